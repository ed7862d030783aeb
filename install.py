"""Set up aioli_fast in the current Python environment.

    python3 install.py          # the package and its dependencies
    python3 install.py --dev    # plus the test and lint tools

If torch is already importable it is used as it is. Otherwise ``torch==2.13.0`` is installed first and
explicitly: a bare ``torch`` requirement can pull a different build with several GB of CUDA packages.
DeepSpeed is built without compiled ops (``DS_BUILD_OPS=0``); its CPU path compiles what it needs on
first use.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

TORCH_PIN = "torch==2.13.0"
ROOT = Path(__file__).resolve().parent


def pip(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", *args]
    print("+", " ".join(cmd), flush=True)
    env = {**os.environ, "DS_BUILD_OPS": os.environ.get("DS_BUILD_OPS", "0")}
    result = subprocess.run(cmd, env=env)
    if result.returncode != 0:
        sys.exit(f"install.py: pip failed (exit {result.returncode}) on: {' '.join(args)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--dev", action="store_true", help="also install the test and lint tools")
    parser.add_argument("--flash", action="store_true", help="also install flash-attn (CUDA only)")
    args = parser.parse_args()
    if sys.version_info < (3, 10):
        sys.exit(f"install.py: aioli_fast needs Python >= 3.10, this is {sys.version.split()[0]}")

    if importlib.util.find_spec("torch") is None:
        pip(TORCH_PIN)
    else:
        print("install.py: using the torch already installed", flush=True)
    extras = [name for name, on in (("dev", args.dev), ("flash", args.flash)) if on]
    target = f"{ROOT}[{','.join(extras)}]" if extras else str(ROOT)
    pip("-e", target)


if __name__ == "__main__":
    main()
