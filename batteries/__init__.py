"""batteries: small, independent helpers for plain PyTorch training loops."""

from batteries.checkpoint import (
    average_checkpoints,
    average_model_state_dicts,
    load_checkpoint,
    make_checkpoint,
    save_checkpoint,
    wait_for_saves,
)
from batteries.data import make_loader
from batteries.device import t2d
from batteries.early_stop import EarlyStopIndicator
from batteries.ema import EMA
from batteries.log import get_logger
from batteries.manager import CheckpointManager
from batteries.meter import AverageMeter, AverageMetter
from batteries.model import unwrap_model
from batteries.preemption import StopOnSignal
from batteries.resume import find_resume_checkpoint, make_training_state, restore_training_state
from batteries.seed import get_rng_state, seed_all, set_rng_state
from batteries.tensorboard import TensorboardLogger

__version__ = "0.1.0"

__all__ = [
    "AverageMeter",
    "AverageMetter",
    "CheckpointManager",
    "EMA",
    "EarlyStopIndicator",
    "StopOnSignal",
    "TensorboardLogger",
    "average_checkpoints",
    "average_model_state_dicts",
    "find_resume_checkpoint",
    "get_logger",
    "get_rng_state",
    "load_checkpoint",
    "make_checkpoint",
    "make_loader",
    "make_training_state",
    "restore_training_state",
    "save_checkpoint",
    "seed_all",
    "set_rng_state",
    "t2d",
    "unwrap_model",
    "wait_for_saves",
]
