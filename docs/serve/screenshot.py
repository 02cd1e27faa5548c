"""Take the README's screenshot of the playground: `lmforge serve RUN` on a free loopback port,
a system message and one exchange typed into the page in headless Chromium, the page saved as PNG.

    .venv/bin/python docs/serve/screenshot.py RUN [--out docs/serve/playground.png]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import threading
import time
from pathlib import Path

import uvicorn
from playwright.sync_api import sync_playwright

from lmforge.inference import load
from lmforge.serve.api import create_app

HERE = Path(__file__).resolve().parent
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", help="a run or checkpoint folder")
    p.add_argument("--checkpoint", default="best")
    p.add_argument("--out", default=str(HERE / "playground.png"))
    args = p.parse_args()
    session = load(Path(args.run), args.checkpoint, "cpu", dtype="fp32")
    server = uvicorn.Server(uvicorn.Config(create_app(session, Path(args.run).resolve().name), port=0))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}/"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=shutil.which("chromium"), args=FLAGS)
        page = browser.new_page(viewport={"width": 1100, "height": 640})
        page.goto(url)
        page.fill("#system", "Thou art a player at the Globe.")
        page.fill("#temperature", "0.7")
        page.dispatch_event("#temperature", "input")
        page.fill("#max_tokens", "60")
        page.fill("#seed", "1")
        page.fill("#input", "What news from the court?")
        page.click("#send")
        page.wait_for_selector(".stats", timeout=60_000)
        page.screenshot(path=args.out)
        browser.close()
    server.should_exit = True
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
