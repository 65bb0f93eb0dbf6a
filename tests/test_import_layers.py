"""Imports go down the layers (README, Layout): evaluation code never reaches up into methods,
callbacks, stages, runs, studies or the CLI, and the torch-free config modules import only
other config modules (what keeps `tus --help` free of torch)."""

from __future__ import annotations

import ast
from pathlib import Path

import tus

ROOT = Path(tus.__file__).parent


def tus_imports(path: Path) -> set[str]:
    """Every ``tus.*`` module a file imports, at any depth (lazy imports inside functions too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tus"):
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names if alias.name.startswith("tus"))
    return names


def test_eval_imports_nothing_above_it():
    above = ("tus.methods", "tus.callbacks", "tus.stages", "tus.runs", "tus.studies", "tus.cli")
    offending = {f"{path.relative_to(ROOT)} -> {name}" for path in (ROOT / "eval").glob("*.py") for name in tus_imports(path) if name.startswith(above) and name != "tus.run_config"}
    assert not offending


def test_config_modules_import_only_configs():
    config_modules = [ROOT / "run_config.py", ROOT / "eval" / "options.py", *ROOT.glob("*/configs.py")]
    allowed = {"tus.config", "tus.run_config", "tus.eval.options"} | {f"tus.{p.parent.name}.configs" for p in ROOT.glob("*/configs.py")}
    offending = {f"{path.relative_to(ROOT)} -> {name}" for path in config_modules for name in tus_imports(path) if name not in allowed}
    assert not offending
