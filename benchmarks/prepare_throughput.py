"""Throughput and peak memory of `lmforge prepare` with BPE on a large corpus.

Builds a corpus of at least --size-mb MB by repeating the shared TinyShakespeare and
WikiText-2 text into one file (or, with --dataset NAME, prepares that named dataset as
`lmforge prepare NAME` finds it, e.g. `gutenberg`: 150 MB of gzipped books in
$LMFORGE_DATA_DIR), then runs, each in a fresh process so peak RSS is its own:
  1. prepare with `--tokenizer bpe` (trains the BPE, then encodes),
  2. prepare with the tokenizer.json from run 1 (encoding only, after the scan pass).
Prints one summary line per run.

    .venv/bin/python benchmarks/prepare_throughput.py --size-mb 200
    .venv/bin/python benchmarks/prepare_throughput.py --dataset gutenberg --vocab-size 8192
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
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument(
        "--data-dir", type=Path, default=Path(os.environ.get("LMFORGE_DATA_DIR", "../shared/data"))
    )
    parser.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a temp dir)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=args.workdir) as scratch:
        work = Path(scratch)
        if args.dataset:
            corpus, size = args.dataset, 0
        else:
            corpus = work / "corpus.txt"
            size = build_corpus(corpus, args.size_mb, args.data_dir)
        import torch  # noqa: F401  (only to report the version)

        print(
            f"corpus: {f'{size / 1e6:.1f} MB ' if size else ''}({corpus}), {cpu_model()}, "
            f"{os.cpu_count()} cpus, python {platform.python_version()}, torch {torch.__version__}"
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


if __name__ == "__main__":
    main()
