"""Adapters that put aioli_fast's online data mixing into other training stacks.

- :mod:`aioli_fast.integrations.hf`: ``AioliTrainer``, a Hugging Face ``transformers.Trainer`` (and
  accelerate, DDP) whose training data is a prepared corpus mixed online by a mixer (Aioli or any
  registered method); docs/integrations/huggingface.md.
- :mod:`aioli_fast.integrations.lightning`: ``AioliDataModule`` and ``AioliCallback`` for PyTorch
  Lightning; docs/integrations/lightning.md.
- :mod:`aioli_fast.integrations.torchtitan`: a data loader, loss, tokenizer and ``Trainer`` subclass
  for torchtitan 0.3, and ``aioli_config`` to turn a model recipe into an online-mixing one;
  docs/integrations/torchtitan.md.
- :mod:`aioli_fast.integrations.common`: ``OnlineMixing``, the framework-neutral part every adapter
  shares (drawing step batches lazily, feeding the mixer, per-domain evaluation, per-rank state).

Nothing is imported here: each adapter imports its framework itself, so ``import aioli_fast`` never
needs transformers, accelerate, Lightning or torchtitan.
"""
