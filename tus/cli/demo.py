"""``tus demo``: the whole pipeline on the generated phantom dataset, CPU-sized.

Each step calls the same stage function a user runs stage by stage (the packaged stage
configs ``pretrain/cpu``, ``finetune/cpu_pretrained`` and ``diffusion/demo`` with CPU-sized overrides), so
``tus demo`` works from any folder; everything goes into one new folder, and ``REPORT.md``
there collects the tables, numbers and plots.

The phantom's labels are 10% flipped on purpose (``--label-noise``; the manifest's ``clean_label``
keeps the truth), so the noisy-label step reports how well flagging finds them; the diffusion
model's samples are scored against those of the same U-Net untrained, so the report shows what
training bought.
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

STAGES = 9
DEFAULT_LABEL_NOISE = 0.1
NUM_SAMPLES = 32
# Respaced ancestral steps, not DDIM: on this briefly trained U-Net DDIM drew many pure-noise images
# (at step 200 of diffusion/demo: FID 529 vs 501 for respaced at the same 25 steps; see benchmarks/sampling.py).
SAMPLER = "respaced"
# 100 steps: the demo model's samples at 25 / 50 / 100 steps scored FID 215 / 190 / 179 (real images at 32 px)
# and the filter kept 3 / 4 / 8 of 32, for 6 / 6 / 11 s of sampling on an idle 2-core machine.
SAMPLE_STEPS = 100
DIFFUSION_STAGE = "4. improved-DDPM training"


@contextmanager
def stage(title: str, timings: dict):
    """One line when a step starts (with the demo's time so far) and one when it ends (its own time)."""
    so_far = sum(timings.values())
    print(f"\n=== {title} (step {len(timings) + 1} of {STAGES}; {so_far:.0f} s so far) ===", flush=True)
    start = time.perf_counter()
    yield
    timings[title] = time.perf_counter() - start
    print(f"--- {title}: {timings[title]:.0f} s", flush=True)


def run_demo(out_root: Path, *, label_noise: float, seeds: str, progress: bool = True) -> Path:
    from tus.config import load_config
    from tus.data.manifest import load_manifest, summarize
    from tus.data.phantom import generate_phantom
    from tus.eval.explain import format_summary
    from tus.eval.noisy_labels import FlaggingRule, find_loss_tables, format_report, read_losses
    from tus.eval.noisy_labels import write_report as write_noisy_label_report
    from tus.figures.runs import write_diffusion_figures
    from tus.runs import new_run_dir
    from tus.stages.diffusion import DiffusionConfig, run_diffusion
    from tus.stages.explain import run_explain
    from tus.stages.finetune_cv import FineTuneCVConfig, run_cv
    from tus.stages.pretrain import PretrainConfig, run_pretraining
    from tus.stages.sample import generate
    from tus.stages.synthetic import format_filter_report, format_metrics_report, run_filter, run_metrics
    from tus.tracking import track_noisy_labels

    demo = new_run_dir(out_root, "demo")
    timings: dict[str, float] = {}
    # One bar per training stage (pretraining and diffusion steps, the CV's epochs), each with its ETA.
    quiet = [] if progress else ["trainer.enable_progress_bar=false"]

    with stage("1. phantom dataset + data check", timings):
        data = generate_phantom(demo / "data", seed=0, label_noise=label_noise)
        labeled = load_manifest(data.labeled_manifest, num_folds=3)
        print(summarize(labeled))
        print(summarize(load_manifest(data.unlabeled_manifest, require_labels=False)))

    with stage("2. organ-supervised contrastive pretraining", timings):
        pretrain = load_config(
            PretrainConfig,
            "pretrain/cpu",
            [
                f"data.sources=[{{manifest: {data.unlabeled_manifest}}}]",
                f"output_root={demo}",
                "trainer.max_steps=100",
                "monitor.every_n_steps=50",
                *quiet,
            ],
        )
        pretrain_dir = run_pretraining(pretrain)

    with stage("3. fine-tuning: 3 patient-grouped folds x seeds, init from the pretrained encoder", timings):
        finetune = load_config(
            FineTuneCVConfig,
            "finetune/cpu_pretrained",
            [
                f"data.manifest={data.labeled_manifest}",
                f"output_root={demo}",
                f"seeds={seeds}",
                f"model.weights={pretrain_dir / 'encoder'}",
                *quiet,
            ],
        )
        cv_dir = run_cv(finetune)
        print((cv_dir / "summary.md").read_text())

    with stage(DIFFUSION_STAGE, timings):
        diffusion = load_config(
            DiffusionConfig,
            "diffusion/demo",
            [
                f"data.sources=[{{manifest: {data.labeled_manifest}}}]",
                f"output_root={demo}",
                *quiet,
            ],
        )
        diffusion_dir = run_diffusion(diffusion)

    samples = demo / "samples"
    with stage(f"5. sampling (respaced ancestral, {SAMPLE_STEPS} steps), trained and untrained", timings):
        manifest = generate(diffusion_dir, samples, NUM_SAMPLES, sampler=SAMPLER, steps=SAMPLE_STEPS, progress=progress)
        print(f"{NUM_SAMPLES} images in {samples} (manifest: {manifest})")
        # The baseline: a freshly initialised U-Net of the same architecture, same sampler and seeds.
        untrained = generate(untrained_export(diffusion_dir, demo / "untrained_unet"), demo / "untrained_samples", NUM_SAMPLES, sampler=SAMPLER, steps=SAMPLE_STEPS, progress=progress)
        print(f"{NUM_SAMPLES} images of the untrained U-Net in {untrained.parent}")

    with stage("6. synthetic metrics + k-NN manifold filter", timings):
        features = {"cache_dir": demo / "feature_cache", "progress": progress}
        metrics_file = demo / "synthetic_metrics.json"
        synthetic = run_metrics(data.labeled_manifest, samples, metrics_file, **features)
        print(format_metrics_report(synthetic, metrics_file))
        baseline_file = demo / "untrained_metrics.json"
        print("the untrained U-Net's samples:")
        print(format_metrics_report(run_metrics(data.labeled_manifest, demo / "untrained_samples", baseline_file, **features), baseline_file))
        write_diffusion_figures(diffusion_dir, fid=synthetic.get("fid"))  # the sample grid's caption gets the FID
        print(format_filter_report(run_filter(data.labeled_manifest, samples, demo / "filtered", k=10, organ="testicle", **features)))

    with stage("7. noisy-label detection from the recorded per-sample losses", timings):
        # The CV run's own labelled manifest; the rule is the reference one (tus noisy-labels' defaults).
        losses = read_losses(find_loss_tables([cv_dir]))
        print(format_report(write_noisy_label_report(losses, data.labeled_manifest, FlaggingRule(), demo / "noisy_labels")))
        track_noisy_labels(demo / "noisy_labels", data.labeled_manifest)

    with stage("8. Grad-CAM++ and marker sensitivity", timings):
        model = cv_dir / "runs" / "fold0-seed0" / "model.safetensors"
        print(format_summary(run_explain(model, _test_images(cv_dir, 8), demo / "explain")))

    with stage("9. predict held-out phantom images with the CV's fold ensemble, export it (ONNX)", timings):
        predict_and_export(demo, cv_dir, progress=progress)

    write_report(demo, cv_dir, pretrain_dir, diffusion_dir, timings)
    print(f"\n{(demo / 'REPORT.md').read_text()}")
    return demo


def untrained_export(diffusion_dir: Path, out: Path) -> Path:
    """An export of the run's U-Net architecture freshly initialised (seed 0), never trained: the baseline the
    trained model's FID is compared with."""
    import torch

    from tus.methods.iddpm import build_unet, latest_export, load_unet_export, save_unet_export

    trained = latest_export(diffusion_dir)
    if trained is None:
        raise FileNotFoundError(f"{diffusion_dir}: no export in export/ema_unet_step*")
    _, export = load_unet_export(trained)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        fresh = build_unet(export.unet)
    return save_unet_export(fresh, replace(export, step=0), out)


def predict_and_export(demo: Path, cv_dir: Path, progress: bool = False) -> None:
    """New phantom patients (another seed, never seen by the CV) through ``tus predict`` and ``tus export``."""
    from tus.data.phantom import generate_phantom
    from tus.stages.export import run_export
    from tus.stages.predict import render_labelled_summary, run_predict

    heldout = generate_phantom(demo / "heldout", num_patients=20, pool_size=0, seed=1)
    result = run_predict(cv_dir, heldout.labeled_manifest, demo / "heldout_predictions.csv", progress=progress)
    print(render_labelled_summary(result["labelled"], result["kind"]))
    run_export(cv_dir, "onnx", demo / "export")
    print(f"exported the fold ensemble to {demo / 'export'}")


def _predict_section(demo: Path) -> list[str]:
    result = json.loads((demo / "heldout_predictions.metrics.json").read_text())
    from tus.stages.predict import render_labelled_summary

    return [
        "## Predictions on held-out phantom patients",
        "",
        f"`tus predict` with the CV run's {len(result['members'])} fold models (mean probability) on {result['images']} images of new "
        f"phantom patients (`heldout/`, another seed), threshold {result['threshold']:.3g}; `heldout_predictions.csv`. "
        "The ensemble, exported to ONNX with its model card, is in `export/`.",
        "",
        render_labelled_summary(result["labelled"], "fold ensemble"),
    ]


def _test_images(cv_dir: Path, count: int) -> list[str]:
    """Images of fold 0's test set, both classes, for the explanation step."""
    import pandas as pd
    import yaml

    folds = pd.read_csv(cv_dir / "folds.csv")
    test = folds[folds["fold"] == 0].sort_values("label", ascending=False)
    root = Path(yaml.safe_load((cv_dir / "config.yaml").read_text())["data"]["manifest"]).parent
    return [str(root / p) for p in pd.concat([test.head(count // 2), test.tail(count - count // 2)])["path"]]


def write_report(demo: Path, cv_dir: Path, pretrain_dir: Path, diffusion_dir: Path, timings: dict) -> None:
    from tus.eval.metrics import format_metrics_table
    from tus.figures.runs import figures_markdown

    def read(path: Path) -> dict:
        return json.loads(path.read_text())

    pretrain = read(pretrain_dir / "summary.json")
    filtered = read(demo / "filtered" / "filter.json")
    trained, untrained = read(demo / "synthetic_metrics.json"), read(demo / "untrained_metrics.json")
    flags = read(demo / "noisy_labels" / "report.json")
    found = flags.get("against_clean_label")
    markers = read(demo / "explain" / "marker_sensitivity.json")
    lines = [
        "# tus demo report",
        "",
        "Produced by `make demo` on the generated phantom dataset.",
        "",
        (cv_dir / "summary.md").read_text().split("\n## Figures")[0].replace("# ", "## Fine-tuning: ", 1),
        "",
        *figures_markdown(demo, [cv_dir, pretrain_dir, diffusion_dir]),
        "## Pretraining",
        "",
        f"{pretrain['steps']} steps; last values: " + ", ".join(f"{k} {v:.3f}" for k, v in pretrain["last"].items()),
        "",
        "## Synthetic images",
        "",
        f"The demo's diffusion model (`diffusion/demo`, {_diffusion_size(diffusion_dir)}) trains on the labelled phantom "
        f"images ({timings.get(DIFFUSION_STAGE, float('nan')):.0f} s here); the table compares its samples with those of the same U-Net architecture untrained. "
        f"The real images are 128 px; metrics and filter compare them at the samples' {trained.get('real_size', 'native')} px, as the model saw them in training. "
        "The best a set of 32 images can do here: 32 real images scored FID 52-57 against all of them, and the filter kept 27-31 of 32 held-out real images. "
        f"{NUM_SAMPLES} samples each (respaced ancestral sampling, {SAMPLE_STEPS} steps), against all real images:",
        "",
        "| model | FID | precision | recall |",
        "|---|---|---|---|",
        *[f"| {name} | {m['fid']:.1f} | {_mean(m, 'precision')} | {_mean(m, 'recall')} |" for name, m in (("trained", trained), ("untrained (same U-Net, step 0)", untrained))],
        "",
        "```",
        format_metrics_table(trained),
        "```",
        "",
        f"k-NN manifold filter (k = {filtered['k']}): kept {filtered['kept']} of {filtered['num_generated']} samples of the trained model.",
        "",
        "## Noisy labels",
        "",
        f"{flags['flagged']} of {flags['samples']} samples flagged (loss > {flags['rule']['threshold']} at least "
        f"{flags['rule']['min_exceed']} times in every run that trained on them); see `noisy_labels/`.",
        *(
            [
                "",
                f"The phantom's labels were flipped on purpose ({found['noisy_samples']} of {flags['samples']}; `clean_label` keeps the truth): "
                f"flagging found {found['flagged_noisy']} of them (recall {_percent(found['recall'])}), "
                f"and {_percent(found['precision'])} of the flagged samples were flipped ones (precision).",
            ]
            if found
            else []
        ),
        "",
        "## Marker sensitivity (fold 0, seed 0)",
        "",
        f"- predictions changed by injected markers: {markers['prediction_change_rate']:.1%}",
        f"- mean shift of the positive-class probability: {markers['mean_probability_shift']:.3f}",
        f"- Grad-CAM++ mass on marker pixels: {markers['cam_mass_on_markers_marked']:.1%} with markers, "
        f"{markers['cam_mass_on_markers_clean']:.1%} on the same pixels without (marker area {markers['marker_area']:.1%})",
        "",
        *_predict_section(demo),
        "## Time per stage",
        "",
        "| stage | seconds |",
        "|---|---|",
        *[f"| {k} | {v:.0f} |" for k, v in timings.items()],
        "",
        "## Where things are",
        "",
        f"- fine-tuning run: `{cv_dir}`",
        f"- pretraining run: `{pretrain_dir}`",
        f"- diffusion run (sample grids in it): `{diffusion_dir}`",
        f"- samples: `{demo / 'samples'}`, filter: `{demo / 'filtered'}`",
        f"- noisy-label report and plots: `{demo / 'noisy_labels'}`",
        f"- Grad-CAM++ overlays: `{demo / 'explain'}`",
        *_wandb_line(demo),
        "",
    ]
    (demo / "REPORT.md").write_text("\n".join(lines))


def _diffusion_size(diffusion_dir: Path) -> str:
    """The run's image size and step budget (e.g. "32 px, 1000 steps"), read from its saved config: the report
    states what ran, not what this file once said."""
    import yaml

    config = yaml.safe_load((diffusion_dir / "config.yaml").read_text())
    return f"{config['data']['image_size']} px, {config['trainer']['max_steps']} steps"


def _mean(metrics: dict, name: str) -> str:
    """``metrics``' mean ``name`` (precision or recall, over the reference batches) or "n/a" when it has none."""
    value = metrics.get(f"{name}_mean")
    return "n/a" if value is None else f"{value:.2f}"


def _percent(value: float) -> str:
    return "n/a" if value != value else f"{value:.0%}"  # NaN: nothing flagged, or nothing to find


def _wandb_line(demo: Path) -> list[str]:
    from tus.tracking import offline_run_folders

    folders = offline_run_folders([demo])
    return [f"- {len(folders)} offline W&B run folder(s) in the stages' `wandb/` folders: `tus wandb export {demo}` uploads them with their lineage"] if folders else []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tus demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs", help="a new demo folder is created under this one")
    parser.add_argument("--label-noise", type=float, default=DEFAULT_LABEL_NOISE, help="fraction of the phantom's labels flipped on purpose (the noisy-label step reports how many it finds)")
    parser.add_argument("--seeds", default="[0]", help="fine-tuning seeds, as a YAML list")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (each step still prints a line when it starts and ends)")
    args = parser.parse_args(argv)
    run_demo(Path(args.out), label_noise=args.label_noise, seeds=args.seeds, progress=not args.no_progress)
    return 0
