"""`prepare --scrub-pii`: personal data becomes placeholders before tokenizing; near misses stay."""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import numpy as np
import pytest

from lmforge.data.pii import KINDS, Scrubber, find_pii, iban_valid, luhn_valid, parse_kinds
from lmforge.data.tokenizer import load_tokenizer

BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "pii_scrub.py"

FOUND = [
    ("write to jane.doe+news@mail.example.co.uk today", "email", "jane.doe+news@mail.example.co.uk"),
    ("see https://example.org/a/b?q=1&x=2.", "url", "https://example.org/a/b?q=1&x=2"),
    ("(www.example.com/path)", "url", "www.example.com/path"),
    ("call +1 (555) 123-4567 now", "phone", "+1 (555) 123-4567"),
    ("call 020 7946 0958 now", "phone", "020 7946 0958"),
    ("call +33 1 42 68 53 00 now", "phone", "+33 1 42 68 53 00"),
    ("call 1-800-555-0199 now", "phone", "1-800-555-0199"),  # North America's trunk prefix 1
    ("call 1.800.555.0199 now", "phone", "1.800.555.0199"),
    ("card 4111 1111 1111 1111, thanks", "card", "4111 1111 1111 1111"),
    ("card 4111-1111-1111-1111.", "card", "4111-1111-1111-1111"),
    ("amex 3782 822463 10005 ok", "card", "3782 822463 10005"),
    ("IBAN DE89 3704 0044 0532 0130 00 PLEASE", "iban", "DE89 3704 0044 0532 0130 00"),
    ("IBAN GB82WEST12345698765432", "iban", "GB82WEST12345698765432"),
    ("from 192.168.1.254.", "ip", "192.168.1.254"),
    ("from 2001:db8::ff00:42:8329 and", "ip", "2001:db8::ff00:42:8329"),
    ("from ::ffff:192.0.2.128 and", "ip", "::ffff:192.0.2.128"),
]

NEAR_MISSES = [
    "card 4111 1111 1111 1112 fails Luhn",
    "order 4111111111111112 fails Luhn",
    "user at example dot com",
    "jane [at] example [dot] org",
    "IBAN DE89 3704 0044 0532 0130 01 has a bad checksum",
    "on 2024-01-15 at 12:30:45",
    "version 1.2.3 and 10.0.0.256 and 999.1.1.1",
    "costs $1,234.56 or 12.50 13.75",
    "ISBN 978-3-16-148410-0",
    "std::vector<int> and a::b and x :: y",
    "as 243:256::81/64:4/3::243 in an old proportion (a : b :: c : d)",  # Gutenberg's arithmetic books
    "scores 12 34 56 and the year 1999",
]


@pytest.mark.parametrize(
    ("text", "kind", "value"), FOUND, ids=[f"{k}-{i}" for i, (_, k, _) in enumerate(FOUND)]
)
def test_each_kind_is_found_at_its_exact_span(text: str, kind: str, value: str) -> None:
    assert [(f.kind, text[f.start : f.end]) for f in find_pii(text)] == [(kind, value)]


@pytest.mark.parametrize("text", NEAR_MISSES)
def test_near_misses_stay(text: str) -> None:
    scrubber = Scrubber()
    assert scrubber.scrub(text) == text
    assert sum(scrubber.counts.values()) == 0


def test_checksums() -> None:
    assert luhn_valid("4111111111111111") and luhn_valid("378282246310005")
    assert not luhn_valid("4111111111111112")
    assert iban_valid("DE89 3704 0044 0532 0130 00") and iban_valid("GB82WEST12345698765432")
    assert not iban_valid("DE89 3704 0044 0532 0130 01") and not iban_valid("DE89")


def test_scrub_replaces_with_placeholders_and_counts_per_kind() -> None:
    scrubber = Scrubber()
    text = "a@b.com, c@d.org, 10.0.0.1 and 4111 1111 1111 1111 but not user at example dot com"
    assert scrubber.scrub(text) == "<EMAIL>, <EMAIL>, <IP> and <CARD> but not user at example dot com"
    assert scrubber.counts == {"url": 0, "email": 2, "iban": 0, "card": 1, "ip": 1, "phone": 0}


def test_only_the_kinds_asked_for_are_scrubbed() -> None:
    assert parse_kinds("phone, EMAIL") == ("email", "phone") and parse_kinds("all") == KINDS
    scrubber = Scrubber(parse_kinds("email"))
    assert scrubber.scrub("a@b.com from 10.0.0.1") == "<EMAIL> from 10.0.0.1"
    assert scrubber.counts == {"email": 1}


def test_streaming_gives_the_text_of_one_pass_wherever_the_chunks_are_cut() -> None:
    rng = random.Random(0)
    lines = [rng.choice([t for t, _, _ in FOUND] + NEAR_MISSES) for _ in range(300)]
    text = " ".join(lines[:100]) + "\n" + "\n".join(lines[100:])  # one long line, then short ones
    whole = Scrubber().scrub(text)
    for max_carry in (200, 1 << 16):  # 200: the long line is cut at safe spaces
        scrubber = Scrubber(max_carry=max_carry)
        cuts = sorted(rng.sample(range(1, len(text)), 80))
        chunks = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        assert "".join(scrubber.stream(chunks)) == whole
        assert len(scrubber._carry) == 0


@pytest.mark.parametrize("number", ["4111 1111 1111 1111", "020 7946 0958"])
def test_a_long_line_cut_after_a_number_keeps_the_digits_that_follow_in_view(number: str) -> None:
    # One pass: the digit after the space makes the number the head of a longer one, so it stays.
    # A long line is cut at a space 64 characters from its end: here right before that digit.
    line = "x" * 200 + f" {number} 2" + "y" * 100
    assert Scrubber().scrub(line) == line
    scrubber = Scrubber(max_carry=300)
    assert "".join(scrubber.stream([line[i : i + 10] for i in range(0, len(line), 10)])) == line


def test_labelled_set_precision_and_recall() -> None:
    spec = importlib.util.spec_from_file_location("pii_scrub", BENCHMARK)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    counts = bench.score(bench.labelled_set(200, seed=1))
    for kind, c in counts.items():
        assert c["precision"] >= 0.98, (kind, c)
        assert c["recall"] >= 0.9, (kind, c)  # the set holds ~5% of forms the scrubber is known to miss


def test_prepare_scrubs_before_tokenizing_and_records_counts(cli, tmp_path: Path) -> None:
    text = "Dear Sir,\nmail bob@example.com or call +44 20 7946 0958.\nbob at example dot com\n" * 30
    (tmp_path / "in.txt").write_text(text)
    code, _, err = cli(
        "prepare", tmp_path / "in.txt", "--tokenizer", "char", "--out", tmp_path / "d", "--scrub-pii", "-q"
    )
    assert code == 0, err
    meta = json.loads((tmp_path / "d" / "meta.json").read_text())
    assert meta["pii"] == {
        "kinds": list(KINDS),
        "replaced": {**dict.fromkeys(KINDS, 0), "email": 30, "phone": 30},
    }
    assert "replaced PII: 0 url, 30 email, 0 iban, 0 card, 0 ip, 30 phone" in err
    tokenizer = load_tokenizer(tmp_path / "d" / "tokenizer.json")
    decoded = "".join(
        tokenizer.decode(np.fromfile(tmp_path / "d" / f"{split}.bin", dtype=np.uint16).tolist())
        for split in ("train", "val")
    )
    assert decoded == text.replace("bob@example.com", "<EMAIL>").replace("+44 20 7946 0958", "<PHONE>")


def test_an_unknown_kind_is_a_one_line_error(cli, tmp_path: Path) -> None:
    (tmp_path / "in.txt").write_text("some text\n" * 20)
    code, _, err = cli(
        "prepare",
        tmp_path / "in.txt",
        "--tokenizer",
        "char",
        "--out",
        tmp_path / "d",
        "--scrub-pii=email,ssn",
    )
    assert code == 1 and err.count("\n") == 1
    assert err.startswith("lmforge prepare: error: --scrub-pii: unknown kind 'ssn'")
