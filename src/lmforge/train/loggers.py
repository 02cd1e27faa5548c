"""Where a run's metrics go besides `metrics.jsonl`: TensorBoard event files (`log.tensorboard`) and
Weights & Biases (`log.wandb`). Both are optional packages, imported only when switched on.

The `Monitor` hands each writer the entries it writes to `metrics.jsonl`; every number in them
becomes a scalar, tagged `train/KEY` (per step) or `val/KEY` (per eval: `val/loss`, `val/ppl`,
`val/bpb`). A resumed run continues the same curves without a step twice: TensorBoard purges the
events after the checkpoint it resumed from (`purge_step`); W&B resumes the run whose id is saved
in the folder, and since W&B's history only moves forward, the steps it already holds from the
interrupted session are kept and the resumed session logs from the one after them.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Protocol

from lmforge.config import Config, LogConfig
from lmforge.errors import LmforgeError

WANDB_RUN_FILE = "wandb-run.json"  # {"id": W&B run id, "step": the last step W&B received}
FLUSH_SECS = 10  # TensorBoard: how stale the event files may be (its default, 120 s, is long to watch)


class MetricWriter(Protocol):
    def write(self, entry: dict) -> None:
        """One entry of `metrics.jsonl` (a step's or an eval's)."""

    def close(self) -> None: ...


def scalars(entry: dict) -> dict[str, float]:
    """The numbers of a metrics entry by tag: `loss` -> `train/loss`, `val_loss` -> `val/loss`,
    an eval's `epsilon`/`delta` (DP-SGD) -> `privacy/epsilon`, `privacy/delta`."""

    def tag(key: str) -> str:
        if key.startswith("val_"):
            return f"val/{key[4:]}"
        return f"privacy/{key}" if key in ("epsilon", "delta") else f"train/{key}"

    return {tag(key): float(value) for key, value in entry.items() if key not in ("step", "skipped")}


def require_packages(log: LogConfig) -> None:
    """Stop before training if a writer is switched on but its package is missing."""
    for key, package in (("tensorboard", "tensorboard"), ("wandb", "wandb")):
        if getattr(log, key):
            try:
                importlib.import_module(package)
            except ImportError:
                raise LmforgeError(
                    f"log.{key} = true needs the {package} package: pip install 'lmforge[{key}]'"
                ) from None


def open_writers(config: Config, run_dir: Path, first_step: int) -> list[MetricWriter]:
    """The writers `config.log` switches on, continuing after `first_step` (0: a new run)."""
    writers: list[MetricWriter] = []
    if config.log.tensorboard:
        writers.append(TensorBoardWriter(run_dir, first_step, config_toml=config.to_toml()))
    if config.log.wandb:
        writers.append(WandbWriter(run_dir, first_step, config=config))
    return writers


class TensorBoardWriter:
    """Event files in the run folder, so `tensorboard --logdir runs/` shows each run by its name."""

    def __init__(self, run_dir: Path, first_step: int, *, config_toml: str) -> None:
        require_packages(LogConfig(tensorboard=True))
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: TensorBoard drops what an earlier session logged from this step on
        self.writer = SummaryWriter(str(run_dir), purge_step=first_step + 1, flush_secs=FLUSH_SECS)
        indented = "".join(f"    {line}\n" for line in config_toml.splitlines())  # markdown: code block
        self.writer.add_text("config", indented, first_step)

    def write(self, entry: dict) -> None:
        for tag, value in scalars(entry).items():
            self.writer.add_scalar(tag, value, entry["step"])

    def close(self) -> None:
        self.writer.close()


class WandbWriter:
    """A W&B run named after the run folder, its files under RUN_DIR/wandb/, its config the run's."""

    def __init__(self, run_dir: Path, first_step: int, *, config: Config) -> None:
        require_packages(LogConfig(wandb=True))
        import wandb

        self.state_file = run_dir / WANDB_RUN_FILE
        saved = self._saved_state() if first_step > 0 else None
        self.logged_before = saved["step"] if saved else 0  # steps an earlier session already sent
        self.run = wandb.init(
            project=config.log.wandb_project,
            name=run_dir.name,
            id=saved["id"] if saved else None,  # None: W&B makes one up
            resume="allow",
            dir=str(run_dir),
            config=config.to_dict(),
        )
        self.state = {"id": self.run.id, "step": self.logged_before}
        self._save_state()

    def _saved_state(self) -> dict | None:
        try:
            state = json.loads(self.state_file.read_text())
            return {"id": str(state["id"]), "step": int(state["step"])}
        except (OSError, ValueError, KeyError, TypeError):
            return None  # no W&B run yet (or an unreadable file): start a new one

    def _save_state(self) -> None:
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state) + "\n")
        tmp.replace(self.state_file)

    def write(self, entry: dict) -> None:
        step = entry["step"]
        if step <= self.logged_before:
            return
        self.run.log(scalars(entry), step=step)
        if step > self.state["step"]:
            self.state["step"] = step
            self._save_state()

    def close(self) -> None:
        self.run.finish()
