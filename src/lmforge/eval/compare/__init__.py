"""`lmforge compare`: a blind side-by-side human evaluation of two models.

`make_sheet` has both runs answer the same prompts (the same seed for both on each prompt) and
writes a folder: `sheet.html`, a self-contained page that shows each prompt's two answers as A
and B in a shuffled order and lets a judge click A, B or tie, then download `judgments.json`; and
`key.json`, which records which run was on which side. `tally` un-blinds a judgments file with
the key and reports RUN_A's win rate over RUN_B with a 95% interval and a sign test; with
`--preferences` it also writes the judged prompts as preference pairs (`preferences.py`).
"""

from lmforge.eval.compare.make import KEY, MODELS, SHEET, SheetReport, make_sheet
from lmforge.eval.compare.preferences import (
    Preferences,
    check_preferences_out,
    preference_pairs,
    write_preferences,
)
from lmforge.eval.compare.prompts import Prompt, read_prompts
from lmforge.eval.compare.sheet import JUDGMENTS_FILE, sheet_html
from lmforge.eval.compare.tally import Tally, sign_test, tally, wilson_interval

__all__ = [
    "JUDGMENTS_FILE",
    "KEY",
    "MODELS",
    "SHEET",
    "Preferences",
    "Prompt",
    "SheetReport",
    "check_preferences_out",
    "Tally",
    "make_sheet",
    "preference_pairs",
    "read_prompts",
    "sheet_html",
    "sign_test",
    "tally",
    "wilson_interval",
    "write_preferences",
]
