"""The training loop: data → forward → loss → backward → optimizer update, with exact resume.

One loop serves pretraining and fine-tuning, in one process or data-parallel under torchrun
(`parallel.strategy`; see `distributed.py`). Everything a resumed run needs to continue
bit-identically is in the checkpoint: weights, optimizer moments, grad scaler, the data
sampler's generator, every RNG state and the loop counters.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import torch
from tqdm import tqdm

from lmforge import checkpoint as ckpt
from lmforge.config import Config, ModelConfig
from lmforge.data.loader import PreparedData, RandomWindows
from lmforge.data.sft import ExampleBatches, SFTData
from lmforge.data.tokenizer import check_same_tokenizer
from lmforge.errors import LmforgeError, TrainingInterrupted
from lmforge.eval.lm import LMEval, evaluate_lm
from lmforge.model.gpt import GPT
from lmforge.model.lora import apply_lora
from lmforge.runtime import autocast, matmul_peak_flops, rng_state, seed_everything, set_rng_state
from lmforge.train import distributed
from lmforge.train.distributed import Distributed
from lmforge.train.optim import build_optimizers, set_lr_factor
from lmforge.train.schedule import lr_factor

MAX_CONSECUTIVE_SKIPS = 10


@dataclass
class LoopState:
    step: int = 0  # optimizer updates done
    tokens_seen: int = 0
    elapsed_s: float = 0.0
    best_val_loss: float | None = None
    skipped_steps: int = 0


@dataclass(frozen=True)
class TrainSummary:
    steps: int
    elapsed_s: float
    tokens_per_s: float
    mfu: float
    final_eval: LMEval | None
    checkpoint: Path


class MetricsLog:
    """`metrics.jsonl`: one JSON object per step and per eval, flushed as written (None: write nothing,
    as on every rank but 0)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.file = open(path, "a", encoding="utf-8") if path is not None else None

    def write(self, entry: dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps(entry) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()

    @staticmethod
    def truncate(path: Path, step: int) -> None:
        """Drop entries after `step` (and a torn last line), so a resumed run continues the log exactly."""
        if not path.is_file():
            return
        kept = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line + "\n")
            except (ValueError, KeyError, TypeError):
                break
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        tmp.replace(path)


class StopSignals:
    """Turn the first SIGINT/SIGTERM into a flag checked between steps; a second one interrupts."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signum

    def __enter__(self) -> StopSignals:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Stepper:
    """One optimizer update: forward and backward over the micro-batches, unscale, clip, step.

    Split in two so the loop can inspect the loss and grad norm before deciding to apply
    the update; benchmarks call it as it is, so they time the real training step. In a
    data-parallel run each rank takes its share of every micro-batch and gradients are
    synchronised on the last one only; the loss and norm returned are those of the global batch.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizers: list[torch.optim.Optimizer],
        scaler: torch.amp.GradScaler,
        amp: contextlib.AbstractContextManager,
        device: torch.device,
        grad_accum_steps: int,
        grad_clip: float,
        compile: bool = False,
        dist: Distributed | None = None,
        only_targets: bool = False,
    ) -> None:
        self.model, self.optimizers, self.scaler, self.amp, self.device = (
            model,
            optimizers,
            scaler,
            amp,
            device,
        )
        self.only_targets = only_targets  # masked (fine-tuning) targets: run the head only where they count
        self.forward = torch.compile(model) if compile else model
        self.grad_accum_steps = grad_accum_steps
        self.max_grad_norm = grad_clip or math.inf  # inf: measure the norm, never clip
        self.dist = dist or Distributed()

    def gradients(self, batches: RandomWindows | ExampleBatches) -> tuple[float, float, int]:
        """Accumulate gradients; return (mean loss, global grad norm before clipping,
        input tokens of all ranks)."""
        loss_sum = torch.zeros((), device=self.device)
        tokens = 0
        for micro in range(self.grad_accum_steps):
            x, y = next(batches)
            tokens += x.numel()  # padded fine-tuning batches vary in length
            x, y, share = self.dist.shard(x, y)
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            with self.dist.gradient_sync(self.model, micro == self.grad_accum_steps - 1):
                with self.amp:
                    _, loss = self.forward(x, y, only_targets=self.only_targets)
                if share != 1.0:  # this rank's part of the global mean (see Distributed.shard)
                    loss = loss * share
                self.scaler.scale(loss / self.grad_accum_steps).backward()
            loss_sum += loss.detach()
        for optimizer in self.optimizers:
            self.scaler.unscale_(optimizer)
        grad_norm = distributed.clip_grad_norm(self.model.parameters(), self.max_grad_norm)
        return self.dist.mean(loss_sum).item() / self.grad_accum_steps, grad_norm.item(), tokens

    def update(self, apply: bool = True) -> None:
        """Step the optimizers (unless told to skip this batch) and clear the gradients."""
        if apply:
            for optimizer in self.optimizers:
                self.scaler.step(optimizer)
        self.scaler.update()
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)


def open_data(config: Config, init_from: Path | None = None) -> PreparedData | SFTData:
    """Open the configured data and reconcile the model's vocabulary and block size with it."""
    model = config.model
    if not config.data.dir:
        raise LmforgeError(
            "data.dir is not set (a folder written by `lmforge prepare` or `lmforge tasks prepare`)"
        )
    if config.data.kind == "sft":
        tokenizer = config.data.tokenizer or (str(init_from / "tokenizer.json") if init_from else "")
        if not tokenizer:
            raise LmforgeError(
                "data.tokenizer is not set (fine-tuning data needs a tokenizer.json or train.init_from)"
            )
        data: PreparedData | SFTData = SFTData(
            Path(config.data.dir), Path(tokenizer), model.block_size, config.data.on_bad_line
        )
    else:
        data = PreparedData.open(config.data.dir)
        if model.block_size >= len(data.train):
            raise LmforgeError(
                f"model.block_size {model.block_size} is larger than the train split "
                f"({len(data.train)} tokens)"
            )
        if len(data.val) < 2:
            raise LmforgeError(f"{data.dir}: the val split needs at least 2 tokens to evaluate")
    if model.vocab_size is None:
        model.vocab_size = data.vocab_size
    elif model.vocab_size < data.vocab_size:
        raise LmforgeError(
            f"model.vocab_size {model.vocab_size} is smaller than the data's vocabulary "
            f"({data.vocab_size}, tokenizer {data.tokenizer_file})"
        )
    return data


def check_same_architecture(saved: ModelConfig, wanted: ModelConfig, where: Path) -> None:
    ignore = {"dropout"}  # regularisation, not architecture: may change on resume
    a, b = dataclasses.asdict(saved), dataclasses.asdict(wanted)
    diffs = [
        f"model.{k}: {a[k]!r} in the checkpoint, {b[k]!r} in the config"
        for k in a
        if k not in ignore and a[k] != b[k]
    ]
    if diffs:
        raise LmforgeError(f"{where}: checkpoint of another architecture ({'; '.join(diffs)})")


def _check_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> Path | None:
    """Return the checkpoint to resume from; refuse to clobber an existing run."""
    if resume and overwrite:
        raise LmforgeError("--resume and --overwrite exclude each other")
    if resume:
        checkpoints = ckpt.list_checkpoints(run_dir)
        if not checkpoints:
            raise LmforgeError(f"--resume: no checkpoint in {run_dir / ckpt.CHECKPOINTS}")
        latest = checkpoints[-1].path
        ckpt.verify_checkpoint(latest)
        return latest
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())) and not overwrite:
        raise LmforgeError(
            f"{run_dir} exists; pass --resume to continue that run or --overwrite to start over"
        )
    return None


def train(config: Config, run_dir: Path | str, resume: bool = False, overwrite: bool = False) -> TrainSummary:
    """Train per `config` into `run_dir`; see the module docstring for what is saved.

    Under torchrun with parallel.strategy ddp or fsdp every process calls this; rank 0 alone
    writes the run folder (but for its share of a checkpoint's DCP shards).
    """
    with distributed.process_group(config.parallel.strategy, config.train.device) as (dist, device):
        return _train(config, Path(run_dir), resume, overwrite, dist, device)


def _train(
    config: Config, run_dir: Path, resume: bool, overwrite: bool, dist: Distributed, device: torch.device
) -> TrainSummary:
    start_wall = time.perf_counter()
    if config.train.batch_size % dist.world:
        raise LmforgeError(
            f"train.batch_size ({config.train.batch_size}) must be divisible by the number of processes "
            f"({dist.world}): each takes an equal share of every micro-batch"
        )
    resume_from = _check_run_dir(run_dir, resume, overwrite)
    init_from = None
    if config.train.init_from and resume_from is None:
        init_from = ckpt.resolve_checkpoint(Path(config.train.init_from), "best")
        ckpt.verify_checkpoint(init_from)
        config.model = ckpt.init_model_config(init_from, config.model)
    data = open_data(config, init_from)
    if init_from is not None:
        check_same_tokenizer(
            data.dir, data.tokenizer_file, init_from / "tokenizer.json", f"train.init_from {init_from}"
        )
    if resume_from is not None:
        saved = ckpt.load_config_of(resume_from)
        check_same_architecture(saved.model, config.model, resume_from)
        check_same_tokenizer(
            data.dir, data.tokenizer_file, resume_from / "tokenizer.json", f"checkpoint {resume_from}"
        )

    t = config.train
    amp = autocast(device, t.dtype)
    if (
        t.deterministic != torch.are_deterministic_algorithms_enabled()
    ):  # the call imports torch._dynamo: ~1 s
        torch.use_deterministic_algorithms(t.deterministic)
    seed_everything(t.seed)  # the same on every rank: identical initial weights, identical batches drawn
    module: torch.nn.Module = GPT(config.model).to(device)
    if init_from is not None:  # through the inference loader, so a LoRA source arrives merged
        module.load_state_dict(ckpt.load_for_inference(init_from, "best", device).model.state_dict())
    if config.lora.rank > 0:
        module = apply_lora(module, config.lora)
    saved_state: dict | None = None
    full_optimizer_state = None
    if resume_from is not None:
        ckpt.load_weights(resume_from, module)  # full weights, before any sharding
        saved_state = ckpt.load_state(resume_from)
        if "optimizers" not in saved_state and not ckpt.has_sharded_state(resume_from):
            raise LmforgeError(
                f"{resume_from}: has no training state to resume (an imported checkpoint?); "
                f'start a new run with train.init_from = "{resume_from}"'
            )
        if "optimizers" in saved_state and dist.enabled:
            # A single-process checkpoint resumed in parallel: name its moments by parameter
            # so they can be sharded.
            plain = build_optimizers(module, config.optim)
            _load_optimizer_states(plain, saved_state["optimizers"])
            full_optimizer_state = distributed.full_optimizer_state(module, plain)
            del plain
    # `model` runs forward and backward (DDP wraps `module`; FSDP2 shards it in place); `module` is the
    # model itself, for evaluation, FLOP counts and the optimizers' parameter groups.
    model = distributed.parallelize(module, dist, device, t.dtype, t.activation_checkpointing)
    optimizers = build_optimizers(module, config.optim)
    scaler = torch.amp.GradScaler(device.type, enabled=t.dtype == "fp16")
    batches = data.train_batches(config.model.block_size, t.batch_size, seed=t.seed)
    state = LoopState()

    dist.barrier()  # every rank has checked the run folder before rank 0 changes it
    if saved_state is not None:
        if ckpt.has_sharded_state(resume_from):
            distributed.load_sharded(resume_from / ckpt.TRAIN_STATE, model, optimizers)
        elif full_optimizer_state is not None:
            distributed.set_full_optimizer_state(model, optimizers, full_optimizer_state)
        else:
            _load_optimizer_states(optimizers, saved_state["optimizers"])
        scaler.load_state_dict(saved_state["scaler"])
        batches.load_state_dict(saved_state["batches"])
        set_rng_state(saved_state["rng"])
        state = LoopState(**saved_state["loop"])
        if dist.is_main:
            MetricsLog.truncate(run_dir / "metrics.jsonl", state.step)
    elif dist.is_main and run_dir.is_dir():  # --overwrite (checked above): start afresh
        shutil.rmtree(run_dir)
    elif dist.is_main and run_dir.exists():
        run_dir.unlink()
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.toml").write_text(config.to_toml())
        shutil.copyfile(data.tokenizer_file, run_dir / "tokenizer.json")
    dist.barrier()

    stepper = Stepper(
        model,
        optimizers,
        scaler,
        amp,
        device,
        t.grad_accum_steps,
        config.optim.grad_clip,
        t.compile,
        dist,
        only_targets=config.data.kind == "sft",
    )
    peak_flops = matmul_peak_flops(device, t.dtype) * dist.world  # MFU of the whole job
    bytes_per_token = data.bytes_per_token("val")
    max_steps = t.max_steps
    last_eval: LMEval | None = None
    last_eval_step = last_saved_step = -1
    latest_checkpoint = resume_from
    consecutive_skips = 0
    metrics = MetricsLog(run_dir / "metrics.jsonl" if dist.is_main else None)
    wall_offset = state.elapsed_s - (time.perf_counter() - start_wall)

    def evaluate() -> LMEval:  # each rank scores a share of the batches; the result is the same on all
        return evaluate_lm(
            module,
            data.eval_batches(config.model.block_size, t.eval_batch_size),
            device,
            amp,
            bytes_per_token,
            rank=dist.rank,
            world=dist.world,
        )

    def save(val_loss: float | None) -> Path:
        state.elapsed_s = time.perf_counter() - start_wall + wall_offset
        training_state = {
            # distributed: the optimizer state goes, sharded, into the checkpoint's DCP folder
            **({} if dist.enabled else {"optimizers": [o.state_dict() for o in optimizers]}),
            "scaler": scaler.state_dict(),
            "batches": batches.state_dict(),
            "rng": rng_state(),
            "loop": dataclasses.asdict(state),
        }
        sharded = distributed.ShardedCheckpoint(dist, model, module, optimizers) if dist.enabled else None
        path = ckpt.save_checkpoint(
            run_dir, state.step, module, training_state, config, data.tokenizer_file, val_loss, sharded
        )
        if dist.is_main:
            ckpt.prune_checkpoints(run_dir, t.keep_checkpoints)
        return path

    bar = tqdm(
        total=max_steps,
        initial=state.step,
        unit="step",
        disable=not config.log.progress or not dist.is_main,
        dynamic_ncols=True,
    )
    say = bar.write if dist.is_main else (lambda text: None)
    model.train()
    try:
        with StopSignals() as stop:
            while state.step < max_steps:
                step_start = time.perf_counter()
                factor = lr_factor(state.step, config.schedule, max_steps, config.optim.lr)
                set_lr_factor(optimizers, factor)
                loss_value, grad_norm_value, step_tokens = stepper.gradients(batches)
                finite = math.isfinite(loss_value) and (math.isfinite(grad_norm_value) or scaler.is_enabled())
                if not finite:
                    if t.on_nan == "stop":
                        where = (
                            f"; the last good checkpoint is {latest_checkpoint}" if latest_checkpoint else ""
                        )
                        raise LmforgeError(
                            f"loss is {loss_value} (grad norm {grad_norm_value}) at step {state.step + 1}; "
                            f'stopped without saving{where} (set train.on_nan = "skip" to skip such batches)'
                        )
                    consecutive_skips += 1
                    if consecutive_skips > MAX_CONSECUTIVE_SKIPS:
                        raise LmforgeError(
                            f"{consecutive_skips} non-finite losses in a row up to step {state.step + 1}; "
                            "stopping"
                        )
                    state.skipped_steps += 1
                else:
                    consecutive_skips = 0
                stepper.update(apply=finite)
                state.step += 1
                state.tokens_seen += step_tokens
                step_seconds = time.perf_counter() - step_start
                entry = {
                    "step": state.step,
                    "loss": loss_value,
                    "lr": config.optim.lr * factor,
                    "grad_norm": grad_norm_value,
                    "tokens_per_s": step_tokens / step_seconds,
                    "mfu": module.flops_per_token() * step_tokens / step_seconds / peak_flops,
                    "elapsed_s": time.perf_counter() - start_wall + wall_offset,
                }
                if not finite:
                    entry["skipped"] = True
                metrics.write(entry)
                bar.update(1)
                if state.step % config.log.interval == 0 or state.step == max_steps:
                    bar.set_postfix(
                        loss=f"{loss_value:.4f}",
                        tok_s=f"{entry['tokens_per_s']:,.0f}",
                        mfu=f"{entry['mfu']:.0%}",
                    )

                val_loss = None
                if (t.eval_interval and state.step % t.eval_interval == 0) or state.step == max_steps:
                    last_eval, last_eval_step = evaluate(), state.step
                    val_loss = last_eval.loss
                    metrics.write({"step": state.step, **_eval_entry(last_eval)})
                    say(
                        f"step {state.step}: val loss {last_eval.loss:.4f}, ppl {last_eval.ppl:.2f}"
                        + (f", {last_eval.bpb:.3f} bpb" if last_eval.bpb else "")
                    )
                improved = val_loss is not None and (
                    state.best_val_loss is None or val_loss < state.best_val_loss
                )
                if improved:
                    state.best_val_loss = val_loss
                reached = (
                    val_loss is not None and t.stop_at_val_loss is not None and val_loss <= t.stop_at_val_loss
                )
                periodic = t.checkpoint_interval and state.step % t.checkpoint_interval == 0
                if periodic or improved or reached or state.step == max_steps:
                    latest_checkpoint, last_saved_step = save(val_loss), state.step
                if reached:
                    say(f"step {state.step}: val loss {val_loss:.4f} <= train.stop_at_val_loss; stopping")
                    break
                if dist.any(stop.received is not None):  # all ranks stop at the same step
                    if last_saved_step != state.step:
                        latest_checkpoint, last_saved_step = save(None), state.step
                    raise TrainingInterrupted(stop.received or signal.SIGTERM, state.step, latest_checkpoint)
    finally:
        bar.close()
        metrics.close()

    if last_eval_step != state.step:  # a resumed run that had already finished
        last_eval = evaluate()
    if last_saved_step != state.step and latest_checkpoint is None:
        latest_checkpoint = save(last_eval.loss)
    elapsed = time.perf_counter() - start_wall + wall_offset
    tokens_per_s = state.tokens_seen / max(elapsed, 1e-9)
    return TrainSummary(
        steps=state.step,
        elapsed_s=elapsed,
        tokens_per_s=tokens_per_s,
        mfu=tokens_per_s * module.flops_per_token() / peak_flops,
        final_eval=last_eval,
        checkpoint=latest_checkpoint,
    )


def _load_optimizer_states(optimizers: list[torch.optim.Optimizer], states: list[dict]) -> None:
    for optimizer, optimizer_state in zip(optimizers, states, strict=True):
        optimizer.load_state_dict(optimizer_state)


def _eval_entry(result: LMEval) -> dict:
    entry = {"val_loss": result.loss, "val_ppl": result.ppl}
    if result.bpb is not None:
        entry["val_bpb"] = result.bpb
    return entry
