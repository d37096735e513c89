"""``lowbit ui``'s page and its routes, served by the same process as the OpenAI API (``api.py``):

    GET  /                      the page (``ui.html``: one file, no build step)
    GET  /ui/api/info           the served models, the runs root, the form's choices and defaults
    POST /ui/api/plan           {"config": {...}, "memory": "24GB"} → lowbit plan's answer: fits, peak by part,
                                the cheapest change that fits, the YAML
    GET  /ui/api/runs           every run under the root, with its state
    POST /ui/api/runs           {"name", "config"} → start lowbit train;  …/{name}/stop, …/{name}/resume
    GET  /ui/api/runs/{name}/metrics?since=K   the metrics.jsonl rows from row K on, and the run's state

The chat tab talks to ``/v1/chat/completions`` itself (a run's adapter added through ``/v1/adapters``).
"""

from __future__ import annotations

from pathlib import Path

import yaml
from fastapi import Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from ..errors import LowbitError
from ..sizes import parse_size
from ..training.config import CHOICES, TrainConfig
from .api import read_json
from .requests import ApiError
from .runs import Runs, config_of

__all__ = ["ui_routes", "FORM_KEYS"]

# the form's fields: the config keys a run is planned and started with
FORM_KEYS = ("base_model", "datasets", "load_in_4bit", "quant_type", "double_quant", "lora_r", "lora_alpha",
             "lora_target_modules", "micro_batch_size", "gradient_accumulation_steps", "sequence_len", "optimizer",
             "learning_rate", "max_steps", "num_epochs", "val_set_size", "eval_steps", "gradient_checkpointing",
             "device", "compute_dtype")


def ui_routes(runs: Runs):
    """``extra_routes`` for ``api.build_app``: the page and its routes over ``runs``."""

    def add(app, server):
        page = (Path(__file__).with_name("ui.html")).read_text()

        @app.get("/", include_in_schema=False)
        async def root():
            return RedirectResponse("/ui")

        @app.get("/favicon.ico", include_in_schema=False)
        async def favicon():
            return Response(status_code=204)

        @app.get("/ui", include_in_schema=False)
        async def ui():
            return HTMLResponse(page)

        @app.get("/ui/api/info")
        async def info():
            defaults = {k: getattr(TrainConfig(), k) for k in FORM_KEYS}
            defaults["base_model"] = server.base_model
            return {"models": server.model_ids(), "base": server.name, "base_model": str(server.base_model),
                    "runs_root": str(runs.root), "defaults": defaults,
                    "choices": {k: [str(c).lower() if isinstance(c, bool) else c for c in v]
                                for k, v in CHOICES.items() if k in FORM_KEYS}}

        @app.post("/ui/api/plan")
        async def plan(request: Request):
            body = await _body(request, server.limits.max_body_bytes)
            return await run_in_threadpool(plan_answer, body.get("config") or {}, body.get("memory"))

        @app.get("/ui/api/runs")
        async def listing():
            return {"runs": [runs.state(n) for n in runs.names()]}

        @app.post("/ui/api/runs")
        async def start(request: Request):
            body = await _body(request, server.limits.max_body_bytes)
            return _checked(runs.start, body.get("name"), body.get("config") or {})

        @app.post("/ui/api/runs/{name}/stop")
        async def stop(name: str):
            return await run_in_threadpool(_checked, runs.stop, name)

        @app.post("/ui/api/runs/{name}/resume")
        async def resume(name: str):
            return _checked(runs.start, name, None, True)

        @app.get("/ui/api/runs/{name}/metrics")
        async def metrics(name: str, since: int = 0):
            rows = _checked(runs.metrics, name)
            return {"rows": rows[max(since, 0):], "count": len(rows), "state": runs.state(name)}

    return add


async def _body(request: Request, limit: int) -> dict:
    body = await read_json(request, limit)
    if not isinstance(body, dict):
        raise ApiError("the request body must be a JSON object")
    return body


def _checked(fn, *args):
    try:
        return fn(*args)
    except LowbitError as e:
        raise ApiError(str(e)) from None


def plan_answer(values: dict, memory) -> dict:
    """lowbit plan's answer for the form: the plan's parts, fits or not in ``memory`` (default: the device's),
    the cheapest change that fits when it does not, and the YAML of the keys given."""
    from ..planner.memory import HEADROOM, plan_config
    from ..training.device import resolve_device
    from ..training.preflight import advice, free_memory

    cfg = _checked(config_of, values)
    # cuda is planned even on a machine without one; auto is where lowbit train would run it here
    device = cfg.device if cfg.device == "cpu" else "cuda" if cfg.device.startswith("cuda") else \
        resolve_device("auto").type
    try:
        total = parse_size(str(memory)) if memory else None
    except LowbitError as e:
        raise ApiError(f"memory: {e}", param="memory") from None
    if total is None:
        total, _ = free_memory(cfg.memory_limit, device)
    p = _checked(plan_config, cfg, f"{total}B", device)
    out = {"fits": p.fits, "total_bytes": p.total_bytes, "device_bytes": p.device_bytes, "items": p.items,
           "host_items": p.host_items, "table": p.table(), "device": device,
           "yaml": yaml.safe_dump({k: v for k, v in values.items() if v not in (None, "")}, sort_keys=False)}
    if p.device_bytes and not p.fits:
        out["advice"] = _checked(advice, cfg, int(p.device_bytes * (1 - HEADROOM)), 1, 1, device)
    return out
