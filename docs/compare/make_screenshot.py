"""Make the README's picture of a comparison sheet: docs/compare/sheet.png.

Builds a sheet with `lmforge compare` (into a temporary folder), opens it in headless Chromium,
clicks a choice on the first card or two so that the picture shows a judged card, and saves a
screenshot of the top of the page. Needs Playwright and Chromium (Debian's /usr/bin/chromium, or
$LMFORGE_CHROMIUM), as the browser tests do.

    python docs/compare/make_screenshot.py RUN_A RUN_B [--prompts docs/compare/prompts.jsonl]
        [--out docs/compare/sheet.png] [--click A,tie] [-- EXTRA COMPARE OPTIONS]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

from lmforge.cli import main as lmforge

HERE = Path(__file__).resolve().parent
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"]


def screenshot(sheet: Path, out: Path, clicks: list[str], width: int = 1100, height: int = 760) -> None:
    """Open `sheet`, click `clicks[i]` on card i, and save the visible top of the page as `out`."""
    from playwright.sync_api import sync_playwright

    executable = os.environ.get("LMFORGE_CHROMIUM") or shutil.which("chromium")
    if executable is None:
        sys.exit("Chromium not found: install Debian's chromium or set LMFORGE_CHROMIUM")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": width, "height": height})
        page.goto(sheet.as_uri())
        for card, choice in enumerate(clicks):
            page.locator(".card").nth(card).locator(f'button[data-choice="{choice}"]').click()
        page.evaluate("window.scrollTo(0, 0)")
        page.screenshot(path=str(out))
        browser.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs=2, metavar="RUN")
    parser.add_argument("--prompts", default=str(HERE / "prompts.jsonl"))
    parser.add_argument("--out", default=str(HERE / "sheet.png"))
    parser.add_argument("--click", default="A", help="choices to click on the first cards, comma-separated")
    argv = sys.argv[1:]
    ours, extra = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    args = parser.parse_args(ours)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "compare"
        code = lmforge(["compare", *args.runs, "--prompts", args.prompts, "--out", str(folder), *extra])
        if code:
            sys.exit(code)
        screenshot(folder / "sheet.html", Path(args.out), [c for c in args.click.split(",") if c])
    print(f"screenshot -> {args.out} ({Path(args.out).stat().st_size / 1024:.0f} KB)")


if __name__ == "__main__":
    main()
