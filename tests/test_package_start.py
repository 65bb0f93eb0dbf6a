"""What importing tus does before any library it imports: wandb, which timm imports at start-up,
is loaded only when used (tus.deferred_imports; issue 28: ~0.55 s of every run with W&B off) and
works as usual once it is; albumentations makes no update request to pypi.org."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from tus.deferred_imports import DeferredModuleFinder


def run_python(code: str) -> dict:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def stage_start() -> dict:
    """A fresh interpreter imports the fine-tuning stage (Lightning, timm, albumentations) with
    every network request intercepted, then uses wandb."""
    return run_python(
        """
        import json, os, sys, urllib.request
        opened = []
        urllib.request.OpenerDirector.open = lambda self, url, *a, **k: opened.append(str(url)) or None
        os.environ.pop("NO_ALBUMENTATIONS_UPDATE", None)
        import tus.stages.finetune_cv  # imports Lightning, albumentations and timm (which imports wandb)
        imported = "wandb" in sys.modules
        # (any attribute, __dict__ too, would load it: read its type only)
        executed_before = "wandb.sdk" in sys.modules or type(sys.modules["wandb"]).__name__ != "_LazyModule"
        import wandb
        init = callable(wandb.init)  # the first use loads the module
        from wandb.sdk.lib import RunDisabled  # and its submodules import as usual
        print(json.dumps({"imported": imported, "executed_before": executed_before, "init": init,
                          "executed_after": "wandb.sdk" in sys.modules, "type": type(sys.modules["wandb"]).__name__,
                          "version": wandb.__version__, "opened": opened, "setting": os.environ.get("NO_ALBUMENTATIONS_UPDATE")}))
        """
    )


def test_stage_import_does_not_execute_wandb_until_used(stage_start):
    result = stage_start
    assert result["imported"] and not result["executed_before"]
    assert result["init"] and result["executed_after"] and result["type"] == "module"
    from importlib.metadata import version

    assert result["version"] == version("wandb")


def test_importing_the_stage_asks_no_server_for_updates(stage_start):
    """albumentations checks pypi.org for a newer version at import unless NO_ALBUMENTATIONS_UPDATE
    is set (a 2 s timeout on an offline node, and a request no clinical site expects; without
    tus, ``import albumentations`` opens https://pypi.org/pypi/albumentations/json)."""
    assert stage_start["opened"] == [] and stage_start["setting"] == "1"


def test_a_module_imported_before_is_left_as_it_is():
    result = run_python(
        """
        import json, sys
        import wandb
        import tus
        import timm  # imports wandb again
        print(json.dumps({"same": sys.modules["wandb"] is wandb, "loaded": "wandb.sdk" in sys.modules}))
        """
    )
    assert result == {"same": True, "loaded": True}


def test_finder_defers_only_its_names_and_only_source_modules():
    finder = DeferredModuleFinder(["json", "math"])
    assert finder.find_spec("csv", None) is None  # not listed: left to the other finders
    spec = finder.find_spec("json", None)
    assert type(spec.loader).__name__ == "LazyLoader"
    math_spec = finder.find_spec("math", None)  # built into the interpreter: no lazy loading
    assert math_spec is None or type(math_spec.loader).__name__ != "LazyLoader"
    assert finder.find_spec("no_such_module_anywhere", None) is None
