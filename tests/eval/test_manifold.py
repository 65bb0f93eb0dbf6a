"""k-NN manifold geometry: radii, membership, improved precision/recall."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch_fidelity.metric_prc import prc_features_to_metric

from tus.eval.manifold import improved_precision_recall, kth_neighbour_radii, manifold_membership


def _embed(points: list[tuple[int, ...]], dim: int) -> np.ndarray:
    """Integer points padded with zeros to ``dim`` dimensions (distances stay exact)."""
    array = np.zeros((len(points), dim), dtype=np.float32)
    array[:, : len(points[0])] = points
    return array


# Two pairs far apart: with k=1 the radii are 4, 4 (first pair) and 6, 6 (second pair).
REAL = [(0, 0, 0), (4, 0, 0), (100, 0, 0), (100, 6, 0)]
# (generated point, inside?, smallest distance ratio)
PLANTED = [
    ((0, 4, 0), True, 1.0),  # exactly on the sphere around (0,0,0): a tie counts as inside
    ((2, 0, 0), True, 0.5),
    ((0, 0, 5), False, 1.25),
    ((100, 0, 6), True, 1.0),  # tie on the second pair's sphere
    ((100, 0, 7), False, 7 / 6),
    ((50, 0, 0), False, 50 / 6),
    ((4, 3, 0), True, 0.75),
]


@pytest.mark.parametrize("dim", [3, 2048])
@pytest.mark.parametrize("block_size", [1, 3, 1024])
def test_planted_points_inside_and_outside_known_balls(dim, block_size):
    real = _embed(REAL, dim)
    generated = _embed([p for p, _, _ in PLANTED], dim)
    radii = kth_neighbour_radii(real, k=1, block_size=block_size)
    assert radii.tolist() == [4.0, 4.0, 6.0, 6.0]
    inside, ratio = manifold_membership(real, radii, generated, block_size=block_size)
    assert inside.tolist() == [expected for _, expected, _ in PLANTED]
    assert ratio == pytest.approx([r for _, _, r in PLANTED], rel=1e-6)


def test_radii_exclude_the_point_itself():
    real = _embed([(0, 0), (3, 0), (0, 5), (20, 0)], 2)
    # Nearest other point of each: 3, 3, 5 (to the origin), 17.
    assert kth_neighbour_radii(real, k=1).tolist() == [3.0, 3.0, 5.0, 17.0]
    assert kth_neighbour_radii(real, k=2).tolist() == pytest.approx([5.0, np.hypot(3, 5), np.hypot(3, 5), 20.0])


def test_exact_duplicates_are_neighbours_at_distance_zero():
    real = _embed([(0, 0), (0, 0), (10, 0), (50, 0), (53, 0)], 2)
    assert kth_neighbour_radii(real, k=1).tolist() == [0.0, 0.0, 10.0, 3.0, 3.0]
    assert kth_neighbour_radii(real, k=2).tolist() == [10.0, 10.0, 10.0, 40.0, 43.0]
    radii = kth_neighbour_radii(real, k=1)
    generated = _embed([(0, 0), (2, 0), (51, 0)], 2)
    inside, ratio = manifold_membership(real, radii, generated)
    # A radius-0 ball holds only its centre; (2, 0) is in the ball of (10, 0) (radius 10).
    assert inside.tolist() == [True, True, True]
    assert ratio.tolist() == pytest.approx([0.0, 0.8, 1 / 3])
    far = _embed([(0, 1)], 2)
    only_zero_balls = np.zeros(2, dtype=np.float32)
    inside, ratio = manifold_membership(real[:2], only_zero_balls, far)
    assert inside.tolist() == [False] and np.isinf(ratio[0])


def test_k_must_leave_a_neighbour():
    real = np.zeros((5, 3), dtype=np.float32)
    with pytest.raises(ValueError, match="k must be between 1 and"):
        kth_neighbour_radii(real, k=5)
    with pytest.raises(ValueError, match="radii for"):
        manifold_membership(real, np.ones(4), real)


def _naive(real: np.ndarray, generated: np.ndarray, k: int):
    real64, gen64 = torch.from_numpy(real).double(), torch.from_numpy(generated).double()
    self_distances = torch.cdist(real64, real64)
    self_distances.fill_diagonal_(float("inf"))
    radii = self_distances.kthvalue(k, dim=1).values
    ratios = (torch.cdist(gen64, real64) / radii).amin(dim=1)
    return radii.numpy(), ratios.numpy()


@pytest.mark.parametrize("block_size", [1, 7, 64, 5000])
def test_blocked_equals_naive_full_matrix(block_size):
    rng = np.random.default_rng(3)
    real = rng.normal(size=(200, 32)).astype(np.float32)
    generated = (1.2 * rng.normal(size=(333, 32))).astype(np.float32)
    expected_radii, expected_ratio = _naive(real, generated, k=5)
    radii = kth_neighbour_radii(real, k=5, block_size=block_size)
    inside, ratio = manifold_membership(real, radii, generated, block_size=block_size)
    np.testing.assert_allclose(radii, expected_radii, rtol=1e-5)
    np.testing.assert_allclose(ratio, expected_ratio, rtol=1e-5)
    np.testing.assert_array_equal(inside, expected_ratio <= 1.0)
    assert 0 < inside.sum() < len(inside)  # the data straddles the boundary


def test_kept_count_never_decreases_with_k():
    rng = np.random.default_rng(7)
    real = rng.normal(size=(150, 16)).astype(np.float32)
    generated = (1.5 * rng.normal(size=(400, 16))).astype(np.float32)
    counts, previous_radii = [], np.zeros(len(real))
    for k in range(1, 40, 3):
        radii = kth_neighbour_radii(real, k)
        assert np.all(radii >= previous_radii)
        previous_radii = radii
        counts.append(int(manifold_membership(real, radii, generated)[0].sum()))
    assert counts == sorted(counts)
    assert counts[0] < counts[-1]


@pytest.mark.parametrize("seed, n_real, n_fake, k", [(0, 64, 500, 3), (1, 300, 120, 3), (3, 100, 100, 5)])
def test_precision_recall_agrees_with_torch_fidelity(seed, n_real, n_fake, k):
    rng = np.random.default_rng(seed)
    real = rng.normal(size=(n_real, 48)).astype(np.float32)
    fake = (1.1 * rng.normal(size=(n_fake, 48)) + 0.15).astype(np.float32)
    ours = improved_precision_recall(real, fake, k=k)
    # torch-fidelity's convention: features_1 is generated, features_2 is real.
    reference = prc_features_to_metric(
        torch.from_numpy(fake),
        torch.from_numpy(real),
        prc_neighborhood=k,
        prc_batch_size=10000,
        save_cpu_ram=False,
        verbose=False,
    )
    assert ours["precision"] == pytest.approx(reference["precision"], abs=1e-6)
    assert ours["recall"] == pytest.approx(reference["recall"], abs=1e-6)
    assert 0 < ours["precision"] < 1 and 0 < ours["recall"] < 1


def test_precision_recall_of_a_set_against_itself_is_perfect():
    points = np.random.default_rng(4).normal(size=(80, 10)).astype(np.float32)
    assert improved_precision_recall(points, points, k=3) == {"precision": 1.0, "recall": 1.0}
