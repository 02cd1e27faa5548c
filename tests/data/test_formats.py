"""Fine-tuning data in the formats people have: JSON/JSONL of Alpaca, ShareGPT, OpenAI messages and
prompt/completion records; CSV, TSV and Parquet with a column mapping; Hugging Face datasets."""

import json
from pathlib import Path

import pytest

from lmforge.config import ColumnsConfig, DataConfig
from lmforge.data.chat_template import DEFAULT_CHAT_TEMPLATE, ChatTemplate, Segment
from lmforge.data.sft import ALPACA_PROMPT, RecordParser, RecordShape, SFTData, read_examples, read_records
from lmforge.data.tokenizer import EOT, char_tokenizer
from lmforge.errors import LmforgeError

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "sft"
TEMPLATE = ChatTemplate(DEFAULT_CHAT_TEMPLATE)  # no special tokens: segments are the bare text
QA = ColumnsConfig(prompt="question", completion="answer")


def read(name: str | Path, **shape: object) -> list[list[Segment]]:
    return read_examples(FIXTURES / name, "error", TEMPLATE, shape=RecordShape(**shape))


def tokenizer_file(tmp_path: Path) -> Path:
    """A char tokenizer with every character of the fixtures and of Alpaca's prompt."""
    text = (
        "".join(p.read_text() for p in FIXTURES.rglob("*.*sv"))
        + ALPACA_PROMPT
        + "".join(p.read_text() for p in FIXTURES.rglob("*.json*"))
    )
    path = tmp_path / "tokenizer.json"
    char_tokenizer(set(text) | set("0123456789"), specials=[EOT]).save(str(path))
    return path


def test_alpaca_records_get_alpacas_prompt_with_and_without_input() -> None:
    with_input, no_input, *_ = read("alpaca.jsonl")
    assert with_input == [
        Segment(
            "Below is an instruction that describes a task, paired with an input that provides further "
            "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
            "Give the opposite of the word.\n\n### Input:\nhot\n\n### Response:",
            False,
        ),
        Segment("cold", True),
    ]
    assert no_input[0].text.endswith("### Instruction:\nName a colour of the sky.\n\n### Response:")
    assert "### Input" not in no_input[0].text


def test_a_json_array_reads_as_the_same_records_in_jsonl() -> None:
    assert read("alpaca.json") == read("alpaca.jsonl")  # an absent 'input' is an empty one


def test_records_after_a_utf8_byte_order_mark_read_as_without_it(tmp_path: Path) -> None:
    for name in ("alpaca.jsonl", "qa.csv"):
        (tmp_path / name).write_bytes(b"\xef\xbb\xbf" + (FIXTURES / name).read_bytes())
        shape = {"columns": QA} if name.endswith(".csv") else {}
        assert read(tmp_path / name, **shape) == read(name, **shape), name


def test_sharegpt_conversations_are_chat_messages() -> None:
    assert read("sharegpt.jsonl") == read("messages.jsonl")
    assert read("messages.jsonl")[0] == [
        Segment("user: hi there\nassistant:", False),
        Segment(" hello!\n", True),
    ]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("alpaca.jsonl", "alpaca"),
        ("sharegpt.jsonl", "sharegpt"),
        ("messages.jsonl", "messages"),
        ("prompt_completion.jsonl", "prompt_completion"),
    ],
)
def test_the_format_is_detected_from_the_keys(name: str, expected: str) -> None:
    parser = RecordParser(TEMPLATE)
    read_records(FIXTURES / name, "error", parser)
    assert parser.describe() == expected


def test_a_named_format_refuses_records_of_another(tmp_path: Path) -> None:
    with pytest.raises(
        LmforgeError, match=r"messages.jsonl:1: expected string fields 'instruction' and 'output'"
    ):
        read("messages.jsonl", format="alpaca")


def test_csv_tsv_and_parquet_columns_are_mapped_to_prompt_and_completion(tmp_path: Path) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    csv_rows = read("qa.csv", columns=QA)
    assert csv_rows[0] == [Segment("the capital of france?", False), Segment("paris", True)]
    assert csv_rows[1][0].text == "two and two, in words?"  # a quoted comma
    assert csv_rows[2][0].text == "a line\nthat breaks?"  # a quoted newline
    tsv_rows = read("qa.tsv", columns=QA)
    assert tsv_rows[0] == csv_rows[0] and tsv_rows[2] == csv_rows[3]
    table = {"question": ["the capital of france?", "two and two?"], "answer": ["paris", "four"]}
    import pyarrow

    pq.write_table(pyarrow.table(table), tmp_path / "qa.parquet")
    assert read(tmp_path / "qa.parquet", columns=QA) == [tsv_rows[0], tsv_rows[1]]


def test_unmapped_columns_are_a_one_line_error_naming_the_row_and_the_keys() -> None:
    with pytest.raises(LmforgeError) as caught:
        read("qa.csv")
    message = str(caught.value)
    assert message.startswith(f"{FIXTURES / 'qa.csv'}:2: no known format")
    assert "found 'question', 'answer', 'source'" in message and "data.columns" in message
    assert "\n" not in message


def test_a_messages_column_holds_json_text_in_a_csv_either_style() -> None:
    first, second = read("chat.csv", columns=ColumnsConfig(messages="dialog"))
    assert first == [Segment("user: hi\nassistant:", False), Segment(" hello\n", True)]
    assert second == [Segment("user: name a fruit\nassistant:", False), Segment(" apple\n", True)]


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("bad.csv", "question,answer\na,b\nc,d,e\n", "bad.csv:3: 3 fields where the header has 2"),
        ("bad.tsv", "question\tanswer\na\tb\nc\t\n", "bad.tsv:3: empty completion"),
        (
            "bad.json",
            '[\n {"question": "a", "answer": "b"},\n\n {"question": "c"}\n]',
            "bad.json:4: expected string fields 'question' and 'answer'",
        ),
    ],
)
def test_bad_rows_name_file_and_line_or_are_skipped(tmp_path: Path, caplog, name, text, message) -> None:
    (tmp_path / name).write_text(text)
    with pytest.raises(LmforgeError, match=message):
        read(tmp_path / name, columns=QA)
    shape = RecordShape(columns=QA)
    assert len(read_examples(tmp_path / name, "skip", TEMPLATE, shape=shape)) == 1
    assert "skipped 1 bad line(s)" in caplog.text


def test_broken_json_array_is_one_error_at_its_line(tmp_path: Path) -> None:
    (tmp_path / "broken.json").write_text('[\n {"prompt": "a", "completion": "b"},\n {"prompt": oops}\n]')
    with pytest.raises(LmforgeError, match=r"broken.json:3: not valid JSON \(Expecting value\)"):
        read(tmp_path / "broken.json")
    (tmp_path / "object.json").write_text('{"prompt": "a", "completion": "b"}')
    with pytest.raises(LmforgeError, match="expected a JSON array of records"):
        read(tmp_path / "object.json")


def test_a_single_file_gets_a_seeded_validation_split(tmp_path: Path) -> None:
    records = [{"prompt": f"q{i}:", "completion": " a"} for i in range(20)]
    (tmp_path / "all.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    tok = tokenizer_file(tmp_path)

    def split(seed: int) -> tuple[list, list]:
        data = SFTData(tmp_path / "all.jsonl", tok, 32, data=DataConfig(val_fraction=0.25, val_seed=seed))
        return [e.ids for e in data.train], [e.ids for e in data.val]

    train, val = split(0)
    assert len(train) == 15 and len(val) == 5 and not {tuple(v) for v in val} & {tuple(t) for t in train}
    assert split(0) == (train, val)  # the same seed: the same split
    assert split(1)[1] != val
    data = SFTData(tmp_path / "all.jsonl", tok, 32, data=DataConfig(val_fraction=0.25))
    assert "15 train examples from" in data.summary and "(prompt_completion)" in data.summary
    assert "5 val carved from train (data.val_fraction 0.25, data.val_seed 0)" in data.summary


def test_a_folder_reads_its_train_and_val_files_of_any_type(tmp_path: Path) -> None:
    data = SFTData(FIXTURES / "folder", tokenizer_file(tmp_path), 512)
    assert (len(data.train), len(data.val)) == (4, 1)
    assert f"4 train examples from {FIXTURES / 'folder' / 'train.jsonl'} (alpaca)" in data.summary
    assert f"1 val from {FIXTURES / 'folder' / 'val.jsonl'}" in data.summary
    (tmp_path / "two").mkdir()
    for name in ("train.jsonl", "train.csv"):
        (tmp_path / "two" / name).write_text("")
    with pytest.raises(LmforgeError, match="both train.jsonl and train.csv; keep one train file"):
        SFTData(tmp_path / "two", tokenizer_file(tmp_path), 32)


def test_the_summary_names_the_train_files_formats_not_vals_too(tmp_path: Path) -> None:
    """The formats given beside "N train examples from FILE" are that file's, not train's and val's."""
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "train.jsonl").write_text(
        "".join(json.dumps({"prompt": f"q{i}", "completion": " a"}) + "\n" for i in range(3))
    )
    chat = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    (folder / "val.jsonl").write_text(json.dumps({"messages": chat}) + "\n")
    data = SFTData(folder, tokenizer_file(tmp_path), 512)
    assert f"3 train examples from {folder / 'train.jsonl'} (prompt_completion), 1 val" in data.summary


def test_a_folders_train_and_val_files_may_have_upper_case_suffixes(tmp_path: Path) -> None:
    folder = tmp_path / "upper"
    folder.mkdir()
    for name in ("train.jsonl", "val.jsonl"):
        (folder / name.replace(".jsonl", ".JSONL")).write_bytes((FIXTURES / "folder" / name).read_bytes())
    data = SFTData(folder, tokenizer_file(tmp_path), 512)
    assert (len(data.train), len(data.val)) == (4, 1)
    assert f"4 train examples from {folder / 'train.JSONL'} (alpaca)" in data.summary


def test_an_unknown_file_type_is_refused(tmp_path: Path) -> None:
    (tmp_path / "data.xml").write_text("<a/>")
    with pytest.raises(
        LmforgeError, match=r"data.xml: unknown file type '.xml' for fine-tuning data \(expected .jsonl"
    ):
        SFTData(tmp_path / "data.xml", tokenizer_file(tmp_path), 32)


def test_a_hugging_face_dataset_folder_and_its_saved_copy_are_read(tmp_path: Path, monkeypatch) -> None:
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")  # not the user's cache
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "train.jsonl").write_text((FIXTURES / "alpaca.jsonl").read_text())
    (folder / "validation.jsonl").write_text((FIXTURES / "folder" / "val.jsonl").read_text())
    tok = tokenizer_file(tmp_path)
    config = DataConfig(hf=str(folder), hf_val_split="validation")
    data = SFTData(Path(), tok, 512, data=config)
    local = SFTData(FIXTURES / "folder", tok, 512)
    assert [e.ids for e in data.train] == [e.ids for e in local.train]
    assert [e.ids for e in data.val] == [e.ids for e in local.val]
    assert f"from {folder}[train] (alpaca)" in data.summary
    datasets.load_dataset(str(folder), split="train").save_to_disk(str(tmp_path / "saved"))
    saved = SFTData(Path(), tok, 512, data=DataConfig(hf=str(tmp_path / "saved"), val_fraction=0.25))
    assert len(saved.train) + len(saved.val) == 4
    with pytest.raises(LmforgeError, match=r"Hugging Face dataset '.*hf' \(split 'test'\): cannot load"):
        SFTData(Path(), tok, 512, data=DataConfig(hf=str(folder), hf_split="test"))


def test_a_saved_single_split_is_not_read_again_as_another_split(tmp_path: Path) -> None:
    """A folder that `Dataset.save_to_disk` wrote holds one split: asked for data.hf_val_split, it
    answered with the train examples again, so checkpoints were chosen on the data trained on."""
    datasets = pytest.importorskip("datasets")
    rows = [{"prompt": f"q{i}?", "completion": f" a{i}"} for i in range(4)]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    tok = tokenizer_file(tmp_path)
    data = SFTData(Path(), tok, 512, data=DataConfig(hf=str(tmp_path / "saved"), val_fraction=0.25))
    assert (len(data.train), len(data.val)) == (3, 1)  # the one split is the train split
    config = DataConfig(hf=str(tmp_path / "saved"), hf_val_split="validation")
    with pytest.raises(LmforgeError, match=r"saved.*: one split \('train'\) .*no split 'validation'"):
        SFTData(Path(), tok, 512, data=config)


def test_a_hub_dataset_loads_offline_from_the_cache(tmp_path: Path, monkeypatch) -> None:
    """What `load_dataset("org/name")` cached is read again with LMFORGE_OFFLINE=1 and no network."""
    datasets = pytest.importorskip("datasets")
    cache = tmp_path / "cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    from datasets.packaged_modules.json.json import Json

    files = datasets.data_files.DataFilesDict.from_patterns({"train": [str(FIXTURES / "messages.jsonl")]})
    Json(cache_dir=str(cache / "built"), dataset_name="tiny-chat", data_files=files).download_and_prepare()
    # laid out as loading the hub's lmforge-tests/tiny-chat leaves it: ORG___NAME/CONFIG/VERSION/COMMIT
    (built,) = (cache / "built" / "tiny-chat").glob("*/0.0.0")
    (cache / "lmforge-tests___tiny-chat" / "default" / "0.0.0").mkdir(parents=True)
    built.rename(cache / "lmforge-tests___tiny-chat" / "default" / "0.0.0" / "0123456789abcdef")
    monkeypatch.setenv("LMFORGE_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)  # lmforge turns it on
    data = SFTData(Path(), tokenizer_file(tmp_path), 512, data=DataConfig(hf="lmforge-tests/tiny-chat"))
    assert len(data.train) + len(data.val) == 3 and "(messages)" in data.summary
    assert datasets.config.HF_HUB_OFFLINE


def test_the_data_keys_are_typed_validated_and_set_from_the_command_line(tmp_path: Path) -> None:
    from lmforge.config import load_config

    config = load_config(None, ["data.kind=sft", "data.columns.prompt=question", "data.pack=true"])
    assert config.data.columns == ColumnsConfig(prompt="question") and config.data.pack
    (tmp_path / "run.toml").write_text(config.to_toml())
    assert load_config(tmp_path / "run.toml") == config  # [data.columns] round-trips through TOML
    for override, message in [
        ("data.val_fraction=1.5", "data.val_fraction must be in (0, 1)"),
        ("data.format=xml", "data.format must be one of auto, prompt_completion, messages, alpaca, sharegpt"),
        ("data.columns.answer=x", "unknown key data.columns.answer"),
        ("data.kind=tokens", 'data.pack applies to data.kind = "sft"'),
        ("model.head=span", 'data.pack needs model.head = "lm"'),
    ]:
        with pytest.raises(LmforgeError, match=message.replace("(", r"\(").replace(")", r"\)")):
            load_config(None, ["data.kind=sft", "data.pack=true", override])
