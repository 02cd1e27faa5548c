"""Build a training run: data, model, optimizers, parallelism and restored state, in one object.

Everything here happens once, before the first step, in an order that matters for exact
resume: the seed before the model, a source checkpoint's weights before LoRA, saved weights
before parallelisation, saved optimizer and sampler state after it. The loop (`trainer.py`)
only uses the `Run` this builds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import shutil
import time
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.optim import Optimizer

from lmforge import checkpoint as ckpt
from lmforge import inference
from lmforge.checkpoint import Checkpointer, TrainingState
from lmforge.config import Config, ModelConfig
from lmforge.data.chat_template import ChatTemplate, special_tokens_of
from lmforge.data.loader import PreparedData
from lmforge.data.preference import PreferenceData
from lmforge.data.protocol import TrainingData
from lmforge.data.sft import SFTData
from lmforge.data.tokenizer import check_same_tokenizer, load_tokenizer, read_end_ids
from lmforge.errors import LmforgeError
from lmforge.inference.loss import LMEval, evaluate_lm
from lmforge.model.gpt import GPT
from lmforge.model.heads import HEADS, TASK_LAYERS
from lmforge.model.lora import apply_lora, lower_base_precision
from lmforge.report.metrics import METRICS_FILE
from lmforge.runtime import Peak, autocast, device_peak, resolve_dtype, seed_everything
from lmforge.staging import LOCK_FILE, MARKER, write_marker
from lmforge.train import distributed
from lmforge.train.distributed import Distributed
from lmforge.train.monitor import MetricsLog
from lmforge.train.objective import (
    Objective,
    PreferenceLoss,
    TargetLogits,
    adapters_off,
    evaluate_preferences,
    frozen_reference,
)
from lmforge.train.optim import apply_settings, build_optimizers
from lmforge.train.step import Stepper, StepSettings


@dataclass
class LoopState:
    """The loop's counters, saved in every checkpoint."""

    step: int = 0  # optimizer updates done
    tokens_seen: int = 0  # input tokens of every global batch so far
    flops_done: float = 0.0  # matmul FLOPs of every update so far (the numerator of MFU)
    elapsed_s: float = 0.0  # wall time of the run, earlier sessions of a resumed run included
    best_val_loss: float | None = None  # lowest val loss so far: the `best` checkpoint
    skipped_steps: int = 0  # updates skipped for a non-finite loss (train.on_nan = "skip")


@dataclass
class Run:
    """Everything one training run works with."""

    config: Config
    run_dir: Path
    dist: Distributed
    device: torch.device
    data: TrainingData
    amp: contextlib.AbstractContextManager  # autocast for train.dtype (a no-op in fp32)
    state: TrainingState  # model, wrapped model, optimizers, scaler, sampler, loop counters
    checkpointer: Checkpointer
    stepper: Stepper
    peak: Peak  # the whole job's (one device's times the processes): the denominator of MFU
    clock_start: float  # perf_counter() at which `elapsed()` would have been 0

    @classmethod
    def assemble(
        cls,
        config: Config,
        run_dir: Path,
        *,
        dist: Distributed,
        device: torch.device,
        data: TrainingData,
        amp: contextlib.AbstractContextManager,
        state: TrainingState,
        checkpointer: Checkpointer,
        objective: Objective | None = None,
    ) -> Run:
        stepper = build_stepper(config, state, amp=amp, device=device, dist=dist, objective=objective)
        peak = device_peak(device, config.train.dtype).times(dist.world)  # MFU of the whole job
        clock_start = time.perf_counter() - state.progress.elapsed_s
        run = cls(
            config=config,
            run_dir=run_dir,
            dist=dist,
            device=device,
            data=data,
            amp=amp,
            state=state,
            checkpointer=checkpointer,
            stepper=stepper,
            peak=peak,
            clock_start=clock_start,
        )
        checkpointer.clock = run.elapsed
        return run

    @property
    def progress(self) -> LoopState:
        return self.state.progress

    def elapsed(self) -> float:
        """Seconds of training so far, earlier sessions of a resumed run included."""
        return time.perf_counter() - self.clock_start

    def privacy_report(self) -> dict | None:
        """Epsilon and the settings behind it, for a run with [privacy]; None otherwise."""
        return None if self.state.privacy is None else self.state.privacy.report()

    def evaluate(self) -> LMEval:
        """The val loss; each rank scores a share of the batches and all get the same result (a
        preference objective's: its loss and statistics over the val pairs)."""
        batches = self.data.eval_batches(self.config.model.block_size, self.config.train.eval_batch_size)
        if isinstance(self.stepper.objective, PreferenceLoss):
            return evaluate_preferences(
                self.state.module, self.stepper.objective, batches, device=self.device, autocast=self.amp
            )
        return evaluate_lm(
            self.state.module,
            batches,
            self.device,
            autocast=self.amp,
            bytes_per_token=self.data.bytes_per_token("val"),
            rank=self.dist.rank,
            world=self.dist.world,
        )


def build_run(
    config: Config,
    run_dir: Path,
    *,
    dist: Distributed,
    device: torch.device,
    resume: bool = False,
    overwrite: bool = False,
    config_file: Path | None = None,
) -> Run:
    """Check the inputs, then build (or restore) every object of the run; rank 0 sets up `run_dir`.
    `config` is left as it is; the run's own copy (`Run.config`, saved with the run) is resolved: the
    precision that train.dtype = "auto" chose, train.init_from's architecture, the data's vocabulary."""
    dtype = "fp32" if config.privacy.enabled else config.train.dtype  # validation allows fp32 or auto
    config = with_dtype(config, resolve_dtype(dtype, device))
    t = config.train
    check_batch_split(t.batch_size, dist.world)
    inputs = run_inputs(config, config_file)
    resume_from = Checkpointer.find_resume_point(run_dir, resume=resume, overwrite=overwrite, inputs=inputs)
    init_from = None if resume_from is not None else resolve_init_from(config)
    if init_from is not None:  # the run takes its architecture
        config = dataclasses.replace(config, model=ckpt.init_model_config(init_from, config.model))
    chat_template = run_chat_template(config, source := resume_from or init_from)  # its template, end ids
    data = open_data(config, init_from or resume_from, chat_template)  # the tokenizer of either
    config = with_vocab_size(config, data)
    check_compatible(config, data, init_from=init_from, resume_from=resume_from)
    amp = autocast(device, t.dtype)
    module = build_model(config, init_from, device, resuming=resume_from is not None)
    objective = build_objective(config, module, device)  # before `restore` sets every RNG state
    if isinstance(data, (SFTData, PreferenceData)):  # fine-tuned: its template (maybe the default) is saved
        chat_template = data.chat_template
    checkpointer = Checkpointer(
        run_dir,
        config,
        tokenizer_file=data.tokenizer_file,
        sharded=dist.enabled,
        chat_template=chat_template,
        end_ids=read_end_ids(source) if source is not None else (),  # an imported model's carry over
    )
    optimizers_of = optimizer_builder(config, resume_from)
    if resume_from is not None:
        checkpointer.restore_weights(resume_from, module, build_optimizers=optimizers_of)
    wrapped = distributed.parallelize(
        module, dist, device, dtype=t.dtype, activation_checkpointing=t.activation_checkpointing
    )
    state = new_training_state(config, module, wrapped, data=data, device=device, optimizers_of=optimizers_of)
    dist.barrier()  # every rank has checked the run folder before rank 0 changes it
    checkpointer.restore(state)
    if resume_from is not None:  # the config's lr, weight decay, ... over those the checkpoint saved
        apply_settings(state.optimizers, module, config.optim)
    progress = state.progress
    if progress.flops_done == 0 and progress.tokens_seen > 0:  # a checkpoint from before FLOPs were counted
        progress.flops_done = progress.tokens_seen * module.flops_per_token()
    resumed_at = None if resume_from is None else progress.step
    # a finished run's folder stays as it is
    if dist.is_main and not finished(config, resumed_at, progress.best_val_loss):
        prepare_run_dir(run_dir, config, data.tokenizer_file, resumed_at=resumed_at)
    dist.barrier()
    parts = dict(dist=dist, device=device, data=data, amp=amp, state=state, checkpointer=checkpointer)
    return Run.assemble(config, run_dir, objective=objective, **parts)


def finished(config: Config, resumed_at: int | None, best_val_loss: float | None = None) -> bool:
    """Whether a resumed run has already done train.max_steps (the total, not steps to add) or more,
    or reached train.stop_at_val_loss (its best val loss at or below it: it stopped there)."""
    if resumed_at is None:
        return False
    target = config.train.stop_at_val_loss
    reached = target is not None and best_val_loss is not None and best_val_loss <= target
    return resumed_at >= config.train.max_steps or reached


def optimizer_builder(config: Config, resume_from: Path | None) -> Callable[[nn.Module], list[Optimizer]]:
    """How the run builds its optimizers: with the config's settings, a resumed run's with the
    checkpoint's, as their saved state has their shape (SGD keeps a momentum buffer only with
    momentum; DCP loads into the shape it is given); `apply_settings` then gives them the config's."""
    optim = config.optim if resume_from is None else ckpt.load_config_of(resume_from).optim
    return functools.partial(build_optimizers, config=optim)


def new_training_state(
    config: Config,
    module: nn.Module,
    wrapped: nn.Module,
    *,
    data: TrainingData,
    device: torch.device,
    optimizers_of: Callable[[nn.Module], list[Optimizer]],
) -> TrainingState:
    """The objects a checkpoint saves, as a new run starts them (a resume then restores them); the
    optimizers as `optimizers_of` builds them (`optimizer_builder`)."""
    t = config.train
    optimizers = optimizers_of(module)
    batches, privacy = data.train_batches(config.model.block_size, t.batch_size, seed=t.seed), None
    if config.privacy.enabled:  # per-sample gradients, Poisson batches, noisy updates, an accountant
        wrapped, batches, privacy = privacy_module().make_private(config, module, optimizers, data=data)
    return TrainingState(
        module=module,
        wrapped=wrapped,
        optimizers=optimizers,
        scaler=torch.amp.GradScaler(device.type, enabled=t.dtype == "fp16"),
        batches=batches,
        progress=LoopState(),
        privacy=privacy,
    )


def build_stepper(
    config: Config,
    state: TrainingState,
    *,
    amp: contextlib.AbstractContextManager,
    device: torch.device,
    dist: Distributed,
    objective: Objective | None = None,
) -> Stepper:
    """The run's `Stepper` (a `PrivateStepper` with [privacy]), set as `config` says; `objective`:
    what it minimises (None: the model's own loss)."""
    settings = StepSettings(
        grad_accum_steps=config.train.grad_accum_steps,
        grad_clip=config.optim.grad_clip,
        compile=config.train.compile,
        only_targets=config.data.kind == "sft",
        loss_per_row=HEADS[config.model.head].per_row_loss,
    )
    parts = dict(
        scaler=state.scaler,
        amp=amp,
        device=device,
        settings=settings,
        dist=dist,
        count_flops=state.module.training_flops,
    )
    if state.privacy is None:
        return Stepper(state.wrapped, state.optimizers, objective=objective, **parts)
    return privacy_module().PrivateStepper(state.wrapped, state.optimizers, privacy=state.privacy, **parts)


def build_objective(config: Config, module: nn.Module, device: torch.device) -> Objective | None:
    """train.objective's loss: None for "lm" (the model's own), else a `PreferenceLoss`; dpo's reference
    is the weights the run started from (train.init_from's, on resume too): the LoRA model with its
    adapters off, or a frozen copy loaded from train.init_from."""
    objective = config.train.objective
    if objective == "lm":
        return None
    reference: TargetLogits | None = None
    if objective == "dpo":
        if config.lora.rank > 0:
            reference = adapters_off(module)
        else:
            init_from = resolve_init_from(config)
            reference = frozen_reference(inference.load(init_from, "best", str(device), any_head=True).model)
    return PreferenceLoss(config.preference, reference)


def privacy_module() -> types.ModuleType:
    """`lmforge.train.privacy`, imported only by runs with [privacy]: Opacus is an optional extra."""
    try:
        from lmforge.train import privacy
    except ModuleNotFoundError as exc:
        if exc.name not in ("opacus", "scipy"):
            raise
        raise LmforgeError(f"[privacy] needs Opacus ({exc}); pip install 'lmforge[privacy]'") from None
    return privacy


def check_batch_split(batch_size: int, world: int) -> None:
    if batch_size % world:
        raise LmforgeError(
            f"train.batch_size ({batch_size}) must be divisible by the number of processes "
            f"({world}): each takes an equal share of every micro-batch"
        )


def with_dtype(config: Config, dtype: str) -> Config:
    return dataclasses.replace(config, train=dataclasses.replace(config.train, dtype=dtype))


def resolve_init_from(config: Config) -> Path | None:
    """train.init_from's checkpoint, verified."""
    if not config.train.init_from:
        return None
    init_from = ckpt.resolve_checkpoint(Path(config.train.init_from), "best")
    ckpt.verify_checkpoint(init_from)
    return init_from


def run_chat_template(config: Config, source: Path | None) -> ChatTemplate | None:
    """The run's chat template: data.chat_template's file, else that of the checkpoint the run
    starts from (resumes from), else None: fine-tuning data and `lmforge chat` use the default.
    A file gets the bos and eos tokens of that checkpoint's template (an imported model's own)."""
    if config.data.chat_template:
        default = (
            source / "tokenizer.json" if source is not None else Path(config.data.dir) / "tokenizer.json"
        )
        tokenizer = load_tokenizer(config.data.tokenizer or default)
        specials = special_tokens_of(source) if source is not None else None
        return ChatTemplate.from_file(Path(config.data.chat_template), tokenizer, specials)
    return ChatTemplate.find(source) if source is not None else None


def open_data(
    config: Config, init_from: Path | None = None, chat_template: ChatTemplate | None = None
) -> TrainingData:
    """Open the configured data, checking that it holds more than model.block_size tokens."""
    model = config.model
    if not config.data.dir and not (config.data.kind == "sft" and config.data.hf):
        raise LmforgeError(
            "data.dir is not set (a folder written by `lmforge prepare` or `lmforge tasks prepare`)"
        )
    if config.data.kind == "tokens":
        return _open_tokens(config.data.dir, model.block_size)
    tokenizer = config.data.tokenizer or (str(init_from / "tokenizer.json") if init_from else "")
    if not tokenizer:
        raise LmforgeError(
            "data.tokenizer is not set (fine-tuning data needs a tokenizer.json or train.init_from)"
        )
    if config.train.objective != "lm":  # dpo, simpo: prompt/chosen/rejected pairs
        return PreferenceData(
            Path(config.data.dir),
            Path(tokenizer),
            model.block_size,
            on_bad_line=config.data.on_bad_line,
            chat_template=chat_template,
        )
    return SFTData(
        Path(config.data.dir),
        Path(tokenizer),
        model.block_size,
        on_bad_line=config.data.on_bad_line,
        chat_template=chat_template,
        head=model.head,
        data=config.data,
    )


def with_vocab_size(config: Config, data: TrainingData) -> Config:
    """`config` with model.vocab_size the data's when it is unset; refused when smaller than the data's."""
    vocab_size = config.model.vocab_size
    if vocab_size is None:
        return dataclasses.replace(
            config, model=dataclasses.replace(config.model, vocab_size=data.vocab_size)
        )
    if vocab_size < data.vocab_size:
        raise LmforgeError(
            f"model.vocab_size {vocab_size} is smaller than the data's vocabulary "
            f"({data.vocab_size}, tokenizer {data.tokenizer_file})"
        )
    return config


def _open_tokens(directory: str, block_size: int) -> PreparedData:
    data = PreparedData.open(directory)
    if block_size >= len(data.train):
        raise LmforgeError(
            f"model.block_size {block_size} is larger than the train split ({len(data.train)} tokens)"
        )
    data.check_evaluable()  # before training, not at its first eval
    return data


def check_compatible(
    config: Config, data: TrainingData, *, init_from: Path | None, resume_from: Path | None
) -> None:
    """The data's tokenizer is the source checkpoint's; a resumed run keeps its architecture."""
    if init_from is not None:
        source = f"train.init_from {init_from}"
        check_same_tokenizer(data.dir, data.tokenizer_file, init_from / "tokenizer.json", source=source)
    if resume_from is not None:
        saved = ckpt.load_config_of(resume_from)
        check_same_architecture(saved.model, config.model, resume_from)
        check_kept_settings(saved, config, resume_from)
        source = f"checkpoint {resume_from}"
        check_same_tokenizer(data.dir, data.tokenizer_file, resume_from / "tokenizer.json", source=source)


# Settings a resumed run keeps, each with what a checkpoint of another value is: the saved optimizer
# state (moments, groups) is optim.name's; the loss is train.objective's and, for dpo, also that of
# its reference, train.init_from's weights. Another value would silently change the run midway.
KEPT_ON_RESUME = {"optim.name": "another optimizer", "train.objective": "another objective"}
KEPT_ON_DPO_RESUME = {"train.init_from": "another DPO reference model"}


def check_kept_settings(saved: Config, config: Config, resume_from: Path) -> None:
    """Refuse a resume whose config changes a setting of `KEPT_ON_RESUME` (or `KEPT_ON_DPO_RESUME`)."""
    kept = KEPT_ON_RESUME | (KEPT_ON_DPO_RESUME if config.train.objective == "dpo" else {})
    for key, other in kept.items():
        section, name = key.split(".")
        old, new = getattr(getattr(saved, section), name), getattr(getattr(config, section), name)
        if old != new:
            raise LmforgeError(
                f"{resume_from}: checkpoint of {other} "
                f"({key}: {old!r} in the checkpoint, {new!r} in the config)"
            )


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


def build_model(
    config: Config, init_from: Path | None, device: torch.device, *, resuming: bool = False
) -> nn.Module:
    """The seeded model, with train.init_from's weights and LoRA adapters when configured. A resumed
    run's weights come from its checkpoint, but a low-precision LoRA base is quantized from
    train.init_from's weights again (the checkpoint holds it dequantized, `lora.FrozenLinear`)."""
    if config.train.deterministic != torch.are_deterministic_algorithms_enabled():  # imports dynamo: ~1 s
        torch.use_deterministic_algorithms(config.train.deterministic)
    if resuming and config.lora.rank > 0 and config.lora.base_dtype != "fp32":
        init_from = resolve_init_from(config)
    seed_everything(config.train.seed)  # the same on every rank: identical initial weights and batches
    module: nn.Module = GPT(config.model).to(device)
    if init_from is not None:  # through the inference loader, so a LoRA source arrives merged
        source = inference.load(init_from, "best", str(device), any_head=True).model.state_dict()
        # model.head and model.word_match are the run's own: a new span head or word-match vector
        # starts as built, an unused one is left behind
        own, run_owns = module.state_dict(), tuple(f"{layer}." for layer in TASK_LAYERS)
        module.load_state_dict(
            {k: v for k, v in source.items() if k in own or not k.startswith(run_owns)}
            | {k: v for k, v in own.items() if k.startswith(run_owns) and k not in source}
        )
    if config.lora.rank > 0:
        # a resume quantizes these source weights again, as here: quantizing is deterministic
        module = lower_base_precision(apply_lora(module, config.lora), config.lora.base_dtype)
    return module


def prepare_run_dir(run_dir: Path, config: Config, tokenizer_file: Path, *, resumed_at: int | None) -> None:
    """A resumed run's log is cut back to its checkpoint; a new run empties the folder that
    `check_out` allowed it to replace (all but this process's lock), marks it first, so a kill
    midway leaves a folder that --overwrite may still replace. Either way the folder holds the
    marker, the config and the tokenizer."""
    if resumed_at is None:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_marker(run_dir, "run")
        for entry in run_dir.iterdir():
            if entry.name in (LOCK_FILE, MARKER):
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    else:
        MetricsLog.truncate(run_dir / METRICS_FILE, resumed_at)
        if not (run_dir / MARKER).exists():  # a run from before markers: marked from now on
            write_marker(run_dir, "run")
    (run_dir / "config.toml").write_text(config.to_toml())
    shutil.copyfile(tokenizer_file, run_dir / "tokenizer.json")


def run_inputs(config: Config, config_file: Path | None) -> list[Path]:
    """What the run reads and its folder must therefore never contain: the config file, the data,
    the tokenizer and the checkpoint it starts from."""
    named = [config.data.dir, config.data.tokenizer, config.data.chat_template, config.train.init_from]
    return [Path(path) for path in named if path] + ([config_file] if config_file else [])
