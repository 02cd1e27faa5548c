"""`lmforge chat`: driven through a pseudo-terminal as a person would, and its parts in-process."""

from __future__ import annotations

import io
import os
import pty
import select
import sys
import time
from pathlib import Path

import pytest

from lmforge.chat.repl import PROMPT, Chat, Conversation, start_chat
from lmforge.errors import LmforgeError
from lmforge.inference import ModelSource
from lmforge.inference.sampling import SamplingOptions, StopScanner
from tests.conftest import random_char_run

ALPHABET = "abcdefghijklmnopqrstuvwxyz :.\n"


@pytest.fixture
def tiny_run(tmp_path: Path) -> Path:
    """A randomly initialised char model with <|endoftext|> and a 64-token context."""
    return random_char_run(tmp_path / "run", ALPHABET, n_layer=1, d_model=16, block_size=64)


class Terminal:
    """`lmforge chat ...` in a child process on a pseudo-terminal."""

    def __init__(self, *args: str) -> None:
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: becomes lmforge, its stdin/stdout the terminal
            os.execv(sys.executable, [sys.executable, "-m", "lmforge", "chat", *args])
        self.output = ""

    def read_until(self, text: str, timeout: float = 60) -> str:
        """Everything printed from now until `text` has appeared (inclusive)."""
        start, deadline = len(self.output), time.monotonic() + timeout
        while text not in self.output[start:]:
            ready, _, _ = select.select([self.fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise AssertionError(f"{text!r} not printed within {timeout} s; got {self.output[start:]!r}")
            try:
                self.output += os.read(self.fd, 4096).decode()
            except OSError:  # the child closed the terminal
                raise AssertionError(
                    f"chat exited before printing {text!r}: {self.output[start:]!r}"
                ) from None
        return self.output[start : self.output.index(text, start) + len(text)]

    def send(self, line: str) -> str:
        """Type `line` and Enter; what the chat printed before its next prompt (the echo removed)."""
        os.write(self.fd, line.encode() + b"\n")
        printed = self.read_until("\n" + PROMPT)
        return printed.replace("\r\n", "\n").removeprefix(line + "\n")[: -len(PROMPT) - 1]

    def exit_code(self) -> int:
        _, status = os.waitpid(self.pid, 0)
        return os.waitstatus_to_exitcode(status)


def test_chat_in_a_terminal_streams_replies_and_obeys_its_commands(tiny_run: Path) -> None:
    chat = Terminal(str(tiny_run), "--temperature", "0", "--max-new-tokens", "8", "--device", "cpu")
    banner = chat.read_until(PROMPT)
    assert "lmforge's default chat template; context 64 tokens, replies up to 8" in banner
    greedy = chat.send("hello")
    assert greedy.strip() and "\n" not in greedy.strip()  # a reply, on its own line
    assert chat.send("/reset") == "[conversation cleared]"
    assert chat.send("hello") == greedy  # temperature 0 and the same conversation: the same reply
    assert chat.send("/temperature 3") == "[temperature 3]"
    assert chat.send("/reset") == "[conversation cleared]"
    assert chat.send("hello") != greedy
    assert chat.send("/temperature x").startswith("error: /temperature expects a number >= 0")
    assert chat.send("/system be brief") == "[system message set]"
    printed = chat.send("tell me a story") + chat.send("and then what happened")
    assert "[context full: dropped the 2 oldest message(s) to leave room for a reply]" in printed
    assert (
        chat.send("/nope")
        == "error: unknown command /nope (commands: /reset, /system TEXT, /temperature X, /quit)"
    )
    os.write(chat.fd, b"/quit\n")
    assert chat.exit_code() == 0


def test_end_of_input_ends_the_chat(tiny_run: Path) -> None:
    chat = Terminal(str(tiny_run), "--device", "cpu")
    chat.read_until(PROMPT)
    os.write(chat.fd, b"\x04")  # Ctrl-D at the start of a line
    assert chat.exit_code() == 0


def in_process_chat(run: Path) -> tuple[Chat, io.StringIO]:
    chat = start_chat(
        ModelSource(run, "last", "cpu", "fp32"),
        system="",
        options=SamplingOptions(max_new_tokens=8, temperature=0.0, top_k=None, top_p=None),
        seed=0,
    )
    chat.out = io.StringIO()
    return chat, chat.out


def test_a_reply_is_written_piece_by_piece_as_it_is_generated(tiny_run: Path) -> None:
    chat, _ = in_process_chat(tiny_run)
    writes: list[str] = []
    chat.say = writes.append
    chat.reply_to("hello")
    assert len(writes) >= 3  # the pieces, then the newline; not one string at the end
    assert chat.conversation.turns[-1] == {"role": "assistant", "content": "".join(writes).strip()}


def test_the_system_message_leads_every_prompt_and_survives_dropping(tiny_run: Path) -> None:
    chat, out = in_process_chat(tiny_run)
    chat.conversation = Conversation("be brief", [{"role": "user", "content": "a b c d"}])
    prompt = chat.session.tokenizer.decode(chat.prompt_ids())
    assert prompt == "system: be brief\nuser: a b c d\nassistant:"
    chat.conversation.turns += [{"role": "assistant", "content": "ok"}, {"role": "user", "content": "more"}]
    prompt = chat.session.tokenizer.decode(chat.prompt_ids())
    assert prompt == "system: be brief\nuser: more\nassistant:"
    assert "[context full: dropped the 2 oldest message(s)" in out.getvalue()


def test_a_message_that_cannot_fit_is_refused_and_the_conversation_kept(tiny_run: Path) -> None:
    chat, out = in_process_chat(tiny_run)
    chat.conversation.turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    chat.run(_lines("x" * 60, "/quit"))
    assert (
        "error: the message is too long: 77 tokens of prompt + 8 for the reply exceed the context (64 tokens)"
        in (out.getvalue())
    )
    assert chat.conversation.turns == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
    ]


@pytest.mark.parametrize(
    ("system", "error"),
    [
        ("be BRIEF", "the system message has characters that this model's tokenizer cannot represent"),
        (
            "x" * 60,
            "the system message is too long: 86 tokens of prompt + 8 for the reply leave no room",
        ),
    ],
)
def test_a_system_message_that_cannot_be_used_is_refused_when_set_and_the_chat_goes_on(
    tiny_run: Path, system: str, error: str
) -> None:
    chat, out = in_process_chat(tiny_run)
    chat.run(_lines("/system be brief", f"/system {system}", "hello", "/quit"))
    assert f"error: {error}" in out.getvalue()
    assert chat.conversation.system == "be brief"  # the earlier one stays
    assert chat.conversation.turns[0] == {
        "role": "user",
        "content": "hello",
    }  # and messages still get replies


def test_a_system_message_option_that_cannot_be_used_stops_the_chat_before_it_starts(tiny_run: Path) -> None:
    with pytest.raises(LmforgeError, match="^the system message has characters that this model's"):
        start_chat(
            ModelSource(tiny_run, "last", "cpu", "fp32"),
            system="BE BRIEF",
            options=SamplingOptions(max_new_tokens=8, temperature=0.0, top_k=None, top_p=None),
            seed=0,
        )


def _lines(*lines: str):
    it = iter(lines)
    return lambda prompt: next(it)


def released(pieces: list[str], stops: tuple[str, ...], reply: bool) -> list[str]:
    """What a StopScanner releases of `pieces`, piece by piece, until a stop."""
    scanner, out = StopScanner(stops, reply=reply), []
    for piece in pieces:
        out.append(scanner.feed(piece))
        if scanner.stopped:
            break
    else:
        out.append(scanner.finish())
    return [text for text in out if text]


@pytest.mark.parametrize(
    ("pieces", "stop", "expected"),
    [
        (["ab", "c<|e", "nd|>x"], "<|end|>", ["ab", "c"]),
        (["a<", "b"], "<|end|>", ["a", "<b"]),
        (["hello\nworld"], "\n", ["hello"]),
        (["no stop"], "\n", ["no stop"]),
        (["\n", " \nDo", "th he speak?\nNo"], "\n", ["Do", "th he speak?"]),  # a reply begins, then ends
    ],
)
def test_a_reply_never_shows_any_of_the_stop_text(pieces: list[str], stop: str, expected: list[str]) -> None:
    assert released(pieces, (stop,), reply=True) == expected


def test_a_plain_continuation_keeps_its_leading_whitespace_before_a_whitespace_stop() -> None:
    assert released([" Paris", "\n", "Lyon"], ("\n",), reply=False) == [" Paris"]
    assert released(["\n", "Paris"], ("\n",), reply=False) == []  # the model stopped at once
    assert released(["  Paris"], (), reply=True) == ["Paris"]  # a reply drops its leading blank, stop or not
