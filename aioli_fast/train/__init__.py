"""Training: the run (one process or DeepSpeed ZeRO), per-domain evaluation and checkpoints.

Where things are: ``trainer`` (the run and its loop: one optimizer step at a time, the mixer run around
it by :class:`aioli_fast.driver.MixingDriver`), ``components`` (what a config asks for: model, mixer,
learning rate, held-out splits), ``engine`` (plain PyTorch or DeepSpeed), ``stats`` (the per-domain loss
window), ``resume`` (run directories and what to resume), ``checkpoint``, ``evaluate`` (a saved
checkpoint; the evaluation itself is :mod:`aioli_fast.evaluation`, shared with the adapters),
``logger``, ``skills`` (Skill-it's graph).
"""

from .checkpoint import load_checkpoint, save_checkpoint
from .components import RunResult, TrainingError, build_run_mixer
from .evaluate import evaluate, evaluate_checkpoint, format_table
from .trainer import TrainingInterrupted, train

__all__ = [
    "RunResult",
    "TrainingError",
    "TrainingInterrupted",
    "build_run_mixer",
    "evaluate",
    "evaluate_checkpoint",
    "format_table",
    "load_checkpoint",
    "save_checkpoint",
    "train",
]
