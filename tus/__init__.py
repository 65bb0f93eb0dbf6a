"""tus: a Lightning experiment framework for data-scarce ultrasound image classification."""

import os

from tus.deferred_imports import defer

__version__ = "0.1.0"

# albumentations asks pypi.org for a newer version of itself at every import, on the main thread
# (~0.2 s online; up to its 2 s timeout on a firewalled cluster node, in every process and loader
# worker) unless this is set. A tus run makes no network call of its own; a user who wants the
# check sets NO_ALBUMENTATIONS_UPDATE=0.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

# Before anything imports timm, which imports wandb at start-up: a run without W&B never
# uses it (see tus.deferred_imports).
defer()
