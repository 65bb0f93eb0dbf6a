"""Seeds derived from (run seed, step, rank, ...): data streams and noise that replay exactly on resume."""

from __future__ import annotations

import numpy as np


def derive_seed(*parts: int) -> int:
    """A 63-bit seed mixed from integers (NumPy's SeedSequence), e.g. (seed, epoch, batch, rank)."""
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])
