"""Checkpoints of a data-parallel run: model and optimizer shards through DCP.

Every rank writes its shard of the model and optimizer state with `torch.distributed.checkpoint`
into a checkpoint's `train_state/`, which any world size can load (DCP reshards), and rank 0
also writes the gathered full weights as the usual `model.safetensors`, so `sample`, `eval`
and `export` read a distributed run's checkpoint like any other.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lmforge.errors import LmforgeError

TRAIN_STATE = "train_state"  # the DCP folder inside a checkpoint


@dataclass(frozen=True)
class ShardedModel:
    """What a distributed save needs: the wrapped model, the model itself, and its optimizers."""

    wrapped: nn.Module  # DDP / FSDP2: what DCP's state-dict helpers understand
    module: nn.Module  # the plain GPT (or its peft wrapper): parameter names and tied weights
    optimizers: list[torch.optim.Optimizer]


def is_main_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def broadcast_from_main(obj: Any) -> Any:
    """Rank 0's `obj` on every rank (a folder chosen by rank 0, for instance)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_shards(folder: Path, sharded: ShardedModel) -> None:
    """Every rank writes its shard of model and optimizer state into `folder` (collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(sharded.wrapped, sharded.optimizers)
    dcp.save({"model": model_state, "optimizers": optimizer_state}, checkpoint_id=folder)


def check_shards_complete(folder: Path) -> None:
    """Every shard file that the DCP metadata in `folder` names is there, whole (called by rank 0).

    On several machines without a shared file system each rank writes its shard to its own disk:
    the checkpoint would verify, but could not be resumed. Better to stop the run loudly.
    """
    from lmforge.checkpoint.safe_dcp import read_metadata

    ends: dict[str, int] = {}  # file -> the end of its last item
    for info in read_metadata(folder).storage_data.values():
        ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    for name, end in sorted(ends.items()):
        size = (folder / name).stat().st_size if (folder / name).is_file() else None
        if size is None or size < end:
            what = "missing" if size is None else f"short ({size} of {end} bytes)"
            raise LmforgeError(
                f"{folder}: the DCP shard {name} is {what}; "
                f"on several machines the run folder must be on a shared file system"
            )


def load_shards(folder: Path, model: nn.Module, optimizers: list[torch.optim.Optimizer]) -> None:
    """Model and optimizer state from a DCP folder, resharded to this job (or one plain process).

    Nothing in the folder is trusted: no code is unpickled (see `safe_dcp`).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from lmforge.checkpoint.safe_dcp import (
        RefusedItem,
        SafeFileSystemReader,
        SafeLoadPlanner,
        first_line,
        read_metadata,
        root_error,
    )

    read_metadata(folder)  # a crafted or damaged .metadata: one clear line on every rank, before DCP
    model_state, optimizer_state = get_state_dict(model, optimizers)
    state = {"model": model_state, "optimizers": optimizer_state}
    try:
        with warnings.catch_warnings():  # without a process group DCP loads in this one process, as intended
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, storage_reader=SafeFileSystemReader(folder), planner=SafeLoadPlanner())
    except (Exception, CheckpointException) as exc:  # DCP reports a damaged or foreign folder in many ways
        if isinstance(cause := root_error(exc), RefusedItem):
            raise LmforgeError(f"{folder}: {cause}") from None
        raise LmforgeError(f"{folder}: cannot load the sharded training state ({first_line(exc)})") from None
    set_state_dict(model, optimizers, model_state_dict=state["model"], optim_state_dict=state["optimizers"])


def gather_full_weights(sharded: ShardedModel) -> dict[str, torch.Tensor]:
    """The whole model's weights on rank 0 (an empty dict elsewhere), tied weights shared again."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(sharded.wrapped, options=options)
    for name, tensor in weights.items():
        # a gathered tensor may be a view into a larger buffer (a dim split unevenly over the ranks is
        # padded): safetensors refuses to save a tensor that does not cover its storage
        if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
            weights[name] = tensor.clone()
    if weights:  # gathering copies a tied weight once per name; safetensors stores shared tensors once
        names: dict[int, list[str]] = {}
        for name, param in sharded.module.named_parameters(remove_duplicate=False):
            names.setdefault(id(param), []).append(name.replace("_checkpoint_wrapped_module.", ""))
        for first, *aliases in names.values():
            for alias in aliases:
                weights[alias] = weights[first]
    return weights


def full_optimizer_state(module: nn.Module, optimizers: list[torch.optim.Optimizer]) -> dict:
    """Optimizer state keyed by parameter name with full tensors: what a single-process checkpoint
    holds, in the form `set_full_optimizer_state` can shard onto a parallelized model."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(module, optimizers, options=StateDictOptions(full_state_dict=True))


def set_full_optimizer_state(model: nn.Module, optimizers: list[torch.optim.Optimizer], state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizers, state, options=StateDictOptions(full_state_dict=True))
