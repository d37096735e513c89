"""The package's shape: data flows one way (quant ← nn ← io ← training ← cli), the planner and the config import
no torch, modules and functions stay small enough to read."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "lowbit"

# a module may import from its own layer and the layers below it
LAYERS = {"errors": 0, "_lazy": 0, "atomic": 0, "cache": 0, "dtypes": 0, "jsonfile": 0, "runlock": 0, "sizes": 0,
          "rewards": 0, "quant": 1, "nn": 2, "optim": 2, "data": 2, "io": 3, "generation": 3, "training": 4,
          "planner": 4, "serve": 5, "cli": 5, "__init__": 5, "__main__": 6}


def _modules():
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).with_suffix("")
        yield path, rel.parts


def _imports(path: Path, parts: tuple[str, ...]):
    """Top parts of the lowbit modules ``path`` imports (relative imports resolved)."""
    tree = ast.parse(path.read_text())
    pkg = parts[:-1]  # the package a relative import starts from (for a/__init__.py and a/b.py alike: a)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[: len(pkg) - (node.level - 1)] if node.level > 1 else pkg
                target = (*base, *(node.module.split(".") if node.module else ()))
                if not target:  # "from . import x" at the top: x itself
                    target = (node.names[0].name,)
                yield target[0], node.lineno
            elif node.module and node.module.split(".")[0] == "lowbit":
                yield node.module.split(".")[1], node.lineno
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "lowbit" and len(a.name.split(".")) > 1:
                    yield a.name.split(".")[1], node.lineno


def test_no_import_runs_upward():
    bad = []
    for path, parts in _modules():
        layer = LAYERS[parts[0]]
        for top, line in _imports(path, parts):
            if top == "_lazy" or parts == ("__init__",):
                continue  # the lazy export tables name every layer by design
            if top in LAYERS and LAYERS[top] > layer:
                bad.append(f"{path.relative_to(SRC)}:{line} imports lowbit.{top}")
    assert not bad, "imports that run upward:\n" + "\n".join(bad)


def test_modules_and_functions_are_small():
    long = []
    for path, _ in _modules():
        text = path.read_text()
        if text.count("\n") > 400:
            long.append(f"{path.relative_to(SRC)}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 60:
                long.append(f"{path.relative_to(SRC)}:{node.name} is {node.end_lineno - node.lineno + 1} lines")
    assert not long, "\n".join(long)


@pytest.mark.parametrize("code", [
    "import lowbit.planner, lowbit.planner.memory, lowbit.training.config, lowbit.cli.options",
    "from lowbit.cli import main; main(['plan', 'llama-65b', '--gpu-memory', '48GB', '--json'])",
    "import lowbit; lowbit.plan; lowbit.LowbitError; lowbit.QuantSpec",
])
def test_planner_and_config_import_no_torch(code):
    check = f"{code}\nimport sys\nassert 'torch' not in sys.modules, [m for m in sys.modules if 'torch' in m][:5]"
    p = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]


def test_every_registry_name_is_accepted_by_config_and_parser():
    from lowbit.cli import build_parser
    from lowbit.data.formats import FORMATS
    from lowbit.optim.registry import OPTIMIZERS
    from lowbit.quant.spec import QUANT_TYPES
    from lowbit.training.config import TrainConfig
    from lowbit.training.schedule import SCHEDULERS

    tables = {"quant_type": QUANT_TYPES, "optimizer": OPTIMIZERS, "lr_scheduler": SCHEDULERS,
              "dataset_format": {"auto": None, **FORMATS}}
    train = build_parser().commands["train"]
    flags = {a.dest: a for a in train._actions}
    for key, table in tables.items():
        assert set(flags[key].choices) == set(table), key
        for name in table:
            TrainConfig(**{key: name}).validate()


def test_no_package_exports_a_name_that_is_also_its_submodule():
    """Once ``pkg.x`` (a module) is imported, Python sets it as ``pkg``'s attribute, hiding an exported ``x``:
    ``from lowbit.training import evaluate`` would give the module, not the function."""
    import importlib

    clashes = []
    for init in sorted(SRC.rglob("__init__.py")):
        pkg = ".".join(("lowbit", *init.parent.relative_to(SRC).parts))
        submodules = {p.stem for p in init.parent.glob("*.py")} | {p.name for p in init.parent.iterdir() if p.is_dir()}
        exported = set(getattr(importlib.import_module(pkg), "__all__", ()))
        clashes += [f"{pkg}.{name}" for name in sorted(exported & submodules)]
    assert not clashes, clashes
