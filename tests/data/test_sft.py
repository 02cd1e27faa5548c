import json
from pathlib import Path

import pytest
import torch

from lmforge.config import ModelConfig
from lmforge.data.chat_template import ChatTemplate, Segment
from lmforge.data.sft import (
    AnswerSpan,
    ExampleBatches,
    SFTData,
    collate,
    collate_spans,
    parse_answer_span,
    prompt_completion,
    read_examples,
    read_records,
    tokenize_examples,
    tokenize_spans,
)
from lmforge.data.tokenizer import EOT, char_tokenizer
from lmforge.errors import LmforgeError
from lmforge.model import GPT
from lmforge.targets import IGNORE_INDEX, SPAN_END, SPAN_MATCH, SPAN_OTHER, SPAN_START

ALPHABET = "abcdefghijklmnopqrstuvwxyz :\n?!.,'"


def tokenize_pairs(pairs: list[tuple[str, str]], tokenizer, max_tokens: int, where: Path):
    """Prompt/completion pairs as SFTData tokenizes them: the completion ends with <|endoftext|> if any."""
    eos = ChatTemplate.default(tokenizer).special_tokens.get("eos_token", "")
    return tokenize_examples(
        [prompt_completion(p, c, eos) for p, c in pairs], tokenizer, max_tokens, where=where
    )


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_prompt_is_masked_and_eot_ends_the_completion() -> None:
    tokenizer = char_tokenizer(ALPHABET, specials=[EOT])
    (example,) = tokenize_pairs([("q: hi\na:", " yo")], tokenizer, 100, Path("x"))
    assert example.prompt_tokens == len("q: hi\na:") and example.ids[-1] == tokenizer.token_to_id(EOT)
    x, y = collate([example])
    n = len(example.ids) - 1
    assert x.shape == (1, 16) and n < 16  # padded up to LENGTH_MULTIPLE
    assert (y[0, : example.prompt_tokens - 1] == IGNORE_INDEX).all()
    assert y[0, example.prompt_tokens - 1 : n].tolist() == example.ids[example.prompt_tokens :]
    assert (y[0, n:] == IGNORE_INDEX).all()
    assert collate([example], max_length=n)[0].shape == (1, n)  # never past the block size


def test_prompt_tokens_contribute_nothing_to_the_gradient() -> None:
    tokenizer = char_tokenizer(ALPHABET, specials=[EOT])
    examples = tokenize_pairs(
        [("question: what is it?\nanswer:", " a cat"), ("q: no\na:", " yes indeed")], tokenizer, 64, Path("x")
    )
    x, y = collate(examples)
    torch.manual_seed(0)
    model = GPT(
        ModelConfig(n_layer=1, n_head=2, d_model=16, block_size=64, vocab_size=tokenizer.get_vocab_size())
    )
    logits, _ = model(x)
    logits.retain_grad()
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
    loss.backward()
    grad_per_position = logits.grad.abs().sum(-1)
    assert (grad_per_position[y == IGNORE_INDEX] == 0).all()  # prompt and padding positions
    assert (grad_per_position[y != IGNORE_INDEX] > 0).all()
    _, model_loss = model(x, y)  # the model's own loss ignores the same positions
    assert model_loss.item() == pytest.approx(loss.item())


def test_padding_does_not_change_the_loss_of_an_example() -> None:
    tokenizer = char_tokenizer(ALPHABET)
    short, long = tokenize_pairs(
        [("a:", " b"), ("question number two:", " a longer answer")], tokenizer, 64, Path("x")
    )
    torch.manual_seed(0)
    model = GPT(
        ModelConfig(n_layer=1, n_head=2, d_model=16, block_size=64, vocab_size=tokenizer.get_vocab_size())
    ).eval()
    alone = model(*collate([short]))[1]
    x, y = collate([short, long])
    logits, _ = model(x)
    padded = torch.nn.functional.cross_entropy(logits[0], y[0])
    assert padded.item() == pytest.approx(alone.item(), rel=1e-5)


def test_chat_messages_use_the_template(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "chat.jsonl",
        [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}],
    )
    assert read_examples(path, "error") == [
        [Segment("user: hi\nassistant:", False), Segment(" hello\n", True)]
    ]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "bad.jsonl:2: Expecting property name"),
        ({"prompt": "p"}, "bad.jsonl:2: expected string fields 'prompt' and 'completion'"),
        ({"prompt": "p", "completion": "  "}, "bad.jsonl:2: empty completion"),
        (
            {"messages": [{"role": "user", "content": "x"}]},
            "bad.jsonl:2: the last message must be the assistant's",
        ),
        ([1, 2], "bad.jsonl:2: expected a JSON object"),
    ],
)
def test_bad_lines_are_errors_or_counted_skips(tmp_path: Path, capsys, line, message: str) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "completion": " b"}, line])
    with pytest.raises(LmforgeError, match=message.replace("(", r"\(")):
        read_examples(path, "error")
    assert read_examples(path, "skip") == [[Segment("a", False), Segment(" b", True)]]
    assert "skipped 1 bad line(s)" in capsys.readouterr().err


@pytest.mark.parametrize(
    "record",
    [
        {"prompt": "p", "completion": " "},
        {"instruction": "say it", "output": ""},
        {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]},
    ],
)
def test_an_empty_completion_is_an_error_where_an_end_of_text_would_close_it(tmp_path: Path, record) -> None:
    """With <|endoftext|> in the tokenizer the trained text of an empty completion is that token
    alone: it was taken (a model taught to answer nothing), where without it the line was refused."""
    template = ChatTemplate.default(char_tokenizer(ALPHABET, specials=[EOT]))
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "completion": " b"}, record])
    with pytest.raises(LmforgeError, match="bad.jsonl:2: empty completion"):
        read_examples(path, "error", template)


def test_long_examples_are_truncated_with_a_count(capsys) -> None:
    tokenizer = char_tokenizer(ALPHABET)
    (example,) = tokenize_pairs([("x" * 50 + ":", " answer")], tokenizer, 20, Path("f.jsonl"))
    assert len(example.ids) == 20 and tokenizer.decode(example.ids).endswith(": answer")
    assert "1 of 1 examples were longer than block_size + 1 = 20 tokens" in capsys.readouterr().err


def test_text_outside_the_vocabulary_is_an_error() -> None:
    with pytest.raises(LmforgeError, match="cannot represent"):
        tokenize_pairs([("Ünïcode:", " x")], char_tokenizer(ALPHABET), 50, Path("f.jsonl"))


def test_example_batches_resume_exactly() -> None:
    tokenizer = char_tokenizer(ALPHABET)
    examples = tokenize_pairs(
        [(f"q{'a' * i}:", " b" * (i % 3 + 1)) for i in range(7)], tokenizer, 50, Path("x")
    )
    a, b = ExampleBatches(examples, 3, seed=1), ExampleBatches(examples, 3, seed=1)
    for _ in range(4):  # crosses an epoch boundary
        next(a)
    b.load_state_dict(a.state_dict())
    for _ in range(5):
        (xa, ya), (xb, yb) = next(a), next(b)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert a.epoch >= 2


@pytest.mark.parametrize("now", [3, 9])
def test_example_batches_refuse_the_state_of_another_number_of_examples(now: int) -> None:
    """A fine-tune resumed with another data.dir: the saved order indexes the examples it was drawn
    from, and read against others it failed with an IndexError (or dropped examples unseen)."""
    tokenizer = char_tokenizer(ALPHABET)
    pairs = [(f"q{'a' * i}:", " b") for i in range(9)]
    saved = ExampleBatches(tokenize_pairs(pairs[:6], tokenizer, 50, Path("x")), 2, seed=1)
    next(saved)
    other = ExampleBatches(tokenize_pairs(pairs[:now], tokenizer, 50, Path("x")), 2, seed=1)
    message = f"the checkpoint's batches were drawn from 6 train examples, the data has {now}"
    with pytest.raises(LmforgeError, match=message):
        other.load_state_dict(saved.state_dict())


def test_one_train_example_cannot_be_split_into_train_and_val(tmp_path: Path) -> None:
    char_tokenizer(ALPHABET).save(str(tmp_path / "tok.json"))
    write_jsonl(tmp_path / "train.jsonl", [{"prompt": "a:", "completion": " b"}])
    with pytest.raises(LmforgeError, match="train.jsonl: one example is too few to hold out a validation"):
        SFTData(tmp_path, tmp_path / "tok.json", 32)


def test_fine_tuning_never_selects_on_the_scored_split(tmp_path: Path) -> None:
    char_tokenizer(ALPHABET).save(str(tmp_path / "tok.json"))
    for name in ("train.jsonl", "eval.jsonl"):
        write_jsonl(tmp_path / name, [{"prompt": "a:", "completion": " b"}])
    with pytest.raises(LmforgeError, match="never on the scored eval.jsonl"):
        SFTData(tmp_path, tmp_path / "tok.json", 32)


def test_batches_group_similar_lengths_and_cover_every_example_each_epoch() -> None:
    tokenizer = char_tokenizer(ALPHABET)
    pairs = [(f"q{'a' * (i * 7 % 40)}:", " b") for i in range(200)]
    examples = tokenize_pairs(pairs, tokenizer, 100, Path("x"))
    batches = ExampleBatches(examples, 10, seed=0)
    assert sorted(batches.order.tolist()) == list(range(200))  # a permutation: each example once per epoch
    padded = sum(next(batches)[0].numel() for _ in range(20))
    unbucketed = sum(
        collate([examples[i] for i in torch.randperm(200)[k * 10 : (k + 1) * 10].tolist()])[0].numel()
        for k in range(20)
    )
    assert padded < 0.8 * unbucketed  # far less padding than random batches


def test_chat_examples_train_on_every_assistant_reply_and_nothing_else(tmp_path: Path) -> None:
    tokenizer = char_tokenizer(ALPHABET, specials=[EOT])
    messages = [
        {"role": "system", "content": "be kind"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "how are you?"},
        {"role": "assistant", "content": "fine"},
    ]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages}])
    template = ChatTemplate.default(tokenizer)
    (example,) = tokenize_examples(read_examples(path, "error", template), tokenizer, 200, where=path)
    assert tokenizer.decode(example.ids, skip_special_tokens=False) == template.render(messages)
    _, y = collate([example])
    trained = tokenizer.decode(y[0][y[0] != IGNORE_INDEX].tolist(), skip_special_tokens=False)
    assert trained == f" hello{EOT}\n fine{EOT}\n"


@pytest.mark.parametrize(
    "record, span",
    [
        ({"prompt": "a b a b:", "completion": " b"}, (2, 3)),  # the first occurrence
        ({"prompt": "a b a b:", "completion": " b", "answer_start": 6}, (6, 7)),
        ({"prompt": "often ten:", "completion": " ten"}, (6, 9)),  # whole words first
        ({"prompt": "often:", "completion": " ten"}, (2, 5)),  # else any text
    ],
)
def test_a_span_is_the_given_occurrence_of_the_completion_else_the_first(record: dict, span) -> None:
    assert parse_answer_span(record) == AnswerSpan(record["prompt"], *span)


@pytest.mark.parametrize(
    "record, message",
    [
        ({"prompt": "abc", "completion": " x"}, "the completion 'x' is not in the prompt anywhere"),
        ({"prompt": "abc", "completion": " b", "answer_start": 0}, "is not in the prompt at answer_start 0"),
        ({"prompt": "abc", "completion": " b", "answer_start": "1"}, "'answer_start' must be an integer"),
        ({"messages": []}, "a span head reads no 'messages'"),
    ],
)
def test_a_span_that_is_not_in_its_prompt_is_a_bad_line(tmp_path: Path, record: dict, message: str) -> None:
    path = write_jsonl(tmp_path / "spans.jsonl", [{"prompt": "abc", "completion": " c"}, record])
    with pytest.raises(LmforgeError, match=f"spans.jsonl:2: .*{message}"):
        read_records(path, "error", parse_answer_span)
    assert read_records(path, "skip", parse_answer_span) == [AnswerSpan("abc", 2, 3)]


def test_span_targets_flag_the_answers_first_and_last_token_and_ignore_padding() -> None:
    tokenizer = char_tokenizer(ALPHABET)
    spans = [AnswerSpan("the cat sat:", 4, 7), AnswerSpan("a b:", 2, 3)]
    x, y = collate_spans(tokenize_spans(spans, tokenizer, 64, where=Path("f.jsonl")))
    assert tokenizer.decode(x[0, :12].tolist()) == "the cat sat:"
    expected = [SPAN_OTHER] * 4 + [SPAN_START, SPAN_OTHER, SPAN_END] + [SPAN_OTHER] * 5
    assert y[0, :12].tolist() == expected and (y[0, 12:] == IGNORE_INDEX).all()
    assert y[1, :4].tolist() == [SPAN_OTHER, SPAN_OTHER, SPAN_START | SPAN_END, SPAN_OTHER]
    assert (y[1, 4:] == IGNORE_INDEX).all() and x.size(1) == 16  # padded to a multiple of 16


def test_span_targets_mark_the_context_words_that_the_question_holds() -> None:
    prompt = "context: a cat sat\nQuestion: cat?"
    x, y = collate_spans(
        tokenize_spans(
            [AnswerSpan(prompt, 15, 18)], char_tokenizer(ALPHABET + "Q"), 64, where=Path("f.jsonl")
        )
    )
    marked = [i for i in range(len(prompt)) if y[0, i] & SPAN_MATCH]
    assert marked == [11, 12, 13]  # "cat" in the context, not in the question
    assert y[0, 15] == SPAN_START and y[0, 17] == SPAN_END  # other flags as without the mark


def test_a_long_prompt_loses_its_start_and_an_answer_cut_off_drops_its_example(capsys) -> None:
    tokenizer = char_tokenizer(ALPHABET)
    prompt = "x" * 30 + " answer here:"
    spans = [AnswerSpan(prompt, 31, 37), AnswerSpan(prompt, 0, 2)]  # "answer" survives, "xx" does not
    (kept,) = tokenize_spans(spans, tokenizer, 20, where=Path("f.jsonl"))
    assert tokenizer.decode([i for i, t in zip(kept.ids, kept.trained) if t]) == "answer"
    assert "2 of 2 prompts were longer than block_size = 20 tokens" in capsys.readouterr().err
    with pytest.raises(LmforgeError, match="f.jsonl: no example keeps its answer"):
        tokenize_spans(spans[1:], tokenizer, 20, where=Path("f.jsonl"))


def test_a_span_prompt_outside_the_vocabulary_is_an_error() -> None:
    with pytest.raises(LmforgeError, match="f.jsonl: an example has text the tokenizer cannot represent"):
        tokenize_spans([AnswerSpan("Ünïcode: x", 9, 10)], char_tokenizer(ALPHABET), 50, where=Path("f.jsonl"))
