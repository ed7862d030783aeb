"""Training: the loop, per-domain evaluation and checkpoints."""

from .checkpoint import load_checkpoint, save_checkpoint
from .evaluate import evaluate, evaluate_checkpoint, format_table
from .loop import RunResult, TrainingError, train

__all__ = [
    "RunResult",
    "TrainingError",
    "evaluate",
    "evaluate_checkpoint",
    "format_table",
    "load_checkpoint",
    "save_checkpoint",
    "train",
]
