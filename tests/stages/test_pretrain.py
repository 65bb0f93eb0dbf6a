"""Organ-supervised contrastive pretraining: losses, heads, LARS, schedules, views, runner, export."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tus.cli.pretrain import main
from tus.config import ConfigError, load_config
from tus.data.datamodules import ImageSourceConfig
from tus.data.images import write_grayscale
from tus.data.pools import PretrainDataConfig, PretrainDataModule, split_heldout
from tus.data.views import ViewConfig, ViewPairTransform
from tus.losses.contrastive import nt_xent_loss, organ_ce_loss
from tus.methods.classifier import FineTuneModule, FineTuneOptimConfig
from tus.methods.simclr_organ import PretrainLossConfig, PretrainModelConfig, SimCLROrgan, SimCLROrganConfig
from tus.models.backbones import BackboneConfig, create_backbone
from tus.models.weights import CheckpointError
from tus.optim import LarsConfig, ScheduleConfig, build_lars, lars_param_groups, lr_multiplier, scaled_lr
from tus.stages.pretrain import PretrainConfig

REPO = Path(__file__).resolve().parents[2]
ORGANS = ("testicle", "thyroid")


def make_pool(root: Path, *, per_organ: int = 12, size: int = 40, per_patient: int = 2, seed: int = 0) -> Path:
    """A two-organ pool: testicles are bright discs, thyroids horizontal bands, both on noise."""
    rng = np.random.default_rng(seed)
    rows = []
    yy, xx = np.mgrid[:size, :size]
    for organ in ORGANS:
        for i in range(per_organ):
            image = rng.integers(20, 80, size=(size, size)).astype(np.uint8)
            if organ == "testicle":
                cy, cx = rng.integers(size // 3, 2 * size // 3, size=2)
                image[(yy - cy) ** 2 + (xx - cx) ** 2 < (size // 4) ** 2] = 200
            else:
                image[(yy // 5) % 2 == 0] += 100
            name = f"images/{organ}_{i:03d}.png"
            write_grayscale(root / name, image)
            rows.append({"path": name, "patient_id": f"{organ}-{i // per_patient}", "organ": organ})
    manifest = root / "manifest.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    return manifest


def tiny_model(**overrides) -> PretrainModelConfig:
    fields = {"backbone": BackboneConfig(name="test_resnet", init="scratch"), "projection_hidden_dim": 32, "projection_output_dim": 16}
    return PretrainModelConfig(**{**fields, **overrides})


def tiny_module(loss: PretrainLossConfig, **model_overrides) -> SimCLROrgan:
    torch.manual_seed(0)
    return SimCLROrgan(SimCLROrganConfig(tiny_model(**model_overrides), loss, LarsConfig(), ScheduleConfig()), num_organs=2, batch_size=4)


def random_batch(count: int = 4, size: int = 32) -> tuple[list[torch.Tensor], torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    views = [torch.randn(count, 1, size, size, generator=generator) for _ in range(2)]
    return views, torch.tensor([0, 1, 1, 0][:count])


# --- losses -----------------------------------------------------------------------------


def reference_nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> float:
    """Eq. 1-2 of the paper, literally: views interleaved as x_{2i-1}, x_{2i}; loop over pairs."""
    n = z1.shape[0]
    z = torch.stack([z1, z2], dim=1).reshape(2 * n, -1).double()  # rows 2i, 2i+1 = views of image i

    def s(j: int, k: int) -> float:
        return float(z[j] @ z[k] / (z[j].norm() * z[k].norm()))

    def ell(j: int, k: int) -> float:
        denominator = sum(math.exp(s(j, m) / temperature) for m in range(2 * n) if m != j)
        return -math.log(math.exp(s(j, k) / temperature) / denominator)

    return sum(ell(2 * i, 2 * i + 1) + ell(2 * i + 1, 2 * i) for i in range(n)) / (2 * n)


@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_nt_xent_matches_the_paper_formula(temperature: float):
    generator = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(6, 8, generator=generator), torch.randn(6, 8, generator=generator)
    expected = reference_nt_xent(z1, z2, temperature)
    assert nt_xent_loss(z1, z2, temperature).item() == pytest.approx(expected, rel=1e-5)
    # Without a process group, gathering is a no-op.
    assert nt_xent_loss(z1, z2, temperature, gather_distributed=True).item() == pytest.approx(expected, rel=1e-5)


def test_organ_loss_skips_unknown_organs_and_never_returns_nan():
    logits = torch.randn(6, 3, requires_grad=True)
    organs = torch.tensor([0, -1, 2, 1, -1, 0])
    known = organs >= 0
    assert organ_ce_loss(logits, organs).item() == pytest.approx(F.cross_entropy(logits[known], organs[known]).item(), rel=1e-6)
    none_known = organ_ce_loss(logits, torch.full((6,), -1))
    none_known.backward()
    assert none_known.item() == 0.0 and torch.all(logits.grad == 0)


def test_loss_is_contrastive_plus_lambda_times_supervised():
    module = tiny_module(PretrainLossConfig(contrastive_weight=1.0, organ_weight=0.2))
    views, organs = random_batch()
    out = module.compute_losses(views, organs)
    assert out["loss"].item() == pytest.approx(out["loss_con"].item() + 0.2 * out["loss_sup"].item(), rel=1e-6)


def grads(module: nn.Module) -> list[torch.Tensor | None]:
    return [p.grad for p in module.parameters()]


def test_lambda_zero_leaves_the_organ_head_without_gradient():
    module = tiny_module(PretrainLossConfig(contrastive_weight=1.0, organ_weight=0.0))
    views, organs = random_batch()
    out = module.compute_losses(views, organs)
    out["loss"].backward()
    assert out["loss"].item() == out["loss_con"].item()
    assert out["loss_sup"].item() > 0  # still computed and logged
    assert all(g is None for g in grads(module.organ_head))
    assert all(g is not None and g.abs().sum() > 0 for g in grads(module.projection_head))
    assert next(module.encoder.parameters()).grad.abs().sum() > 0


def test_supervised_only_leaves_the_projection_head_without_gradient():
    module = tiny_module(PretrainLossConfig(contrastive_weight=0.0, organ_weight=1.0))
    views, organs = random_batch()
    out = module.compute_losses(views, organs)
    out["loss"].backward()
    assert out["loss"].item() == out["loss_sup"].item()
    assert all(g is None for g in grads(module.projection_head))
    assert all(g is not None and g.abs().sum() > 0 for g in grads(module.organ_head))
    # Frozen heads are left out of the optimiser altogether (no weight decay either).
    optimised = {id(p) for group in lars_param_groups(module, LarsConfig()) for p in group["params"]}
    assert not optimised & {id(p) for p in module.projection_head.parameters()}


def test_loss_weights_are_validated():
    with pytest.raises(ValueError, match="at least one"):
        PretrainLossConfig(contrastive_weight=0.0, organ_weight=0.0)
    with pytest.raises(ValueError, match="temperature"):
        load_config(PretrainConfig, None, ["method.loss.temperature=0"])


# --- LARS and schedules -------------------------------------------------------------------


def lars_toy() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


def toy_gradients(model: nn.Module, step: int) -> None:
    generator = torch.Generator().manual_seed(step)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=generator)


def test_lars_leaves_biases_and_norms_unadapted_and_undecayed():
    config = LarsConfig(momentum=0.9, weight_decay=0.1, trust_coeff=0.001)
    model, reference = lars_toy(), lars_toy()
    groups = {g["name"]: g for g in lars_param_groups(model, config)}
    excluded = groups["lars_excluded"]
    assert excluded["weight_decay"] == 0 and not excluded["always_adapt"] and not excluded["trust_clip"]
    assert groups["lars_adapted"]["always_adapt"] and groups["lars_adapted"]["weight_decay"] == 0.1
    names = {n for n, p in model.named_parameters() if any(p is q for q in excluded["params"])}
    assert names == {"0.bias", "1.weight", "1.bias", "3.bias"}

    lr = 0.5
    lars = build_lars(model, config, lr)
    sgd = torch.optim.SGD([p for n, p in reference.named_parameters() if n in names], lr=lr, momentum=0.9, weight_decay=0.0)
    before = copy.deepcopy(model.state_dict())
    for step in range(2):  # two steps: the momentum buffer takes part
        toy_gradients(model, step)
        toy_gradients(reference, step)
        lars.step()
        sgd.step()
    for name, parameter in model.named_parameters():
        if name in names:
            torch.testing.assert_close(parameter, dict(reference.named_parameters())[name], rtol=0, atol=1e-7)

    # An adapted weight takes LARS's step: lr * eta * |w| / (|g| + wd |w|) * (g + wd w).
    single = lars_toy()
    lars = build_lars(single, config, lr)
    toy_gradients(single, 0)
    weight, grad = before["0.weight"], single[0].weight.grad.clone()
    lars.step()
    trust = config.trust_coeff * weight.norm() / (grad.norm() + config.weight_decay * weight.norm())
    torch.testing.assert_close(single[0].weight.detach(), weight - lr * trust * (grad + config.weight_decay * weight))


def test_warmup_then_cosine_or_poly_decay():
    cosine = ScheduleConfig(warmup_steps=10, decay="cosine", min_lr_ratio=0.1)
    assert lr_multiplier(0, 100, cosine) == pytest.approx(0.1)
    assert lr_multiplier(9, 100, cosine) == pytest.approx(1.0)
    assert lr_multiplier(55, 100, cosine) == pytest.approx(0.55)  # half-way down the cosine
    assert lr_multiplier(100, 100, cosine) == pytest.approx(0.1)
    poly = ScheduleConfig(warmup_steps=0, decay="poly", poly_power=2.0)
    assert lr_multiplier(50, 100, poly) == pytest.approx(0.25)
    assert scaled_lr(0.3, 1024) == pytest.approx(1.2)


# --- views ---------------------------------------------------------------------------------


def test_views_are_single_channel_and_each_image_and_view_gets_its_own_draw(tmp_path: Path):
    image = np.tile((np.arange(40, dtype=np.uint8) * 6)[None, :], (40, 1))
    for i in range(8):
        write_grayscale(tmp_path / "same" / f"{i}.png", image)  # eight identical images
    config = PretrainDataConfig(sources=[ImageSourceConfig(folder=str(tmp_path / "same"), organ="testicle")], image_size=32, batch_size=8, num_workers=0)
    datamodule = PretrainDataModule(config, seed=0)
    datamodule.setup("fit")
    first, second = next(iter(datamodule.train_dataloader()))["image"]
    assert first.shape == second.shape == (8, 1, 32, 32)
    for i in range(8):
        assert not torch.equal(first[i], second[i])  # the two views of one image differ
        for j in range(i):
            assert not torch.equal(first[i], first[j])  # identical images, different draws


def test_view_draws_are_reproducible_and_differ_across_ranks():
    image = np.random.default_rng(0).integers(0, 255, size=(48, 48), dtype=np.uint8)

    def views(transform: ViewPairTransform) -> torch.Tensor:
        return torch.cat(transform(image))

    rank0, again, rank1 = (ViewPairTransform(ViewConfig(), 32, seed=3) for _ in range(3))
    rank1.set_rank(1)
    first = views(rank0)
    assert torch.equal(first, views(again))
    assert not torch.equal(first, views(rank1))
    rank0.reseed(3)
    assert torch.equal(views(rank0), first)


def test_markers_go_into_views_when_asked():
    image = np.full((48, 48), 40, dtype=np.uint8)
    plain = ViewConfig(hflip_p=0, rotate_p=0, jitter_p=0, blur_p=0, noise_p=0, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0))
    marked = ViewConfig(**{**plain.__dict__, "markers_p": 1.0})
    assert torch.unique(ViewPairTransform(plain, 48)(image)[0]).numel() == 1
    assert ViewPairTransform(marked, 48)(image)[0].max() > ViewPairTransform(plain, 48)(image)[0].max()


# --- pool ----------------------------------------------------------------------------------


def test_heldout_slice_keeps_patients_whole_and_reports_the_draw_shares(tmp_path: Path):
    manifest = make_pool(tmp_path / "pool", per_organ=12)
    extra = make_pool(tmp_path / "extra", per_organ=4, seed=1)
    frame = pd.read_csv(manifest)
    pool, heldout = split_heldout([frame.assign(abs_path=frame["path"], sample_id=frame["path"], label=-1)], 4, seed=0)
    assert heldout["organ"].value_counts().to_dict() == {"testicle": 4, "thyroid": 4}
    assert set(heldout["patient_id"]).isdisjoint(pool[0]["patient_id"])
    assert len(pool[0]) + len(heldout) == len(frame)

    sources = [ImageSourceConfig(manifest=str(manifest), weight=3.0), ImageSourceConfig(folder=str(extra.parent / "images"), organ="thyroid", weight=1.0)]
    datamodule = PretrainDataModule(PretrainDataConfig(sources=sources, image_size=32, batch_size=4, num_workers=0), seed=0, holdout_per_organ=2)
    report = datamodule.pool_report()
    assert report["draw_share_per_organ"] == {"testicle": 0.375, "thyroid": 0.625}
    assert sum(report["heldout_per_organ"].values()) >= 4
    assert sum(report["images_per_organ"].values()) + sum(report["heldout_per_organ"].values()) == 24 + 8


# --- the runner: bf16, resume, export --------------------------------------------------------


def cli_overrides(manifest: Path, out: Path) -> list[str]:
    return [
        f"data.sources=[{{manifest: '{manifest}'}}]",
        f"output_root={out}",
        "data.image_size=32",
        "data.batch_size=8",
        "data.num_workers=0",
        "method.model.backbone.name=test_resnet",
        "method.model.projection_hidden_dim=32",
        "method.model.projection_output_dim=16",
        "trainer.accelerator=cpu",
        "trainer.devices=1",
        "trainer.strategy=auto",
        "trainer.precision=bf16-mixed",
        "trainer.max_steps=2",
        "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false",
        "method.schedule.warmup_steps=1",
        "checkpoint_every_n_steps=1",
        "monitor.every_n_steps=2",
        "monitor.holdout_per_organ=2",
        "monitor.bank_per_organ=8",
        "monitor.knn_k=3",
        "logging.wandb=false",
    ]


@pytest.fixture(scope="module")
def pretrained_run(tmp_path_factory) -> Path:
    """Two bf16-mixed steps through ``tus pretrain``, then ``--resume`` up to four."""
    root = tmp_path_factory.mktemp("pretrain")
    manifest = make_pool(root / "pool")
    assert main(["--config", str(REPO / "experiments/pretrain/cpu.yaml"), *cli_overrides(manifest, root / "runs")]) == 0
    (run_dir,) = (root / "runs").iterdir()
    first = json.loads((run_dir / "summary.json").read_text())
    assert first["steps"] == 2 and [p["step"] for p in first["probe"]] == [0, 2]
    assert main(["--resume", str(run_dir), "--allow-config-change", "--trainer.max_steps=4"]) == 0
    assert list((root / "runs").iterdir()) == [run_dir]  # resumed in place, no new run dir
    return run_dir


def test_bf16_run_logs_finite_losses_and_probe(pretrained_run: Path):
    metrics = pd.read_csv(pretrained_run / "metrics.csv")
    steps = metrics.dropna(subset=["train/loss"])
    # Steps 2 and 3 come from the resumed process (Lightning's CSVLogger restarts metrics.csv
    # when its folder is reused, so steps 0-1 may be gone).
    assert {2, 3} <= set(steps["step"].tolist())
    for name in ("train/loss", "train/loss_con", "train/loss_sup", "train/organ_acc"):
        assert np.isfinite(steps[name]).all(), name
    assert any(c.startswith("lr-") for c in metrics.columns)
    summary = json.loads((pretrained_run / "summary.json").read_text())
    assert summary["steps"] == 4
    assert [p["step"] for p in summary["probe"]] == [2, 4]  # the resumed process probes where it starts (step 2) and at its steps
    assert 0.0 <= summary["probe"][0]["probe/knn_organ_acc"] <= 1.0
    pool = json.loads((pretrained_run / "pool.json").read_text())
    assert pool["organ_classes"] == list(ORGANS)


def test_resume_checkpoint_is_plain_and_carries_the_step(pretrained_run: Path):
    checkpoint = torch.load(pretrained_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 4
    assert checkpoint["lr_schedulers"][0]["last_epoch"] == 4
    assert len(checkpoint["optimizer_states"][0]["param_groups"]) == 2


def test_exported_encoder_reproduces_the_features(pretrained_run: Path):
    meta = json.loads((pretrained_run / "encoder" / "config.json").read_text())
    assert meta["kind"] == "encoder" and meta["architecture"]["name"] == "test_resnet" and meta["in_chans"] == 1 and meta["organ_classes"] == list(ORGANS)
    weights = str(pretrained_run / "encoder")
    loaded = create_backbone(BackboneConfig(name="test_resnet", init="tus", weights=weights)).eval()
    checkpoint = torch.load(pretrained_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    trained = create_backbone(BackboneConfig(name="test_resnet", init="scratch")).eval()
    trained.load_state_dict({k.removeprefix("encoder."): v for k, v in checkpoint["state_dict"].items() if k.startswith("encoder.")})
    images = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(images), trained(images))
    # Fine-tuning takes it as its init (what `tus finetune-cv model.init=tus model.weights=...` builds).
    finetune = FineTuneModule(BackboneConfig(name="test_resnet", init="tus", weights=weights), FineTuneOptimConfig())
    with torch.no_grad():
        assert torch.equal(finetune.backbone.eval()(images), trained(images))


@pytest.mark.parametrize(
    ("backbone", "message"),
    [
        (BackboneConfig(name="resnet18", init="tus"), "encoder is a 'test_resnet', but backbone.name is 'resnet18'"),
        (BackboneConfig(name="test_resnet", in_chans=3, init="tus"), "encoder takes 1 input channel"),
    ],
)
def test_a_mismatched_encoder_is_refused(pretrained_run: Path, backbone: BackboneConfig, message: str):
    backbone.weights = str(pretrained_run / "encoder" / "model.safetensors")
    with pytest.raises(CheckpointError, match=message):
        create_backbone(backbone)
    with pytest.raises(CheckpointError, match=message):
        FineTuneModule(backbone, FineTuneOptimConfig())


def test_runner_refuses_organ_loss_without_organs_and_epoch_budgets(tmp_path: Path):
    for i in range(4):
        write_grayscale(tmp_path / "images" / f"{i}.png", np.zeros((16, 16), dtype=np.uint8))
    base = [f"data.sources=[{{folder: '{tmp_path / 'images'}'}}]", f"output_root={tmp_path / 'runs'}", "monitor.holdout_per_organ=0"]
    config = load_config(PretrainConfig, REPO / "experiments/pretrain/cpu.yaml", base)
    from tus.stages.pretrain import run_pretraining

    with pytest.raises(ValueError, match="no image has an organ"):
        run_pretraining(config)
    with pytest.raises(ValueError, match="max_steps"):
        run_pretraining(load_config(PretrainConfig, REPO / "experiments/pretrain/cpu.yaml", [*base, "trainer.max_steps=-1"]))


def test_experiment_configs_load():
    paper = load_config(PretrainConfig, REPO / "experiments/pretrain/paper.yaml")
    assert paper.data.batch_size * paper.trainer.devices == 1024
    assert (paper.data.image_size, paper.trainer.precision, paper.trainer.strategy) == (224, "auto", "ddp")
    assert (paper.method["loss"]["contrastive_weight"], paper.method["loss"]["organ_weight"]) == (1.0, 0.2)
    assert (paper.method["optimizer"]["momentum"], paper.method["optimizer"]["weight_decay"]) == (0.9, 1e-6)
    assert paper.method["model"]["backbone"]["name"] == "resnet18" and paper.method["model"]["backbone"]["in_chans"] == 1
    cpu = load_config(PretrainConfig, REPO / "experiments/pretrain/cpu.yaml")
    assert cpu.trainer.accelerator == "cpu" and cpu.trainer.devices == 1 and cpu.data.image_size <= 64
    assert 0 < cpu.trainer.max_steps <= 500
    with pytest.raises(ConfigError, match="method.loss.lambda"):
        load_config(PretrainConfig, REPO / "experiments/pretrain/cpu.yaml", ["method.loss.lambda=0.2"])
