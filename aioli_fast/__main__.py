"""``python -m aioli_fast`` is the ``aioli-fast`` command."""

import sys

from .cli import main

sys.exit(main())
