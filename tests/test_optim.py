"""tus.optim.adamw: the fused kernel where parameters allow it, the same update as the default loop."""

from __future__ import annotations

import torch

from tus.optim import adamw


def two_groups(device: str = "cpu") -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    weights = torch.nn.Parameter(torch.randn(8, 4, 3, 3, generator=generator).to(device))
    bias = torch.nn.Parameter(torch.randn(8, generator=generator).to(device))
    return [{"params": [weights], "lr": 1e-2}, {"params": [bias], "lr": 1e-3, "weight_decay": 0.0}]


def run(optimizer: torch.optim.Optimizer, steps: int = 5) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator)
        optimizer.step()
    return [p.detach().clone() for p in params]


def test_cpu_parameters_get_the_fused_kernel_and_the_default_update():
    fused = adamw(two_groups(), weight_decay=0.05)
    assert fused.defaults["fused"] is True
    reference = torch.optim.AdamW(two_groups(), weight_decay=0.05)
    assert reference.defaults["fused"] is None
    for a, b in zip(run(fused), run(reference)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert fused.param_groups[1]["weight_decay"] == 0.0 and fused.param_groups[0]["weight_decay"] == 0.05


def test_parameters_the_kernel_does_not_cover_keep_the_default_loop():
    meta = adamw([torch.nn.Parameter(torch.zeros(3, device="meta"))], lr=1e-3)
    assert meta.defaults["fused"] is None
    from_generator = adamw(torch.nn.Linear(2, 2).parameters(), lr=1e-3)  # a generator, as model.parameters() gives
    assert from_generator.defaults["fused"] is True and len(from_generator.param_groups[0]["params"]) == 2
