"""The research harness: the code that produces evidence, not needed to train.

- :mod:`~aioli_fast.harness.sweep`: ``aioli-fast sweep``, methods x seeds on one corpus, tables and plots;
- :mod:`~aioli_fast.harness.corpora`: ``aioli-fast corpus``, real-text corpora collected from the
  installation;
- :mod:`~aioli_fast.harness.demo`: ``aioli-fast demo``, from raw text to stratified vs Aioli in minutes;
- :mod:`~aioli_fast.harness.sim`: the linear-mixing-law simulator that tests and benchmarks drive mixers
  with;
- :mod:`~aioli_fast.harness.sources`: the text collectors the demo and the corpora share;
- :mod:`~aioli_fast.harness.commands`: the three subcommands, which the core CLI finds through the
  ``aioli_fast.commands`` entry-point group (docs/DECISIONS.md).

The core (the rest of ``aioli_fast`` and the kernels) never imports this package (tests/test_layout.py).
Nothing is imported here, so that loading the commands keeps ``aioli-fast`` quick to start.
"""
