"""Checkpoints: the one on-disk format (`folder`), its data-parallel shards (`sharded`), and the
`Checkpointer` that decides when a training run saves and what a resume restores.

Inference (`lmforge.inference`) opens a checkpoint with `open_checkpoint` and reads its weights with
`load_weights`; nothing here builds a model or imports training code.
"""

from lmforge.checkpoint.checkpointer import Checkpointer, TrainingState
from lmforge.checkpoint.folder import (
    CHECKPOINTS,
    FILES,
    PREFIX,
    CheckpointInfo,
    VerifiedCheckpoint,
    best_checkpoint,
    has_sharded_state,
    init_model_config,
    list_checkpoints,
    load_config_of,
    load_state,
    load_weights,
    open_checkpoint,
    prune_checkpoints,
    resolve_checkpoint,
    save_checkpoint,
    stored_shapes,
    tokenizer_file_of,
    verify_checkpoint,
)
from lmforge.checkpoint.sharded import TRAIN_STATE

__all__ = [
    "CHECKPOINTS",
    "FILES",
    "PREFIX",
    "TRAIN_STATE",
    "CheckpointInfo",
    "Checkpointer",
    "TrainingState",
    "VerifiedCheckpoint",
    "best_checkpoint",
    "has_sharded_state",
    "init_model_config",
    "list_checkpoints",
    "load_config_of",
    "load_state",
    "load_weights",
    "open_checkpoint",
    "prune_checkpoints",
    "resolve_checkpoint",
    "save_checkpoint",
    "stored_shapes",
    "tokenizer_file_of",
    "verify_checkpoint",
]
