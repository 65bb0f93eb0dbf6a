"""Do tus' recipes hold up on real images? BUSI malignant vs rest, patient-grouped 3-fold CV x seeds.

Data (``--data-root``, the shared ``data`` folder): BUSI breast (label 1 = malignant) is the
labelled task, one patient per image (``patient_id`` = file name), without the images whose
pixels occur under two file names (``tus data check`` reports one such pair, a benign and a
malignant copy of one image); BUSI + DDTI thyroid are the two-organ pretraining pool. Derived
manifests go into the output folder, never beside the data.

Arms (``--arms``, letters or names), all on the same folds, epochs, batch, input size and
augmentations:

    a plain     a plain PyTorch loop (benchmarks/plain_finetune.py): AdamW + one-cycle, channels_last
    b scratch   tus finetune-cv, finetune/cpu as it is (its default recipe: AdamW + one-cycle, wd 0.05)
    c constant  tus finetune-cv with the reference's constant learning rate and AdamW's wd 0.01
                (tus's default before this benchmark chose one-cycle)
    d simclr    tus pretraining (SimCLR + organ CE, pretrain/cpu) on BUSI + DDTI, then fine-tuning
    e sup, con  supervised-only (organ CE) and contrastive-only pretraining, then fine-tuning
    f mae       MAE pretraining (pretrain/mae_cpu, a ViT), then fine-tuning that ViT

Leakage guard of the pretrained arms (``--exclusion``): ``per_fold`` (default) pretrains once per
fold with that fold's test images left out of the pool (``exclude_labeled: test_folds``), and
fine-tunes fold F from the encoder that never saw fold F; ``all`` pretrains once without any
labelled BUSI image (with 3 folds every BUSI image is in some test fold, so the pool keeps no
breast image at all). The pretrained arms fine-tune with the default recipe, as scratch does.

Recipe search: ``--pretrain-set KEY=VALUE`` (pretraining config keys) and ``--finetune-set
KEY=VALUE`` (fine-tuning keys of the pretrained arms), repeatable, with ``--variant NAME``, which
names the pretrained arms ``ARM:NAME`` and keeps their runs apart, so each candidate recipe is
one more row of the same table. ``--finetune-config`` swaps the packaged recipe of every tus arm
(``finetune/vit_cpu`` with ``--model vit_tiny_patch16_224``: a ViT from scratch and from MAE) and
``--scratch-set KEY=VALUE`` overrides the scratch arm alone. ``--downstream-probe`` adds the k-NN probe of BUSI (the fold's
training images only) to every pretraining, logged as ``probe/downstream_auroc``.

Multi-class check (``--classes 3``): BUSI's three classes (benign / malignant / normal, from its
``class_name`` column) instead of malignant vs rest, through the same CV; the table then gives
macro F1, macro one-vs-rest AUROC and balanced accuracy. The plain arm is binary-only and refused.

Output (``--out``): ``table.md`` / ``table.csv`` (mean +- std over folds x seeds of F1 and AUROC, and
each arm against tus scratch with :func:`tus.eval.statistics.compare_arms`, the
Nadeau-Bengio corrected t-test), ``runs.csv`` (every fold x seed), ``real_data.png`` and
``timing.json``. Re-running with the same ``--out`` reuses finished arms.

    python benchmarks/real_data.py                                   # tus/configs/benchmarks/real_data.yaml
    python benchmarks/real_data.py --arms a,b,c,d --epochs 8 --pretrain-steps 150
    python benchmarks/real_data.py --arms d --variant lr-split --finetune-set optim.backbone_lr_scale=0.1
    python benchmarks/real_data.py --classes 3 --arms b --out runs/benchmarks/real_data_3class
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import textwrap
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_model, finetune_cv_overrides  # noqa: E402
from plain_finetune import PlainConfig, train_and_test  # noqa: E402

from tus.config import load_config  # noqa: E402
from tus.data.datamodules import ImageSourceConfig  # noqa: E402
from tus.data.folds import assign_folds, fold_table  # noqa: E402
from tus.data.manifest import load_manifest  # noqa: E402
from tus.data.overlap import image_hashes  # noqa: E402
from tus.eval.cv_summary import collect_runs  # noqa: E402
from tus.eval.statistics import compare_arms  # noqa: E402
from tus.models.backbones import read_tus_encoder_meta  # noqa: E402
from tus.stages.finetune_cv import FineTuneCVConfig, run_cv, run_single  # noqa: E402
from tus.stages.pretrain import PretrainConfig, run_pretraining  # noqa: E402

ARMS = {"a": "plain", "b": "scratch", "c": "constant", "d": "simclr", "e": "sup,con", "f": "mae"}
ALL_ARMS = ["plain", "scratch", "constant", "simclr", "sup", "con", "mae"]
# Pretraining arm -> (packaged pretraining config, method overrides).
PRETRAINING = {
    "simclr": ("pretrain/cpu", []),
    "sup": ("pretrain/cpu", ["--method.loss.contrastive_weight=0", "--method.loss.organ_weight=1"]),
    "con": ("pretrain/cpu", ["--method.loss.organ_weight=0"]),
    "mae": ("pretrain/mae_cpu", []),
}
METRICS = ("f1", "auroc")
# --classes 3: macro F1, macro one-vs-rest AUROC and balanced accuracy of the CV runs.
MULTICLASS_METRICS = ("f1", "auroc", "balanced_accuracy")
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "tus" / "configs" / "benchmarks" / "real_data.yaml"


def parse_arms(text: str) -> list[str]:
    names: list[str] = []
    for token in text.split(","):
        token = token.strip()
        for name in ARMS.get(token, token).split(","):
            if name not in ALL_ARMS:
                raise SystemExit(f"unknown arm {token!r}; choose from {ARMS} or {ALL_ARMS}")
            if name not in names:
                names.append(name)
    return names


def prepare_data(data_root: Path, out: Path, classes: int = 2) -> tuple[Path, Path, list[str]]:
    """(BUSI manifest with patient_id and without duplicated pixels, DDTI manifest, dropped files).
    ``classes=3``: BUSI's label is its class name (benign, malignant, normal)."""
    busi = pd.read_csv(data_root / "busi" / "manifest.csv")
    if classes == 3:
        busi["label"] = busi["class_name"]
    busi["path"] = [str((data_root / "busi" / p).resolve()) for p in busi["path"]]
    busi["patient_id"] = [Path(p).stem for p in busi["path"]]
    # Pixel-identical images under two names (and here two labels) would leak across folds: drop every copy.
    hashes = image_hashes(busi["path"].tolist())["pixel_hash"]
    duplicated = hashes.duplicated(keep=False).to_numpy()
    dropped = sorted(Path(p).name for p in busi.loc[duplicated, "path"])
    busi = busi[~duplicated].reset_index(drop=True)
    ddti = pd.read_csv(data_root / "ddti" / "manifest.csv")
    ddti["path"] = [str((data_root / "ddti" / p).resolve()) for p in ddti["path"]]
    ddti["patient_id"] = "ddti-" + ddti["case_id"].astype(str)
    out.mkdir(parents=True, exist_ok=True)
    busi_path, ddti_path = out / "busi_manifest.csv", out / "ddti_manifest.csv"
    busi.to_csv(busi_path, index=False)
    ddti.to_csv(ddti_path, index=False)
    return busi_path, ddti_path, dropped


def finetune_config(args, manifest: Path, name: str, recipe: str, extra: list[str] = ()) -> FineTuneCVConfig:
    overrides = [*finetune_cv_overrides(manifest, args.out / "arms", args, folds=args.folds), f"--name={name}"]
    if recipe == "constant":
        overrides += ["--optim.schedule=constant", "--optim.weight_decay=0.01"]
    if recipe == "scratch":
        overrides += [f"--{setting}" for setting in args.scratch_set]
    return load_config(FineTuneCVConfig, args.finetune_config, [*overrides, *extra])


def arm_label(args, arm: str) -> str:
    """The arm's name in the table and its folder: ``ARM`` or, for a pretrained arm of a recipe variant, ``ARM-VARIANT``."""
    return f"{arm}-{args.variant}" if args.variant and arm in PRETRAINING else arm


def pretraining_label(args, arm: str) -> str:
    """``ARM-sSTEPS``, plus a digest of ``--pretrain-set`` when given: variants that change only the
    fine-tuning reuse the encoders of the same pretraining recipe."""
    label = f"{arm}-s{args.pretrain_steps}"
    if args.pretrain_set:
        label += "-" + hashlib.sha1("\n".join(args.pretrain_set).encode()).hexdigest()[:6]
    return label


def fold_training_manifest(args, busi: Path, folds: np.ndarray, fold: int) -> Path:
    """BUSI without fold ``fold``: the labelled images the downstream probe of that fold's pretraining may see."""
    frame = pd.read_csv(busi)
    path = args.out / f"busi_train_fold{fold}.csv"
    frame[folds != fold].to_csv(path, index=False)
    return path


def pretrain(args, arm: str, busi: Path, ddti: Path, folds: np.ndarray, folds_csv: Path, test_folds: list[int] | None) -> Path:
    """The encoder export of one pretraining on BUSI + DDTI without the labelled images of ``test_folds`` (None: all)."""
    packaged, method = PRETRAINING[arm]
    tag = "all" if test_folds is None else "fold" + "".join(map(str, test_folds))
    name = f"{pretraining_label(args, arm)}-{tag}"
    overrides = [
        f"--output_root={args.out / 'pretrain'}",
        f"--name={name}",
        f"--trainer.max_steps={args.pretrain_steps}",
        f"--data.image_size={args.image_size}",
        "--logging.wandb=false",
        "--trainer.enable_progress_bar=false",
        f"--monitor.every_n_steps={args.pretrain_steps}",
        f"--checkpoint_every_n_steps={args.pretrain_steps}",
        *method,
    ]
    # The CNN arms pretrain the fine-tuned backbone; MAE pretrains its own ViT at the input size.
    overrides.append(f"--method.image_size={args.image_size}" if arm == "mae" else f"--method.model.backbone.name={args.model}")
    if args.downstream_probe and test_folds is not None:
        (fold,) = test_folds
        overrides += [
            f"--monitor.downstream_manifest={fold_training_manifest(args, busi, folds, fold)}",
            f"--monitor.downstream_every_n_steps={max(1, args.pretrain_steps // 4)}",
        ]
    overrides += [f"--{setting}" for setting in args.pretrain_set]
    config = load_config(PretrainConfig, packaged, overrides)
    config.data.sources = [ImageSourceConfig(manifest=str(busi)), ImageSourceConfig(manifest=str(ddti))]
    config.data.labeled_manifest = str(folds_csv)
    config.data.exclude_labeled = "all" if test_folds is None else "test_folds"
    config.data.test_folds = test_folds
    run_dir = args.out / "pretrain" / name
    if not (run_dir / "encoder" / "model.safetensors").is_file():
        start = time.perf_counter()
        run_pretraining(config, run_dir, create=True)
        (run_dir / "wall_s.txt").write_text(f"{time.perf_counter() - start:.1f}\n")
    return run_dir / "encoder"


def run_pretrained_arm(args, arm: str, busi: Path, ddti: Path, frame: pd.DataFrame, folds: np.ndarray, folds_csv: Path) -> pd.DataFrame:
    """Pretrain (per fold, or once) and fine-tune each fold x seed from the matching encoder."""
    label = arm_label(args, arm)
    arm_dir = args.out / "arms" / label
    encoders = {}
    for fold in range(args.folds):
        if args.exclusion == "all":
            encoders[fold] = encoders.get(0) or pretrain(args, arm, busi, ddti, folds, folds_csv, None)
        else:
            encoders[fold] = pretrain(args, arm, busi, ddti, folds, folds_csv, [fold])
    for fold in range(args.folds):
        extra = ["--model.init=tus", f"--model.weights={encoders[fold]}", f"--init_label={label}"]
        if arm == "mae":
            extra.append(f"--model.name={read_tus_encoder_meta(encoders[fold])[1]['architecture']['name']}")
        config = finetune_config(args, busi, label, "default", [*extra, *(f"--{setting}" for setting in args.finetune_set)])
        for seed in args.seeds:
            sub = arm_dir / "runs" / f"fold{fold}-seed{seed}"
            if not (sub / "metrics.json").exists():
                run_single(config, frame, folds, fold, seed, sub)
    runs = collect_runs(arm_dir)
    runs.to_csv(arm_dir / "runs.csv", index=False)
    return runs


def finished(args, arm_dir: Path) -> bool:
    return (arm_dir / "runs.csv").is_file() and len(pd.read_csv(arm_dir / "runs.csv")) == args.folds * len(args.seeds)


def run_arm(args, arm: str, busi: Path, ddti: Path, frame: pd.DataFrame, folds: np.ndarray, folds_csv: Path) -> pd.DataFrame:
    arm_dir = args.out / "arms" / arm_label(args, arm)
    if finished(args, arm_dir):
        return pd.read_csv(arm_dir / "runs.csv")
    if arm == "plain":
        config = PlainConfig(
            model=args.model,
            image_size=args.image_size,
            batch_size=args.batch_size,
            epochs=args.epochs,
            lr=args.lr,
            weight_decay=args.weight_decay,
        )
        runs = pd.DataFrame([train_and_test(config, frame, folds, fold, seed) for seed in args.seeds for fold in range(args.folds)])
        arm_dir.mkdir(parents=True, exist_ok=True)
        runs.to_csv(arm_dir / "runs.csv", index=False)
        return runs
    if arm in ("scratch", "constant"):
        config = finetune_config(args, busi, arm, arm)
        run_dir = run_cv(config, arm_dir, create=True)
        # The tus run's folds must be the ones every other arm uses.
        written = pd.read_csv(run_dir / "folds.csv")["fold"].to_numpy()
        if not np.array_equal(written, folds):
            raise RuntimeError(f"{run_dir}/folds.csv differs from the benchmark's folds")
        return pd.read_csv(run_dir / "runs.csv")
    return run_pretrained_arm(args, arm, busi, ddti, frame, folds, folds_csv)


def earlier_arms(args, results: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    """Finished arms of earlier invocations with the same ``--out`` (e.g. other recipe variants), so the
    table grows with a search; table order: ALL_ARMS, each followed by its variants."""
    found = dict(results)
    for arm_dir in sorted((args.out / "arms").glob("*")):
        if arm_dir.name not in found and finished(args, arm_dir):
            found[arm_dir.name] = pd.read_csv(arm_dir / "runs.csv")

    def order(label: str) -> tuple[int, str]:
        base = label.split("-")[0]
        return (ALL_ARMS.index(base) if base in ALL_ARMS else len(ALL_ARMS), label)

    return {label: found[label] for label in sorted(found, key=order)}


def summarize(results: dict[str, pd.DataFrame], n_images: int, folds: int, metrics: tuple[str, ...] = METRICS) -> pd.DataFrame:
    """Mean +- std (ddof=1) per arm, and the corrected t-test of each arm against scratch."""
    n_test = n_images / folds
    n_train = n_images - n_test
    rows = []
    for arm, runs in results.items():
        row = {"arm": arm, "runs": len(runs)}
        for metric in metrics:
            values = 100 * runs[metric].to_numpy(dtype=float)
            row[metric] = f"{values.mean():.1f} +- {values.std(ddof=1):.1f}"
            for baseline in ("scratch",):
                if baseline in results and baseline != arm:
                    test = compare_arms(results[baseline], runs, metric, n_train, n_test)
                    row[f"{metric} vs {baseline}"] = f"{100 * test['mean_diff']:+.1f} (p={test['p']:.2f})"
        rows.append(row)
    return pd.DataFrame(rows).fillna("")


def markdown_table(table: pd.DataFrame) -> str:
    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines)


def plot(results: dict[str, pd.DataFrame], path: Path, title: str, metrics: tuple[str, ...] = METRICS) -> None:
    width = max(4.5, 0.42 * len(results) + 1.0)  # room for one rotated label per arm
    figure, axes = plt.subplots(1, len(metrics), figsize=(width * len(metrics), 4.2))
    rng = np.random.default_rng(0)
    for ax, metric in zip(axes, metrics):
        for i, runs in enumerate(results.values()):
            values = 100 * runs[metric].to_numpy(dtype=float)
            ax.scatter(i + rng.uniform(-0.12, 0.12, len(values)), values, s=14, alpha=0.6)
            ax.errorbar(i, values.mean(), yerr=values.std(ddof=1), fmt="o", color="black", capsize=4)
        ax.set_xticks(range(len(results)), list(results), rotation=45, ha="right")
        ax.set_ylabel(f"test {metric.upper()} (%)")
        ax.grid(axis="y", alpha=0.3)
    figure.suptitle(textwrap.fill(title, 110), fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="YAML of flag defaults (keys = flag names with _)")
    parser.add_argument("--data-root", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--out", type=Path, default=Path("runs/benchmarks/real_data"))
    parser.add_argument("--arms", default="a,b,c,d", help=f"letters {ARMS} or names {ALL_ARMS}, comma-separated")
    parser.add_argument("--model", default="resnet10t")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--fold-seed", type=int, default=0, help="finetune/cpu's data.fold_seed (the folds every arm uses)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--lr", type=float, default=3e-3, help="plain loop's peak lr (finetune/cpu's lr)")
    parser.add_argument("--weight-decay", type=float, default=0.05, help="plain loop's (= finetune/cpu's) weight decay")
    parser.add_argument("--pretrain-steps", type=int, default=300)
    parser.add_argument("--exclusion", choices=["per_fold", "all"], default="per_fold")
    parser.add_argument("--variant", default="", help="names a recipe variant of the pretrained arms (ARM-VARIANT)")
    parser.add_argument("--pretrain-set", action="append", default=[], metavar="KEY=VALUE", help="pretraining config override (repeatable)")
    parser.add_argument("--finetune-set", action="append", default=[], metavar="KEY=VALUE", help="fine-tuning override of the pretrained arms (repeatable)")
    parser.add_argument("--scratch-set", action="append", default=[], metavar="KEY=VALUE", help="fine-tuning override of the scratch arm (repeatable)")
    parser.add_argument("--finetune-config", default="finetune/cpu", help="packaged fine-tuning recipe of every tus arm (finetune/vit_cpu with --model vit_tiny_patch16_224: the ViT arms)")
    parser.add_argument("--downstream-probe", action="store_true", help="k-NN probe of BUSI (fold's training images) during pretraining")
    parser.add_argument("--classes", type=int, choices=(2, 3), default=2, help="3: BUSI benign / malignant / normal (macro metrics) instead of malignant vs rest")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    config_path = parser.parse_known_args(argv)[0].config
    defaults = yaml.safe_load(config_path.read_text()) or {}
    unknown = sorted(set(defaults) - {action.dest for action in parser._actions})
    if unknown:
        raise SystemExit(f"{config_path}: unknown key(s) {unknown}")
    parser.set_defaults(**defaults)
    args = parser.parse_args(argv)
    args.out = args.out.resolve()
    torch.set_num_threads(args.threads)
    arms = parse_arms(args.arms)
    if args.classes > 2 and "plain" in arms:
        raise SystemExit("--classes 3: the plain arm (benchmarks/plain_finetune.py) is binary-only; leave out arm a")
    metrics = METRICS if args.classes == 2 else MULTICLASS_METRICS

    busi, ddti, dropped = prepare_data(args.data_root, args.out, args.classes)
    frame = load_manifest(busi, require_labels=True, num_folds=args.folds)
    if args.fold_seed != 0:
        raise SystemExit("--fold-seed other than finetune/cpu's 0 is not wired into the tus arms")
    folds = assign_folds(frame, args.folds, args.fold_seed)
    folds_csv = args.out / "folds.csv"
    fold_table(frame, folds).to_csv(folds_csv, index=False)
    counts = ", ".join(f"{count} {name}" for name, count in zip(frame.attrs.get("label_names", ["rest", "malignant"]), np.bincount(frame["label"])))
    print(f"BUSI: {len(frame)} images ({counts}), dropped duplicated pixels: {dropped}")
    print(f"machine: {cpu_model()}, {torch.get_num_threads()} torch thread(s); torch {torch.__version__}")

    results, timing = {}, {}
    timing_path = args.out / "timing.json"
    if timing_path.is_file():
        timing = json.loads(timing_path.read_text())
    recipes_path = args.out / "recipes.json"
    recipes = json.loads(recipes_path.read_text()) if recipes_path.is_file() else {}
    for arm in arms:
        label = arm_label(args, arm)
        if arm in PRETRAINING:
            recipes[label] = {"pretrain_steps": args.pretrain_steps, "pretrain_set": args.pretrain_set, "finetune_set": args.finetune_set}
            recipes_path.write_text(json.dumps(recipes, indent=2))
        start = time.perf_counter()
        results[label] = run_arm(args, arm, busi, ddti, frame, folds, folds_csv)
        elapsed = time.perf_counter() - start
        if elapsed > 5 or label not in timing:  # a reused arm keeps the wall time it was run in
            timing[label] = round(elapsed, 1)
        timing_path.write_text(json.dumps(timing, indent=2))
        print(f"arm {label}: {timing[label]:.0f} s wall")
    for wall in sorted((args.out / "pretrain").glob("*/wall_s.txt")):
        timing[f"pretrain {wall.parent.name}"] = float(wall.read_text())

    results = earlier_arms(args, results)
    table = summarize(results, len(frame), args.folds, metrics)
    pd.concat([runs.assign(arm=arm) for arm, runs in results.items()]).to_csv(args.out / "runs.csv", index=False)
    table.to_csv(args.out / "table.csv", index=False)
    setting = (
        f"BUSI {'malignant vs rest' if args.classes == 2 else 'benign / malignant / normal (macro metrics)'}, {len(frame)} images, {args.folds}-fold patient-grouped CV x seeds {args.seeds}; "
        f"{args.model}, {args.image_size} px, batch {args.batch_size}, {args.epochs} epochs; "
        f"pretraining {args.pretrain_steps} steps (exclusion {args.exclusion})"
    )
    shown = {label: recipe for label, recipe in recipes.items() if label in results}
    markdown = f"{setting}\n\n{markdown_table(table)}\n\npretraining recipes: {shown}\nwall time per arm (s): {timing}\nmachine: {cpu_model()}\n"
    (args.out / "table.md").write_text(markdown)
    plot(results, args.out / "real_data.png", setting, metrics)
    print(markdown)


if __name__ == "__main__":
    main()
