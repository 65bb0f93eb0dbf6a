"""tus: a Lightning experiment framework for data-scarce ultrasound image classification."""

from tus.deferred_imports import defer

__version__ = "0.1.0"

# Before anything imports timm, which imports wandb at start-up: a run without W&B never
# uses it (see tus.deferred_imports).
defer()
