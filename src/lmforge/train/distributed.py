"""Data parallelism on PyTorch's own engine: torchrun processes, DDP or FSDP2, gradient clipping.

Parallelism is applied from outside the model (as in torchtitan): `parallelize` wraps the
plain `GPT` with activation checkpointing per block and then DDP, or FSDP2's `fully_shard`
per block and on the root. The training loop stays the one loop of `trainer.py`; it asks a
`Distributed` for its share of each batch, for gradient sync on the last micro-batch only,
and for cross-rank means of what it logs. Checkpoints of such a run (DCP shards) are the
checkpoint package's business (`lmforge.checkpoint.sharded`).

Global batch: every rank draws the same micro-batch of `train.batch_size` sequences from
the same seeded sampler and keeps its own `batch_size / world` rows, so the optimizer sees
`batch_size x grad_accum_steps` sequences at any world size, the shares are disjoint and
deterministic, and the sampler state in a checkpoint is the same on every rank (a run
resumes at another world size exactly where it stopped).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import inspect
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from lmforge.errors import LmforgeError, TrainingInterrupted
from lmforge.runtime import resolve_device
from lmforge.targets import IGNORE_INDEX


def launched_by_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


@dataclass
class Distributed:
    """This process's place in the job, and the few collectives the training loop needs."""

    strategy: str = "none"
    rank: int = 0
    world: int = 1
    owns_group: bool = False  # we created the process group, so we destroy it

    @property
    def enabled(self) -> bool:
        return self.strategy != "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(
        self, batch: tuple[torch.Tensor, ...], *, per_row: bool = False
    ) -> tuple[tuple[torch.Tensor, ...], float]:
        """This rank's rows of a global micro-batch (x, y, and a packed batch's documents), and the
        factor that turns its mean loss into its part of the global mean (x world, as gradients are
        averaged over ranks).

        The factor is (this rank's scored targets x world) / (all scored targets): exactly 1 for
        token windows; padded fine-tuning batches score different numbers of tokens per row. A
        loss that is a mean `per_row` (a span head's) weighs every rank's equal share of rows alike.
        """
        if self.world == 1:
            return batch, 1.0
        y = batch[1]
        rows = y.size(0) // self.world
        mine = slice(self.rank * rows, (self.rank + 1) * rows)
        shard = tuple(t[mine] for t in batch)
        if per_row:
            return shard, 1.0
        scored, total = int((y[mine] != IGNORE_INDEX).sum()), int((y != IGNORE_INDEX).sum())
        return shard, scored * self.world / max(total, 1)

    @contextlib.contextmanager
    def gradient_sync(self, model: nn.Module, enabled: bool) -> Iterator[None]:
        """All-reduce gradients only on the last micro-batch of an accumulation."""
        if self.strategy == "ddp" and not enabled:
            with model.no_sync():
                yield
            return
        if self.strategy == "fsdp":
            model.set_requires_gradient_sync(enabled)
        yield

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """Mean over ranks of a per-rank scalar (identical on every rank afterwards)."""
        if self.world > 1:
            value = value.clone()
            dist.all_reduce(value)  # a sum: gloo has no AVG
            value /= self.world
        return value

    def any(self, flag: bool) -> bool:
        """True on every rank if it is true on any: ranks must agree when to stop and save."""
        if self.world == 1:
            return flag
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
        value = torch.tensor(float(flag), device=device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


@contextlib.contextmanager
def process_group(
    strategy: str, device_name: str, timeout_s: float
) -> Iterator[tuple[Distributed, torch.device]]:
    """Join the torchrun job (or make a one-process group without torchrun) and pick the device.

    Backend NCCL on CUDA, gloo on CPU; under torchrun each process takes `cuda:LOCAL_RANK`.
    A collective that waits more than `timeout_s` for another process fails (parallel.timeout_s).
    Strategy "none" under a multi-process torchrun is refused: every process would train
    the whole model on the whole batch and write the same run folder.
    """
    world_env = int(os.environ.get("WORLD_SIZE", "1"))
    if strategy == "none":
        if world_env > 1:
            raise LmforgeError(
                f'started as {world_env} processes (torchrun) but parallel.strategy is "none"; '
                f'set parallel.strategy = "ddp" or "fsdp"'
            )
        yield Distributed(), resolve_device(device_name)
        return
    device = resolve_device(device_name)
    if device.type not in ("cpu", "cuda"):
        raise LmforgeError(
            f"parallel.strategy {strategy} needs train.device cpu or cuda; got {device_name!r}"
        )
    if device.type == "cuda" and device.index is None:  # set_device and DDP's device_ids need an index
        device = torch.device("cuda", torch.cuda.current_device())
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    owns = not dist.is_initialized()
    if owns and launched_by_torchrun():
        if device.type == "cuda":
            local_rank = int(os.environ.get("LOCAL_RANK", "0"))
            if local_rank >= torch.cuda.device_count():
                raise LmforgeError(
                    f"LOCAL_RANK {local_rank} but this machine has {torch.cuda.device_count()} "
                    f"CUDA device(s); pass torchrun --nproc-per-node <= that"
                )
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None, timeout=timeout)
    elif owns:  # not launched by torchrun: a group of one, so the same code path runs at world size 1
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    state = Distributed(strategy, rank=dist.get_rank(), world=dist.get_world_size(), owns_group=owns)
    try:
        yield state, device
    except BaseException as error:
        # Another rank may be waiting in a collective: leave the group to die with the process
        # (the CLI exits at once, and torchrun stops the other ranks). A group of one is safe to
        # close, and so is any group after a signal stop, which every rank agreed on.
        if owns and (state.world == 1 or isinstance(error, TrainingInterrupted)):
            dist.destroy_process_group()
        raise
    if owns:
        dist.destroy_process_group()


def gpt_of(model: nn.Module) -> nn.Module:
    """The lmforge GPT inside `model` (itself, or under a peft/DDP wrapper)."""
    from lmforge.model.gpt import GPT

    return next(m for m in model.modules() if isinstance(m, GPT))


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute every block's activations during backward instead of keeping them (non-reentrant,
    so RNG state such as dropout masks is replayed and gradients are unchanged).

    The wrapper's state-dict hooks drop its `_checkpoint_wrapped_module.` prefix, so checkpoints
    keep the plain parameter names.
    """
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

    blocks = gpt_of(model).blocks
    for i, block in enumerate(blocks):
        blocks[i] = checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT)


def parallelize(
    model: nn.Module,
    dist_state: Distributed,
    device: torch.device,
    *,
    dtype: str,
    activation_checkpointing: bool,
) -> nn.Module:
    """Activation checkpointing, then DDP or FSDP2; returns the module to run forward/backward on.

    FSDP2 shards each block as its own unit (gathered just before it runs, freed after) and the
    root for the embeddings, final norm and head; with bf16 it computes in bf16 and reduces
    gradients in fp32. Every rank built the same initial weights from the same seed.
    """
    check_same_model(model, dist_state, dtype=dtype)
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    if dist_state.strategy == "ddp":
        # Buffers are rotary tables derived from the config: no need to broadcast them every forward
        # (`forward_sync_buffers` replaces `broadcast_buffers` in recent PyTorch).
        ddp = nn.parallel.DistributedDataParallel
        no_sync = (
            "forward_sync_buffers"
            if "forward_sync_buffers" in inspect.signature(ddp).parameters
            else "broadcast_buffers"
        )
        return ddp(model, device_ids=[device.index] if device.type == "cuda" else None, **{no_sync: False})
    if dist_state.strategy == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(device.type, (dist_state.world,))
        policy = (
            MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            if dtype == "bf16"
            else MixedPrecisionPolicy()
        )
        for block in gpt_of(model).blocks:
            fully_shard(block, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def check_same_model(model: nn.Module, dist_state: Distributed, *, dtype: str) -> None:
    """Refuse, on every rank, a job whose processes built different models: another config or data
    on one machine (a vocabulary of another size, ...). DDP would stop that rank with a traceback,
    and FSDP's first all-gather of mismatched sizes would abort it without a word."""
    if dist_state.world == 1:
        return
    facts = {f"model.{key}": value for key, value in dataclasses.asdict(gpt_of(model).config).items()}
    facts["train.dtype"] = dtype
    facts["trainable parameters"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    everyone: list[dict | None] = [None] * dist_state.world
    dist.all_gather_object(everyone, facts)
    first = everyone[0]
    for rank, theirs in enumerate(everyone[1:], start=1):
        for key, value in first.items():
            if theirs.get(key) != value:
                raise LmforgeError(
                    f"the processes built different models: {key} is {theirs.get(key)!r} on rank {rank}, "
                    f"{value!r} on rank 0; every process must read the same config and data"
                )


def clip_grad_norm(parameters: Iterator[nn.Parameter], max_norm: float) -> torch.Tensor:
    """`clip_grad_norm_` that also takes FSDP2's sharded (DTensor) gradients: the norm is global."""
    from torch.distributed.tensor import DTensor

    params = [p for p in parameters if p.grad is not None]
    total = torch.nn.utils.get_total_norm([p.grad for p in params])
    if isinstance(total, DTensor):  # a partial norm per shard: reduce it across ranks
        total = total.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total
