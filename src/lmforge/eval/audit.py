"""`lmforge audit`: how much of its training data a checkpoint gives away.

Three measurements, each on the run's prepared data (or `--data`):

- **Canary exposure** (Carlini et al. 2019, "The Secret Sharer"): for each canary that `lmforge
  prepare --canaries` inserted, its log-perplexity (summed loss of its tokens after a line break)
  is ranked among that of `alternatives` random secrets of the same format. Exposure is
  log2|R| - log2(rank), |R| = 10**digits. Two estimates: *sampled* puts the rank at
  |R| * (1 + alternatives with a lower loss) / (alternatives + 1), so it is at most
  log2(alternatives + 1); *normal fit* is the paper's extrapolation with a normal distribution (the
  paper fits a skew-normal) fitted to the alternatives' log-perplexities: -log2 P(X <= canary's),
  at most log2|R|. A never-inserted canary has an expected exposure of about 1.4 bits.
- **Verbatim memorisation**: the share of `prefixes` random windows of the train split whose greedy
  continuation of `prefix_tokens` tokens reproduces the next `k` tokens exactly, beside the same
  share for the val split. Both lengths default to what fits the model's block size.
- **Membership inference by loss**: the ROC AUC of "lower loss means member" separating `sequences`
  member lines from as many held-out lines, both picked at random from the training text by
  `lmforge prepare --holdout-lines` (membership.json; 0.5: no signal). Members and non-members are
  drawn alike, so the AUC measures membership; train windows against val windows would also measure
  how the val split differs (a split by position holds out other text).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lmforge.data.canaries import CANARIES_FILE, CanarySet, load_canaries
from lmforge.data.loader import PreparedData
from lmforge.data.membership import MEMBERSHIP_FILE, MembershipLines, load_membership
from lmforge.data.tokenizer import check_same_tokenizer
from lmforge.errors import LmforgeError
from lmforge.inference import ModelSource
from lmforge.inference.generate import generate

DEFAULT_PREFIX_TOKENS = 64  # memorisation's prefix, where the block size allows
DEFAULT_K = 32  # and the continuation it must reproduce: at most half the block size


@dataclass(frozen=True)
class AuditOptions:
    """How much of each measurement to run; the defaults take seconds for a small model on a CPU."""

    alternatives: int = 10_000  # random secrets each canary is ranked among
    prefixes: int = 256  # windows per split for verbatim memorisation
    prefix_tokens: int | None = None  # None: DEFAULT_PREFIX_TOKENS, or what fits beside k
    k: int | None = None  # tokens a greedy continuation must reproduce; None: what fits (fitted)
    sequences: int = 512  # member and held-out lines each, for membership inference
    batch_size: int = 64
    seed: int = 0

    def fitted(self, block_size: int) -> AuditOptions:
        """These options with the memorisation lengths that were not given filled in to fit
        `block_size`; given ones that cannot fit are refused."""
        prefix, k = self.prefix_tokens, self.k
        if block_size < 2:
            raise LmforgeError(f"the model's block_size {block_size} leaves no room for a prefix and --k")
        if prefix is not None and k is not None and prefix + k > block_size:
            raise LmforgeError(
                f"--prefix-tokens {prefix} + --k {k} is more than the model's block_size {block_size}"
            )
        for value, flag, other in ((prefix, "--prefix-tokens", "--k"), (k, "--k", "--prefix-tokens")):
            if value is not None and value >= block_size:
                raise LmforgeError(
                    f"{flag} {value} leaves no room for {other} in the model's block_size {block_size}"
                )
        if k is None:
            k = min(DEFAULT_K, block_size // 2, block_size - (prefix or 0))
        if prefix is None:
            prefix = min(DEFAULT_PREFIX_TOKENS, block_size - k)
        return replace(self, prefix_tokens=prefix, k=k)


@dataclass(frozen=True)
class CanaryExposure:
    secret: str
    repeats: int
    log_perplexity: float  # summed loss of the canary's tokens, in nats
    exposure_sampled: float
    exposure_fit: float


@dataclass(frozen=True)
class Memorisation:
    prefixes: int
    prefix_tokens: int
    k: int
    train_exact: float  # share of train prefixes whose continuation reproduces all k tokens
    val_exact: float
    train_token_match: float  # share of the k tokens reproduced, position by position
    val_token_match: float


@dataclass(frozen=True)
class Membership:
    lines: int  # member lines, and as many held-out ones
    auc: float
    member_loss: float  # mean per-token loss of the member lines
    held_out_loss: float


def roc_auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties counted half: the Mann-Whitney U over
    n_pos x n_neg, from the average ranks of all scores."""
    scores = np.concatenate([positive, negative]).astype(np.float64)
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    average_rank = first + (counts + 1) / 2.0  # 1-based rank shared by each group of ties
    ranks = np.empty_like(scores)
    ranks[order] = np.repeat(average_rank, counts)
    n_pos, n_neg = len(positive), len(negative)
    return float((ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def exposure_from_sample(loss: float, alternatives: np.ndarray) -> float:
    """log2(|alternatives| + 1) - log2(1 + alternatives with a lower loss): the sampled estimate."""
    below = int(np.searchsorted(np.sort(alternatives), loss, side="left"))
    return math.log2(len(alternatives) + 1) - math.log2(below + 1)


def exposure_from_fit(loss: float, alternatives: np.ndarray, space: int) -> float:
    """-log2 P(X <= loss) for X normal with the alternatives' mean and deviation, capped at log2(space)."""
    mean, std = float(alternatives.mean()), float(alternatives.std()) or 1e-12
    cdf = 0.5 * math.erfc(-(loss - mean) / (std * math.sqrt(2.0)))
    return min(-math.log2(cdf) if cdf > 0 else math.inf, math.log2(space))


@torch.no_grad()
def sequence_losses(
    model: torch.nn.Module, rows: list[list[int]], score_from: int, *, device: torch.device, batch_size: int
) -> np.ndarray:
    """Per row, the summed loss (nats) of its tokens from position `score_from` on, each predicted from
    those before it. Rows may differ in length (they are padded; padding is not scored)."""
    sums = []
    for i in range(0, len(rows), batch_size):
        batch = rows[i : i + batch_size]
        width = max(map(len, batch))
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        scored = torch.zeros((len(batch), width - 1), dtype=torch.bool)
        for r, row in enumerate(batch):
            ids[r, : len(row)] = torch.tensor(row)
            scored[r, score_from - 1 : len(row) - 1] = True
        ids, scored = ids.to(device), scored.to(device)
        logits, _ = model(ids[:, :-1])
        nll = F.cross_entropy(logits.float().transpose(1, 2), ids[:, 1:], reduction="none")
        sums.append((nll * scored).sum(dim=1).double().cpu())
    return torch.cat(sums).numpy()


def canary_exposures(
    model: torch.nn.Module, tokenizer, canaries: CanarySet, *, options: AuditOptions, device: torch.device
) -> list[CanaryExposure]:
    """Each canary's exposure among `options.alternatives` random secrets of its format."""
    probe = "\n" + canaries.text("0123456789")  # every character a secret of the format may hold
    if tokenizer.decode(tokenizer.encode(probe, add_special_tokens=False).ids) != probe:
        shown = canaries.text("D" * canaries.digits)
        raise LmforgeError(f"the model's tokenizer cannot represent the canaries' text \"{shown}\"")
    rng = np.random.default_rng([options.seed, 1])
    space = 10**canaries.digits
    secrets = [f"{int(n):0{canaries.digits}d}" for n in rng.integers(0, space, size=options.alternatives)]
    secrets += [c.secret for c in canaries.canaries]
    # Canaries stand on a line of their own: each is scored after a line break.
    rows = [tokenizer.encode("\n" + canaries.text(s), add_special_tokens=False).ids for s in secrets]
    if max(map(len, rows)) > model.config.block_size + 1:
        raise LmforgeError(f"a canary is longer than the model's block_size ({model.config.block_size})")
    losses = sequence_losses(model, rows, 1, device=device, batch_size=options.batch_size)
    alternatives = losses[: options.alternatives]
    return [
        CanaryExposure(
            c.secret,
            c.repeats,
            float(loss),
            exposure_from_sample(loss, alternatives),
            exposure_from_fit(loss, alternatives, space),
        )
        for c, loss in zip(canaries.canaries, losses[options.alternatives :])
    ]


def _windows(tokens: np.ndarray, count: int, length: int, *, rng: np.random.Generator) -> np.ndarray:
    """`count` random windows of `length` tokens, int64 [count, length]."""
    starts = rng.integers(0, len(tokens) - length + 1, size=count)
    return np.stack([np.asarray(tokens[s : s + length], dtype=np.int64) for s in starts])


@torch.no_grad()
def _greedy_matches(
    model: torch.nn.Module, windows: np.ndarray, prefix_tokens: int, *, batch_size: int, device: torch.device
) -> np.ndarray:
    """bool [N, k]: where the greedy continuation of each window's prefix equals its next tokens."""
    matches = []
    for i in range(0, len(windows), batch_size):
        batch = torch.from_numpy(windows[i : i + batch_size]).to(device)
        prompt, target = batch[:, :prefix_tokens], batch[:, prefix_tokens:]
        produced = torch.stack(list(generate(model, prompt, target.size(1), temperature=0.0)), dim=1)
        matches.append((produced == target).cpu())
    return torch.cat(matches).numpy()


def memorisation(
    model: torch.nn.Module, data: PreparedData, options: AuditOptions, *, device: torch.device
) -> Memorisation:
    """Share of train and val prefixes whose greedy continuation reproduces the next k tokens."""
    rng = np.random.default_rng([options.seed, 2])
    length = options.prefix_tokens + options.k
    result = {}
    for split, tokens in (("train", data.train), ("val", data.val)):
        windows = _windows(tokens, options.prefixes, length, rng=rng)
        match = _greedy_matches(
            model, windows, options.prefix_tokens, batch_size=options.batch_size, device=device
        )
        result[split] = (float(match.all(axis=1).mean()), float(match.mean()))
    (train_exact, train_tokens), (val_exact, val_tokens) = result["train"], result["val"]
    return Memorisation(
        prefixes=options.prefixes,
        prefix_tokens=options.prefix_tokens,
        k=options.k,
        train_exact=train_exact,
        val_exact=val_exact,
        train_token_match=train_tokens,
        val_token_match=val_tokens,
    )


def membership(
    model: torch.nn.Module,
    tokenizer,
    lines: MembershipLines,
    *,
    options: AuditOptions,
    device: torch.device,
) -> Membership:
    """AUC of the per-token loss separating member lines from held-out lines, `options.sequences`
    of each (or as many as there are) drawn at random. Each line is scored after a line break, as it
    stands in the text; a line longer than the block keeps its first block_size tokens."""
    rng = np.random.default_rng([options.seed, 3])
    count = min(options.sequences, len(lines.members), len(lines.held_out))
    block_size = model.config.block_size
    losses = {}
    for side, texts in (("members", lines.members), ("held_out", lines.held_out)):
        chosen = [texts[i] for i in sorted(rng.choice(len(texts), size=count, replace=False))]
        encoded = tokenizer.encode_batch(["\n" + text for text in chosen], add_special_tokens=False)
        rows = [e.ids[: block_size + 1] for e in encoded]
        scored = np.array([len(row) - 1 for row in rows], dtype=np.float64)
        losses[side] = sequence_losses(model, rows, 1, device=device, batch_size=options.batch_size) / scored
    auc = roc_auc(-losses["members"], -losses["held_out"])  # lower loss scores higher as a member
    return Membership(count, auc, float(losses["members"].mean()), float(losses["held_out"].mean()))


@dataclass(frozen=True)
class AuditReport:
    """The three measurements of one checkpoint, as a table or as JSON."""

    checkpoint: Path
    step: int
    data_dir: Path
    options: AuditOptions
    canary_format: str | None  # e.g. "my PIN is D D D D D D"; None without canaries.json
    space: int | None  # |R|, the number of secrets of that format
    canaries: list[CanaryExposure] | None
    memorisation: Memorisation
    membership: Membership | None  # None without membership.json

    def exposure_by_repeats(self) -> list[dict]:
        """Mean (and range of the normal-fit) exposure of the canaries inserted R times, per R."""
        rows = []
        for repeats in sorted({c.repeats for c in self.canaries or []}):
            group = [c for c in self.canaries if c.repeats == repeats]
            fit = [c.exposure_fit for c in group]
            rows.append(
                {
                    "repeats": repeats,
                    "canaries": len(group),
                    "exposure_sampled": float(np.mean([c.exposure_sampled for c in group])),
                    "exposure_fit": float(np.mean(fit)),
                    "exposure_fit_min": min(fit),
                    "exposure_fit_max": max(fit),
                }
            )
        return rows

    def as_dict(self) -> dict:
        exposure = None
        if self.canaries is not None:
            exposure = {
                "format": self.canary_format,
                "space": self.space,
                "alternatives": self.options.alternatives,
                "by_repeats": self.exposure_by_repeats(),
                "canaries": [asdict(c) for c in self.canaries],
            }
        return {
            "checkpoint": str(self.checkpoint),
            "step": self.step,
            "data": str(self.data_dir),
            "exposure": exposure,
            "memorisation": asdict(self.memorisation),
            "membership": None if self.membership is None else asdict(self.membership),
        }

    def json_line(self) -> str:
        return json.dumps(self.as_dict())

    def text(self) -> str:
        lines = [f"audit of {self.checkpoint} (step {self.step}) on {self.data_dir}", ""]
        lines += self._exposure_lines()
        m = self.memorisation
        lines += [
            f"verbatim memorisation: greedy continuation of {m.prefixes:,} random {m.prefix_tokens}-token "
            f"prefixes reproduces the next {m.k} tokens",
            f"  {'split':<8}{'exact':>10}{'tokens':>10}",
            f"  {'train':<8}{m.train_exact:>10.2%}{m.train_token_match:>10.2%}",
            f"  {'val':<8}{m.val_exact:>10.2%}{m.val_token_match:>10.2%}",
            "",
            *self._membership_lines(),
        ]
        return "\n".join(lines)

    def _membership_lines(self) -> list[str]:
        b = self.membership
        if b is None:
            where = f"{MEMBERSHIP_FILE} in {self.data_dir}"
            return [f"membership inference: no {where} (prepare with --holdout-lines N)"]
        return [
            f"membership inference by loss: {b.lines:,} lines trained on vs {b.lines:,} held out, "
            "picked alike",
            f"  AUC {b.auc:.4f} (0.5: no signal); mean loss members {b.member_loss:.4f}, "
            f"held out {b.held_out_loss:.4f}",
        ]

    def _exposure_lines(self) -> list[str]:
        if self.canaries is None:
            return [f"canary exposure: no {CANARIES_FILE} in {self.data_dir} (prepare with --canaries)", ""]
        alternatives = self.options.alternatives
        lines = [
            f'canary exposure: "{self.canary_format}", |R| = {self.space:,}, ranked among {alternatives:,} '
            f"random secrets (sampled: at most {math.log2(alternatives + 1):.1f} bits; normal fit: at most "
            f"{math.log2(self.space):.1f})",
            f"  {'repeats':>7}{'canaries':>10}{'sampled':>10}{'fit':>8}{'fit range':>16}",
        ]
        for row in self.exposure_by_repeats():
            lines.append(
                f"  {row['repeats']:>7}{row['canaries']:>10}{row['exposure_sampled']:>10.2f}"
                f"{row['exposure_fit']:>8.2f}"
                f"{row['exposure_fit_min']:>8.2f} - {row['exposure_fit_max']:.2f}"
            )
        return [*lines, ""]


def check_data(options: AuditOptions, data: PreparedData) -> None:
    """A one-line error when a split is too short for the memorisation windows of fitted `options`."""
    shortest = min(len(data.train), len(data.val))
    if shortest <= options.prefix_tokens + options.k:
        raise LmforgeError(f"{data.dir}: a split of {shortest:,} tokens is too short for these windows")


def read_controls(
    data_dir: Path, canaries_file: Path | None
) -> tuple[CanarySet | None, MembershipLines | None]:
    """What `prepare` planted for the audit: the canaries (DATA/canaries.json or `canaries_file`) and
    the member and held-out lines (DATA/membership.json), each None when absent."""
    canaries_file = canaries_file or data_dir / CANARIES_FILE
    if canaries_file != data_dir / CANARIES_FILE and not canaries_file.is_file():
        raise LmforgeError(f"{canaries_file}: no such canaries file")
    canaries = load_canaries(canaries_file) if canaries_file.is_file() else None
    lines = load_membership(data_dir / MEMBERSHIP_FILE) if (data_dir / MEMBERSHIP_FILE).is_file() else None
    return canaries, lines


def audit_checkpoint(
    source: ModelSource,
    data: Path | None,
    canaries_file: Path | None,
    *,
    options: AuditOptions,
) -> AuditReport:
    """Load the checkpoint of `source` and measure exposure, memorisation and membership on
    `data` (default: the run's data.dir), its canaries.json (or `canaries_file`) and membership.json."""
    session = source.load()
    if not (data or session.config.data.dir):
        raise LmforgeError("--data is required: the checkpoint's config has no data.dir")
    data_dir = Path(data or session.config.data.dir)
    prepared = PreparedData.open(data_dir)
    check_same_tokenizer(
        data_dir, prepared.tokenizer_file, session.tokenizer_file, source=f"checkpoint {session.checkpoint}"
    )
    options = options.fitted(session.config.model.block_size)
    check_data(options, prepared)
    canaries, lines = read_controls(data_dir, canaries_file)
    model, tokenizer, device = session.model, session.tokenizer, session.device
    with session.autocast():
        exposures = None
        if canaries is not None:
            exposures = canary_exposures(model, tokenizer, canaries, options=options, device=device)
        memorised = memorisation(model, prepared, options, device=device)
        members = (
            None if lines is None else membership(model, tokenizer, lines, options=options, device=device)
        )
    fmt = None if canaries is None else canaries.text("D" * canaries.digits)
    space = None if canaries is None else 10**canaries.digits
    return AuditReport(
        checkpoint=session.checkpoint,
        step=session.step,
        data_dir=data_dir,
        options=options,
        canary_format=fmt,
        space=space,
        canaries=exposures,
        memorisation=memorised,
        membership=members,
    )
