"""The one typed configuration tree of a run, loaded from TOML with dotted overrides.

Every section is a dataclass; the field types drive validation, so a key added here is
automatically accepted in TOML and by `--set section.key=value`, with one-line errors for
unknown keys, wrong types and impossible values. Sections are frozen: a config never changes
once loaded and validated, and code that needs other values makes a copy (`dataclasses.replace`).
"""

from __future__ import annotations

import dataclasses
import math
import sys
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import tomli_w

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from lmforge.errors import LmforgeError

# Seeds are in [0, SEED_LIMIT): np.random.seed's range, which torch's and Python's generators take too.
SEED_LIMIT = 2**32

# Precision names, everywhere (config, CLI options); `runtime.DTYPES` maps them to torch dtypes.
Dtype = Literal["fp32", "bf16", "fp16"]
DTYPE_NAMES: tuple[str, ...] = typing.get_args(Dtype)
# train.dtype also takes "auto", which the trainer resolves per device (`runtime.resolve_dtype`).
TrainDtype = Literal["auto", "fp32", "bf16", "fp16"]
WANDB_PROJECT_FORBIDDEN = "/\\#?%:"  # characters W&B refuses in a project name


# The shapes of fine-tuning records that data.format names; "auto" detects each record's from its keys.
SFTFormat = Literal["auto", "prompt_completion", "messages", "alpaca", "sharegpt"]


@dataclass(frozen=True)
class ColumnsConfig:
    """[data.columns]: which columns (or JSON keys) of fine-tuning data hold what; "": the format's own."""

    prompt: str = ""  # the prompt's column (default "prompt")
    completion: str = ""  # the completion's column (default "completion")
    messages: str = ""  # a column of chat messages, {role, content} or ShareGPT's {from, value}


@dataclass(frozen=True)
class DataConfig:
    """[data]: what to train on."""

    # tokens: a folder written by `lmforge prepare`. sft: a folder with train.* (and val.*) files of
    # .jsonl, .json, .csv, .tsv or .parquet, or a single such file
    dir: str = ""
    kind: Literal["tokens", "sft"] = "tokens"  # tokens: pretraining shards; sft: examples, prompt masked
    tokenizer: str = ""  # sft: a tokenizer.json (default: train.init_from's)
    on_bad_line: Literal["error", "skip"] = "error"  # sft: a malformed record fails, or is skipped
    # a Jinja chat template file (renders `messages` data; saved with the checkpoints for `lmforge chat`
    # and `export`); "": the one of the checkpoint the run starts from, else lmforge's default
    chat_template: str = ""
    # sft: the shape of the records: prompt_completion, messages (OpenAI), alpaca (instruction, input,
    # output: rendered with Alpaca's prompt), sharegpt (conversations of from/value); auto: by their keys
    format: SFTFormat = "auto"
    columns: ColumnsConfig = field(default_factory=ColumnsConfig)  # [data.columns]: sft column mapping
    hf: str = ""  # sft: a Hugging Face dataset (hub id "org/name" or a local folder) instead of data.dir
    hf_split: str = "train"  # sft: the split of data.hf trained on
    hf_config: str = ""  # sft: the configuration (subset) of data.hf; "": its default
    hf_val_split: str = ""  # sft: a split of data.hf to validate on; "": carved from train
    # sft: share of the train examples held out for validation when no val file (or split) is given
    val_fraction: float = 0.1
    val_seed: int = 0  # sft: seed of the choice of those examples (independent of train.seed)
    # sft: fill each block with several examples; attention stays within an example and positions
    # restart at each, so every example's loss is the unpacked one's
    pack: bool = False


@dataclass(frozen=True)
class ModelConfig:
    """[model]: the architecture, GPT-2's by default."""

    n_layer: int = 4  # Transformer blocks
    n_head: int = 4  # query heads; d_model must be divisible by it
    n_kv_head: int | None = None  # < n_head for GQA, 1 for MQA; None means n_head
    d_model: int = 128  # width of the residual stream and of the embeddings
    head_dim: int | None = None  # channels of each attention head; None: d_model / n_head (Qwen3/Gemma: more)
    block_size: int = 64  # context length in tokens: the longest sequence the model takes
    vocab_size: int | None = None  # None: taken from the prepared data
    position: Literal["learned", "rope"] = "learned"  # learned embeddings (GPT-2) or rotary (Llama)
    rope_theta: float = 10000.0  # rope: base of the rotation frequencies
    # rope: how the frequencies are scaled for a longer context, as Hugging Face's rope_type: none (plain
    # RoPE), linear (every frequency / rope_factor), dynamic (NTK-aware, which changes nothing up to
    # block_size) or llama3 (Llama 3.1's: long wavelengths / rope_factor, short ones kept, a blend between)
    rope_scaling: Literal["none", "linear", "dynamic", "llama3"] = "none"
    rope_factor: float = 1.0  # linear, dynamic, llama3: the scaling factor
    rope_low_freq_factor: float = 1.0  # llama3: wavelengths above rope_original_context / this are scaled
    rope_high_freq_factor: float = 4.0  # llama3: wavelengths below rope_original_context / this are kept
    rope_original_context: int | None = None  # llama3: the context of pretraining before the scaling
    # rope: base of the sliding-window layers, which then take plain RoPE (rope_scaling applies to the
    # layers that use rope_theta); None: rope_theta everywhere
    rope_local_theta: float | None = None
    # of every block and before the head; rmsnorm1p: RMSNorm scaling by (1 + weight), computed in fp32
    # whatever the activations' dtype, its weight starting at 0 (Gemma)
    norm: Literal["layernorm", "rmsnorm", "rmsnorm1p"] = "layernorm"
    norm_eps: float = 1e-5  # added to the variance in every norm, for stability
    # gelu_tanh: GPT-2's approximation; geglu: gelu_tanh(gate) x up, gated as swiglu is (Gemma)
    mlp: Literal["gelu", "gelu_tanh", "swiglu", "geglu", "relu2"] = "gelu"
    # None: 4 * d_model (gelu, relu2) or 8/3 * d_model rounded up to 64 (swiglu, geglu)
    mlp_hidden: int | None = None
    qk_norm: bool = False  # RMSNorm on each head's queries and keys before attention (Qwen3)
    # a norm also on each attention and MLP output, before it joins the residual stream (Gemma 2, 3)
    post_norms: bool = False
    embed_scale: bool = False  # token embeddings times sqrt(d_model), in their own dtype (Gemma)
    # attention scores scaled by 1 / sqrt(this) rather than 1 / sqrt(head_dim); None: head_dim
    # (Gemma's query_pre_attn_scalar)
    attn_scale_dim: int | None = None
    # attention scores = cap * tanh(scores / cap) before the softmax (Gemma 2); None: no cap. Set,
    # attention runs on explicit matrices, not the fused kernel: slower, memory quadratic in length
    attn_softcap: float | None = None
    # local attention (Mistral, Phi-3, Gemma): each query sees only the latest this many positions, its own
    # included; None: all
    sliding_window: int | None = None
    # with sliding_window: every Nth layer (the Nth, 2Nth, ...) still sees every position, as Gemma 2
    # (2) and Gemma 3 (6) alternate local and global layers; 0: every layer is local
    global_every: int = 0
    tie_embeddings: bool = True  # the head reuses the input embedding's weights
    bias: bool = True  # biases in the blocks' Linear layers and LayerNorms (the head never has one)
    qkv_bias: bool = False  # biases on the attention's q, k, v projection even without bias (Qwen2)
    dropout: float = 0.0  # probability, on embeddings, residual branches and attention; 0: none
    zero_init_residual: bool = False  # start attention and MLP output projections at zero
    logit_softcap: float | None = None  # logits = cap * tanh(logits / cap); None: no cap
    # lm: next-token logits. span: start and end scores per position, for answers that are a span of
    # the prompt (extractive QA, as BERT's SQuAD head); fine-tuned from an lm checkpoint with init_from
    head: Literal["lm", "span"] = "lm"
    # causal: each position sees the ones before it (a language model). bidirectional: every position
    # sees the whole prompt, as in BERT; for a span head, which reads and never generates
    attention: Literal["causal", "bidirectional"] = "causal"
    # span head: a learned vector added to each context token whose word the question also holds
    # (DrQA's exact-match feature; `lmforge.words.question_matches` says which)
    word_match: bool = False


@dataclass(frozen=True)
class OptimConfig:
    """[optim]: the optimizer."""

    name: Literal["adamw", "sgd", "muon"] = "adamw"  # muon: Muon for hidden matrices, AdamW for the rest
    lr: float = 1e-3  # peak learning rate (under muon, of the AdamW parameters)
    # on matrices only (see decay_embeddings); 0: none. Decoupled under adamw and muon; under sgd an L2
    # term added to the gradient, as torch.optim.SGD does (so it goes through the momentum)
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW's decay rates of the two moments
    eps: float = 1e-8  # AdamW's term added to the denominator
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    momentum: float = 0.9  # sgd; 0: plain SGD
    muon_lr: float = 0.02  # muon: learning rate of the hidden matrices
    muon_momentum: float = 0.95  # muon: momentum of the hidden matrices
    muon_ns_steps: int = 5  # muon: Newton-Schulz iterations per update (fewer: cheaper, rougher)
    decay_embeddings: bool = False  # weight decay on embeddings and head too


@dataclass(frozen=True)
class ScheduleConfig:
    """[schedule]: the learning rate over the steps."""

    name: Literal["cosine", "linear", "wsd", "constant"] = "cosine"  # shape of the lr after warmup
    warmup_steps: int = 100  # steps of linear warmup to optim.lr; 0: none
    min_lr: float = 0.0  # absolute floor for optim.lr; other groups scale in proportion
    decay_steps: int | None = None  # None: until train.max_steps
    wsd_decay_fraction: float = 0.2  # wsd: final share of the steps spent decaying


@dataclass(frozen=True)
class TrainConfig:
    """[train]: the training loop."""

    max_steps: int = 2000  # optimizer updates in the whole run
    batch_size: int = 12  # sequences per micro-batch, over all devices together
    grad_accum_steps: int = 1  # micro-batches whose gradients add up to one update
    eval_interval: int = 250  # 0: evaluate only at the end
    eval_batch_size: int = 64  # sequences per evaluation batch
    # steps between periodic checkpoints; 0: none. An eval with a new best val loss, the end of the run
    # and a stop signal save one whatever this is
    checkpoint_interval: int = 500
    keep_checkpoints: int = 2  # newest checkpoints kept, besides the best
    seed: int = 1337  # of the initial weights and of the batches drawn
    # auto: bf16 where the device computes it natively, else fp32; bf16/fp16 autocast over fp32
    # weights (fp16 with a grad scaler). A run's saved config holds the resolved name.
    dtype: TrainDtype = "auto"
    compile: bool = False  # torch.compile the model
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    on_nan: Literal["stop", "skip"] = "stop"  # at a non-finite loss: end the run, or skip that update
    stop_at_val_loss: float | None = None  # end the run at the first eval at or below this loss
    init_from: str = ""  # start from the weights of a run or checkpoint folder (e.g. `lmforge import`)
    deterministic: bool = False  # torch.use_deterministic_algorithms
    # recompute each block's activations in backward: less memory, ~1/3 more compute
    activation_checkpointing: bool = False
    # lm: next-token cross-entropy (pretraining, fine-tuning). dpo: Direct Preference Optimization on
    # prompt/chosen/rejected JSONL against the frozen starting weights (train.init_from); simpo: SimPO,
    # its reference-free variant (length-normalised log-probabilities, a target margin); see [preference]
    objective: Literal["lm", "dpo", "simpo"] = "lm"


@dataclass(frozen=True)
class PreferenceConfig:
    """[preference]: the loss of train.objective = "dpo" or "simpo" (DPO: Rafailov et al. 2023; SimPO:
    Meng et al. 2024), on pairs of completions of one prompt, the chosen one preferred."""

    # the strength of the pull: dpo's KL penalty (0.1 typical; smaller drifts further from the
    # reference); simpo's reward scale (2.0-2.5 in its paper)
    beta: float = 0.1
    # dpo: sigmoid (the paper's -log sigmoid(beta * margin)), hinge (max(0, 1 - beta * margin)) or ipo
    # (IPO's squared loss on the per-token margin, target 1 / (2 beta)), as TRL's DPOTrainer loss_type
    loss_type: Literal["sigmoid", "hinge", "ipo"] = "sigmoid"
    simpo_gamma: float = 0.5  # simpo: target reward margin gamma (its paper's gamma / beta: 0.3-0.5 x beta)


@dataclass(frozen=True)
class LoraConfig:
    """[lora]: low-rank adapters instead of full fine-tuning."""

    rank: int = 0  # 0: full fine-tuning; > 0: train only rank-r adapters (peft) on `targets`
    alpha: float = 16.0  # the adapters' update is scaled by alpha / rank
    dropout: float = 0.0  # probability, on the adapters' input; 0: none
    targets: tuple[str, ...] = ("qkv", "proj", "up", "down")  # Linear layers of the model's blocks
    # precision in which the frozen Linear matrices of the blocks are held while the adapters train (in
    # full precision): fp32 as loaded; bf16; int8 (per row) or nf4 (QLoRA's 4-bit NormalFloat), both
    # torchao's (extra: lora). Checkpoints store that base dequantized, so everything else reads them as usual
    base_dtype: Literal["fp32", "bf16", "int8", "nf4"] = "fp32"


@dataclass(frozen=True)
class ParallelConfig:
    """[parallel]: how the processes of a run share the work."""

    # none: one process. ddp / fsdp: data parallel over the processes started by torchrun (one per device),
    # replicated (DDP) or sharded (FSDP2) weights, gradients and optimizer state; the global batch is
    # train.batch_size x train.grad_accum_steps sequences whatever the world size.
    strategy: Literal["none", "ddp", "fsdp"] = "none"
    timeout_s: float = 1800.0  # seconds a collective waits for the other processes before the job fails


@dataclass(frozen=True)
class PrivacyConfig:
    """[privacy]: differentially private training (DP-SGD through Opacus); off unless a noise level is set.

    The unit of privacy is one window of model.block_size + 1 tokens of the train split (the split cut
    into disjoint windows); each step trains on a Poisson sample of them (each window in with
    probability train.batch_size / windows), clips every window's gradient to max_grad_norm and adds
    Gaussian noise of standard deviation noise_multiplier x max_grad_norm.
    """

    noise_multiplier: float | None = None  # sigma, the noise's std over max_grad_norm; or target_epsilon
    target_epsilon: float | None = None  # choose sigma so that epsilon reaches this after train.max_steps
    max_grad_norm: float = 1.0  # each window's gradient is clipped to this L2 norm (over all parameters)
    delta: float = 1e-5  # the delta of (epsilon, delta)-DP; keep it well below 1 / number of windows
    accountant: Literal["rdp", "prv"] = "rdp"  # Opacus's privacy accountant: Renyi DP or PRV

    @property
    def enabled(self) -> bool:
        return self.noise_multiplier is not None or self.target_epsilon is not None


@dataclass(frozen=True)
class LogConfig:
    """[log]: progress output and where metrics go besides metrics.jsonl."""

    interval: int = 10  # steps between progress-bar updates
    progress: bool = True  # show the progress bar (main process only)
    tensorboard: bool = False  # also write TensorBoard event files into the run folder (extra: tensorboard)
    wandb: bool = False  # also log to Weights & Biases; WANDB_MODE=offline needs no account (extra: wandb)
    wandb_project: str = "lmforge"  # the W&B project of the run (its name is the run folder's)


@dataclass(frozen=True)
class Config:
    """A whole run: one section per table of the TOML file."""

    data: DataConfig = field(default_factory=DataConfig)  # [data]: what to train on
    model: ModelConfig = field(default_factory=ModelConfig)  # [model]: the architecture
    optim: OptimConfig = field(default_factory=OptimConfig)  # [optim]: optimizer and its settings
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)  # [schedule]: learning rate
    train: TrainConfig = field(default_factory=TrainConfig)  # [train]: the loop, its length and dtype
    lora: LoraConfig = field(default_factory=LoraConfig)  # [lora]: low-rank adapters; rank 0: off
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)  # [preference]: dpo/simpo loss
    parallel: ParallelConfig = field(default_factory=ParallelConfig)  # [parallel]: data parallel devices
    log: LogConfig = field(default_factory=LogConfig)  # [log]: progress output, TensorBoard, W&B
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)  # [privacy]: DP-SGD; off by default

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Section -> key -> value, tuples kept as tuples."""
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        """TOML text that `load_config` reads back to an equal Config (None values are left out)."""
        return tomli_w.dumps(_drop_none(self.to_dict()))


def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, tuple):
        return list(value)
    return value


def load_config(path: Path | str | None, overrides: list[str] = (), origin: str | None = None) -> Config:
    """Read a TOML file (or defaults when None), apply `a.b=value` overrides, validate."""
    raw: dict[str, Any] = {}
    origin = origin or (str(path) if path is not None else "--set")
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise LmforgeError(f"{path}: config file not found")
        try:
            raw = _parse_toml(path.read_text(encoding="utf-8-sig"))  # -sig: Notepad's byte order mark
        except (ValueError, OSError) as exc:  # TOMLDecodeError and UnicodeDecodeError are ValueErrors
            raise LmforgeError(f"{path}: not valid TOML ({exc})") from None
    for override in overrides:
        _apply_override(raw, override)
    config = _build(Config, raw, origin, prefix="")
    validate(config, origin)
    return config


def _parse_toml(text: str) -> dict[str, Any]:
    """tomllib.loads, with the limits Python hits on hostile input raised as ValueError too."""
    try:
        return tomllib.loads(text)
    except RecursionError:
        raise ValueError("nested too deeply") from None
    except tomllib.TOMLDecodeError:
        raise
    except ValueError:  # int(): more digits than the interpreter converts
        raise ValueError("a number has too many digits") from None


def _apply_override(raw: dict[str, Any], override: str) -> None:
    """Set SECTION.KEY (or SECTION.TABLE.KEY, e.g. data.columns.prompt) of `raw` to the override's value."""
    key, value = _parse_override(override)
    *tables, name = key.split(".")
    if not tables or not all(tables) or not name or len(tables) > 2:
        raise LmforgeError(f"--set {override}: expected SECTION.KEY=VALUE, e.g. model.n_layer=6")
    table = raw
    for part in tables:
        table = table.setdefault(part, {})
        if not isinstance(table, dict):
            raise LmforgeError(f"--set {override}: {part} is not a section")
    table[name] = value


def _parse_override(override: str) -> tuple[str, Any]:
    key, sep, text = override.partition("=")
    if not sep or not key.strip():
        raise LmforgeError(f"--set {override}: expected SECTION.KEY=VALUE")
    try:  # a TOML value: 6, 3e-4, true, "text", [0.9, 0.95]
        value = _parse_toml(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text  # a bare word such as rope or cuda:0
    except ValueError as exc:
        raise LmforgeError(f"--set {key.strip()}=...: {exc}") from None
    return key.strip(), value


def _build(cls: type, raw: Any, origin: str, *, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise LmforgeError(f"{origin}: {prefix.rstrip('.') or 'config'} must be a table")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise LmforgeError(f"{origin}: unknown key {prefix}{unknown[0]} (known: {', '.join(sorted(names))})")
    values = {}
    for name, value in raw.items():
        kind = hints[name]
        key = f"{prefix}{name}"
        if dataclasses.is_dataclass(kind):
            values[name] = _build(kind, value, origin, prefix=f"{key}.")
        else:
            values[name] = _coerce(value, kind, origin, key=key)
    return cls(**values)


def _coerce(value: Any, kind: Any, origin: str, *, key: str) -> Any:
    """Check `value` against a field type, converting int→float and list→tuple."""
    origin_type = typing.get_origin(kind)
    if origin_type in (typing.Union, types.UnionType):
        options = typing.get_args(kind)
        if value is None and type(None) in options:
            return None
        inner = [o for o in options if o is not type(None)]
        return _coerce(value, inner[0], origin, key=key)
    if origin_type is Literal:
        choices = typing.get_args(kind)
        if value not in choices:
            raise LmforgeError(
                f"{origin}: {key} must be one of {', '.join(map(str, choices))}; got {value!r}"
            )
        return value
    if origin_type is tuple and typing.get_args(kind)[-1] is Ellipsis:
        if not isinstance(value, (list, tuple)) or not value:
            raise LmforgeError(f"{origin}: {key} must be a non-empty list; got {value!r}")
        return tuple(_coerce(v, typing.get_args(kind)[0], origin, key=key) for v in value)
    if origin_type is tuple:
        items = typing.get_args(kind)
        if not isinstance(value, (list, tuple)) or len(value) != len(items):
            raise LmforgeError(f"{origin}: {key} must be a list of {len(items)} numbers; got {value!r}")
        return tuple(_coerce(v, t, origin, key=key) for v, t in zip(value, items))
    if kind is bool:
        if not isinstance(value, bool):
            raise LmforgeError(f"{origin}: {key} must be true or false; got {value!r}")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise LmforgeError(f"{origin}: {key} must be an integer; got {value!r}")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise LmforgeError(f"{origin}: {key} must be a number; got {value!r}")
        # TOML has inf and nan; no setting means anything with them (a cap or a limit is a number or none)
        if isinstance(value, float) and not math.isfinite(value):
            raise LmforgeError(f"{origin}: {key} must be a finite number; got {value!r}")
        try:
            return float(value)
        except OverflowError:  # an integer too large for a float
            raise LmforgeError(f"{origin}: {key} must be a finite number; got {value}") from None
    if kind is str:
        if not isinstance(value, str):
            raise LmforgeError(f"{origin}: {key} must be a string; got {value!r}")
        return value
    raise TypeError(f"unsupported config type {kind} for {key}")  # a programming error, not user input


def head_size(m: ModelConfig) -> int:
    """Channels of each attention head: model.head_dim, else d_model / n_head."""
    return m.head_dim or m.d_model // m.n_head


# Raises LmforgeError("{origin}: {key} {message}") unless the condition holds.
Need = Callable[[bool, str, str], None]


def validate(config: Config, origin: str) -> None:
    """Reject values that type-check but cannot work, naming the key."""

    def need(condition: bool, key: str, message: str) -> None:
        if not condition:
            raise LmforgeError(f"{origin}: {key} {message}")

    _validate_model(config.model, need)
    _validate_optim(config.optim, need)
    _validate_schedule(config.schedule, config.optim, need)
    _validate_train(config.train, need)
    _validate_parallel(config, need)
    need(config.log.interval > 0, "log.interval", "must be positive")
    project = config.log.wandb_project
    need(
        project.strip() != "" and not any(c in project for c in WANDB_PROJECT_FORBIDDEN),
        "log.wandb_project",
        f"must be a non-empty name without any of {WANDB_PROJECT_FORBIDDEN}",
    )
    _validate_lora(config, need)
    _validate_privacy(config, need)
    _validate_data(config, need)
    _validate_preference(config, need)
    if config.model.head == "span":
        need(
            config.data.kind == "sft",
            "data.kind",
            'must be "sft" with model.head = "span" (prompt/completion data)',
        )
        need(
            config.lora.rank == 0,
            "lora.rank",
            'must be 0 with model.head = "span" (the new head trains in full)',
        )
    need(
        not config.model.word_match or config.model.head == "span",
        "model.word_match",
        'needs model.head = "span" (it marks the context words that a question holds)',
    )
    need(
        config.model.attention == "causal" or config.model.head == "span",
        "model.attention",
        'must be "causal" unless model.head = "span" (a language model generates left to right)',
    )


# Upper bounds on the two sizes a typo can blow up (an extra digit, 2**30 for 2**13): caught here, the
# mistake is one line naming the key, rather than an allocation failure inside torch, or an OOM kill
# minutes into a run. They are fixed rather than taken from this machine's memory, so that a config
# means the same everywhere and `lmforge estimate` can size runs for bigger machines. Both are far
# above any released model: vocabularies reach 262,144 (Gemma 3), 64 times less than 2**24; contexts
# reach ~1M tokens (Qwen2.5-1M's 1,010,000), and lmforge's full attention is quadratic: one sequence of
# 2**20 tokens is 2**40 query-key products per head and layer.
MAX_VOCAB_SIZE = 1 << 24
MAX_BLOCK_SIZE = 1 << 20


def _validate_model(m: ModelConfig, need: Need) -> None:
    for key in ("n_layer", "n_head", "d_model", "block_size"):
        need(getattr(m, key) > 0, f"model.{key}", "must be positive")
    need(m.block_size <= MAX_BLOCK_SIZE, "model.block_size", f"must be at most {MAX_BLOCK_SIZE:,}")
    need(
        m.vocab_size is None or m.vocab_size <= MAX_VOCAB_SIZE,
        "model.vocab_size",
        f"must be at most {MAX_VOCAB_SIZE:,}",
    )
    need(m.rope_theta > 0, "model.rope_theta", "must be positive")
    need(m.head_dim is None or m.head_dim > 0, "model.head_dim", "must be positive")
    need(
        m.head_dim is not None or m.d_model % m.n_head == 0,
        "model.d_model",
        f"({m.d_model}) must be divisible by model.n_head ({m.n_head}) unless model.head_dim is set",
    )
    if m.n_kv_head is not None:
        need(m.n_kv_head > 0, "model.n_kv_head", "must be positive")
        need(
            m.n_head % m.n_kv_head == 0,
            "model.n_head",
            f"({m.n_head}) must be divisible by model.n_kv_head ({m.n_kv_head})",
        )
    if m.position == "rope":
        need(
            head_size(m) % 2 == 0,
            "model.head_dim" if m.head_dim else "model.d_model",
            "must be even for rope" if m.head_dim else "/ n_head must be even for rope",
        )
    need(m.vocab_size is None or m.vocab_size > 0, "model.vocab_size", "must be positive")
    need(m.mlp_hidden is None or m.mlp_hidden > 0, "model.mlp_hidden", "must be positive")
    need(0.0 <= m.dropout < 1.0, "model.dropout", "must be in [0, 1)")
    need(m.norm_eps > 0, "model.norm_eps", "must be positive")
    need(m.logit_softcap is None or m.logit_softcap > 0, "model.logit_softcap", "must be positive")
    need(
        m.sliding_window is None or m.attention == "causal",
        "model.sliding_window",
        'needs model.attention = "causal" (a window of the positions before each query)',
    )
    _validate_rope_scaling(m, need)
    _validate_attention(m, need)


def _validate_rope_scaling(m: ModelConfig, need: Need) -> None:
    need(m.rope_factor >= 1, "model.rope_factor", "must be at least 1")
    need(
        m.rope_original_context is None or m.rope_original_context > 0,
        "model.rope_original_context",
        "must be positive",
    )
    need(
        m.rope_scaling == "none" or m.position == "rope",
        "model.rope_scaling",
        'needs model.position = "rope"',
    )
    if m.rope_scaling != "llama3":
        return
    need(m.rope_original_context is not None, "model.rope_original_context", "must be set for llama3")
    need(
        0 < m.rope_low_freq_factor < m.rope_high_freq_factor,
        "model.rope_low_freq_factor",
        "must be positive and below model.rope_high_freq_factor",
    )


def _validate_attention(m: ModelConfig, need: Need) -> None:
    """The options of attention's scores, positions and layers (Gemma's and the sliding window's)."""
    for key in ("rope_local_theta", "attn_scale_dim", "attn_softcap", "sliding_window"):
        need(getattr(m, key) is None or getattr(m, key) > 0, f"model.{key}", "must be positive")
    need(m.global_every >= 0, "model.global_every", "must be >= 0 (0: every layer is local)")
    need(
        m.rope_local_theta is None or m.position == "rope",
        "model.rope_local_theta",
        'needs model.position = "rope"',
    )
    if m.sliding_window is None:
        need(m.global_every == 0, "model.global_every", "needs model.sliding_window")
        need(m.rope_local_theta is None, "model.rope_local_theta", "needs model.sliding_window")


def _validate_optim(o: OptimConfig, need: Need) -> None:
    need(o.lr > 0, "optim.lr", "must be positive")
    need(o.muon_lr > 0, "optim.muon_lr", "must be positive")
    need(o.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
    need(o.grad_clip >= 0, "optim.grad_clip", "must be >= 0 (0 disables clipping)")
    need(o.eps > 0, "optim.eps", "must be positive (it keeps AdamW's step finite where a gradient is 0)")
    need(0.0 <= o.momentum < 1.0, "optim.momentum", "must be in [0, 1)")
    need(0.0 <= o.muon_momentum < 1.0, "optim.muon_momentum", "must be in [0, 1)")
    need(1 <= o.muon_ns_steps < 100, "optim.muon_ns_steps", "must be in [1, 100)")
    need(all(0.0 <= b < 1.0 for b in o.betas), "optim.betas", "must be in [0, 1)")


def _validate_schedule(s: ScheduleConfig, o: OptimConfig, need: Need) -> None:
    need(0.0 <= s.min_lr <= o.lr, "schedule.min_lr", f"must be in [0, optim.lr={o.lr}]")
    need(s.warmup_steps >= 0, "schedule.warmup_steps", "must be >= 0")
    need(s.decay_steps is None or s.decay_steps > 0, "schedule.decay_steps", "must be positive")
    need(0.0 < s.wsd_decay_fraction <= 1.0, "schedule.wsd_decay_fraction", "must be in (0, 1]")


def _validate_train(t: TrainConfig, need: Need) -> None:
    for key in ("max_steps", "batch_size", "grad_accum_steps", "eval_batch_size", "keep_checkpoints"):
        need(getattr(t, key) > 0, f"train.{key}", "must be positive")
    need(0 <= t.seed < SEED_LIMIT, "train.seed", "must be in [0, 2**32) (numpy's seed takes no more)")
    need(t.eval_interval >= 0, "train.eval_interval", "must be >= 0")
    need(t.checkpoint_interval >= 0, "train.checkpoint_interval", "must be >= 0")
    need(
        t.device == "auto" or t.device == "cpu" or t.device.startswith("cuda") or t.device == "mps",
        "train.device",
        f"must be auto, cpu, cuda, cuda:N or mps; got {t.device!r}",
    )


def _validate_parallel(config: Config, need: Need) -> None:
    need(config.parallel.timeout_s > 0, "parallel.timeout_s", "must be positive")
    if config.parallel.strategy == "fsdp":
        # Sharded gradients would need a sharded grad scaler; Muon orthogonalizes whole matrices, not shards.
        need(
            config.train.dtype != "fp16",
            "train.dtype",
            'fp16 is not supported with parallel.strategy = "fsdp"; use bf16',
        )
        need(
            config.optim.name != "muon",
            "optim.name",
            'muon is not supported with parallel.strategy = "fsdp"; use ddp',
        )


def _validate_data(config: Config, need: Need) -> None:
    """[data]'s fine-tuning keys: meaningful values, and only where fine-tuning data reads them."""
    d = config.data
    need(0.0 < d.val_fraction < 1.0, "data.val_fraction", "must be in (0, 1)")
    need(0 <= d.val_seed < SEED_LIMIT, "data.val_seed", "must be in [0, 2**32)")
    need(not (d.hf and d.dir), "data.hf", "and data.dir exclude each other (one names the data)")
    need(d.hf_split != "", "data.hf_split", "must name a split, e.g. train")
    if d.kind == "tokens":
        for key in ("hf", "pack"):
            need(
                not getattr(d, key),
                f"data.{key}",
                'applies to data.kind = "sft" (use `lmforge prepare` for tokens)',
            )
    if d.pack:
        need(
            config.model.head == "lm",
            "data.pack",
            'needs model.head = "lm" (a span head reads one prompt per row)',
        )


def _validate_lora(config: Config, need: Need) -> None:
    lora = config.lora
    need(lora.rank >= 0, "lora.rank", "must be >= 0 (0 disables LoRA)")
    if lora.base_dtype != "fp32":  # a low-precision base is frozen: only adapters may train on it
        need(lora.rank > 0, "lora.base_dtype", f"= {lora.base_dtype!r} needs lora.rank > 0 (a frozen base)")
        need(
            config.parallel.strategy == "none",
            "lora.base_dtype",
            f'= {lora.base_dtype!r} runs in one process: parallel.strategy must be "none"',
        )
        need(
            not config.train.compile, "lora.base_dtype", f"= {lora.base_dtype!r} needs train.compile = false"
        )
    need(0.0 <= lora.dropout < 1.0, "lora.dropout", "must be in [0, 1)")
    known = {"qkv", "proj", "up", "down"}
    need(
        set(lora.targets) <= known,
        "lora.targets",
        f"must name layers among {', '.join(sorted(known))}",
    )


def _validate_preference(config: Config, need: Need) -> None:
    """[preference]'s values, and what a preference objective needs of the rest."""
    p, objective = config.preference, config.train.objective
    need(p.beta > 0, "preference.beta", "must be positive")
    need(p.simpo_gamma >= 0, "preference.simpo_gamma", "must be >= 0")
    if objective == "lm":
        return
    need(
        config.data.kind == "sft",
        "data.kind",
        f'must be "sft" with train.objective = "{objective}" (a folder of prompt/chosen/rejected JSONL)',
    )
    need(config.model.head == "lm", "model.head", f'must be "lm" with train.objective = "{objective}"')
    need(not config.privacy.enabled, "privacy", f'is not supported with train.objective = "{objective}"')
    need(not config.data.pack, "data.pack", f'is not supported with train.objective = "{objective}" (pairs)')
    need(
        not config.data.hf, "data.hf", f'is not supported with train.objective = "{objective}" (JSONL pairs)'
    )
    need(
        objective != "dpo" or config.train.init_from != "",
        "train.init_from",
        'must name the checkpoint to tune with train.objective = "dpo" (its weights are the reference)',
    )


def _validate_privacy(config: Config, need: Need) -> None:
    """[privacy]'s values, and the settings DP-SGD cannot honour (each refused naming its key)."""
    p, t = config.privacy, config.train
    need(p.noise_multiplier is None or p.noise_multiplier > 0, "privacy.noise_multiplier", "must be positive")
    need(p.target_epsilon is None or p.target_epsilon > 0, "privacy.target_epsilon", "must be positive")
    need(
        p.noise_multiplier is None or p.target_epsilon is None,
        "privacy.target_epsilon",
        "and privacy.noise_multiplier exclude each other (the one sets the other)",
    )
    need(p.max_grad_norm > 0, "privacy.max_grad_norm", "must be positive")
    need(0.0 < p.delta < 1.0, "privacy.delta", "must be in (0, 1)")
    if not p.enabled:
        return
    unsupported = [
        (config.parallel.strategy == "none", "parallel.strategy", "must be none (Opacus' DDP is not wired)"),
        (t.grad_accum_steps == 1, "train.grad_accum_steps", "must be 1 (one Poisson batch per update)"),
        (
            t.dtype in ("auto", "fp32"),
            "train.dtype",
            "must be fp32 (per-sample gradients are computed in fp32)",
        ),
        (not t.compile, "train.compile", "must be false (per-sample gradient hooks do not compile)"),
        (
            not t.activation_checkpointing,
            "train.activation_checkpointing",
            "must be false (the recomputed forward would record every activation twice)",
        ),
        (
            config.data.kind == "tokens",
            "data.kind",
            'must be "tokens" (privacy is per window of token shards)',
        ),
        (config.lora.rank == 0, "lora.rank", "must be 0 (LoRA adapters are not supported with privacy)"),
    ]
    for ok, key, message in unsupported:
        need(ok, key, f"{message} with [privacy]")
