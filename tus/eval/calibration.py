"""Temperature scaling and expected calibration error: pure functions, no I/O.

Temperature scaling (Guo et al. 2017, "On Calibration of Modern Neural Networks") divides a
classifier's logits by one scalar ``T > 0`` fitted to minimise the negative log-likelihood on
held-out predictions; it never changes which class has the highest probability. For a binary
softmax classifier the positive-class probability is ``sigmoid(l1 - l0)``, so the logit
difference ``z = log(p / (1 - p))`` recovered from a stored probability is all that is needed:
the calibrated probability is ``sigmoid(z / T)``.

ECE: predictions are binned by their confidence (the top class's probability) into
``bins`` equal-width bins on [0, 1]; ECE = sum over bins of (bin share) x |accuracy - mean
confidence| (Guo et al. 2017, Eq. 3).
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import expit, log_softmax, logit

# Probabilities stored as 0 or 1 (float rounding) would give infinite logits.
PROBABILITY_EPS = 1e-7
TEMPERATURE_BOUNDS = (0.05, 20.0)
ECE_BINS = 15


def binary_logits(probs: np.ndarray) -> np.ndarray:
    """``log(p / (1 - p))`` of positive-class probabilities, clipped away from 0 and 1."""
    return logit(np.clip(np.asarray(probs, dtype=np.float64), PROBABILITY_EPS, 1 - PROBABILITY_EPS))


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """Positive-class probabilities after dividing the logit difference by ``temperature``."""
    if temperature == 1.0:
        return np.asarray(probs, dtype=np.float64)
    return expit(binary_logits(probs) / temperature)


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The ``T`` minimising the mean negative log-likelihood of ``softmax(logits / T)``.

    ``logits``: (N, K) class logits, or (N,) binary logit differences. Bounded search over
    log T in :data:`TEMPERATURE_BOUNDS` (the NLL is smooth and unimodal in practice).
    """
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim == 1:
        logits = np.stack([np.zeros_like(logits), logits], axis=1)
    labels = np.asarray(labels).astype(int)
    if len(labels) == 0:
        raise ValueError("fitting a temperature needs predictions")

    def nll(log_t: float) -> float:
        return float(-log_softmax(logits / np.exp(log_t), axis=1)[np.arange(len(labels)), labels].mean())

    low, high = np.log(TEMPERATURE_BOUNDS[0]), np.log(TEMPERATURE_BOUNDS[1])
    result = minimize_scalar(nll, bounds=(low, high), method="bounded", options={"xatol": 1e-6})
    return float(np.exp(result.x))


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE of (N, K) class probabilities, or (N,) positive-class probabilities of a binary task."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim == 1:
        probs = np.stack([1 - probs, probs], axis=1)
    labels = np.asarray(labels).astype(int)
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(float)
    # Bin b holds confidences in (b/bins, (b+1)/bins]; a confidence of exactly 0 joins bin 0.
    which = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    total = 0.0
    for b in range(bins):
        members = which == b
        if members.any():
            total += members.mean() * abs(correct[members].mean() - confidence[members].mean())
    return float(total)


def out_of_fold_temperatures(predictions, seed_column: str = "seed", fold_column: str = "fold") -> dict[tuple[int, int], float]:
    """The temperature of each (fold, seed) run, fitted on the other folds' out-of-fold predictions of the same
    seed (``prob``, ``label``; :func:`tus.eval.cv_summary.pooled_predictions`): its own test fold never takes part."""
    fitted = {}
    for (fold, seed), _ in predictions.groupby([fold_column, seed_column]):
        others = predictions[(predictions[seed_column] == seed) & (predictions[fold_column] != fold)]
        fitted[(int(fold), int(seed))] = fit_temperature(binary_logits(others["prob"].to_numpy()), others["label"].to_numpy())
    return fitted
