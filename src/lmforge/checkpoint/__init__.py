"""Checkpoints: the one on-disk format (`folder`), its data-parallel shards (`sharded`), and the
`Checkpointer` that decides when a training run saves and what a resume restores.

Inference (`sample`, `eval`, `export`) needs only `load_for_inference`; nothing here imports
training code.
"""

from lmforge.checkpoint.checkpointer import Checkpointer, TrainingState
from lmforge.checkpoint.folder import (
    CHECKPOINTS,
    FILES,
    PREFIX,
    CheckpointInfo,
    LoadedCheckpoint,
    best_checkpoint,
    has_sharded_state,
    init_model_config,
    list_checkpoints,
    load_config_of,
    load_for_inference,
    load_state,
    load_weights,
    prune_checkpoints,
    resolve_checkpoint,
    save_checkpoint,
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
    "LoadedCheckpoint",
    "TrainingState",
    "best_checkpoint",
    "has_sharded_state",
    "init_model_config",
    "list_checkpoints",
    "load_config_of",
    "load_for_inference",
    "load_state",
    "load_weights",
    "prune_checkpoints",
    "resolve_checkpoint",
    "save_checkpoint",
    "tokenizer_file_of",
    "verify_checkpoint",
]
