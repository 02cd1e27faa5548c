"""Chat templates render as transformers renders them, and cut conversations at the assistant's replies."""

from __future__ import annotations

import pytest

from lmforge.data.chat_template import DEFAULT_CHAT_TEMPLATE, ChatTemplate, Segment, encode_segments
from lmforge.data.tokenizer import EOT, char_tokenizer
from lmforge.errors import LmforgeError

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] }}"
    "{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Llama-2-like: bos_token, raise_exception, a namespace, loop controls, whitespace control, tojson
LLAMA_LIKE = """{{ bos_token }}
{%- set ns = namespace(system='') -%}
{%- for message in messages -%}
    {%- if message['role'] == 'system' -%}
        {%- set ns.system = message['content'] -%}{%- continue -%}
    {%- endif -%}
    {%- if message['role'] not in ['user', 'assistant'] -%}
        {{ raise_exception('Only user, assistant and system roles are supported') }}
    {%- endif -%}
    {%- if message['role'] == 'user' %}
[INST] {{ (ns.system + ' ' if ns.system else '') + message['content'] | trim }} [/INST]
    {%- else %} {{ message['content'] | trim }} {{ eos_token }}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt %} {{ {'n': 'ünï'} | tojson }}{% endif %}"""
MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello, ünïcode!"},
    {"role": "user", "content": "Bye"},
]
SPECIALS = {"bos_token": "<s>", "eos_token": "</s>"}


def hf_tokenizer(template: str, specials: dict[str, str]):
    transformers = pytest.importorskip("transformers")
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=char_tokenizer("abc"), **specials)
    tokenizer.chat_template = template
    return tokenizer


@pytest.mark.parametrize(
    ("template", "specials"),
    [
        (DEFAULT_CHAT_TEMPLATE, {"bos_token": EOT, "eos_token": EOT}),
        (DEFAULT_CHAT_TEMPLATE, {}),
        (CHATML, {"eos_token": "<|im_end|>"}),
        (LLAMA_LIKE, SPECIALS),
    ],
    ids=["default", "default-without-eot", "chatml", "llama-like"],
)
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_lmforge_renders_a_template_exactly_as_transformers_apply_chat_template(
    template: str, specials: dict, add_generation_prompt: bool
) -> None:
    messages = MESSAGES if add_generation_prompt else MESSAGES[:3]
    expected = hf_tokenizer(template, specials).apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert ChatTemplate(template, specials).render(messages, add_generation_prompt) == expected


def test_the_default_template_is_role_colon_content_lines_with_eot_after_each_reply() -> None:
    template = ChatTemplate.default(char_tokenizer("ab", specials=[EOT]))
    assert template.render(MESSAGES[:3], add_generation_prompt=False) == (
        "system: Be brief.\nuser: Hi there\nassistant: Hello, ünïcode!<|endoftext|>\n"
    )
    assert template.render(MESSAGES[:2], add_generation_prompt=True).endswith("user: Hi there\nassistant:")
    assert ChatTemplate.default(char_tokenizer("ab")).special_tokens == {}  # no EOT: replies end with \n


def test_the_default_template_takes_a_models_own_special_tokens_that_its_tokenizer_has() -> None:
    tokenizer = char_tokenizer("ab", specials=[EOT, "<s>", "</s>"])
    own = {"bos_token": "<s>", "eos_token": "</s>"}  # an imported model's tokenizer_config.json
    assert ChatTemplate.default(tokenizer, own).special_tokens == own
    assert ChatTemplate.default(tokenizer, own).end_of_turn() == "</s>"
    # a token the tokenizer lacks would be trained on as plain characters: <|endoftext|> stays
    assert ChatTemplate.default(tokenizer, {"eos_token": "<eos>"}).special_tokens == {
        "bos_token": EOT,
        "eos_token": EOT,
    }
    assert ChatTemplate.default(char_tokenizer("ab"), {"eos_token": "<eos>"}).special_tokens == {}


def test_segments_cut_the_text_at_every_reply_and_its_end_of_turn() -> None:
    messages = [*MESSAGES[:3], {"role": "user", "content": "And?"}, {"role": "assistant", "content": "Done."}]
    template = ChatTemplate(CHATML, {})
    segments = template.segments(messages)
    assert "".join(s.text for s in segments) == template.render(messages)
    assert [s.text for s in segments if s.assistant] == ["Hello, ünïcode!<|im_end|>\n", "Done.<|im_end|>\n"]
    with_prompt = template.segments(MESSAGES, add_generation_prompt=True)
    assert with_prompt[-1] == Segment("<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n", False)


@pytest.mark.parametrize(
    ("template", "specials", "end"),
    [
        (DEFAULT_CHAT_TEMPLATE, {"eos_token": EOT}, EOT),
        (DEFAULT_CHAT_TEMPLATE, {}, "\n"),
        (CHATML, {}, "<|im_end|>"),
        (LLAMA_LIKE, SPECIALS, "</s>"),
    ],
)
def test_the_end_of_turn_is_what_the_template_writes_after_a_reply(
    template: str, specials: dict, end: str
) -> None:
    assert ChatTemplate(template, specials).end_of_turn() == end


def test_a_template_that_renders_earlier_turns_differently_cannot_be_trained_on() -> None:
    last_only = (
        "{% for m in messages %}{% if loop.last %}{{ m['role'] }}: {{ m['content'] }}{% endif %}{% endfor %}"
    )
    with pytest.raises(LmforgeError, match="earlier turns render differently"):
        ChatTemplate(last_only).segments(MESSAGES[:3])


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("{% for m in messages %}", "chat template: Unexpected end of template"),
        ("{{ raise_exception('no system role') }}", "chat template: no system role"),
        ("{{ messages.__class__.__mro__ }}", "chat template: access to attribute '__class__'"),
        ("{{ messages.append(1) }}", "chat template: .*unsafe"),
        # Python's own errors in a template's expressions, which jinja passes on as they are
        ("{{ messages[0]['content'] + 1 }}", "chat template: TypeError: can only concatenate str"),
        ("{{ 1 / 0 }}", "chat template: ZeroDivisionError: division by zero"),
    ],
)
def test_bad_or_unsafe_templates_are_one_line_errors(source: str, message: str) -> None:
    with pytest.raises(LmforgeError, match=message):
        ChatTemplate(source).render(MESSAGES)


def test_a_lone_surrogate_is_text_the_tokenizer_cannot_represent_not_a_crash() -> None:
    """Undecodable bytes read by `chat` (surrogate escapes) or "\\ud800" in a JSON message: the
    tokenizer refuses such a str outright (TypeError); the conversation is not exact instead."""
    tokenizer = char_tokenizer("abc:\n ")
    ok, bad = encode_segments(
        tokenizer, [[Segment("a: b", False)], [Segment("a\udcff", False), Segment("b", True)]]
    )
    assert ok.exact and not bad.exact


def test_a_template_files_byte_order_mark_is_no_text_of_the_conversation(tmp_path) -> None:
    """Notepad's "UTF-8" saves a BOM first: it is no part of the template (it was rendered, and
    trained on, at the start of every example)."""
    source = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    (tmp_path / "chat.jinja").write_bytes(b"\xef\xbb\xbf" + source.encode())
    (tmp_path / "chat_template.jinja").write_bytes(b"\xef\xbb\xbf" + source.encode())
    tokenizer = char_tokenizer("abcdefghijklmnopqrstuvwxyz: \n", specials=[EOT])
    for template in ChatTemplate.from_file(tmp_path / "chat.jinja", tokenizer), ChatTemplate.find(tmp_path):
        assert template.source == source
        assert template.render(MESSAGES[:2]) == ChatTemplate(source).render(MESSAGES[:2])


def sentencepiece_style(scheme: str):
    """A byte-fallback BPE whose pieces, as SentencePiece's, never cross a "▁", and that puts a "▁"
    before a text's first word: Llama 2's way (a Prepend normalizer: Mistral, Phi-3) or the newer
    Metaspace pre-tokenizer's (prepend_scheme first)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=True)
    tokenizer.decoder = decoders.Metaspace(prepend_scheme="first", split=True)
    alphabet = list("abcdefghijklmnopqrstuvwxyzACFQR#?:.▁\n")
    trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>"], initial_alphabet=alphabet)
    tokenizer.train_from_iterator(["Q: the capital of France?\nA: Paris. ### Response: blue"] * 20, trainer)
    if scheme == "prepend":
        tokenizer.pre_tokenizer = None
        tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tokenizer.decoder = decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
        )
    return tokenizer


@pytest.mark.parametrize("scheme", ["prepend", "metaspace"])
def test_segments_after_the_first_continue_the_text_without_sentencepieces_dummy_prefix(scheme: str) -> None:
    """Each segment was encoded as the start of a text, so a Llama 2-style tokenizer put an extra "▁"
    before every reply: no example was exact, and fine-tuning an imported Mistral or Phi-3 refused all."""
    tokenizer = sentencepiece_style(scheme)
    for prompt, completion in [("Q: the capital of France?\nA:", " Paris."), ("### Response:", "blue")]:
        (encoded,) = encode_segments(tokenizer, [[Segment(prompt, False), Segment(completion, True)]])
        assert encoded.exact
        assert tokenizer.decode(encoded.ids) == prompt + completion
        reply = [i for i, trained in zip(encoded.ids, encoded.assistant) if trained]
        assert tokenizer.decode(encoded.ids[: len(encoded.ids) - len(reply)]) == prompt
    whole = tokenizer.encode("Q: the capital of France?\nA: Paris.", add_special_tokens=False).ids
    (split,) = encode_segments(
        tokenizer, [[Segment("Q: the capital of France?\nA:", False), Segment(" Paris.", True)]]
    )
    assert split.ids == whole  # a reply that starts a word is tokenized as in the whole text
