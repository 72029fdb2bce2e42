"""The package's layers, read from the source: `core` imports no job, a job
imports only `core` and itself, `boot` only the live jobs (overlay, apply)
and core, `mkupdates` only apply and core (it makes what apply reads, and
judges it with apply's planner), `fold` only overlay, build and core (it
builds an image from a live overlay), and click stays in the CLI.  Function-level
imports count as much as those at the top."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dmoverlay"
JOBS = ("build", "overlay", "apply")


def _layer(module: str) -> str:
    """"dmoverlay.apply.plan" -> "apply"; "dmoverlay.inspect" -> "inspect"."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _module(path: Path) -> str:
    return "dmoverlay." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts)


def _imports(source: str, here: str) -> set[str]:
    """Every module that source (the module `here`) imports, as an absolute
    dotted name."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source, here)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = here.split(".")[: -node.level]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            found.add(module)
            # `from dmoverlay import apply` brings in a subpackage
            found.update(f"{module}.{alias.name}" for alias in node.names
                         if module == "dmoverlay")
        elif isinstance(node, ast.Attribute):  # dmoverlay.apply.plan, once dmoverlay is bound
            dotted = _dotted(node)
            if dotted.startswith("dmoverlay."):
                found.add(dotted)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) \
                and node.value.startswith("dmoverlay."):  # importlib.import_module("...")
            found.add(node.value)
    return found


def _dotted(node: ast.expr) -> str:
    """"a.b.c" for the expression a.b.c, "" for anything else."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return ".".join([node.id, *reversed(parts)]) if isinstance(node, ast.Name) else ""


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def _own(source: str, here: str) -> set[str]:
    return {m for m in _imports(source, here) if m.startswith("dmoverlay.")}


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_layers(path: Path) -> None:
    parts = path.relative_to(PACKAGE).parts
    layer = parts[0] if len(parts) > 1 else "top"
    source, here = path.read_text(), _module(path)
    reached = {_layer(m) for m in _own(source, here)}
    if layer == "core":
        assert reached <= {"core"}, f"core reaches {reached - {'core'}}"
    elif layer in JOBS:
        assert reached <= {"core", layer}, f"{layer} reaches {reached - {'core', layer}}"
    elif layer == "boot":  # over setup and apply, under the CLI; builds nothing
        allowed = {"core", "overlay", "apply", "boot"}
        if path.name == "initramfs.py":  # it packs the command line for the initramfs
            allowed.add("cli")
        assert reached <= allowed, f"boot reaches {reached - allowed}"
    elif layer == "mkupdates":  # over apply: its readers read, its planner judges
        allowed = {"core", "apply", "mkupdates"}
        assert reached <= allowed, f"mkupdates reaches {reached - allowed}"
    elif layer == "fold":  # over overlay (the live devices) and build (the image)
        allowed = {"core", "overlay", "build", "fold"}
        assert reached <= allowed, f"fold reaches {reached - allowed}"
    elif layer == "top" and path.name != "__main__.py":  # inspect, doctor: under the CLI
        assert "cli" not in reached
    imports_click = any(m.split(".")[0] == "click" for m in _imports(source, here))
    assert layer == "cli" or not imports_click, "click belongs to the CLI"


def test_the_checker_sees_what_it_checks() -> None:
    """A job's module that imports another job's, written as each of
    Python's forms, is seen."""
    for line in ("from dmoverlay.apply import plan", "import dmoverlay.apply.plan",
                 "from dmoverlay import apply", "from ..apply import plan",
                 "def f():\n    from dmoverlay.apply.plan import make_plan\n",
                 "import dmoverlay.core.log\nx = dmoverlay.apply.plan.make_plan",
                 "import importlib\nplan = importlib.import_module('dmoverlay.apply.plan')"):
        reached = {_layer(m) for m in _own(line + "\n", "dmoverlay.build.probe")}
        assert "apply" in reached, line


def test_every_job_is_a_package() -> None:
    for job in ("core", *JOBS, "cli"):
        assert (PACKAGE / job / "__init__.py").is_file()
