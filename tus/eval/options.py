"""Names and defaults the evaluation tools offer on the command line (choices, defaults, the
environment variable of the Inception weights), kept free of torch so that ``tus metrics``,
``tus filter`` and ``tus explain`` answer ``--help`` at once. The modules that use them
re-export them (:mod:`tus.eval.filtering`, :mod:`tus.eval.metrics`, :mod:`tus.eval.features`,
:mod:`tus.eval.explain`)."""

from __future__ import annotations

import re
from dataclasses import dataclass

# The k-NN manifold filter: neighbours defining each real ball's radius, and how kept images are placed.
FILTER_K = 50
LINK_MODES = ("hardlink", "copy")
# Neighbours of the improved precision/recall.
PRC_K = 3
# Where the FID Inception-v3 weights file may be named.
WEIGHTS_ENV_VAR = "TUS_INCEPTION_WEIGHTS"
# The side real images are resized to before feature extraction (tus metrics / tus filter --real-size):
# "auto" is the generated images' size when they all share one square size (a 32 px generator is compared
# with the real images as it saw them in training, not with their full-resolution detail); "native" keeps
# the real images as they are; a number is that side in pixels.
REAL_SIZE_AUTO = "auto"
REAL_SIZE_NATIVE = "native"


def parse_real_size(value: str | int) -> str | int:
    """``"auto"``, ``"native"`` or a side >= 1 (an int or its digits); ValueError naming the value otherwise."""
    text = str(value).strip().lower()
    if text in (REAL_SIZE_AUTO, REAL_SIZE_NATIVE):
        return text
    if text.isdigit() and int(text) >= 1:
        return int(text)
    raise ValueError(f"--real-size {value!r}: give 'auto' (the generated images' size), 'native' or a side in pixels >= 1")


# CAM methods by option value, and their names in figures and summaries.
CAM_METHODS = {"gradcam++": "Grad-CAM++", "scorecam": "Score-CAM"}

# Decision thresholds (tus finetune-cv threshold=..., tus.eval.thresholds): how a rule is written.
RULE_KINDS = ("fixed", "youden", "sensitivity", "specificity")
DEFAULT_THRESHOLD = 0.5


@dataclass(frozen=True)
class ThresholdRule:
    """A parsed rule: ``kind`` in :data:`RULE_KINDS`; ``value`` is the fixed threshold or the target rate."""

    kind: str
    value: float = DEFAULT_THRESHOLD

    @property
    def needs_data(self) -> bool:
        return self.kind != "fixed"

    def __str__(self) -> str:
        if self.kind == "fixed":
            return f"{self.value:g}"
        if self.kind == "youden":
            return "youden"
        return f"{self.kind}={self.value:g}"


def parse_threshold_rule(text: str | float) -> ThresholdRule:
    """``"0.5"``, ``"youden"``, ``"sensitivity=0.9"`` or ``"specificity=0.9"`` as a rule; ValueError naming the text otherwise."""
    raw = str(text).strip().lower()
    if raw == "youden":
        return ThresholdRule("youden")
    match = re.fullmatch(r"(sensitivity|specificity)\s*=\s*([0-9.eE+-]+)", raw)
    try:
        if match:
            value = float(match.group(2))
            if not 0.0 < value <= 1.0:
                raise ValueError
            return ThresholdRule(match.group(1), value)
        value = float(raw)
        if not 0.0 < value < 1.0:
            raise ValueError
        return ThresholdRule("fixed", value)
    except ValueError:
        raise ValueError(f"threshold {text!r}: give a number in (0, 1), 'youden', 'sensitivity=R' or 'specificity=R' with R in (0, 1]") from None
