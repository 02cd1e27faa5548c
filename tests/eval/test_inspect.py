"""`lmforge inspect`: the numbers it shows are the model's own (checked against its forward pass
and against transformers), and the files it writes hold them."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lmforge import checkpoint as ckpt
from lmforge.config import Config, ModelConfig
from lmforge.data.tokenizer import char_tokenizer
from lmforge.eval.inspect import logit_lens, recording, trace
from lmforge.eval.inspect.report import surprisal_html, token_label
from lmforge.eval.inspect.trace import attention_output, attention_probabilities
from lmforge.inference import load
from lmforge.model import GPT
from lmforge.staging import write_marker

TEXT = 'To be, or not to be: that is the question.\n<b>Whether</b> \'tis nobler & "braver" <script>\n'
TINY = {"n_layer": 2, "n_head": 4, "d_model": 32, "block_size": 32}
ARCHITECTURES = {
    "gpt2": {},
    "llama-gqa": {"position": "rope", "norm": "rmsnorm", "mlp": "swiglu", "n_kv_head": 2, "bias": False},
    "qk-norm-mqa-softcap": {
        "position": "rope",
        "norm": "rmsnorm",
        "qk_norm": True,
        "n_kv_head": 1,
        "logit_softcap": 5.0,
    },
    "sliding-window-6": {"position": "rope", "norm": "rmsnorm", "mlp": "swiglu", "sliding_window": 6},
}


def tiny_model(vocab: int = 50, **options) -> GPT:
    """A randomly initialised model, perturbed so that no weight sits at its init value."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(**(TINY | {"vocab_size": vocab} | options))).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.3 * torch.randn_like(param))
    return model


def prompt(vocab: int = 50, length: int = 20) -> list[int]:
    return torch.randint(0, vocab, (length,), generator=torch.Generator().manual_seed(3)).tolist()


def lens_rows(model: GPT, ids: list[int]) -> list[torch.Tensor]:
    """The logit lens of `ids` in full: (T, V) for the embeddings, then for each block's output."""
    with torch.no_grad(), recording(model) as seen:
        model(torch.tensor([ids]))
        return [row[0] for row in logit_lens(model, seen.residual)]


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_last_layer_of_the_logit_lens_is_exactly_the_models_logits(name: str) -> None:
    model, ids = tiny_model(**ARCHITECTURES[name]), prompt()
    rows = lens_rows(model, ids)
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids]))
    assert len(rows) == 3 and rows[0].shape == (20, 50)  # the embeddings, then each of 2 blocks
    assert torch.equal(rows[-1], logits[0].float())
    assert not torch.allclose(rows[0], rows[-1])  # earlier rows are not copies
    result = trace(model, ids, k=4)
    assert torch.equal(result.logits, logits[0].float())
    best = logits[0].softmax(-1).topk(4)
    assert torch.equal(result.lens.ids[-1], best.indices) and torch.equal(result.lens.probs[-1], best.values)


def test_first_row_of_the_logit_lens_reads_out_the_embeddings() -> None:
    model, ids = tiny_model(), prompt()
    idx = torch.tensor([ids])
    with torch.no_grad():
        embedded = model.embed(idx) + model.pos_embed(torch.arange(len(ids)))
        expected = model.head(model.norm(embedded))[0]
    assert torch.equal(lens_rows(model, ids)[0], expected)


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_attention_rows_sum_to_one_and_no_query_sees_a_later_token(name: str) -> None:
    result = trace(tiny_model(**ARCHITECTURES[name]), prompt())
    for probs in result.attention:
        assert probs.shape == (4, 20, 20)
        torch.testing.assert_close(probs.sum(-1), torch.ones(4, 20), atol=1e-6, rtol=0)
        assert torch.all(probs.triu(diagonal=1) == 0)
        assert torch.all(probs[:, 0, 0] == 1)  # the first token can only look at itself
        past = torch.ones(20, 20, dtype=torch.bool).tril()
        if (window := ARCHITECTURES[name].get("sliding_window")) is not None:  # only the last `window` keys
            assert torch.all(probs[:, past.tril(diagonal=-window)] == 0)
            past &= ~past.tril(diagonal=-window)
        assert probs[:, past].min() > 0  # and the (visible) past is not masked


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_captured_probabilities_times_v_reproduce_each_attention_modules_output(name: str) -> None:
    model, ids = tiny_model(**ARCHITECTURES[name]), prompt()
    with torch.no_grad(), recording(model) as seen:
        model(torch.tensor([ids]))
    assert len(seen.qkv) == len(seen.attention_out) == 2
    for layer, ((q, k, v), actual) in enumerate(zip(seen.qkv, seen.attention_out)):
        with torch.no_grad():
            probs = attention_probabilities(q, k, window=model.blocks[layer].attn.window)
            rebuilt = attention_output(model.blocks[layer].attn, probs, v)
        torch.testing.assert_close(rebuilt, actual, atol=1e-5, rtol=1e-5)
    assert trace(model, ids).attention_error < 1e-5


def test_a_gemma_models_probabilities_use_its_scale_soft_cap_and_window() -> None:
    gemma = {
        "position": "rope",
        "norm": "rmsnorm1p",
        "mlp": "geglu",
        "qk_norm": True,
        "post_norms": True,
        "embed_scale": True,
        "head_dim": 16,
        "attn_scale_dim": 20,
        "attn_softcap": 2.0,
        "sliding_window": 6,
        "global_every": 2,
        "bias": False,
    }
    model, ids = tiny_model(**gemma), prompt()  # 20 tokens, a window of 6 in the first layer
    result = trace(model, ids)
    assert result.attention_error < 1e-5
    first = result.attention[0]  # (H, T, T)
    assert torch.all(first[:, 10, :5] == 0) and torch.all(first[:, 10, 5:11] > 0)
    assert torch.all(result.attention[1][:, 10, :11] > 0)  # the global layer sees everything before


def test_under_bf16_autocast_the_probabilities_stay_fp32_and_close_to_the_modules_output() -> None:
    model, ids = tiny_model(**ARCHITECTURES["llama-gqa"]), prompt()
    result = trace(model, ids, autocast=torch.autocast("cpu", dtype=torch.bfloat16))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits, _ = model(torch.tensor([ids]))
    assert torch.equal(result.logits, logits[0].float())
    assert all(probs.dtype == torch.float32 for probs in result.attention)
    torch.testing.assert_close(result.attention[1].sum(-1), torch.ones(4, 20), atol=1e-6, rtol=0)
    assert result.attention_error < 0.1  # bf16 rounding of the module's own output, nothing more


def test_probabilities_change_when_the_scaling_changes() -> None:
    """The reconstruction check is sharp: probabilities computed without the 1/sqrt(head_dim) miss."""
    model, ids = tiny_model(), prompt()
    with torch.no_grad(), recording(model) as seen:
        model(torch.tensor([ids]))
    q, k, v = seen.qkv[0]
    with torch.no_grad():
        wrong = attention_output(model.blocks[0].attn, attention_probabilities(q * 8**0.5, k), v)
    assert (wrong - seen.attention_out[0]).abs().max() > 1e-3


def test_recording_leaves_the_model_as_it_was() -> None:
    model, ids = tiny_model(), prompt()
    with torch.no_grad():
        before, _ = model(torch.tensor([ids]))
    trace(model, ids)
    assert all(block.attn.capture is None for block in model.blocks)
    assert all(not block._forward_hooks and not block._forward_pre_hooks for block in model.blocks)
    with torch.no_grad():
        after, _ = model(torch.tensor([ids]))
    assert torch.equal(before, after)


def test_surprisal_is_the_per_token_cross_entropy_of_the_forward() -> None:
    model, ids = tiny_model(), prompt()
    with torch.no_grad():
        logits, loss = model(torch.tensor([ids[:-1]]), torch.tensor([ids[1:]]))
    result = trace(model, ids)
    expected = F.cross_entropy(logits[0], torch.tensor(ids[1:]), reduction="none")
    torch.testing.assert_close(result.surprisal, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(result.surprisal.mean(), loss, atol=1e-5, rtol=1e-5)


def test_lens_ranks_count_the_tokens_scored_above_the_next_one_and_top_k_is_sorted() -> None:
    model, ids = tiny_model(), prompt()
    result = trace(model, ids, k=3)
    assert result.lens.ranks.shape == (3, 19) and result.lens.ids.shape == (3, 20, 3)
    for layer, scores in enumerate(lens_rows(model, ids)):
        for pos in range(19):
            expected = int((scores[pos] > scores[pos, ids[pos + 1]]).sum())
            assert result.lens.ranks[layer, pos] == expected
        assert torch.equal(result.lens.ids[layer, :, 0], scores.argmax(-1))
    assert torch.all(result.lens.probs[..., :-1] >= result.lens.probs[..., 1:])
    assert torch.equal(result.ranks, result.lens.ranks[-1])


class _PageText(HTMLParser):
    """The tags of a page, and the text inside its <div class="text">."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: set[str] = set()
        self.depth = 0  # > 0 inside the text div
        self.text = ""

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self.tags.add(tag)
        if self.depth or ("class", "text") in attrs:
            self.depth += 1

    def handle_endtag(self, tag: str) -> None:
        self.depth = max(0, self.depth - 1)

    def handle_data(self, data: str) -> None:
        if self.depth:
            self.text += data


def test_surprisal_page_shows_the_prompt_as_text_never_as_markup() -> None:
    tokenizer = char_tokenizer(TEXT)
    text = '<b>Whe</b> & "to"\n<script>'
    ids = tokenizer.encode(text).ids
    model = tiny_model(vocab=tokenizer.get_vocab_size())
    page = surprisal_html(trace(model, ids), lambda i: tokenizer.decode([i]), "<title & more>")
    parsed = _PageText()
    parsed.feed(page)
    assert parsed.text == text
    assert parsed.tags == {
        "html",
        "head",
        "meta",
        "title",
        "style",
        "body",
        "h1",
        "p",
        "span",
        "div",
        "table",
        "tr",
        "th",
        "td",
    }
    assert "<title & more>" not in page and "&lt;title &amp; more&gt;" in page


def test_token_labels_are_one_visible_line() -> None:
    assert token_label("a b\n\t") == "a·b\\n\\t"
    assert token_label("é") == "é" and token_label("") == "∅"


def char_run(root: Path, **options) -> Path:
    """A run folder with one checkpoint of a perturbed random model over TEXT's characters."""
    tokenizer = char_tokenizer(TEXT)
    tokenizer.save(str(root / "tokenizer.json"))
    model = tiny_model(vocab=tokenizer.get_vocab_size(), **options)
    config = Config(model=model.config)
    ckpt.save_checkpoint(
        root / "run", 3, model, state={}, config=config, tokenizer_file=root / "tokenizer.json", val_loss=2.0
    )
    return root / "run"


def test_inspect_command_writes_the_models_numbers_to_every_file(cli, tmp_path: Path) -> None:
    run, text = char_run(tmp_path, **ARCHITECTURES["llama-gqa"]), "To be, or not <b>to</b> be"
    code, out, err = cli("inspect", run, "--prompt", text, "--out", tmp_path / "inspect", "--top-k", "3")
    assert code == 0, err
    files = {p.name for p in (tmp_path / "inspect").iterdir()}
    expected = {"attention_layer0.png", "attention_layer1.png", "logit_lens.png", "logit_lens.tsv"}
    assert files == expected | {"surprisal.html", "topk.json", "summary.json", ".lmforge"}
    loaded = load(run, "best", "cpu")
    ids = char_tokenizer(TEXT).encode(text).ids
    with torch.no_grad():
        logits, loss = loaded.model(torch.tensor([ids[:-1]]), torch.tensor([ids[1:]]))
    summary = json.loads((tmp_path / "inspect" / "summary.json").read_text())
    assert summary["tokens"] == len(ids) and summary["layers"] == 2 and summary["heads"] == 4
    assert summary["mean_loss"] == pytest.approx(loss.item(), abs=1e-5)
    assert summary["attention_max_error"] < 1e-5
    top = json.loads((tmp_path / "inspect" / "topk.json").read_text())
    probs = logits[0].softmax(-1).topk(3)
    assert [t["token"] for t in top][:3] == ["T", "o", " "] and len(top) == len(ids)
    assert [n["token_id"] for n in top[4]["next"]] == probs.indices[4].tolist()
    assert [n["prob"] for n in top[4]["next"]] == pytest.approx(probs.values[4].tolist(), abs=1e-6)
    rows = (tmp_path / "inspect" / "logit_lens.tsv").read_text().splitlines()
    assert rows[0].split("\t")[:5] == ["layer", "position", "token", "next_token", "next_rank"]
    assert len(rows) == 1 + 3 * len(ids)  # embeddings and 2 layers, every position
    assert "pos" in out and "L1" in out and f"{len(ids)} tokens" in out


def test_a_top_k_past_the_vocabulary_lists_every_token_and_the_summary_says_so(cli, tmp_path: Path) -> None:
    """As `sample --top-k` takes a k past the vocabulary for all of it."""
    run, vocab = char_run(tmp_path), char_tokenizer(TEXT).get_vocab_size()
    out = tmp_path / "inspect"
    code, _, err = cli("inspect", run, "--prompt", "To be", "--out", out, "--top-k", vocab + 100)
    assert code == 0, err
    assert json.loads((out / "summary.json").read_text())["top_k"] == vocab
    top = json.loads((out / "topk.json").read_text())
    assert {len(position["next"]) for position in top} == {vocab}


def test_inspect_works_on_an_imported_hugging_face_model(cli, tmp_path: Path) -> None:
    """Attention probabilities and logits equal transformers' own (eager attention returns them)."""
    pytest.importorskip("transformers")
    from tests.interop.test_hf import random_hf_model, save_hf

    hf = random_hf_model("llama")  # grouped-query attention, RoPE, RMSNorm, SwiGLU
    assert cli("import", save_hf(hf, tmp_path / "hf"), "--out", tmp_path / "run")[0] == 0
    ids = list(b"Hello, world")  # the byte tokenizer: one id per byte
    ours = trace(load(tmp_path / "run", "last", "cpu").model, ids)
    hf.set_attn_implementation("eager")
    with torch.no_grad():
        theirs = hf(torch.tensor([ids]), output_attentions=True, output_hidden_states=True)
    torch.testing.assert_close(ours.logits, theirs.logits[0], atol=1e-4, rtol=1e-4)
    for layer, probs in enumerate(ours.attention):
        torch.testing.assert_close(probs, theirs.attentions[layer][0], atol=1e-5, rtol=1e-4)
    code, out, err = cli("inspect", tmp_path / "run", "--prompt", "Hello, world", "--out", tmp_path / "i")
    assert code == 0, err
    assert json.loads((tmp_path / "i" / "summary.json").read_text())["attention_max_error"] < 1e-5


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--prompt", ""], "--prompt is empty"),
        (["--prompt", "T"], "--prompt is 1 token; inspect needs at least 2"),
        (["--prompt", "To be " * 6], "--prompt is 36 tokens, longer than this model's block_size 32"),
        (["--prompt", "zebra"], "--prompt has characters that this model's tokenizer cannot represent"),
        (["--prompt", "To be", "--checkpoint", "nowhere"], "nowhere: not a checkpoint folder"),
    ],
)
def test_bad_input_is_a_one_line_error_and_writes_nothing(cli, tmp_path: Path, args, message) -> None:
    run = char_run(tmp_path)
    code, out, err = cli("inspect", run, "--out", tmp_path / "inspect", *args)
    assert code == 1 and message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "inspect").exists()


def test_a_missing_run_is_a_one_line_error(cli, tmp_path: Path) -> None:
    code, _, err = cli("inspect", tmp_path / "nope", "--prompt", "To be", "--out", tmp_path / "inspect")
    assert (
        code == 1
        and err == f"lmforge inspect: error: {tmp_path / 'nope'}: no such run or checkpoint folder\n"
    )


def test_an_existing_folder_is_replaced_only_with_overwrite_and_only_if_lmforge_wrote_it(
    cli, tmp_path: Path
) -> None:
    run, mine, old = char_run(tmp_path), tmp_path / "mine", tmp_path / "old"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    code, _, err = cli("inspect", run, "--prompt", "To be", "--out", mine, "--overwrite")
    assert code == 1 and "was not written by lmforge" in err and (mine / "notes.txt").exists()
    old.mkdir()
    write_marker(old, "inspect")
    (old / "stale.png").write_text("from an earlier inspection")
    code, _, err = cli("inspect", run, "--prompt", "To be", "--out", old)
    assert code == 1 and "pass --overwrite" in err and (old / "stale.png").exists()
    assert cli("inspect", run, "--prompt", "To be", "--out", old, "--overwrite")[0] == 0
    assert not (old / "stale.png").exists() and (old / "summary.json").exists()
