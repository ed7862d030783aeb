"""Training: the run (one process or DeepSpeed ZeRO), per-domain evaluation and checkpoints."""

from .checkpoint import load_checkpoint, save_checkpoint
from .evaluate import evaluate, evaluate_checkpoint, format_table
from .loop import RunResult, TrainingError
from .trainer import TrainingInterrupted, train

__all__ = [
    "RunResult",
    "TrainingError",
    "TrainingInterrupted",
    "evaluate",
    "evaluate_checkpoint",
    "format_table",
    "load_checkpoint",
    "save_checkpoint",
    "train",
]
