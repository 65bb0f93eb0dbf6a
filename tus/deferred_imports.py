"""Libraries that others import at start-up but a tus run may never use, loaded on first use.

timm imports ``wandb`` at start-up (``timm.utils.summary``, for a summary writer tus does not
use): ~0.55 s of a 2-core CPU's start-up that a run with W&B off pays for nothing (issue 28: a
1-step CV's fixed cost).

:func:`defer` registers such modules with :class:`importlib.util.LazyLoader` (the standard
library's lazy import): ``import wandb`` then returns a module object at once and executes the
module on its first attribute access. Whoever really uses it (tus's W&B logging, Lightning's
WandbLogger) gets the same module, loaded then. Only modules not yet imported are affected, and
only these names (not their submodules, which load normally when asked for).

This only helps where the importer does not touch the module at import time: torchmetrics
(through Lightning) also imports ``matplotlib.pyplot`` (~0.6 s), but reads ``plt.Figure`` and
``plt.style`` at module level, which would load it at once, so matplotlib is not listed.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
from collections.abc import Iterable, Sequence

# Imported, not used, at start-up by libraries tus imports; tus uses it only to log to W&B.
DEFERRED_MODULES = ("wandb",)


class DeferredModuleFinder(importlib.abc.MetaPathFinder):
    """Finds ``names`` with the finders after it on ``sys.meta_path`` and wraps their loader in
    a LazyLoader; every other name is left to those finders."""

    def __init__(self, names: Iterable[str]) -> None:
        self.names = frozenset(names)

    def find_spec(self, fullname: str, path: Sequence[str] | None, target=None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in self.names:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        # LazyLoader needs a loader that executes a module it did not create: Python source and
        # bytecode files (not extension or built-in modules, not namespace packages).
        if not isinstance(spec.loader, (importlib.machinery.SourceFileLoader, importlib.machinery.SourcelessFileLoader)):
            return spec
        spec.loader = importlib.util.LazyLoader(spec.loader)
        return spec


def defer(names: Iterable[str] = DEFERRED_MODULES) -> None:
    """Load ``names`` on first use from now on in this process (once; modules already imported
    stay as they are)."""
    if any(isinstance(finder, DeferredModuleFinder) for finder in sys.meta_path):
        return
    sys.meta_path.insert(0, DeferredModuleFinder(names))
