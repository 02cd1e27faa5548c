"""The text outputs of `lmforge inspect`: the logit-lens table (TSV and terminal), the top-k
next tokens (JSON) and the surprisal page (self-contained HTML, every piece of text escaped)."""

from __future__ import annotations

import html
import math
from collections.abc import Callable

from lmforge.eval.inspect.trace import Trace

Decode = Callable[[int], str]  # one token id -> its text


def token_label(text: str) -> str:
    """A token's text as one visible line: line breaks and tabs escaped, a space shown as ·."""
    shown = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)  # "\n" -> "\\n"
    return shown.replace(" ", "·") or "∅"


def lens_layer_names(trace: Trace) -> list[str]:
    """Row names of the logit lens: the embeddings, then each block's output."""
    return ["embed", *(f"layer {i}" for i in range(len(trace.attention)))]


def lens_tsv(trace: Trace, decode: Decode) -> str:
    """One row per lens layer and position: the token, the next token, its rank, and the top k."""
    ranks, k = trace.lens.ranks, trace.lens.ids.size(-1)  # (L + 1, T - 1)
    header = ["layer", "position", "token", "next_token", "next_rank", *(f"top{j + 1}" for j in range(k))]
    rows = ["\t".join(header)]
    for row, name in enumerate(lens_layer_names(trace)):
        probs, ids = trace.lens.probs[row], trace.lens.ids[row]  # (T, k) each
        for pos, token in enumerate(trace.ids):
            last = pos == len(trace.ids) - 1
            nxt, rank = (
                ("", "") if last else (token_label(decode(trace.ids[pos + 1])), str(int(ranks[row, pos])))
            )
            top = [f"{token_label(decode(int(i)))} {float(p):.4f}" for p, i in zip(probs[pos], ids[pos])]
            rows.append("\t".join([name, str(pos), token_label(decode(token)), nxt, rank, *top]))
    return "\n".join(rows) + "\n"


def lens_table(trace: Trace, decode: Decode, width: int = 8) -> str:
    """The logit lens for the terminal: a row per position, a column per lens layer holding its
    top-1 token, marked * where that is the prompt's next token."""
    names = lens_layer_names(trace)
    top1 = trace.lens.ids[..., 0]  # (L + 1, T)
    cell = lambda text: text[:width].ljust(width)  # noqa: E731
    header = (
        cell("pos") + cell("token") + cell("next") + "".join(cell(n.replace("layer ", "L")) for n in names)
    )
    lines = [header.rstrip()]
    for pos, token in enumerate(trace.ids):
        nxt = trace.ids[pos + 1] if pos + 1 < len(trace.ids) else None
        row = (
            cell(str(pos))
            + cell(token_label(decode(token)))
            + cell("" if nxt is None else token_label(decode(nxt)))
        )
        for layer in range(len(names)):
            guess = int(top1[layer, pos])
            row += cell(token_label(decode(guess))[: width - 2] + ("*" if guess == nxt else ""))
        lines.append(row.rstrip())
    return "\n".join(lines)


def top_k_json(trace: Trace, decode: Decode) -> list[dict]:
    """For each position: the token, and the model's k likeliest next tokens with probabilities."""
    probs, ids = trace.top_k()  # (T, k) each
    return [
        {
            "position": pos,
            "token": decode(token),
            "token_id": token,
            "next": [
                {"token": decode(int(i)), "token_id": int(i), "prob": float(p)}
                for p, i in zip(probs[pos], ids[pos])
            ],
        }
        for pos, token in enumerate(trace.ids)
    ]


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title><style>
body {{ font-family: system-ui, sans-serif; max-width: 60em; margin: 2em auto; padding: 0 1em; }}
.text {{ font-family: ui-monospace, monospace; white-space: pre-wrap; line-height: 1.9; font-size: 15px; }}
.text span {{ border-radius: 2px; }}
.first {{ background: #ddd; }}
table {{ border-collapse: collapse; font-size: 13px; margin-top: 2em; }}
td, th {{ border-bottom: 1px solid #ddd; padding: 2px 8px; text-align: left; }}
td {{ font-family: ui-monospace, monospace; }}
.scale span {{ display: inline-block; width: 3.5em; text-align: center; font-size: 12px; }}
</style></head><body>
<h1>{title}</h1>
<p>{summary}</p>
<p class="scale">surprisal (bits): {scale}</p>
<div class="text">{text}</div>
<table><tr><th>pos</th><th>token</th><th>surprisal (bits)</th><th>p(token)</th><th>rank</th>
<th>top predictions before it</th></tr>
{rows}
</table></body></html>
"""


def surprisal_colour(bits: float, top: float) -> str:
    """White at 0 bits, deepening to red at `top` bits (and above)."""
    share = min(max(bits / top, 0.0), 1.0) if top > 0 else 0.0
    return f"hsl(0, 100%, {100 - 50 * share:.0f}%)"


def surprisal_html(trace: Trace, decode: Decode, title: str) -> str:
    """The prompt with every token coloured by its surprisal (hover for the numbers), and a table."""
    bits = (trace.surprisal / math.log(2)).tolist()  # (T - 1,) bits of tokens 1..T-1
    top = max(math.log2(trace.logits.size(-1)), 1.0)  # a uniform guess; rarer is deepest red
    ranks = trace.ranks.tolist()
    probs, ids = trace.top_k()
    first = html.escape(decode(trace.ids[0]))
    spans = [f'<span class="first" title="first token: nothing predicts it">{first}</span>']
    rows = []
    for pos, token in enumerate(trace.ids[1:], start=1):
        text, b = decode(token), bits[pos - 1]
        guesses = ", ".join(
            f"{token_label(decode(int(i)))} {float(p):.3f}" for p, i in zip(probs[pos - 1], ids[pos - 1])
        )
        note = f"{b:.2f} bits, p = {2**-b:.4f}, rank {ranks[pos - 1] + 1}; predicted: {guesses}"
        style = f"background: {surprisal_colour(b, top)}"
        spans.append(f'<span style="{style}" title="{html.escape(note)}">{html.escape(text)}</span>')
        cells = [str(pos), token_label(text), f"{b:.3f}", f"{2**-b:.4f}", str(ranks[pos - 1] + 1), guesses]
        rows.append(f'<tr style="{style}">' + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    mean = sum(bits) / len(bits)
    summary = (
        f"{len(trace.ids)} tokens; mean loss {mean * math.log(2):.4f} nats/token ({mean:.3f} bits/token)."
    )
    scale = "".join(
        f'<span style="background: {surprisal_colour(b, top)}">{b:.0f}</span>'
        for b in (top * j / 4 for j in range(5))
    )
    return PAGE.format(
        title=html.escape(title), summary=summary, scale=scale, text="".join(spans), rows="\n".join(rows)
    )
