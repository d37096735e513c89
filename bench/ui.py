"""The README's pictures of ``lowbit ui``, taken on the real model: headless Chromium (Debian's package, driven by
Playwright) plans a short QLoRA run of SmolLM2-135M on the built-in chatterbot corpus, starts it, waits for it to
finish, and asks the base and the run's adapter the same question. Screenshots go to ``bench/results/ui/``.

    python bench/ui.py [--steps 60]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

OUT = Path(__file__).resolve().parent / "results" / "ui"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--port", type=int, default=7861)
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        raise SystemExit("Chromium is not installed (apt-get install chromium)")
    runs = Path(tempfile.mkdtemp(prefix="lowbit-ui-"))
    server = subprocess.Popen([sys.executable, "-m", "lowbit", "ui", "--model", "smollm2-135m", "--runs", str(runs),
                               "--port", str(args.port)], stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{args.port}"
    try:
        _wait(lambda: _up(url), 300, "the server")
        OUT.mkdir(parents=True, exist_ok=True)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1280, "height": 860})
            page.goto(url + "/ui")
            page.wait_for_selector("#f-base_model")
            for key, value in (("datasets", "chatterbot"), ("max_steps", str(args.steps)), ("sequence_len", "256"),
                               ("micro_batch_size", "8"), ("learning_rate", "0.0003"), ("val_set_size", "0.05"),
                               ("eval_steps", "20")):
                page.fill(f"#f-{key}", value)
            page.fill("#memory", "8GB")
            _wait(lambda: page.inner_text("#plan-verdict").startswith("fits"), 60, "the plan")
            page.screenshot(path=str(OUT / "plan.png"), full_page=True)
            page.fill("#run-name", "chatterbot")
            page.click("#start-run")
            status = lambda: page.get_attribute('tr[data-run="chatterbot"]', "data-status")
            _wait(lambda: status() in ("finished", "failed"), 3600, "the run")
            time.sleep(1.5)
            page.screenshot(path=str(OUT / "runs.png"))
            print(f"run {status()}: {page.inner_text('#progress')}")
            page.click('nav button[data-tab="chat"]')
            page.wait_for_selector('#chat-run option[value="chatterbot"]', state="attached")
            page.fill("#chat-input", "What is a wavelength?")
            page.fill("#chat-max", "48")
            page.click("#chat-send")
            for side in ("base", "adapter"):
                page.wait_for_selector(f'#answer-{side}[data-done="1"]', state="attached", timeout=300000)
            page.screenshot(path=str(OUT / "chat.png"))
            print("base:   ", page.inner_text("#answer-base"))
            print("adapter:", page.inner_text("#answer-adapter"))
            browser.close()
    finally:
        server.terminate()
        server.wait(120)
        shutil.rmtree(runs, ignore_errors=True)
    print(f"screenshots in {OUT}")


def _up(url: str) -> bool:
    try:
        urllib.request.urlopen(url + "/health", timeout=1)
        return True
    except OSError:
        return False


def _wait(predicate, timeout: float, what: str):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.5)
    raise SystemExit(f"timed out waiting for {what}")


if __name__ == "__main__":
    main()
