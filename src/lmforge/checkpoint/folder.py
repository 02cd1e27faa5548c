"""The one checkpoint format: a self-contained folder per step, written atomically.

    RUN/checkpoints/step-0000500/
        model.safetensors   weights (safetensors: no code is unpickled on load)
        state.pt            optimizer, loader, RNG and loop state (torch.load weights_only=True)
        config.toml         the resolved run config (model architecture included)
        tokenizer.json      so the checkpoint alone can encode and decode
        tokenizer_config.json  the chat template (and its bos/eos tokens) that `messages` data was
                            rendered with and `lmforge chat` talks with; absent in older checkpoints
        generation_config.json  the ids that end a completion (`eos_token_id`): an imported model's
                            own; absent in native runs, whose completions end at <|endoftext|>
        meta.json           step, val_loss and the sha256 of every file above
        train_state/        distributed runs only: model and optimizer shards written by DCP
                            (torch.distributed.checkpoint), loadable at any world size; state.pt
                            then holds the loader, RNG and loop state without the optimizer

A checkpoint is assembled in a hidden staging folder and renamed into place (`lmforge.staging`),
so a kill at any moment leaves either the whole new checkpoint or none of it; the sha256 list
catches files truncated or altered afterwards.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model, save_model

from lmforge.checkpoint.sharded import (
    TRAIN_STATE,
    ShardedModel,
    barrier,
    broadcast_from_main,
    check_shards_complete,
    gather_full_weights,
    is_main_process,
    save_shards,
)
from lmforge.config import Config, ModelConfig, load_config
from lmforge.data.chat_template import TOKENIZER_CONFIG, ChatTemplate
from lmforge.data.tokenizer import GENERATION_CONFIG, write_end_ids
from lmforge.errors import LmforgeError
from lmforge.files import file_sha256
from lmforge.run_folder import CHECKPOINTS, PREFIX, CheckpointInfo, checkpoint_path, list_checkpoints
from lmforge.staging import disk_full, remove_stale_staging, staged

FILES = ("model.safetensors", "state.pt", "config.toml", "tokenizer.json")
OPTIONAL_FILES = (TOKENIZER_CONFIG, GENERATION_CONFIG)


class _TokenizerFacts(NamedTuple):
    """What a checkpoint saves beside its weights to read and write text like its model."""

    file: Path  # tokenizer.json
    chat_template: ChatTemplate | None
    end_ids: tuple[int, ...]  # an imported model's eos_token_id; () in a native run: <|endoftext|> ends it


class _Weights:
    """A state dict posing as a module for safetensors' `save_model` (which keeps shared tensors once)."""

    def __init__(self, weights: dict[str, torch.Tensor]) -> None:
        self.weights = weights

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.weights)


def _sharded_files(path: Path) -> list[str]:
    """Relative names of the DCP files of a checkpoint, sorted (none for a single-process one)."""
    folder = path / TRAIN_STATE
    if not folder.is_dir():
        return []
    return sorted(str(f.relative_to(path)) for f in folder.rglob("*") if f.is_file())


def _optional_files(path: Path) -> list[str]:
    """Files a checkpoint may lack (older ones do): covered by the sha256 list when present."""
    return [name for name in OPTIONAL_FILES if (path / name).is_file()]


def has_sharded_state(path: Path) -> bool:
    return (path / TRAIN_STATE).is_dir()


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: torch.nn.Module | None,
    *,
    state: dict[str, Any],
    config: Config,
    tokenizer_file: Path,
    val_loss: float | None,
    sharded: ShardedModel | None = None,
    extra_meta: dict[str, Any] | None = None,
    chat_template: ChatTemplate | None = None,
    end_ids: Sequence[int] = (),
) -> Path:
    """Write checkpoint `step` atomically and return its folder (with `chat_template` and the `end_ids`
    that end a completion, if given; without them a completion ends at <|endoftext|>).

    With `sharded` (a distributed run) every rank calls this: all ranks write their DCP shards
    into rank 0's staging folder and gather the full weights to rank 0, which writes the other
    files and renames the folder into place; the others wait for that before going on.
    A full disk is a one-line error: the staging folder is removed, earlier checkpoints stay whole.
    `extra_meta` adds keys to meta.json (e.g. `privacy`: epsilon and its settings).
    """
    final = checkpoint_path(run_dir, step)
    try:
        tokenizer = _TokenizerFacts(tokenizer_file, chat_template, tuple(end_ids))
        _save_staged(
            final,
            step,
            model,
            state=state,
            config=config,
            tokenizer=tokenizer,
            val_loss=val_loss,
            sharded=sharded,
            extra_meta=extra_meta,
        )
    except BaseException as exc:  # BaseException: DCP reports a rank's failure as a CheckpointException
        if (reason := disk_full(exc)) is None:
            raise
        raise LmforgeError(
            f"{reason} in {final.parent} while writing checkpoint {final.name}; the earlier checkpoints "
            f"are intact (free some space, then continue with --resume)"
        ) from None
    if sharded is not None:
        barrier()  # nobody reads or prunes the checkpoint before it is in place
    return final


def _save_staged(
    final: Path,
    step: int,
    model: torch.nn.Module | None,
    *,
    state: dict[str, Any],
    config: Config,
    tokenizer: _TokenizerFacts,
    val_loss: float | None,
    sharded: ShardedModel | None,
    extra_meta: dict[str, Any] | None,
) -> None:
    main = sharded is None or is_main_process()
    with staged(final, durable=True) if main else contextlib.nullcontext() as staging:
        weights = model
        if sharded is not None:
            staging = broadcast_from_main(staging)
            save_shards(staging / TRAIN_STATE, sharded)
            if main:  # every rank's shard must be in the folder that rank 0 renames into place
                check_shards_complete(staging / TRAIN_STATE)
            weights = _Weights(gather_full_weights(sharded))
        if main:
            _write_files(
                staging,
                step,
                weights,
                state=state,
                config=config,
                tokenizer=tokenizer,
                val_loss=val_loss,
                extra_meta=extra_meta,
            )


def _write_files(
    folder: Path,
    step: int,
    weights: Any,
    *,
    state: dict[str, Any],
    config: Config,
    tokenizer: _TokenizerFacts,
    val_loss: float | None,
    extra_meta: dict[str, Any] | None = None,
) -> None:
    save_model(weights, str(folder / "model.safetensors"))
    with open(folder / "state.pt", "wb") as file:  # a Python file: a full disk raises OSError(ENOSPC)
        torch.save(state, file)
    (folder / "config.toml").write_text(config.to_toml())
    shutil.copyfile(tokenizer.file, folder / "tokenizer.json")
    if tokenizer.chat_template is not None:
        tokenizer.chat_template.save(folder)
    if tokenizer.end_ids:
        write_end_ids(folder, tokenizer.end_ids)
    names = (*FILES, *_optional_files(folder), *_sharded_files(folder))
    sha256 = {name: file_sha256(folder / name) for name in names}
    meta = {"step": step, "val_loss": val_loss, **(extra_meta or {}), "sha256": sha256}
    (folder / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")


def best_checkpoint(checkpoints: list[CheckpointInfo]) -> CheckpointInfo | None:
    scored = [c for c in checkpoints if c.val_loss is not None]
    return min(scored, key=lambda c: (c.val_loss, -c.step)) if scored else None


def prune_checkpoints(run_dir: Path, keep_last: int, newest_step: int | None = None) -> None:
    """Delete all but the newest `keep_last` checkpoints and the best one; clear stale temp folders.

    `newest_step` is that of the newest checkpoint known to verify (the one just saved). Checkpoints
    after it are corrupt ones a resume fell back past: they do not count among the newest, so the
    intact ones before them stay, and they are left for the run to replace when it reaches their step.
    """
    checkpoints = list_checkpoints(run_dir)
    newer = [c for c in checkpoints if newest_step is not None and c.step > newest_step]
    intact = [c for c in checkpoints if c not in newer]
    keep = {c.path for c in (*intact[-keep_last:], *newer)}
    if (best := best_checkpoint(checkpoints)) is not None:
        keep.add(best.path)
    for c in checkpoints:
        if c.path not in keep:
            shutil.rmtree(c.path, ignore_errors=True)
    remove_stale_staging(run_dir / CHECKPOINTS, owned=True)


def resolve_checkpoint(target: Path, which: str = "best") -> Path:
    """A checkpoint folder from a run folder (`best` or `last`) or a checkpoint path."""
    if (target / "meta.json").is_file() and (target / "model.safetensors").exists():
        return target
    if which not in ("best", "last"):
        path = Path(which)
        if not (path / "meta.json").is_file():
            raise LmforgeError(f"{path}: not a checkpoint folder (no meta.json)")
        return path
    checkpoints = list_checkpoints(target)
    if not checkpoints:
        raise LmforgeError(f"{target}: no checkpoint found (expected {target / CHECKPOINTS}/{PREFIX}NNNNNNN)")
    chosen = best_checkpoint(checkpoints) if which == "best" else None
    return (chosen or checkpoints[-1]).path


def tokenizer_file_of(folder: Path) -> Path:
    """The tokenizer.json a folder stands for: its own (a prepared data folder or a checkpoint),
    else that of a run folder's best checkpoint."""
    own = folder / "tokenizer.json"
    return own if own.is_file() else resolve_checkpoint(folder, "best") / "tokenizer.json"


def verify_checkpoint(path: Path) -> dict:
    """Check every file against the sha256 in meta.json; return the meta."""
    try:
        meta = json.loads((path / "meta.json").read_text())
        expected = meta["sha256"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise LmforgeError(f"{path}: corrupted checkpoint (meta.json unreadable: {exc})") from None
    sharded = sorted({*_sharded_files(path), *(n for n in expected if n.startswith(f"{TRAIN_STATE}/"))})
    optional = [n for n in OPTIONAL_FILES if n in expected or (path / n).exists()]
    for name in (*FILES, *optional, *sharded):
        file = path / name
        if not file.is_file():
            raise LmforgeError(f"{path}: corrupted checkpoint ({name} is missing)")
        if file_sha256(file) != expected.get(name):
            raise LmforgeError(
                f"{path}: corrupted checkpoint ({name} does not match its sha256; truncated or altered)"
            )
    return meta


def load_config_of(path: Path) -> Config:
    """The run config saved with a checkpoint."""
    return load_config(path / "config.toml")


def init_model_config(source: Path, config: ModelConfig) -> ModelConfig:
    """The model config of a run started from checkpoint `source` (`train.init_from`): the
    architecture is the checkpoint's, the regularisation (dropout), the head, the attention mask
    (a causal language model fine-tuned into a bidirectional span model) and its word-match input
    stay `config`'s."""
    return dataclasses.replace(
        load_config_of(source).model,
        dropout=config.dropout,
        head=config.head,
        attention=config.attention,
        word_match=config.word_match,
    )


def load_weights(path: Path, model: torch.nn.Module) -> None:
    """Load model.safetensors into `model`, with a clear error when the architecture differs."""
    try:
        missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False)
    except (SafetensorError, RuntimeError) as exc:
        reason = str(exc).splitlines()[0]
        raise LmforgeError(f"{path}: weights do not fit this model ({reason})") from None
    if missing or unexpected:
        raise LmforgeError(
            f"{path}: weights do not fit this model "
            f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})"
        )


def stored_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """The name and shape of every tensor in a checkpoint's model.safetensors, read from its header
    alone: no tensor data is read."""
    try:
        with safe_open(str(path / "model.safetensors"), "pt") as weights:
            return {name: tuple(weights.get_slice(name).get_shape()) for name in weights.keys()}
    except (SafetensorError, OSError) as exc:
        reason = str(exc).splitlines()[0]
        raise LmforgeError(f"{path}: model.safetensors cannot be read ({reason})") from None


def load_state(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path / "state.pt", weights_only=True, map_location="cpu")
    except Exception as exc:  # a damaged pickle can raise nearly anything; none of it is trusted
        raise LmforgeError(f"{path / 'state.pt'}: cannot be loaded ({type(exc).__name__}: {exc})") from None


@dataclass(frozen=True)
class VerifiedCheckpoint:
    """A checkpoint folder whose files match their sha256, and the run config saved in it."""

    path: Path
    step: int
    config: Config

    @property
    def tokenizer_file(self) -> Path:
        return self.path / "tokenizer.json"


def open_checkpoint(target: Path, which: str = "best") -> VerifiedCheckpoint:
    """Checkpoint `which` (best, last, a folder) of `target` (a run folder or a checkpoint folder), its
    files checked against their sha256 and its config read. Nothing is loaded into a model here: that
    is `lmforge.inference`'s, which checks the weights against the config first."""
    if not target.exists():
        raise LmforgeError(f"{target}: no such run or checkpoint folder")
    path = resolve_checkpoint(target, which)
    meta = verify_checkpoint(path)
    return VerifiedCheckpoint(path, int(meta["step"]), load_config_of(path))
