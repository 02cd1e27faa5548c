"""An imported model's completions end at its own end-of-text tokens (generation_config.json's
eos_token_id), in `sample` and in `serve`, where transformers' `generate` ends them; export writes
them back."""

from __future__ import annotations

import json
import queue
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tokenizers import Tokenizer, decoders, models  # noqa: E402

from lmforge.data.tokenizer import GENERATION_CONFIG, char_tokenizer, read_end_ids  # noqa: E402
from lmforge.errors import LmforgeError  # noqa: E402
from lmforge.inference import load  # noqa: E402
from lmforge.interop.hf import export_checkpoint, hf_end_ids, import_folder  # noqa: E402
from lmforge.serve.engine import STOP, Engine, Job, Params, Update  # noqa: E402
from tests.interop.test_hf import random_hf_model  # noqa: E402

PROMPT = [10, 20, 30, 40]
END = "</s>"


def char_vocab_tokenizer(end_id: int) -> Tokenizer:
    """256 ids, one character each (U+0100 + id), except `end_id`: the special token </s>."""
    vocab = {chr(0x100 + i): i for i in range(256) if i != end_id} | {END: end_id}
    tokenizer = Tokenizer(models.BPE(vocab, []))
    tokenizer.decoder = decoders.Fuse()  # the characters joined as they are (no blank between tokens)
    tokenizer.add_special_tokens([END])  # already in the vocabulary: keeps its id
    return tokenizer


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, list[int]]:
    """A tiny Llama saved with its end ids [unused, E], E a token its greedy continuation of PROMPT
    reaches; the folder, the text transformers' `generate` gives (stopped at E), and the end ids."""
    folder = tmp_path_factory.mktemp("llama") / "hf"
    hf = random_hf_model("llama")
    hf.generation_config.eos_token_id = hf.generation_config.pad_token_id = None
    prompt = torch.tensor([PROMPT])
    free = hf.generate(prompt, max_new_tokens=12, do_sample=False, attention_mask=torch.ones_like(prompt))
    continuation = free[0, len(PROMPT) :].tolist()
    end = next(t for i, t in enumerate(continuation) if i >= 3 and t not in continuation[:i])
    unused = next(t for t in range(256) if t not in continuation + PROMPT)
    ends = [unused, end]
    hf.generation_config.eos_token_id = ends
    hf.save_pretrained(folder)
    char_vocab_tokenizer(end).save(str(folder / "tokenizer.json"))
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(folder / "tokenizer.json"), eos_token=END
    )
    tokenizer.save_pretrained(folder)
    stopped = hf.generate(prompt, max_new_tokens=12, do_sample=False, attention_mask=torch.ones_like(prompt))
    assert stopped[0, -1].item() == end and stopped.size(1) < free.size(1)  # generate stopped there
    return folder, tokenizer.decode(stopped[0, len(PROMPT) :], skip_special_tokens=True), ends


def test_an_imported_model_stops_at_its_end_token_in_sample_as_transformers_does(
    cli, tmp_path: Path, llama: tuple[Path, str, list[int]]
) -> None:
    folder, expected, ends = llama
    assert cli("import", folder, "--out", tmp_path / "run")[0] == 0
    assert read_end_ids(tmp_path / "run" / "checkpoints" / "step-0000000") == tuple(ends)
    prompt = "".join(chr(0x100 + i) for i in PROMPT)
    code, out, err = cli(
        "sample", tmp_path / "run", "--prompt", prompt, "--max-new-tokens", "12", "--temperature", "0"
    )
    assert code == 0, err
    assert out == prompt + expected + "\n"


def test_an_imported_model_stops_at_its_end_token_in_serve_with_finish_reason_stop(
    tmp_path: Path, llama: tuple[Path, str, list[int]]
) -> None:
    folder, expected, _ = llama
    session = load(import_folder(folder, tmp_path / "run"), "last", "cpu", dtype="fp32")
    updates: queue.Queue[Update] = queue.Queue()
    engine = Engine(session, max_batch=1).start()
    try:
        engine.submit([Job(PROMPT, Params(max_tokens=12, temperature=0.0, top_p=None, seed=0), updates.put)])
        text, update = "", Update("", None, 0)
        while update.finish_reason is None:
            update = updates.get(timeout=30)
            text += update.text
    finally:
        engine.close()
    assert (text, update.finish_reason) == (expected, STOP)
    assert update.completion_tokens == len(expected) + 1  # the end token counts, as OpenAI's usage does


def test_export_writes_the_imported_end_ids_and_a_round_trip_keeps_them(
    tmp_path: Path, llama: tuple[Path, str, list[int]]
) -> None:
    folder, _, ends = llama
    export_checkpoint(import_folder(folder, tmp_path / "run"), tmp_path / "back")
    assert json.loads((tmp_path / "back" / GENERATION_CONFIG).read_text())["eos_token_id"] == ends
    assert json.loads((tmp_path / "back" / "config.json").read_text())["eos_token_id"] == ends
    assert transformers.GenerationConfig.from_pretrained(tmp_path / "back").eos_token_id == ends
    assert load(import_folder(tmp_path / "back", tmp_path / "again"), "last", "cpu").end_ids == tuple(ends)


def hf_folder(folder: Path, *, generation: object = None, config: object = None, eos_token: str = "") -> Path:
    """A folder with what hf_end_ids reads: tokenizer.json (specials <|endoftext|> and </s>), and
    generation_config.json, config.json's eos_token_id and tokenizer_config.json where given."""
    folder.mkdir()
    char_tokenizer("abc", specials=["<|endoftext|>", END]).save(str(folder / "tokenizer.json"))
    if generation is not None:
        (folder / GENERATION_CONFIG).write_text(json.dumps({"eos_token_id": generation}))
    if eos_token:
        (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": eos_token}}))
    return folder


def test_the_end_ids_come_from_generation_config_else_config_else_the_tokenizers_eos_token(
    tmp_path: Path,
) -> None:
    both = hf_folder(tmp_path / "both", generation=[4, 3, 4], eos_token=END)
    assert hf_end_ids(both, {"eos_token_id": 0}, 5) == (4, 3)  # in order, once each
    assert hf_end_ids(hf_folder(tmp_path / "config", eos_token=END), {"eos_token_id": 3}, 5) == (3,)
    assert hf_end_ids(hf_folder(tmp_path / "tokenizer", eos_token=END), {}, 5) == (4,)
    assert hf_end_ids(hf_folder(tmp_path / "none"), {"eos_token_id": None}, 5) == ()
    # an id past the vocabulary can never be generated (transformers' GPT-2 config says 50256 at any size)
    assert hf_end_ids(hf_folder(tmp_path / "past", generation=[2, 50256]), {}, 5) == (2,)


@pytest.mark.parametrize("ids", [-1, [1, -2], "2", [True], {"id": 1}, 1.0])
def test_an_end_id_that_is_not_a_token_id_is_refused(tmp_path: Path, ids: object) -> None:
    with pytest.raises(LmforgeError, match="eos_token_id must be a token id or a list of them"):
        hf_end_ids(hf_folder(tmp_path / "bad", generation=ids), {}, 5)


def test_export_of_an_imported_model_without_a_chat_template_keeps_its_eos_token_for_transformers(
    tmp_path: Path, llama: tuple[Path, str, list[int]]
) -> None:
    folder, _, ends = llama
    export_checkpoint(import_folder(folder, tmp_path / "run"), tmp_path / "back")
    original = transformers.AutoTokenizer.from_pretrained(folder)
    exported = transformers.AutoTokenizer.from_pretrained(tmp_path / "back")
    assert original.chat_template is None  # the case: a base model, lmforge's default template exported
    assert (original.eos_token, original.eos_token_id) == (END, ends[1])  # not the first end id
    assert (exported.eos_token, exported.eos_token_id) == (END, ends[1])
    # lmforge's default template, which ends a reply with that eos_token, renders alike in both
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ho"}]
    rendered = load(tmp_path / "run", "last", "cpu").template.render(chat)
    assert exported.apply_chat_template(chat, tokenize=False) == rendered == f"user: hi\nassistant: ho{END}\n"


def test_a_chat_template_file_for_a_run_from_an_imported_model_gets_the_models_eos_token(
    tmp_path: Path, llama: tuple[Path, str, list[int]]
) -> None:
    from lmforge.config import Config, DataConfig
    from lmforge.train.run import run_chat_template

    folder, _, _ = llama
    checkpoint = import_folder(folder, tmp_path / "run") / "checkpoints" / "step-0000000"
    template_file = tmp_path / "turns.jinja"  # as Mistral's and Llama 2's: each reply closed by eos_token
    template_file.write_text(
        "{% for m in messages %}{{ m['content'] }}{% if m['role'] == 'assistant' %}"
        "{{ eos_token }}{% endif %}{% endfor %}"
    )
    config = Config(data=DataConfig(chat_template=str(template_file)))
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ho"}]
    # fine-tuning renders its messages so: the model learns to end a reply with its end token
    assert run_chat_template(config, checkpoint).render(chat) == f"hiho{END}"


def test_fine_tuning_an_imported_base_model_trains_it_to_end_a_completion_with_its_end_token(
    tmp_path: Path, llama: tuple[Path, str, list[int]]
) -> None:
    from lmforge.config import Config
    from lmforge.data.sft import SFTData
    from lmforge.train.run import run_chat_template

    folder, _, ends = llama
    checkpoint = import_folder(folder, tmp_path / "run") / "checkpoints" / "step-0000000"
    a, b = [chr(0x100 + i) for i in range(256) if i not in ends][:2]
    (tmp_path / "data").mkdir()
    for split in ("train", "val"):
        (tmp_path / "data" / f"{split}.jsonl").write_text(
            json.dumps({"prompt": a * 3, "completion": b * 2}) + "\n"
        )
    template = run_chat_template(Config(), checkpoint)  # a run from the import: its template
    (example,) = SFTData(tmp_path / "data", checkpoint / "tokenizer.json", 32, chat_template=template).train
    assert example.ids[3:] == [ord(b) - 0x100] * 2 + [ends[1]]  # the completion, then </s>
    assert example.trained == [False] * 3 + [True] * 3  # all trained on


def test_export_names_the_imported_models_own_bos_token_id(tmp_path: Path) -> None:
    """A model whose tokenizer begins with <s> (Llama 2, Mistral) exports bos_token_id = <s>'s id, which
    `generate` without inputs starts from; it was <|endoftext|>'s (None where there is none)."""
    folder = tmp_path / "hf"
    hf = random_hf_model("llama")
    bos, eos = 1, 2
    hf.config.bos_token_id = hf.generation_config.bos_token_id = bos
    hf.config.eos_token_id = hf.generation_config.eos_token_id = eos
    hf.save_pretrained(folder)
    vocab = {chr(0x100 + i): i for i in range(256) if i not in (bos, eos)} | {"<s>": bos, END: eos}
    tokenizer = Tokenizer(models.BPE(vocab, []))
    tokenizer.add_special_tokens(["<s>", END])
    tokenizer.save(str(folder / "tokenizer.json"))
    transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(folder / "tokenizer.json"), bos_token="<s>", eos_token=END
    ).save_pretrained(folder)
    export_checkpoint(import_folder(folder, tmp_path / "run"), tmp_path / "back")
    for name in ("config.json", GENERATION_CONFIG):
        written = json.loads((tmp_path / "back" / name).read_text())
        assert (written["bos_token_id"], written["eos_token_id"]) == (bos, eos), name
    exported = transformers.AutoTokenizer.from_pretrained(tmp_path / "back")
    assert (exported.bos_token, exported.bos_token_id) == ("<s>", bos)
