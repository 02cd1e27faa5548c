"""Precision and recall of `lmforge prepare --scrub-pii` on a labelled synthetic set, and its speed.

The set is generated with a seeded RNG: sentences from a few templates, each holding one value of a
kind at a known span, in the forms people write (cards with spaces or dashes, compressed IPv6,
phone numbers of several countries). A share of the values are forms the scrubber is known to miss
(a US number without area code, a URL without scheme or www., an e-mail address with a non-ASCII
local part), so recall is measured rather than assumed. Near misses
that must stay (Luhn-failing 16-digit numbers, IBANs with a wrong checksum, `user at example dot
com`, dates, times, versions, prices, ISBNs, `std::vector`) are mixed in as negatives.

A match counts as a true positive only with the right kind and the exact span.

    .venv/bin/python benchmarks/pii_scrub.py [--n 2000] [--seed 0] [--json]
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import random
import time
from collections.abc import Callable
from pathlib import Path

from lmforge.data.pii import KINDS, Scrubber, find_pii, luhn_valid

TEMPLATES = (
    "Please contact {} for details.",
    "{}",
    "Sent from {} on Monday, see attached.",
    "my details: {}; thanks!",
    "(reply to {})",
    "Notes\n{}\nend of notes",
)
WORDS = ("alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy")
DOMAINS = ("example.com", "mail.example.org", "uni-x.edu", "corp.co.uk", "startup.io")
IBAN_BBAN = {"DE": "n18", "GB": "a4n14", "FR": "n23", "NL": "a4n10", "ES": "n20", "IT": "a1n22"}


def _digits(rng: random.Random, n: int) -> str:
    return "".join(rng.choice("0123456789") for _ in range(n))


def email(rng: random.Random) -> tuple[str, bool]:
    if rng.random() < 0.05:  # a non-ASCII local part: missed (the ASCII tail is found, at another span)
        return f"josé.{rng.choice(WORDS)}@{rng.choice(DOMAINS)}", False
    local = rng.choice(
        [rng.choice(WORDS), f"{rng.choice(WORDS)}.{rng.choice(WORDS)}", f"{rng.choice(WORDS)}+news"]
    )
    return f"{local}{rng.choice(['', _digits(rng, 2)])}@{rng.choice(DOMAINS)}", True


def url(rng: random.Random) -> tuple[str, bool]:
    path = "/".join(rng.choice(WORDS) for _ in range(rng.randint(0, 3)))
    if rng.random() < 0.05:  # no scheme, no www.: missed
        return f"{rng.choice(DOMAINS)}/{path}", False
    query = rng.choice(["", f"?q={rng.choice(WORDS)}&page={rng.randint(1, 9)}", "#top"])
    start = rng.choice(["https://", "http://", "https://www.", "www."])
    return f"{start}{rng.choice(DOMAINS)}/{path}{query}", True


def _iban_check(country: str, bban: str) -> str:
    number = "".join(str(int(ch, 36)) for ch in bban + country + "00")
    return f"{98 - int(number) % 97:02d}"


def iban(rng: random.Random, valid: bool = True) -> tuple[str, bool]:
    country = rng.choice(sorted(IBAN_BBAN))
    spec = IBAN_BBAN[country]  # "a4n14": 4 letters, then 14 digits
    letters = int(spec[1 : spec.index("n")]) if spec.startswith("a") else 0
    bban = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(letters))
    bban += _digits(rng, int(spec[spec.index("n") + 1 :]))
    check = _iban_check(country, bban)
    if not valid:
        check = f"{(int(check) + rng.randint(1, 96)) % 97 + 2:02d}"[-2:]
    compact = country + check + bban
    grouped = " ".join(compact[i : i + 4] for i in range(0, len(compact), 4))
    return rng.choice([compact, grouped]), True


def _luhn_complete(body: str) -> str:
    return next(body + d for d in "0123456789" if luhn_valid(body + d))


def card(rng: random.Random, valid: bool = True) -> tuple[str, bool]:
    if rng.random() < 0.2:  # American Express, 4-6-5
        number = _luhn_complete(rng.choice(["34", "37"]) + _digits(rng, 12))
        groups = [number[:4], number[4:10], number[10:]]
    else:
        prefix = rng.choice(["4", "51", "55"])
        number = _luhn_complete(prefix + _digits(rng, 15 - len(prefix)))
        groups = [number[i : i + 4] for i in range(0, 16, 4)]
    if not valid:
        last = str((int(groups[-1][-1]) + rng.randint(1, 9)) % 10)
        groups[-1] = groups[-1][:-1] + last
    return rng.choice(["", " ", "-"]).join(groups), True


def ip(rng: random.Random) -> tuple[str, bool]:
    r = rng.random()
    if r < 0.5:
        return ".".join(str(rng.randint(0, 255)) for _ in range(4)), True
    if r < 0.95:
        address = ipaddress.IPv6Address(rng.getrandbits(128) >> (rng.choice([0, 64]) if r < 0.8 else 0))
        if r >= 0.8:
            address = ipaddress.IPv6Address(int(address) & ~((1 << 80) - 1 << 16))  # zeros to compress
        return str(address), True
    return f"::ffff:{'.'.join(str(rng.randint(0, 255)) for _ in range(4))}", True  # IPv4-mapped IPv6


def phone(rng: random.Random) -> tuple[str, bool]:
    forms = [
        lambda: f"+1 ({_digits(rng, 3)}) {_digits(rng, 3)}-{_digits(rng, 4)}",
        lambda: f"({_digits(rng, 3)}) {_digits(rng, 3)}-{_digits(rng, 4)}",
        lambda: f"{rng.randint(200, 999)}-{_digits(rng, 3)}-{_digits(rng, 4)}",
        lambda: f"+44 20 {_digits(rng, 4)} {_digits(rng, 4)}",
        lambda: f"020 {_digits(rng, 4)} {_digits(rng, 4)}",
        lambda: f"+33 1 {' '.join(_digits(rng, 2) for _ in range(4))}",
        lambda: f"+49 30 {_digits(rng, 8)}",
        lambda: f"{rng.randint(200, 999)}.{_digits(rng, 3)}.{_digits(rng, 4)}",
    ]
    if rng.random() < 0.05:  # a local number without area code: missed
        return f"{rng.randint(200, 999)}-{_digits(rng, 4)}", False
    return rng.choice(forms)(), True


NEGATIVES: tuple[Callable[[random.Random], str], ...] = (
    lambda rng: card(rng, valid=False)[0],
    lambda rng: iban(rng, valid=False)[0],
    lambda rng: f"{rng.choice(WORDS)} at example dot com",
    lambda rng: f"{rng.choice(WORDS)} [at] {rng.choice(DOMAINS).replace('.', ' [dot] ')}",
    lambda rng: f"{rng.randint(1990, 2030)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
    lambda rng: f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d}",
    lambda rng: f"version {rng.randint(0, 9)}.{rng.randint(0, 20)}.{rng.randint(0, 99)}",
    lambda rng: f"${rng.randint(1, 999)},{_digits(rng, 3)}.{_digits(rng, 2)}",
    lambda rng: f"ISBN 978-{rng.randint(0, 9)}-{_digits(rng, 2)}-{_digits(rng, 6)}-{rng.randint(0, 9)}",
    lambda rng: f"order #{_digits(rng, 6)} of {rng.randint(1, 99)} items",
    lambda rng: "std::vector<int> and a::b",
    lambda rng: f"{rng.randint(256, 999)}.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(0, 255)}",
    lambda rng: f"scores {rng.randint(10, 99)} {rng.randint(10, 99)} {rng.randint(10, 99)}",
)
GENERATORS = {"email": email, "url": url, "iban": iban, "card": card, "ip": ip, "phone": phone}


def labelled_set(n: int, seed: int) -> list[tuple[str, list[tuple[str, int, int]]]]:
    """n sentences per kind with one value each, and n negatives: (text, [(kind, start, end)])."""
    rng = random.Random(seed)
    examples = []
    for kind, generate in GENERATORS.items():
        for _ in range(n):
            value, _ = generate(rng)
            before, after = rng.choice(TEMPLATES).split("{}")
            examples.append((before + value + after, [(kind, len(before), len(before) + len(value))]))
    for _ in range(n):
        before, after = rng.choice(TEMPLATES).split("{}")
        examples.append((before + rng.choice(NEGATIVES)(rng) + after, []))
    return examples


def score(examples: list[tuple[str, list[tuple[str, int, int]]]]) -> dict[str, dict[str, float]]:
    """Per kind: true positives, false positives, false negatives, precision, recall."""
    counts = {kind: {"tp": 0, "fp": 0, "fn": 0} for kind in KINDS}
    for text, gold in examples:
        found = {(f.kind, f.start, f.end) for f in find_pii(text)}
        for kind, *_ in found - set(gold):
            counts[kind]["fp"] += 1
        for kind, *_ in set(gold) - found:
            counts[kind]["fn"] += 1
        for kind, *_ in found & set(gold):
            counts[kind]["tp"] += 1
    for c in counts.values():
        c["precision"] = c["tp"] / max(c["tp"] + c["fp"], 1)
        c["recall"] = c["tp"] / max(c["tp"] + c["fn"], 1)
    return counts


def throughput(path: Path) -> dict[str, float]:
    """Scrub a real text in 64 KiB chunks: MB/s and what it replaced."""
    text = path.read_text()
    scrubber = Scrubber()
    start = time.perf_counter()
    for i in range(0, len(text), 1 << 16):
        scrubber.feed(text[i : i + (1 << 16)])
    scrubber.finish()
    seconds = time.perf_counter() - start
    return {"file": str(path), "mb_per_s": len(text.encode()) / 1e6 / seconds, "replaced": scrubber.counts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="sentences per kind, and negatives")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    counts = score(labelled_set(args.n, args.seed))
    shakespeare = Path(os.environ.get("LMFORGE_DATA_DIR", "../shared/data")) / "tinyshakespeare" / "input.txt"
    speed = throughput(shakespeare) if shakespeare.is_file() else None
    if args.json:
        print(json.dumps({"kinds": counts, "throughput": speed}))
        return
    print(f"{args.n} sentences per kind + {args.n} near misses (seed {args.seed}); exact kind and span")
    print(f"{'kind':<8}{'tp':>7}{'fp':>7}{'fn':>7}{'precision':>11}{'recall':>9}")
    for kind, c in counts.items():
        print(f"{kind:<8}{c['tp']:>7}{c['fp']:>7}{c['fn']:>7}{c['precision']:>11.4f}{c['recall']:>9.4f}")
    tp, fp, fn = (sum(c[key] for c in counts.values()) for key in ("tp", "fp", "fn"))
    print(f"{'all':<8}{tp:>7}{fp:>7}{fn:>7}{tp / max(tp + fp, 1):>11.4f}{tp / max(tp + fn, 1):>9.4f}")
    if speed:
        print(f"{speed['file']}: {speed['mb_per_s']:.2f} MB/s, replaced {speed['replaced']}")


if __name__ == "__main__":
    main()
