"""Throughput and peak memory of `lmforge prepare` with BPE on a large corpus.

Builds a corpus of at least --size-mb MB by repeating the shared TinyShakespeare and
WikiText-2 text into one file (or, with --dataset NAME, prepares that named dataset as
`lmforge prepare NAME` finds it, e.g. `gutenberg`: 150 MB of gzipped books in
$LMFORGE_DATA_DIR; with --limit-mb N, its first N MB of text as one file), then runs, each in a
fresh process so peak RSS is its own:
  1. prepare with `--tokenizer bpe` (trains the BPE, then encodes),
  2. prepare with the tokenizer.json from run 1 (encoding only, after the scan pass),
  3. raw `tokenizers` with that tokenizer.json on the same text: read the files, cut the text in
     64 KiB pieces at newlines, `encode_batch_fast` 4 MB at a time, write uint16 (and the same with
     `encode_batch`, which also computes offsets), the floor of what prepare can cost.
Prints one summary line per run, the load average, and run 2's MB/s over run 3's (both passes of
prepare, scan included, against the raw loop).

    .venv/bin/python benchmarks/prepare_throughput.py --size-mb 200
    .venv/bin/python benchmarks/prepare_throughput.py --dataset tinyshakespeare --vocab-size 8192
    .venv/bin/python benchmarks/prepare_throughput.py --dataset gutenberg --limit-mb 50 --vocab-size 8192
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = """
import json, resource, sys
from lmforge.data.prepare import prepare
vocab_size = None if sys.argv[4] == "-" else int(sys.argv[4])
report = prepare(
    sys.argv[1], sys.argv[2], tokenizer=sys.argv[3], vocab_size=vocab_size, overwrite=True, progress=False
)
usage = resource.getrusage(resource.RUSAGE_SELF)  # CPU seconds: what a loaded machine does not inflate
print(json.dumps({
    "text_mb": report.text_bytes / 1e6, "scan_s": report.scan_seconds, "encode_s": report.encode_seconds,
    "encode_mb_s": report.encode_mb_per_s, "tokens": report.meta["train_tokens"] + report.meta["val_tokens"],
    "peak_rss_mb": usage.ru_maxrss / 1024, "cpu_s": usage.ru_utime + usage.ru_stime,
}))
"""


RAW = """
import gzip, json, resource, sys, time
import numpy as np
from tokenizers import Tokenizer
tokenizer = Tokenizer.from_file(sys.argv[1])
encode = getattr(tokenizer, sys.argv[2])
start = time.perf_counter()
opener = lambda f: gzip.open(f, "rt", encoding="utf-8") if f.endswith(".gz") else open(f, encoding="utf-8")
text = "".join(opener(f).read() for f in sys.argv[4:])
pieces, i = [], 0
while i < len(text):  # 64 KiB pieces cut after a newline, as prepare reads
    cut = text.rfind("\\n", i, i + 65536) + 1
    end = cut if cut > i and i + 65536 < len(text) else min(i + 65536, len(text))
    pieces.append(text[i:end])
    i = end
tokens = 0
with open(sys.argv[3], "wb") as out:
    for b in range(0, len(pieces), 64):  # 64 pieces: 4 MB a call
        encodings = encode(pieces[b:b + 64], add_special_tokens=False)
        ids = np.concatenate([np.asarray(e.ids, np.uint16) for e in encodings])
        ids.tofile(out)
        tokens += len(ids)
seconds = time.perf_counter() - start
usage = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"text_mb": len(text.encode()) / 1e6, "seconds": seconds, "tokens": tokens,
                  "cpu_s": usage.ru_utime + usage.ru_stime}))
"""


def build_corpus(path: Path, size_mb: int, data_dir: Path) -> int:
    sources = [
        data_dir / "tinyshakespeare" / "input.txt",
        data_dir / "wikitext-2" / "wiki.valid.raw",
        data_dir / "wikitext-2" / "wiki.test.raw",
    ]
    block = b"".join(p.read_bytes() for p in sources)
    written = 0
    with open(path, "wb") as f:
        while written < size_mb * 1_000_000:
            f.write(block)
            written += len(block)
    return written


def gutenberg_slice(path: Path, limit_mb: int, data_dir: Path) -> int:
    """The first `limit_mb` MB of the gutenberg train text (cut after a line), as one plain file."""
    import gzip

    written = 0
    with gzip.open(data_dir / "gutenberg" / "train.txt.gz", "rb") as books, open(path, "wb") as f:
        for line in books:
            if written >= limit_mb * 1_000_000:
                break
            f.write(line)
            written += len(line)
    return written


def corpus_files(corpus: Path | str) -> list[str]:
    """The files lmforge prepare reads for this input, for the raw loop to read the same text."""
    from lmforge.data.sources import open_corpus

    return [str(f) for f in open_corpus(str(corpus)).files]


def raw(tokenizer: Path, corpus: Path | str, out: Path, method: str) -> dict:
    args = [sys.executable, "-c", RAW, str(tokenizer), method, str(out), *corpus_files(corpus)]
    result = subprocess.run(args, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run(corpus: Path | str, out: Path, tokenizer: str, vocab_size: int | None) -> dict:
    args = [sys.executable, "-c", CHILD, str(corpus), str(out), tokenizer, str(vocab_size or "-")]
    result = subprocess.run(args, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def overall(result: dict) -> str:
    """Both passes together: the whole command's throughput."""
    seconds = result["scan_s"] + result["encode_s"]
    return (
        f"both passes {seconds:.1f} s = {result['text_mb'] / seconds:.2f} MB/s; "
        f"{result['cpu_s']:.0f} CPU s = {result['text_mb'] / result['cpu_s']:.2f} MB per CPU s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size-mb", type=int, default=200)
    parser.add_argument("--dataset", help="a named dataset (e.g. gutenberg) instead of the built corpus")
    parser.add_argument("--limit-mb", type=int, help="with --dataset gutenberg: only its first N MB of text")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument(
        "--data-dir", type=Path, default=Path(os.environ.get("LMFORGE_DATA_DIR", "../shared/data"))
    )
    parser.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a temp dir)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=args.workdir) as scratch:
        work = Path(scratch)
        if args.dataset == "gutenberg" and args.limit_mb:
            corpus = work / f"gutenberg-{args.limit_mb}mb.txt"
            size = gutenberg_slice(corpus, args.limit_mb, args.data_dir)
        elif args.dataset:
            corpus, size = args.dataset, 0
        else:
            corpus = work / "corpus.txt"
            size = build_corpus(corpus, args.size_mb, args.data_dir)
        import tokenizers
        import torch  # noqa: F401  (only to report the version)

        print(
            f"corpus: {f'{size / 1e6:.1f} MB ' if size else ''}({corpus}), {cpu_model()}, "
            f"{os.cpu_count()} cpus, python {platform.python_version()}, torch {torch.__version__}, "
            f"tokenizers {tokenizers.__version__}; load average {load()}"
        )
        trained = run(corpus, work / "bpe", "bpe", args.vocab_size)
        print(
            f"bpe train+encode: {trained['text_mb']:.1f} MB, scan+train {trained['scan_s']:.1f} s, "
            f"encode {trained['encode_s']:.1f} s = {trained['encode_mb_s']:.2f} MB/s "
            f"({overall(trained)}), {trained['tokens']:,} tokens, peak RSS {trained['peak_rss_mb']:.0f} MB"
        )
        encoded = run(corpus, work / "again", str(work / "bpe" / "tokenizer.json"), None)
        print(
            f"bpe encode only:  {encoded['text_mb']:.1f} MB, scan {encoded['scan_s']:.1f} s, "
            f"encode {encoded['encode_s']:.1f} s = {encoded['encode_mb_s']:.2f} MB/s "
            f"({overall(encoded)}), {encoded['tokens']:,} tokens, peak RSS {encoded['peak_rss_mb']:.0f} MB"
        )
        prepared_mb_s = encoded["text_mb"] / (encoded["scan_s"] + encoded["encode_s"])
        for method in ("encode_batch_fast", "encode_batch"):
            floor = raw(work / "bpe" / "tokenizer.json", corpus, work / "raw.bin", method)
            raw_mb_s = floor["text_mb"] / floor["seconds"]
            print(
                f"raw tokenizers ({method}): {floor['text_mb']:.1f} MB in {floor['seconds']:.1f} s = "
                f"{raw_mb_s:.2f} MB/s, {floor['cpu_s']:.0f} CPU s, {floor['tokens']:,} tokens; "
                f"prepare (encode only, both passes) / raw = {prepared_mb_s / raw_mb_s:.2f}x"
            )
        print(f"load average after: {load()}")


if __name__ == "__main__":
    main()
