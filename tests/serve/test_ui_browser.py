"""``lowbit ui`` in a real browser: headless Chromium from Debian's packages, driven by Playwright (no browser
download). The page plans a run on a tiny model (fits / does not fit, with the cheapest change), starts it, the
loss chart grows, the run is stopped (a checkpoint) and resumed to the end, and its adapter answers in the chat —
as ``lowbit generate`` does — beside the base."""

import json
import os
import shutil
import time

import pytest
import torch
from servers import free_port, running

from lowbit import cli
from lowbit.cli.ui import make_ui
from lowbit.generation import generate
from lowbit.io.adapters import load_adapter
from lowbit.io.loader import load
from lowbit.io.tokenizer import end_token_ids, tokenizer_for
from lowbit.serve.runs import Runs

playwright = pytest.importorskip("playwright.sync_api")

CHROMIUM = os.environ.get("LOWBIT_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
STEPS = 1500  # the browser test's run


def _points(page) -> int:
    line = page.query_selector("#train-line")
    return len(line.get_attribute("points").split()) if line else 0


def _wait(predicate, timeout=120.0, what="the page"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_plan_start_watch_stop_resume_and_chat_in_a_browser(setup, tmp_path):
    assert CHROMIUM, "Chromium is not installed: apt-get install chromium (make test does), or set LOWBIT_CHROMIUM"
    root, model_dir, data = setup
    runs_dir = tmp_path / "runs"
    port = free_port()
    args = cli.build_parser().parse_args(["ui", "--model", str(model_dir), "--runs", str(runs_dir),
                                          "--compute-dtype", "float32", "--port", str(port)])
    app, runs = make_ui(args)
    shots = tmp_path / "shots"
    shots.mkdir()
    with running(app, port) as url, \
            playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(url + "/")  # redirected to the page
        page.wait_for_selector("#f-base_model")
        assert page.input_value("#f-base_model") == str(model_dir)

        # plan: too little memory, then enough
        page.fill("#f-datasets", str(data))
        # enough steps that the run cannot end between the chart growing and the click on Stop (a tiny-model step
        # takes ~9 ms on a fast machine: 300 steps once finished before the click landed)
        for key, value in (("max_steps", str(STEPS)), ("sequence_len", "64"), ("micro_batch_size", "8"),
                           ("learning_rate", "0.001"), ("compute_dtype", "float32")):
            page.fill(f"#f-{key}", value) if key != "compute_dtype" else page.select_option(f"#f-{key}", value)
        page.fill("#memory", "100MB")
        _wait(lambda: "does not fit" in page.inner_text("#plan-verdict"), 30, "the plan to say it does not fit")
        assert page.inner_text("#plan-advice").startswith(("it would fit with", "even with"))
        page.fill("#memory", "4GB")
        _wait(lambda: page.inner_text("#plan-verdict").startswith("fits"), 30, "the plan to say it fits")
        assert "quantized weights" in page.inner_text("#plan-items")
        assert f"datasets: {data}" in page.inner_text("#plan-yaml")
        page.screenshot(path=str(shots / "plan.png"))

        # start: the chart grows while it runs; stop it (a checkpoint); resume it to the end
        page.fill("#run-name", "tiny-run")
        page.click("#start-run")
        page.wait_for_selector('tr[data-run="tiny-run"]')
        first = _wait(lambda: _points(page) >= 3 and _points(page), 120, "the first logged steps")
        _wait(lambda: _points(page) > first, 60, "the chart to grow")
        page.click("#stop-tiny-run")
        _wait(lambda: page.get_attribute('tr[data-run="tiny-run"]', "data-status") == "stopped", 120, "stopped")
        stopped_at = runs.state("tiny-run")["step"]
        assert 0 < stopped_at < STEPS
        assert any((runs_dir / "tiny-run" / "checkpoints").iterdir())
        page.click("#resume-tiny-run")
        _wait(lambda: page.get_attribute('tr[data-run="tiny-run"]', "data-status") == "finished", 600, "finished")
        _wait(lambda: f"step {STEPS} of {STEPS}" in page.inner_text("#progress"), 10, "the progress to reach the end")
        losses = [r["loss"] for r in runs.metrics("tiny-run") if "loss" in r]
        assert losses[-1] < losses[0]  # what the chart shows went down
        page.screenshot(path=str(shots / "runs.png"))

        # chat: the run's adapter beside the base, streamed through the API
        page.click('nav button[data-tab="chat"]')
        page.wait_for_selector('#chat-run option[value="tiny-run"]', state="attached")
        page.fill("#chat-input", "what is the capital of france 1")
        page.fill("#chat-max", "40")
        page.click("#chat-send")
        page.wait_for_selector('#answer-adapter[data-done="1"]', state="attached", timeout=60000)
        page.wait_for_selector('#answer-base[data-done="1"]', state="attached", timeout=60000)
        page.screenshot(path=str(shots / "chat.png"))
        adapter = page.eval_on_selector("#answer-adapter", "e => e.textContent")
        base = page.eval_on_selector("#answer-base", "e => e.textContent")
        browser.close()
    assert not errors, errors
    net = load(model_dir, compute_dtype=torch.float32)
    tok = tokenizer_for(model_dir)
    assert base == generate(net, tok, "what is the capital of france 1", 40, stop_ids=end_token_ids(tok))
    run = runs_dir / "tiny-run"
    load_adapter(net, run)
    tok = tokenizer_for(model_dir, run)
    want = generate(net, tok, "what is the capital of france 1", 40, stop_ids=end_token_ids(tok, run))
    assert adapter == want and adapter != base
    # thousands of steps on one answer: the run has learned how it starts; the base has not
    assert adapter.startswith("the capital") and not base.startswith("the capital")


def test_the_ui_api_refuses_bad_runs_in_one_line(setup, tmp_path):
    root, model_dir, data = setup
    runs = Runs(tmp_path / "runs")
    from lowbit.errors import LowbitError

    with pytest.raises(LowbitError, match="lora_r"):
        runs.start("a", {"base_model": str(model_dir), "datasets": str(data), "lora_r": -1})
    assert not (tmp_path / "runs" / "a.yaml").exists()  # nothing written for a refused config
    with pytest.raises(LowbitError, match="adapter name"):
        runs.start("../up", {"base_model": str(model_dir)})
    with pytest.raises(LowbitError, match="not running"):
        runs.stop("nothing")
    assert json.loads(json.dumps(runs.state("nothing")))["status"] == "new"


def test_a_run_another_process_holds_is_shown_running_and_not_started_twice(setup, tmp_path):
    from lowbit.errors import LowbitError
    from lowbit.runlock import RunLock

    root, model_dir, data = setup
    runs = Runs(tmp_path / "runs")
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "busy.yaml").write_text(f"base_model: {model_dir}\ndatasets: {data}\n")
    with RunLock(tmp_path / "runs" / "busy"):  # as a `lowbit train` in another terminal holds it
        assert runs.state("busy")["status"] == "running"
        with pytest.raises(LowbitError, match="already running"):
            runs.start("busy", resume=True)
        with pytest.raises(LowbitError, match="already running"):
            runs.start("busy", {"base_model": str(model_dir), "datasets": str(data)})
    assert runs.state("busy")["status"] == "new"
    with pytest.raises(LowbitError, match="exists; resume it"):
        runs.start("busy", {"base_model": str(model_dir), "datasets": str(data)})


def test_stop_checkpoints_a_run_started_with_ctrl_c_ignored(setup, tmp_path):
    """A page started from a background job (`lowbit ui … &` in a script) has SIGINT ignored, and its runs inherit
    that: Stop must still end the run with a checkpoint."""
    import signal

    root, model_dir, data = setup
    runs = Runs(tmp_path / "runs")
    prev = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        runs.start("bg", {"base_model": str(model_dir), "datasets": str(data), "max_steps": 100_000,
                          "save_steps": 20, "sequence_len": 64, "compute_dtype": "float32"})
    finally:
        signal.signal(signal.SIGINT, prev)
    try:
        _wait(lambda: len(runs.metrics("bg")) > 20, 120, "the run to pass its first checkpoint")
        assert runs.stop("bg")["status"] == "stopped"
    finally:
        if runs.children["bg"].poll() is None:  # Stop failed: never leave a 100,000-step run behind
            runs.children["bg"].kill()
    assert 20 < runs.state("bg")["step"] < 100_000
    assert any((tmp_path / "runs" / "bg" / "checkpoints").iterdir())
