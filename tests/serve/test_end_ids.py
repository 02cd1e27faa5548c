"""Over HTTP, a served imported model's completions end at its own end token (generation_config.json's
eos_token_id), as transformers' `generate` ends them: finish_reason "stop", in /v1/completions and
/v1/chat/completions, streamed or not, and the end token's text is never part of the reply."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tokenizers import Tokenizer, decoders, models  # noqa: E402

from lmforge.inference import InferenceSession, load  # noqa: E402
from lmforge.interop.hf import import_folder  # noqa: E402
from tests.interop.test_hf import random_hf_model  # noqa: E402
from tests.serve.conftest import MODEL, LiveServer, serve  # noqa: E402
from tests.serve.test_api import client  # noqa: E402

END = "</s>"
CHAT = [{"role": "user", "content": "hi"}]
# CHAT as lmforge's default chat template renders it with its generation prompt, for a model with
# neither a template of its own nor <|endoftext|>: the same tokens through either endpoint
PROMPT = "user: hi\nassistant:"


def ascii_vocab_tokenizer(end_id: int) -> Tokenizer:
    """256 ids, one character each: \\n and printable ASCII as themselves, the rest U+0100 + id;
    `end_id` is the special token </s>."""
    text = {i: "\n" if i == 10 else chr(i) if 32 <= i < 127 else chr(0x100 + i) for i in range(256)}
    vocab = {t: i for i, t in text.items() if i != end_id} | {END: end_id}
    tokenizer = Tokenizer(models.BPE(vocab, []))
    tokenizer.decoder = decoders.Fuse()  # the characters joined as they are
    tokenizer.add_special_tokens([END])  # already in the vocabulary: keeps its id
    return tokenizer


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> tuple[InferenceSession, str]:
    """A tiny Llama with no chat template, imported from a folder whose only end id is a token E
    that its greedy continuation of PROMPT reaches; the session, and the text transformers'
    `generate` gives (stopped at E, E's text left out)."""
    root = tmp_path_factory.mktemp("served-end-ids")
    hf = random_hf_model("llama")
    hf.generation_config.eos_token_id = hf.generation_config.pad_token_id = None
    prompt = torch.tensor([[ord(c) for c in PROMPT]])
    free = hf.generate(prompt, max_new_tokens=8, do_sample=False, attention_mask=torch.ones_like(prompt))
    continuation = free[0, prompt.size(1) :].tolist()
    end = next(t for i, t in enumerate(continuation) if i >= 3 and t not in continuation[:i])
    assert end not in prompt[0].tolist()  # PROMPT can still be written with the tokenizer below
    hf.generation_config.eos_token_id = end
    hf.save_pretrained(root / "hf")
    ascii_vocab_tokenizer(end).save(str(root / "hf" / "tokenizer.json"))
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(root / "hf" / "tokenizer.json"), eos_token=END
    )
    tokenizer.save_pretrained(root / "hf")
    stopped = hf.generate(prompt, max_new_tokens=8, do_sample=False, attention_mask=torch.ones_like(prompt))
    assert stopped[0, -1].item() == end  # generate stopped there
    expected = tokenizer.decode(stopped[0, prompt.size(1) :], skip_special_tokens=True)
    # a chat reply shows no blank before it: the same text, for the test to see the end token end it
    assert expected == expected.strip() and expected
    session = load(import_folder(root / "hf", root / "run"), "last", "cpu", dtype="fp32")
    return session, expected


@pytest.fixture(scope="module")
def live(imported: tuple[InferenceSession, str]) -> Iterator[LiveServer]:
    with serve(imported[0]) as server:
        yield server


def _completion(live: LiveServer, *, chat: bool, stream: bool) -> tuple[str, str, object]:
    """The reply's text, its finish_reason and the usage of a greedy request (streamed: the chunks'
    texts joined, the last finish_reason, the usage of the last chunk)."""
    api = client(live)
    options = dict(model=MODEL, temperature=0, stream=stream)
    if stream:
        options["stream_options"] = {"include_usage": True}
    if chat:
        response = api.chat.completions.create(messages=CHAT, **options)
    else:
        response = api.completions.create(prompt=PROMPT, max_tokens=8, **options)
    if not stream:
        (choice,) = response.choices
        return (choice.message.content if chat else choice.text), choice.finish_reason, response.usage
    chunks = list(response)
    choices = [c.choices[0] for c in chunks if c.choices]
    text = "".join((c.delta.content or "") if chat else c.text for c in choices)
    return text, next(c.finish_reason for c in reversed(choices) if c.finish_reason), chunks[-1].usage


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
def test_a_served_imported_model_stops_at_its_end_token_with_finish_reason_stop(
    live: LiveServer, imported: tuple[InferenceSession, str], chat: bool, stream: bool
) -> None:
    _, expected = imported
    text, finish_reason, usage = _completion(live, chat=chat, stream=stream)
    assert (text, finish_reason) == (expected, "stop")
    assert END not in text
    assert usage.prompt_tokens == len(PROMPT)  # the chat's prompt is PROMPT's tokens
    assert usage.completion_tokens == len(expected) + 1  # the end token counts, as OpenAI's usage does
