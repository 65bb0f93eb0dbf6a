"""Names and defaults the evaluation tools offer on the command line (choices, defaults, the
environment variable of the Inception weights), kept free of torch so that ``tus metrics``,
``tus filter`` and ``tus explain`` answer ``--help`` at once. The modules that use them
re-export them (:mod:`tus.eval.filtering`, :mod:`tus.eval.metrics`, :mod:`tus.eval.features`,
:mod:`tus.eval.explain`)."""

from __future__ import annotations

# The k-NN manifold filter: neighbours defining each real ball's radius, and how kept images are placed.
FILTER_K = 50
LINK_MODES = ("hardlink", "copy")
# Neighbours of the improved precision/recall.
PRC_K = 3
# Where the FID Inception-v3 weights file may be named.
WEIGHTS_ENV_VAR = "TUS_INCEPTION_WEIGHTS"
# CAM methods by option value, and their names in figures and summaries.
CAM_METHODS = {"gradcam++": "Grad-CAM++", "scorecam": "Score-CAM"}
