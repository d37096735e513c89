"""``lowbit ui --model M [--runs DIR]``: the web page — plan a run, start and watch it, chat with the result —
served with the OpenAI API by one process (``lowbit serve``'s flags; adapters are read from the runs folder)."""

from __future__ import annotations

from .serve import add_server_flags, make_server, serve

HELP = "a web page to plan, start, watch and chat with runs (and lowbit serve's API beside it)"


def add_parser(sub, name):
    p = sub.add_parser(name, help=HELP)
    p.add_argument("--runs", default="runs", help="the folder runs are started in and read from (default runs/)")
    add_server_flags(p)
    p.set_defaults(port=7860)
    return p


def make_ui(args):
    """(the app: the server with the page's routes, the runs it starts); adapters are read from the runs folder."""
    from ..serve.api import build_app
    from ..serve.runs import Runs
    from ..serve.ui import ui_routes

    args.adapter_root = args.adapter_root or args.runs
    runs = Runs(args.runs)
    return build_app(make_server(args), args.api_key, ui_routes(runs)), runs


def run(args) -> int:
    app, runs = make_ui(args)
    try:
        print(f"the page: http://{args.host}:{args.port}/ui", flush=True)
        serve(app, args)
    finally:
        runs.stop_all()
    return 0
