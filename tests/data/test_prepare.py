import hashlib
import importlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lmforge.data import prepare, sources
from lmforge.data.tokenizer import EOT, char_tokenizer, load_tokenizer
from lmforge.errors import LmforgeError
from tests.conftest import DATASETS


def read_split(out: Path, split: str) -> np.ndarray:
    meta = json.loads((out / "meta.json").read_text())
    return np.fromfile(out / f"{split}.bin", dtype=meta["dtype"])


def decode_split(out: Path, split: str) -> str:
    return load_tokenizer(out / "tokenizer.json").decode(read_split(out, split).tolist())


def test_tinyshakespeare_char_gives_nanogpt_split(cli, shared_data: Path, tmp_path: Path) -> None:
    code, _, err = cli("prepare", "tinyshakespeare", "--tokenizer", "char", "--out", tmp_path / "d", "-q")
    assert code == 0, err
    meta = json.loads((tmp_path / "d" / "meta.json").read_text())
    text = (shared_data / "tinyshakespeare" / "input.txt").read_text()
    n_train = int(len(text) * 0.9)
    assert (meta["vocab_size"], meta["train_tokens"], meta["val_tokens"]) == (
        len(set(text)),
        n_train,
        len(text) - n_train,
    )
    if DATASETS.real:
        assert (meta["vocab_size"], n_train, meta["val_tokens"]) == (65, 1_003_854, 111_540)  # nanoGPT's
    assert meta["dtype"] == "uint16" and meta["tokenizer"] == "char" and meta["source"] == "tinyshakespeare"
    assert meta["source_sha256"] == sources.NAMED_DATASETS["tinyshakespeare"][0].sha256
    # nanoGPT: stoi over sorted(set(text)); train = first int(n * 0.9) characters.
    stoi = {c: i for i, c in enumerate(sorted(set(text)))}
    expected = np.array([stoi[c] for c in text], dtype=np.uint16)
    np.testing.assert_array_equal(read_split(tmp_path / "d", "train"), expected[:n_train])
    np.testing.assert_array_equal(read_split(tmp_path / "d", "val"), expected[n_train:])


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["char", "byte", "bpe"])
def test_round_trip_whole_corpus(shared_data: Path, tmp_path: Path, kind: str) -> None:
    text = (shared_data / "tinyshakespeare" / "input.txt").read_text()
    meta = prepare("tinyshakespeare", tmp_path / kind, tokenizer=kind, progress=False).meta
    assert decode_split(tmp_path / kind, "train") + decode_split(tmp_path / kind, "val") == text
    assert meta["train_bytes"] + meta["val_bytes"] == len(text.encode())
    if kind == "byte":
        assert meta["vocab_size"] == 256 and meta["train_tokens"] + meta["val_tokens"] == len(text.encode())
    if kind == "bpe":  # 100 kB (the small copy) holds fewer than 8,192 distinct tokens
        assert meta["vocab_size"] == 8192 or not DATASETS.real and meta["vocab_size"] <= 8192
        assert meta["eot_id"] is not None


@pytest.mark.slow
def test_wikitext2_bpe_4096(cli, shared_data: Path, tmp_path: Path) -> None:
    folder = shared_data / "wikitext-2"
    code, _, err = cli(
        "prepare", folder, "--tokenizer", "bpe", "--vocab-size", "4096", "--out", tmp_path / "w", "-q"
    )
    assert code == 0, err
    meta = json.loads((tmp_path / "w" / "meta.json").read_text())
    assert meta["vocab_size"] == 4096 or not DATASETS.real and meta["vocab_size"] <= 4096
    assert meta["documents"] == 3  # SOURCE.md and the two .raw files
    # Three documents are too few to hold one out at 10%: the last 10% of the text is val.
    assert meta["split"] == "tail"
    assert 0.08 < meta["val_bytes"] / (meta["train_bytes"] + meta["val_bytes"]) < 0.12
    files = sorted(p for p in folder.rglob("*") if p.suffix in (".md", ".raw"))
    expected = "".join(p.read_text() for p in files)
    assert decode_split(tmp_path / "w", "train") + decode_split(tmp_path / "w", "val") == expected
    tokens = np.concatenate([read_split(tmp_path / "w", "train"), read_split(tmp_path / "w", "val")])
    assert (tokens == meta["eot_id"]).sum() == 3  # one <|endoftext|> after each document


def make_mixed_folder(root: Path) -> list[str]:
    """A folder of .txt, .md, nested and .jsonl documents (and files to skip); return the documents."""
    docs = {f"doc{i:02d}.txt": f"plain text number {i}.\nwith two lines {'x' * i}\n" for i in range(12)}
    for name, text in docs.items():
        (root / name).write_text(text)
    (root / "nested" / "deeper").mkdir(parents=True)
    (root / "nested" / "notes.md").write_text("# A heading\n\nSome *markdown* — with ünïcode.\n")
    (root / "nested" / "deeper" / "records.jsonl").write_text(
        json.dumps({"text": "first record"}) + "\n\n" + json.dumps({"text": "second\nrecord", "id": 7}) + "\n"
    )
    (root / "image.png").write_bytes(b"\x89PNG not text")
    (root / "empty.txt").write_text("")
    files = sorted(p for p in root.rglob("*") if p.suffix in (".txt", ".md"))
    return [p.read_text() for p in files if p.read_text()][:13] + ["first record", "second\nrecord"]


@pytest.mark.parametrize("kind", ["char", "byte", "bpe"])
def test_mixed_folder_splits_whole_documents(tmp_path: Path, kind: str) -> None:
    (tmp_path / "corpus").mkdir()
    documents = make_mixed_folder(tmp_path / "corpus")
    vocab = {"vocab_size": 300} if kind == "bpe" else {}
    meta = prepare(
        str(tmp_path / "corpus"),
        tmp_path / "out",
        tokenizer=kind,
        val_fraction=0.2,
        seed=3,
        progress=False,
        **vocab,
    ).meta
    assert meta["documents"] == len(documents) == 15
    assert meta["split"] == "documents" and meta["val_documents"] == 3
    tokenizer = load_tokenizer(tmp_path / "out" / "tokenizer.json")
    pieces = {}
    for split in ("train", "val"):
        ids = read_split(tmp_path / "out", split).tolist()
        if kind == "byte":  # no room for <|endoftext|> in 256 ids: documents are concatenated
            pieces[split] = tokenizer.decode(ids)
            continue
        eot = tokenizer.token_to_id(EOT)
        assert ids[-1] == eot
        parts, current = [], []
        for i in ids:
            if i == eot:
                parts.append(tokenizer.decode(current))
                current = []
            else:
                current.append(i)
        pieces[split] = parts
    if kind == "byte":
        assert len(pieces["train"]) + len(pieces["val"]) == len("".join(documents))
    else:
        assert sorted(pieces["train"] + pieces["val"]) == sorted(documents)
        assert len(pieces["val"]) == 3


def test_document_choice_is_seeded(tmp_path: Path) -> None:
    (tmp_path / "corpus").mkdir()
    make_mixed_folder(tmp_path / "corpus")
    runs = {}
    for name, seed in [("a", 1), ("b", 1), ("c", 2)]:
        prepare(
            str(tmp_path / "corpus"),
            tmp_path / name,
            tokenizer="byte",
            val_fraction=0.3,
            seed=seed,
            progress=False,
        )
        runs[name] = read_split(tmp_path / name, "val").tobytes()
    assert runs["a"] == runs["b"]
    assert runs["a"] != runs["c"]


def test_existing_tokenizer_file_and_uint32_shards(tmp_path: Path) -> None:
    alphabet = [chr(0x10000 + i) for i in range(70_000)]  # more ids than uint16 holds
    char_tokenizer(alphabet).save(str(tmp_path / "big.json"))
    text = "".join(alphabet[i * 997 % 70_000] for i in range(1000))
    (tmp_path / "in.txt").write_text(text)
    meta = prepare(
        str(tmp_path / "in.txt"), tmp_path / "out", tokenizer=str(tmp_path / "big.json"), progress=False
    ).meta
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == 70_000 and meta["tokenizer"] == "file"
    assert decode_split(tmp_path / "out", "train") + decode_split(tmp_path / "out", "val") == text
    assert read_split(tmp_path / "out", "train").max() >= 1 << 16


def test_text_is_read_in_bounded_chunks(tmp_path: Path) -> None:
    path = tmp_path / "big.txt"
    line = "a line of text that repeats\n"
    path.write_text(line * (3 * sources.CHUNK_BYTES // len(line)))
    chunks = list(sources.open_corpus(str(path)).documents().__next__())
    assert len(chunks) > 2
    assert max(len(c) for c in chunks) <= sources.CHUNK_BYTES + len(line)  # a chunk plus the carried line
    assert all(c.endswith("\n") for c in chunks)
    assert "".join(chunks) == path.read_text()


def test_invalid_utf8_is_an_error_unless_replaced(cli, tmp_path: Path) -> None:
    path = tmp_path / "bad.txt"
    path.write_bytes(b"good text\n" * 10 + b"\xff\xfe broken\n" + b"more good text\n" * 10)
    code, _, err = cli("prepare", path, "--tokenizer", "char", "--out", tmp_path / "o", "-q")
    assert code == 1
    assert f"{path}: invalid UTF-8 at byte 100" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()
    code, _, err = cli(
        "prepare", path, "--tokenizer", "char", "--out", tmp_path / "o", "-q", "--invalid-utf8", "replace"
    )
    assert code == 0, err
    assert "warning" in err and "replaced with U+FFFD" in err
    assert "\ufffd\ufffd broken" in decode_split(tmp_path / "o", "train") + decode_split(
        tmp_path / "o", "val"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["missing.txt", "--tokenizer", "char"], "missing.txt: no such file or folder"),
        (
            ["nosuchdataset", "--tokenizer", "char"],
            "'nosuchdataset' is neither a file, a folder nor a known dataset",
        ),
        (["{empty}", "--tokenizer", "char"], "input is empty"),
        (
            ["{emptydir}", "--tokenizer", "char"],
            "no .txt, .md, .raw, .text, .jsonl, .json, .csv, .tsv, .parquet files",
        ),
        (["{tiny}", "--tokenizer", "char"], "too small to give a non-empty train and val split"),
        (["{text}", "--tokenizer", "bpe", "--vocab-size", "100"], "--vocab-size must be at least 257"),
        (
            ["{text}", "--tokenizer", "char", "--vocab-size", "300"],
            "--vocab-size applies only to --tokenizer bpe",
        ),
        (["{text}", "--tokenizer", "{badtok}"], "not a valid tokenizer.json"),
        (["{text}", "--tokenizer", "nosuch/tokenizer.json"], "tokenizer file not found"),
        (
            ["{text}", "--tokenizer", "char", "--val-fraction", "1.5"],
            "--val-fraction must be between 0 and 1",
        ),
        (["{badjson}", "--tokenizer", "char"], "records.jsonl:2: not valid JSON"),
        (
            ["{notext}", "--tokenizer", "char"],
            "records.jsonl:1: expected an object with a string 'text' field",
        ),
    ],
)
def test_bad_input_is_a_one_line_error(cli, tmp_path: Path, args: list[str], message: str) -> None:
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "emptydir").mkdir()
    (tmp_path / "emptydir" / "skipped.png").write_bytes(b"x")
    (tmp_path / "tiny.txt").write_text("a")
    (tmp_path / "text.txt").write_text("some text\n" * 20)
    (tmp_path / "badtok.json").write_text("{not json")
    (tmp_path / "badjson").mkdir()
    (tmp_path / "badjson" / "records.jsonl").write_text('{"text": "ok"}\n{"text": oops}\n')
    (tmp_path / "notext").mkdir()
    (tmp_path / "notext" / "records.jsonl").write_text('{"body": "no text field"}\n')
    paths = {
        name: str(tmp_path / f)
        for name, f in [
            ("empty", "empty.txt"),
            ("emptydir", "emptydir"),
            ("tiny", "tiny.txt"),
            ("text", "text.txt"),
            ("badtok", "badtok.json"),
            ("badjson", "badjson"),
            ("notext", "notext"),
        ]
    }
    args = [a.format(**paths) for a in args]
    code, out, err = cli("prepare", *args, "--out", tmp_path / "out", "-q")
    assert code == 1
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no staging left behind


def test_existing_output_is_kept_without_overwrite(cli, tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("first corpus\n" * 50)
    (tmp_path / "b.txt").write_text("second corpus, different\n" * 50)
    out = tmp_path / "out"
    assert cli("prepare", tmp_path / "a.txt", "--tokenizer", "byte", "--out", out, "-q")[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    code, _, err = cli("prepare", tmp_path / "b.txt", "--tokenizer", "byte", "--out", out, "-q")
    assert code == 1 and "exists and is not empty; pass --overwrite" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # A failing run with --overwrite leaves the old output whole too.
    (tmp_path / "bad.txt").write_bytes(b"\xff" * 100)
    code, _, err = cli(
        "prepare", tmp_path / "bad.txt", "--tokenizer", "byte", "--out", out, "--overwrite", "-q"
    )
    assert code == 1 and "invalid UTF-8" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    code, _, err = cli(
        "prepare", tmp_path / "b.txt", "--tokenizer", "byte", "--out", out, "--overwrite", "-q"
    )
    assert code == 0, err
    assert decode_split(out, "train") + decode_split(out, "val") == (tmp_path / "b.txt").read_text()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_out_inside_input_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("text\n" * 100)
    with pytest.raises(LmforgeError, match="contains the input"):
        prepare(str(tmp_path / "a.txt"), tmp_path, tokenizer="char", overwrite=True, progress=False)
    assert (tmp_path / "a.txt").is_file()


def test_named_dataset_download_is_verified_and_cached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    published = tmp_path / "published.txt"
    published.write_text("to be or not to be\n" * 100)
    good = sources.NamedDataset("toy", "toy.txt", published.as_uri(), sources.file_sha256(published), 1900)
    monkeypatch.setitem(sources.NAMED_DATASETS, "toy", (good,))
    monkeypatch.setenv("LMFORGE_DATA_DIR", str(tmp_path / "nodata"))
    with pytest.raises(LmforgeError, match="LMFORGE_OFFLINE=1 forbids downloading"):
        sources.open_corpus("toy")
    monkeypatch.setenv("LMFORGE_OFFLINE", "0")
    corpus = sources.open_corpus("toy")
    assert corpus.files[0] == sources.cache_dir() / "datasets" / "toy" / "toy.txt"
    published.unlink()  # now served from the cache
    assert sources.open_corpus("toy").files == corpus.files
    corpus.files[0].write_text("tampered\n")
    with pytest.raises(LmforgeError, match="does not match the pinned"):
        sources.open_corpus("toy")
    published.write_text("TO BE OR NOT TO BE\n" * 100)  # changed upstream, same size as pinned
    corpus.files[0].unlink()
    with pytest.raises(LmforgeError, match="has sha256 .* expected"):
        sources.open_corpus("toy")
    assert not corpus.files[0].exists()


def test_python_m_lmforge_reports_errors_without_traceback(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "lmforge",
            "prepare",
            str(tmp_path / "nope.txt"),
            "--tokenizer",
            "char",
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert result.stderr == f"lmforge prepare: error: {tmp_path / 'nope.txt'}: no such file or folder\n"


def test_overwrite_refuses_a_folder_lmforge_did_not_write(cli, tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("first corpus\n" * 50)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes\n")
    code, _, err = cli(
        "prepare", tmp_path / "a.txt", "--tokenizer", "byte", "--out", mine, "--overwrite", "-q"
    )
    assert code == 1 and "was not written by lmforge" in err and err.count("\n") == 1
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    # A prepared folder says it is one, so --overwrite may replace it.
    assert cli("prepare", tmp_path / "a.txt", "--tokenizer", "byte", "--out", tmp_path / "data", "-q")[0] == 0
    assert json.loads((tmp_path / "data" / ".lmforge").read_text())["kind"] == "data"


def test_a_folder_named_like_a_tokenizer_kind_does_not_replace_it(
    cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bpe").mkdir()  # `--tokenizer bpe` still trains a BPE, not "the tokenizer of ./bpe"
    (tmp_path / "text.txt").write_text("the cat sat on the mat, and the dog sat on the log.\n" * 200)
    options = ["--tokenizer", "bpe", "--vocab-size", "300", "--out", "data", "-q"]
    code, _, err = cli("prepare", "text.txt", *options)
    assert code == 0, err
    assert json.loads((tmp_path / "data" / "meta.json").read_text())["tokenizer"] == "bpe"


# sha256 of the shards written before `prepare` encoded with `encode_batch_fast` in a worker thread
# (and skipped the round-trip check for byte-level BPEs): the output must not change by a byte.
PINNED = {
    ("bpe", "train.bin"): "12c8e0c9872fc06d4eaf58f1cbe78583cdfe458c08fdd46164367ec73e0ea00a",
    ("bpe", "val.bin"): "497272e24835c57e88631c59819c2526243a93bcef5b7a8f40e39b0a062ce6da",
    ("bpe", "tokenizer.json"): "6c948b7dfcab877355bc232f54273b584d6a0bc4a9564c0f1d923d7d99a3bce4",
    ("again", "train.bin"): "f2d17733a6f10c7ce342a7184f4de6eeccc69a37e8a3625047b6001d370e2fb4",
    ("again", "val.bin"): "cea5e49dbe12de24fb66acb0f6c13b61337f6436ff0c1fe9e6fc583a82d98c19",
}


@pytest.mark.parametrize("batch_chars", [4 << 20, 10_000])  # one batch; many, pipelined
def test_output_is_byte_identical_to_the_pinned_shards(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, batch_chars: int
) -> None:
    monkeypatch.setattr(importlib.import_module("lmforge.data.prepare"), "BATCH_CHARS", batch_chars)
    fixtures = Path(__file__).parents[1] / "fixtures" / "data"  # the small copies, whatever DATASETS is
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for source, name in [
        ("tinyshakespeare/input.txt", "a.txt"),
        ("wikitext-2/wiki.valid.raw", "b.txt"),
        ("wikitext-2/wiki.test.raw", "c.txt"),
    ]:
        shutil.copy(fixtures / source, corpus / name)
    # three documents, one held out, with a BPE trained on them; then the first file alone, split
    # at its tail, encoded with that tokenizer.json (a user's tokenizer: the coverage path)
    prepare(str(corpus), tmp_path / "bpe", "bpe", vocab_size=400, val_fraction=0.34, progress=False)
    user_tokenizer = str(tmp_path / "bpe" / "tokenizer.json")
    prepare(str(corpus / "a.txt"), tmp_path / "again", user_tokenizer, progress=False)
    for (out, name), digest in PINNED.items():
        assert hashlib.sha256((tmp_path / out / name).read_bytes()).hexdigest() == digest, f"{out}/{name}"


def test_an_encoding_error_in_the_worker_is_the_commands_error(tmp_path: Path) -> None:
    char_tokenizer("abc\n").save(str(tmp_path / "abc.json"))
    (tmp_path / "in.txt").write_text("abc\n" * 100 + "abd\n")
    with pytest.raises(LmforgeError, match="character 'd'"):
        prepare(str(tmp_path / "in.txt"), tmp_path / "out", str(tmp_path / "abc.json"), progress=False)
    assert not (tmp_path / "out").exists()


def test_a_linked_file_is_read_by_its_own_name_not_its_targets(cli, tmp_path: Path) -> None:
    """A Hugging Face cache snapshot links `train.txt` to a blob named by its hash: the link's suffix
    says how to read it, alone or in a folder."""
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshot"
    blobs.mkdir()
    snapshot.mkdir()
    (blobs / "9f86d081884c7d65").write_text("text kept in a blob\n" * 20)
    (blobs / "60303ae22b998861").write_text('{"text": "a record in a blob"}\n' * 20)
    (snapshot / "train.txt").symlink_to(blobs / "9f86d081884c7d65")
    (snapshot / "records.jsonl").symlink_to(blobs / "60303ae22b998861")
    code, _, err = cli(
        "prepare", snapshot / "train.txt", "--tokenizer", "byte", "--out", tmp_path / "one", "-q"
    )
    assert code == 0, err
    assert decode_split(tmp_path / "one", "train") + decode_split(tmp_path / "one", "val") == (
        "text kept in a blob\n" * 20
    )
    code, _, err = cli("prepare", snapshot, "--tokenizer", "char", "--out", tmp_path / "folder", "-q")
    assert code == 0, err
    assert json.loads((tmp_path / "folder" / "meta.json").read_text())["documents"] == 21


def test_a_folder_reads_its_gzipped_text_files_as_a_file_argument_does(tmp_path: Path) -> None:
    import gzip

    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.txt").write_text("a plain document\n")
    with gzip.open(folder / "b.txt.gz", "wt") as f:
        f.write("a gzipped document\n")
    prepare(str(folder), tmp_path / "out", tokenizer="byte", progress=False, val_fraction=0.34)
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["documents"] == 2
    text = decode_split(tmp_path / "out", "train") + decode_split(tmp_path / "out", "val")
    assert sorted(text.splitlines()) == ["a gzipped document", "a plain document"]


def test_a_gzipped_text_file_with_an_upper_case_suffix_is_decompressed(tmp_path: Path) -> None:
    """`.txt.GZ` is taken for gzipped text (the suffix rule ignores case), so it must be read as such:
    it was read as raw bytes, an 'invalid UTF-8' error (or, with --invalid-utf8 replace, garbage)."""
    import gzip

    folder = tmp_path / "corpus"
    folder.mkdir()
    with gzip.open(folder / "b.txt.GZ", "wt") as f:
        f.write("a gzipped document\n" * 4)
    prepare(str(folder), tmp_path / "out", tokenizer="byte", progress=False)
    text = decode_split(tmp_path / "out", "train") + decode_split(tmp_path / "out", "val")
    assert text == "a gzipped document\n" * 4


def test_every_suffix_is_matched_whatever_its_case(tmp_path: Path, cli) -> None:
    """`.TXT`, `.Md`, `.TXT.GZ`, `.JSONL`, `.Csv`: read as their lower-case names are, in a folder
    and alone."""
    import gzip

    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.TXT").write_text("plain text\n")
    (folder / "b.Md").write_text("markdown\n")
    with gzip.open(folder / "c.TXT.GZ", "wt") as f:
        f.write("gzipped text\n")
    (folder / "d.JSONL").write_text('{"text": "a record"}\n')
    (folder / "e.Csv").write_text("text\na row\n")
    prepare(str(folder), tmp_path / "out", tokenizer="byte", progress=False, val_fraction=0.2)
    assert json.loads((tmp_path / "out" / "meta.json").read_text())["documents"] == 5
    text = decode_split(tmp_path / "out", "train") + decode_split(tmp_path / "out", "val")
    for line in ["plain text", "markdown", "gzipped text", "a record", "a row"]:
        assert line in text
    code, _, err = cli("prepare", folder / "a.TXT", "--tokenizer", "byte", "--out", tmp_path / "one", "-q")
    assert code == 0, err
