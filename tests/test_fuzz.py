"""Property-based fuzzing of every parser of user files: each input either works or raises
LmforgeError (a one-line message), never another exception.

Derandomized, so CI sees the same inputs every run; each test is sized to about a second.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmforge.config import ModelConfig, load_config
from lmforge.data import tokenizer as tok
from lmforge.data.sft import read_examples
from lmforge.data.sources import open_corpus
from lmforge.errors import LmforgeError
from lmforge.interop.hf import hf_config, model_config_from_hf
from lmforge.tasks.base import read_eval

FUZZ = settings(
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def fuzz(examples: int) -> settings:
    """FUZZ with a number of examples chosen so that the test takes about a second."""
    return settings(FUZZ, max_examples=examples)


# Values of every JSON/TOML type, with the edge cases parsers trip on.
NUMBERS = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, -1, 2**24 + 1, 2**63, 10**30]),
    st.floats(allow_nan=True, allow_infinity=True),
)
SCALARS = st.one_of(st.none(), st.booleans(), NUMBERS, st.text(max_size=12))
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=8,
)
HOSTILE_TEXT = st.sampled_from(["[" * 3000, "{" * 3000, "9" * 5000, '{"a": ' * 2000, "\x00", "\ud800"])


def _without_none(value: Any) -> Any:
    """TOML has no null: drop None values (tomli_w refuses them)."""
    if isinstance(value, dict):
        return {str(k): _without_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_none(v) for v in value if v is not None]
    return value


SECTIONS = ["data", "model", "optim", "schedule", "train", "lora", "parallel", "log", "nosuch"]
KEYS = [
    "n_layer", "n_head", "n_kv_head", "d_model", "block_size", "vocab_size", "position", "rope_theta",
    "norm_eps", "mlp", "mlp_hidden", "dropout", "lr", "eps", "betas", "momentum", "grad_clip", "name",
    "warmup_steps", "min_lr", "decay_steps", "max_steps", "batch_size", "device", "dtype", "rank",
    "targets", "strategy", "interval", "dir", "kind", "typo",
]  # fmt: skip


@st.composite
def toml_texts(draw: st.DrawFn) -> str:
    """Config files: structured tables of plausible keys, mutated or replaced by raw text."""
    kind = draw(st.sampled_from(["tables", "garbled", "raw", "hostile"]))
    if kind == "raw":
        return draw(st.text(max_size=200))
    if kind == "hostile":
        return f"[model]\nn_layer = {draw(HOSTILE_TEXT)}\n"
    tables = draw(
        st.dictionaries(
            st.sampled_from(SECTIONS),
            st.dictionaries(st.sampled_from(KEYS), VALUES, max_size=5),
            max_size=4,
        )
    )
    text = tomli_w.dumps(_without_none(tables))
    if kind == "garbled" and text:
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.text(max_size=10)) + text[at + draw(st.integers(0, 5)) :]
    return text


OVERRIDES = st.lists(
    st.one_of(
        st.builds(
            lambda s, k, v: f"{s}.{k}={v}",
            st.sampled_from(SECTIONS),
            st.sampled_from(KEYS),
            st.one_of(
                st.text(max_size=20), HOSTILE_TEXT, st.sampled_from(["nan", "inf", "-inf", "[1,", "{}"])
            ),
        ),
        st.text(max_size=30),
    ),
    max_size=4,
)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def works_or_refuses(call) -> Any:
    """Run `call`; an LmforgeError must be one line. Anything else fails the test by propagating."""
    try:
        return call()
    except LmforgeError as exc:
        assert "\n" not in str(exc), str(exc)
        return None


@fuzz(50)
@given(text=toml_texts(), overrides=OVERRIDES)
def test_config_files_and_overrides(workdir: Path, text: str, overrides: list[str]) -> None:
    path = workdir / "config.toml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    works_or_refuses(lambda: load_config(path, overrides))
    works_or_refuses(lambda: load_config(None, overrides))


RECORD_KEYS = ["prompt", "completion", "messages", "text", "role", "content", "label", "answers"]


@st.composite
def jsonl_files(draw: st.DrawFn) -> bytes:
    """JSONL files: records with the fields readers look for (of any type), raw bytes, hostile lines."""
    lines = []
    for _ in range(draw(st.integers(0, 5))):
        kind = draw(st.sampled_from(["record", "chat", "value", "bytes", "hostile"]))
        if kind == "record":
            record = draw(st.dictionaries(st.sampled_from(RECORD_KEYS), VALUES, max_size=4))
            lines.append(json.dumps(record).encode())
        elif kind == "chat":
            turn = st.dictionaries(
                st.sampled_from(["role", "content"]), st.one_of(st.text(max_size=8), VALUES)
            )
            lines.append(json.dumps({"messages": draw(st.lists(turn, max_size=3))}).encode())
        elif kind == "value":
            lines.append(json.dumps(draw(VALUES)).encode())
        elif kind == "bytes":
            lines.append(draw(st.binary(max_size=40)))
        else:
            lines.append(draw(HOSTILE_TEXT).encode("utf-8", errors="surrogatepass"))
    return b"\n".join(lines) + draw(st.sampled_from([b"", b"\n", b"\r\n"]))


@fuzz(80)
@given(content=jsonl_files(), skip=st.booleans(), limit=st.one_of(st.none(), st.integers(1, 3)))
def test_jsonl_readers(workdir: Path, content: bytes, skip: bool, limit: int | None) -> None:
    path = workdir / "data.jsonl"
    path.write_bytes(content)
    works_or_refuses(lambda: read_examples(path, "skip" if skip else "error"))
    works_or_refuses(lambda: read_eval(path, limit))
    mode = "replace" if skip else "error"
    works_or_refuses(lambda: [list(doc) for doc in open_corpus(str(path), mode).documents()])


def _valid_tokenizers() -> list[dict]:
    texts = "the quick brown fox jumps over the lazy dog\n" * 3
    built = [tok.char_tokenizer(texts, [tok.EOT]), tok.byte_tokenizer(), tok.train_bpe([texts], 300)]
    return [json.loads(t.to_str()) for t in built]


VALID_TOKENIZERS = _valid_tokenizers()


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key path into a JSON object (not into long vocabularies, to keep the draws varied)."""
    found = [prefix] if prefix else []
    if isinstance(value, dict) and len(value) <= 20:
        for key, inner in value.items():
            found += _paths(inner, (*prefix, key))
    elif isinstance(value, list) and len(value) <= 20:
        for i, inner in enumerate(value):
            found += _paths(inner, (*prefix, i))
    return found


@st.composite
def mutated(draw: st.DrawFn, originals: list[dict]) -> Any:
    """A valid document with a few values replaced or removed; one time in ten, any JSON value."""
    if draw(st.integers(0, 9)) == 0:
        return draw(VALUES)
    document = json.loads(json.dumps(draw(st.sampled_from(originals))))
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(document)
        if not paths:
            break
        *parents, last = draw(st.sampled_from(paths))
        holder = document
        for key in parents:
            holder = holder[key]
        if draw(st.booleans()) and isinstance(holder, dict):
            del holder[last]
        else:
            holder[last] = draw(VALUES)
    return document


@st.composite
def garbled_json(draw: st.DrawFn, originals: list[dict]) -> str:
    """`mutated` as text, one time in ten cut short."""
    text = json.dumps(draw(mutated(originals)))
    if draw(st.integers(0, 9)) == 0:
        text = text[: draw(st.integers(0, len(text)))]
    return text


@fuzz(100)
@given(text=garbled_json(VALID_TOKENIZERS))
def test_tokenizer_json_loading(workdir: Path, text: str) -> None:
    path = workdir / "tokenizer.json"
    path.write_text(text)
    tokenizer = works_or_refuses(lambda: tok.load_tokenizer(path))
    if tokenizer is not None:
        assert tok.vocab_size(tokenizer) >= 1


def _valid_hf_configs() -> list[dict]:
    rope = {"position": "rope", "norm": "rmsnorm", "mlp": "swiglu"}
    llama = ModelConfig(n_layer=2, n_head=4, n_kv_head=2, d_model=32, block_size=64, vocab_size=100, **rope)
    qwen3 = ModelConfig(n_layer=2, n_head=4, d_model=32, block_size=64, vocab_size=100, qk_norm=True, **rope)
    gpt2 = ModelConfig(n_layer=2, n_head=4, d_model=32, block_size=64, vocab_size=100)
    configs = [
        hf_config(llama, "llama", 0, dtype="float32"),
        hf_config(qwen3, "qwen3", None, dtype="bfloat16"),
    ]
    configs.append(hf_config(gpt2, "gpt2", 1, dtype="float32"))
    gemma = dict(head_dim=16, norm="rmsnorm1p", mlp="geglu", post_norms=True, embed_scale=True, bias=False)
    gemma3 = ModelConfig(
        n_layer=3, n_head=4, n_kv_head=2, d_model=32, block_size=64, vocab_size=100, position="rope",
        qk_norm=True, sliding_window=8, global_every=3, rope_local_theta=1e4, rope_scaling="linear",
        rope_factor=8.0, **gemma,
    )  # fmt: skip
    gemma2 = dataclasses.replace(
        gemma3, qk_norm=False, rope_local_theta=None, rope_scaling="none", rope_factor=1.0
    )
    configs += [
        hf_config(gemma3, "gemma3_text", None, dtype="float32"),
        hf_config(
            dataclasses.replace(gemma2, attn_softcap=50.0, logit_softcap=30.0), "gemma2", 2, dtype="float32"
        ),
    ]
    v5 = dict(configs[0], rope_parameters={"rope_type": "default", "rope_theta": 5e5})
    del v5["rope_theta"]
    return [*configs, v5, dict(configs[0], model_type="mistral"), dict(configs[0], model_type="qwen2")]


@fuzz(200)
@given(config=mutated(_valid_hf_configs()))
def test_hf_config_json(config: Any) -> None:
    model = works_or_refuses(lambda: model_config_from_hf(config, "config.json"))
    if model is not None:  # what import accepts is a config lmforge can build
        assert model.n_layer >= 1 and math.isfinite(model.rope_theta)
        assert model.head_dim is not None or model.d_model % model.n_head == 0
