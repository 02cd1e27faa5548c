"""`lmforge prepare` on record files (JSON/JSONL, CSV, TSV, Parquet) and Hugging Face datasets: one
document per record's text column; any other file type is an error that names the flag to use."""

import json
from pathlib import Path

import pytest

from lmforge.data.prepare import prepare
from lmforge.errors import LmforgeError

PRETRAIN = Path(__file__).resolve().parents[1] / "fixtures" / "sft" / "pretrain"


def shards(out: Path) -> tuple[bytes, bytes, int]:
    meta = json.loads((out / "meta.json").read_text())
    return (out / "train.bin").read_bytes(), (out / "val.bin").read_bytes(), meta["documents"]


def prepared(tmp_path: Path, source: str | Path, **options: object) -> tuple[bytes, bytes, int]:
    out = tmp_path / f"out{len(list(tmp_path.iterdir()))}"
    prepare(str(source), out, "char", progress=False, val_fraction=0.34, **options)
    return shards(out)


def test_every_record_format_gives_the_same_shards(tmp_path: Path) -> None:
    reference = prepared(tmp_path, PRETRAIN / "docs.jsonl")
    assert reference[2] == 3  # three documents, one per record
    assert prepared(tmp_path, PRETRAIN / "docs.csv", text_column="body") == reference
    assert prepared(tmp_path, PRETRAIN / "docs.json", text_column="body") == reference
    tsv = tmp_path / "docs.tsv"
    rows = [json.loads(line)["text"] for line in (PRETRAIN / "docs.jsonl").read_text().splitlines()]
    tsv.write_text("text\n" + "".join(f'"{r}"\n' for r in rows))  # quoted: the first text spans two lines
    assert prepared(tmp_path, tsv) == reference
    pq, pa = pytest.importorskip("pyarrow.parquet"), pytest.importorskip("pyarrow")
    pq.write_table(pa.table({"id": [1, 2, 3], "text": rows}), tmp_path / "docs.parquet")
    assert prepared(tmp_path, tmp_path / "docs.parquet") == reference


def test_a_hugging_face_dataset_is_streamed_record_by_record(tmp_path: Path, monkeypatch) -> None:
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path.parent / "hf-cache")
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "train.jsonl").write_text((PRETRAIN / "docs.jsonl").read_text())
    (folder / "test.jsonl").write_text('{"text": "not this split"}\n')
    reference = prepared(tmp_path, PRETRAIN / "docs.jsonl")
    assert prepared(tmp_path, f"hf:{folder}") == reference
    assert prepared(tmp_path, f"hf:{folder}@test")[2] == 1
    with pytest.raises(LmforgeError, match=r"Hugging Face dataset '.*hf' \(split 'nope'\): cannot load"):
        prepared(tmp_path, f"hf:{folder}@nope")


@pytest.mark.parametrize(
    ("name", "content", "options", "message"),
    [
        ("docs.dat", "some text\n", {}, r"docs.dat: unknown file type '.dat'; give --format text\|jsonl"),
        ("notes", "some text\n", {}, r"notes: unknown file type '\(none\)'; give --format"),
        ("docs.jsonl.gz", "", {}, r"compressed .jsonl records are not read; decompress the file"),
        (
            "docs.csv",
            "id,body\n1,hello\n",
            {},
            r"docs.csv:2: no text column 'text' \(name it with --text-column",
        ),
        ("docs.json", '{"text": "x"}', {}, r"docs.json: expected a JSON array of records"),
        ("docs.csv", "text\nhello\n", {"input_format": "xml"}, r"--format must be one of auto, text, jsonl"),
    ],
)
def test_a_file_that_would_be_misread_is_a_one_line_error_naming_the_flag(
    tmp_path: Path, name: str, content: str, options: dict, message: str
) -> None:
    (tmp_path / name).write_text(content)
    with pytest.raises(LmforgeError, match=message) as caught:
        prepare(str(tmp_path / name), tmp_path / "out", "char", progress=False, **options)
    assert "\n" not in str(caught.value) and not (tmp_path / "out").exists()


def test_format_says_how_to_read_a_file_of_any_name(tmp_path: Path) -> None:
    (tmp_path / "docs.dat").write_bytes((PRETRAIN / "docs.csv").read_bytes())
    as_csv = prepared(tmp_path, tmp_path / "docs.dat", input_format="csv", text_column="body")
    assert as_csv == prepared(tmp_path, PRETRAIN / "docs.jsonl")
    as_text = prepared(tmp_path, PRETRAIN / "docs.csv", input_format="text")
    assert as_text[2] == 1  # the whole file, header and all, one document


def test_the_cli_reads_a_csv_column(cli, tmp_path: Path) -> None:
    code, _, err = cli(
        "prepare",
        PRETRAIN / "docs.csv",
        "--text-column",
        "body",
        "--out",
        tmp_path / "o",
        "--tokenizer",
        "char",
        "-q",
    )
    assert code == 0, err
    assert json.loads((tmp_path / "o" / "meta.json").read_text())["documents"] == 3
    code, _, err = cli("prepare", PRETRAIN / "docs.csv", "--out", tmp_path / "p", "--tokenizer", "char", "-q")
    assert code == 1 and err.count("\n") == 1 and "--text-column" in err


def test_hf_input_names_dataset_config_and_split_and_is_opened_as_a_stream(
    tmp_path: Path, monkeypatch
) -> None:
    datasets = pytest.importorskip("datasets")
    from lmforge.data.records import open_hf
    from lmforge.data.sources import HFSource

    assert HFSource.parse("hf:org/name:cfg@validation") == HFSource("org/name", "validation", "cfg")
    assert HFSource.parse("hf:org/name") == HFSource("org/name", "train", "")
    (tmp_path / "train.jsonl").write_text((PRETRAIN / "docs.jsonl").read_text())
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    stream = open_hf(str(tmp_path), split="train", streaming=True)
    assert isinstance(stream, datasets.IterableDataset)  # records are read as they are used, never all held


BOM = b"\xef\xbb\xbf"


def test_a_utf8_byte_order_mark_is_not_part_of_the_text(tmp_path: Path) -> None:
    """Excel's "CSV UTF-8" and Windows editors start a file with a byte order mark, which Python's
    utf-8-sig, pandas and Hugging Face datasets drop: it is no character of the text, nor of a key."""
    for name, column in (("docs.jsonl", None), ("docs.csv", "body"), ("docs.json", "body")):
        marked = tmp_path / "marked" / name
        marked.parent.mkdir(exist_ok=True)
        marked.write_bytes(BOM + (PRETRAIN / name).read_bytes())
        reference = prepared(tmp_path, PRETRAIN / name, text_column=column)
        assert prepared(tmp_path, marked, text_column=column) == reference, name
    text = "A text file that a Windows editor saved.\n" * 10
    (tmp_path / "plain.txt").write_text(text)
    (tmp_path / "marked.txt").write_bytes(BOM + text.encode())
    assert prepared(tmp_path, tmp_path / "marked.txt") == prepared(tmp_path, tmp_path / "plain.txt")


def test_a_record_whose_text_is_not_a_string_says_so_rather_than_that_the_column_is_missing(
    tmp_path: Path,
) -> None:
    (tmp_path / "docs.json").write_text('[{"text": "a document"}, {"text": null}, {"text": 7}]')
    with pytest.raises(LmforgeError, match=r"docs.json:1: column 'text' holds null, not a string$"):
        prepare(str(tmp_path / "docs.json"), tmp_path / "out", "char", progress=False)
    pq, pa = pytest.importorskip("pyarrow.parquet"), pytest.importorskip("pyarrow")
    pq.write_table(pa.table({"text": ["a document", None]}), tmp_path / "docs.parquet")
    with pytest.raises(LmforgeError, match=r"docs.parquet: row 2: column 'text' holds null, not a string$"):
        prepare(str(tmp_path / "docs.parquet"), tmp_path / "out", "char", progress=False)
