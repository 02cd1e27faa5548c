"""The judge's sheet: one self-contained HTML page (inline CSS and script, no external URL).

The prompts and answers travel as one JSON document inside a `<script type="application/json">`
element, with `<`, `>` and `&` written as `\\u003c`, `\\u003e`, `\\u0026` and everything outside
ASCII as `\\uXXXX`, so no text can close the element or be read as markup; the script puts each
string on the page with `textContent`, never as HTML. Choices are kept in the browser's
localStorage under the sheet's id, so a reload loses nothing, and "Download judgments" saves
`judgments.json`: `{"sheet_id", "judged", "total", "judgments": [{"index", "choice"}]}` with choice
"A", "B", "tie" or null (not judged). Nothing on the page says which model wrote which answer.
"""

from __future__ import annotations

import json

CHOICES = ("A", "B", "tie")
JUDGMENTS_FILE = "judgments.json"

_SAFE_JSON = str.maketrans({"<": "\\u003c", ">": "\\u003e", "&": "\\u0026"})

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Blind comparison</title>
<style>
body { font: 15px/1.45 system-ui, sans-serif; margin: 0; background: #f3f4f6; color: #111827; }
header { position: sticky; top: 0; z-index: 1; background: #1f2937; color: #fff; padding: 10px 20px;
  display: flex; gap: 16px; align-items: center; flex-wrap: wrap; }
header h1 { font-size: 17px; margin: 0; }
header p { margin: 0; color: #d1d5db; flex: 1; min-width: 240px; }
#progress { font-weight: 600; }
main { max-width: 1100px; margin: 0 auto; padding: 16px 20px 40px; }
.card { background: #fff; border: 1px solid #d1d5db; border-radius: 8px; padding: 14px 16px;
  margin: 0 0 16px; }
.card.judged { border-color: #10b981; }
.card h2 { font-size: 14px; margin: 0 0 6px; color: #4b5563; }
pre { white-space: pre-wrap; overflow-wrap: anywhere; margin: 0; font: 14px/1.4 ui-monospace, monospace; }
.prompt { background: #eef2ff; padding: 8px 10px; border-radius: 6px; }
.answers { display: grid; grid-template-columns: 1fr 1fr; gap: 12px; margin: 12px 0; }
.answer { border: 1px solid #e5e7eb; border-radius: 6px; padding: 8px 10px; }
.answer h3 { font-size: 14px; margin: 0 0 4px; }
.choices { display: flex; gap: 8px; justify-content: center; }
button { font: inherit; padding: 6px 16px; border-radius: 6px; border: 1px solid #9ca3af; background: #fff;
  cursor: pointer; }
button[aria-pressed="true"] { background: #10b981; border-color: #047857; color: #fff; font-weight: 600; }
#download { background: #2563eb; border-color: #1d4ed8; color: #fff; }
</style></head>
<body>
<header><h1>Blind comparison</h1>
<p>For each prompt, pick the better answer, or tie. The sides are shuffled. Your choices stay in
this browser; when done, download them and send back the file.</p>
<span id="progress"></span><button id="download" type="button">Download judgments</button></header>
<main id="cards"></main>
<script type="application/json" id="sheet-data">__DATA__</script>
<script>
"use strict";
const data = JSON.parse(document.getElementById("sheet-data").textContent);
const CHOICES = ["A", "B", "tie"];
const LABELS = {A: "A is better", tie: "Tie", B: "B is better"};
const storeKey = "lmforge-compare-" + data.id;
const choices = restore();

function restore() {
  let saved = {};
  try { saved = JSON.parse(localStorage.getItem(storeKey) || "{}") || {}; } catch (e) { saved = {}; }
  const known = {};
  for (const item of data.items) {
    if (CHOICES.includes(saved[item.index])) known[item.index] = saved[item.index];
  }
  return known;
}

function store() {
  try { localStorage.setItem(storeKey, JSON.stringify(choices)); } catch (e) { /* private mode */ }
}

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function card(item, number) {
  const section = element("section", "card");
  section.id = "prompt-" + item.index;
  section.dataset.index = item.index;
  section.append(element("h2", "", "Prompt " + number + " of " + data.items.length));
  section.append(element("pre", "prompt", item.prompt));
  const answers = element("div", "answers");
  for (const side of ["A", "B"]) {
    const answer = element("div", "answer");
    answer.dataset.side = side;
    answer.append(element("h3", "", side), element("pre", "", item[side]));
    answers.append(answer);
  }
  const buttons = element("div", "choices");
  for (const choice of ["A", "tie", "B"]) {
    const button = element("button", "", LABELS[choice]);
    button.type = "button";
    button.dataset.choice = choice;
    button.addEventListener("click", () => choose(item.index, choice));
    buttons.append(button);
  }
  section.append(answers, buttons);
  return section;
}

function choose(index, choice) {
  choices[index] = choice;
  store();
  show();
}

function show() {
  for (const section of document.querySelectorAll(".card")) {
    const chosen = choices[section.dataset.index];
    section.classList.toggle("judged", chosen !== undefined);
    for (const button of section.querySelectorAll("button")) {
      button.setAttribute("aria-pressed", String(button.dataset.choice === chosen));
    }
  }
  const judged = Object.keys(choices).length;
  document.getElementById("progress").textContent = judged + " of " + data.items.length + " judged";
}

function download() {
  const judgments = data.items.map((item) => ({index: item.index, choice: choices[item.index] || null}))
    .sort((a, b) => a.index - b.index);  // by prompt, whatever order the sheet showed them in
  const content = {
    sheet_id: data.id,
    judged: judgments.filter((j) => j.choice !== null).length,
    total: data.items.length,
    judgments: judgments,
  };
  const blob = new Blob([JSON.stringify(content, null, 1) + "\\n"], {type: "application/json"});
  const link = element("a");
  link.href = URL.createObjectURL(blob);
  link.download = "__FILE__";
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 10000);
}

data.items.forEach((item, i) => document.getElementById("cards").append(card(item, i + 1)));
document.getElementById("download").addEventListener("click", download);
show();
</script>
</body></html>
"""


def embedded_json(value: object) -> str:
    """`value` as JSON that is safe inside a script element: ASCII only, no `<`, `>` or `&`."""
    return json.dumps(value, ensure_ascii=True, sort_keys=True).translate(_SAFE_JSON)


def sheet_html(sheet_id: str, items: list[dict]) -> str:
    """The sheet for `items` (each `{"index", "prompt", "A", "B"}`: the answers by side)."""
    return PAGE.replace("__FILE__", JUDGMENTS_FILE).replace(
        "__DATA__", embedded_json({"id": sheet_id, "items": items})
    )
