"""``lowbit serve --model M [--adapter NAME=DIR …] [--host 127.0.0.1] [--port 8000] [--api-key K]``: an
OpenAI-compatible server over one 4-bit base and its adapters (``lowbit.serve``)."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

from ..errors import LowbitError
from .options import MODEL_KEYS, add_config_flags, config_from

HELP = "an OpenAI-compatible server: the base and its adapters, chosen per request (model base:adapter)"


def add_server_flags(p) -> None:
    """The flags ``serve`` and ``ui`` share."""
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                   help="an adapter to serve as model <base>:NAME (repeat for more; DIR alone: named after it)")
    p.add_argument("--adapter-root", help="a folder adapters may be added from at run time (POST /v1/adapters)")
    p.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1; any other needs --api-key")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("LOWBIT_API_KEY"),
                   help="clients send it as 'Authorization: Bearer KEY' (default: $LOWBIT_API_KEY)")
    p.add_argument("--served-name", help="the base's model name (default: the model folder's name)")
    p.add_argument("--max-batch", type=int, default=32, help="sequences decoded together (default 32)")
    p.add_argument("--max-queue", type=int, default=256, help="sequences queued or running before 429 (default 256)")
    p.add_argument("--max-tokens", type=int, default=512, help="the most tokens a completion may ask for")
    p.add_argument("--max-prompt-tokens", type=int, help="the longest prompt (default: the model's context)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20)
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds in-flight requests get to finish on shutdown (default 30)")
    p.add_argument("--force", action="store_true", help="serve adapters trained on another base")
    add_config_flags(p, MODEL_KEYS, required=("base_model",))


def add_parser(sub, name):
    p = sub.add_parser(name, help=HELP)
    add_server_flags(p)
    return p


def adapter_args(values: list[str]) -> dict[str, Path]:
    out = {}
    for v in values:
        name, sep, path = v.partition("=")
        if not sep:
            name, path = Path(v.rstrip("/")).name, v
        if name in out:
            raise LowbitError(f"--adapter {v}: the name {name!r} is given twice")
        out[name] = Path(path)
    return out


def check_host(host: str, api_key: str | None) -> None:
    try:
        local = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        local = False
    if not local and not api_key:
        raise LowbitError(f"--host {host}: serving beyond this machine needs --api-key (or $LOWBIT_API_KEY)")


def check_port(host: str, port: int) -> None:
    """Refuse a port another process listens on now, before the model is loaded."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise LowbitError(f"--host {host} --port {port}: cannot listen there ({e.strerror}); choose another "
                              "--port") from None


def make_server(args):
    """The model loaded (with the config.json fields its adapters were trained with) and the server over it; the
    host, port and adapter folders checked first."""
    from ..io.adapters import ADAPTER_FILES, adapter_config_overrides
    from ..serve.server import Limits, Server
    from .options import load_model

    check_host(args.host, args.api_key)
    check_port(args.host, args.port)
    for flag in ("max_batch", "max_queue", "max_tokens", "max_body_bytes"):
        if getattr(args, flag) < 1:
            raise LowbitError(f"--{flag.replace('_', '-')} must be at least 1")
    adapters = adapter_args(args.adapter)
    for p in adapters.values():
        missing = [f for f in ADAPTER_FILES if not (p / f).exists()]
        if missing:
            raise LowbitError(f"--adapter {p}: no {missing[0]} there — not a PEFT adapter folder")
    overrides = [adapter_config_overrides(p) or {} for p in adapters.values()]
    if any(o != overrides[0] for o in overrides):
        raise LowbitError("the adapters were trained with different model_config (e.g. rope_scaling); serve them "
                          "from separate servers")
    cfg = config_from(args)
    if overrides and overrides[0]:
        cfg.model_config = {**(cfg.model_config or {}), **overrides[0]}
    limits = Limits(args.max_batch, args.max_queue, args.max_tokens, args.max_prompt_tokens, args.max_body_bytes,
                    args.shutdown_timeout)
    net = load_model(cfg)
    return Server(net, cfg.base_model, args.served_name, adapters, args.adapter_root, limits, args.force)


def serve(app, args) -> None:
    import uvicorn

    print(f"serving on http://{args.host}:{args.port} (Ctrl-C to stop)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning",
                timeout_graceful_shutdown=max(1, int(args.shutdown_timeout)))


def run(args) -> int:
    from ..serve.api import build_app

    server = make_server(args)
    print(f"models: {', '.join(server.model_ids())}")
    serve(build_app(server, args.api_key), args)
    return 0
