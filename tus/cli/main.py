"""The ``tus`` command: one entry point, one subcommand per stage.

Stage subcommands live next to their code and are imported only when called, so
``tus data check`` starts fast and a broken optional stage cannot break the others.
"""

from __future__ import annotations

import importlib
import re
import signal
import sys
import warnings

from tus.preemption import TrainingStopped, stop_message, stop_on_signals
from tus.preemption import requested as requested_signal

# subcommand -> "module:function" taking argv and returning an exit code
STAGES = {
    "data": ("tus.cli.data:main", "check, crop or generate (phantom) datasets"),
    "finetune-cv": ("tus.cli.finetune:finetune_cv_main", "patient-grouped K-fold x seeds fine-tuning"),
    "pretrain": ("tus.cli.pretrain:main", "organ-supervised contrastive pretraining"),
    "diffusion": ("tus.cli.diffusion:main", "train the improved-DDPM generator"),
    "sample": ("tus.cli.sample:main", "sample images from a trained diffusion model"),
    "metrics": ("tus.cli.synthetic:metrics_main", "FID, IS, precision/recall of generated images"),
    "filter": ("tus.cli.synthetic:filter_main", "k-NN manifold filter of generated images"),
    "guidance-sweep": ("tus.cli.synthetic:guidance_sweep_main", "faithfulness vs FID of a conditional model across guidance scales"),
    "noisy-labels": ("tus.cli.noisy_labels:main", "flag noisy labels from per-sample loss trajectories"),
    "explain": ("tus.cli.explain:main", "Grad-CAM++ overlays and marker sensitivity"),
    "predict": ("tus.cli.predict:main", "run a trained classifier (fold ensemble or refit) on new images"),
    "export": ("tus.cli.export:main", "export a classifier to ONNX or TorchScript with a model card"),
    "experiment": ("tus.cli.experiment:main", "run a study's arms and render its table"),
    "report": ("tus.cli.report:main", "re-render figures and summaries of finished runs from their CSVs"),
    "wandb": ("tus.cli.wandb_export:main", "export offline W&B runs with their artifacts and lineage"),
    "demo": ("tus.cli.demo:main", "the whole pipeline on the generated phantom dataset"),
}


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand. Expected errors (bad config, bad data, bad weights) print one line
    and exit 2 (usage/config) or 1 (data); ``--debug`` shows the traceback instead. A run
    stopped by SIGTERM/SIGUSR1 exits 128 + signal (143, 138) with one line on how to resume
    (:mod:`tus.preemption`)."""
    # Library chatter (Lightning's pytree deprecation, "GPU available" banners, tips) says
    # nothing to a tus user; warnings tus itself raises still show.
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    # The diffusion EMA copy and frozen heads are in eval mode on purpose.
    warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode at the start of training.*")
    quiet_libraries()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in STAGES:
        usage = "\n".join(f"  {name:<13} {help_text}" for name, (_, help_text) in STAGES.items())
        print(f"usage: tus <command> [options]\n\ncommands:\n{usage}\n\n'tus <command> --help' for a command's options.")
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    debug = "--debug" in argv
    target, _ = STAGES[argv[0]]
    module_name, function_name = target.split(":")
    function = getattr(importlib.import_module(module_name), function_name)
    try:
        with stop_on_signals():
            return int(function([a for a in argv[1:] if a != "--debug"]) or 0)
    except SystemExit as stop:
        code = stopped_exit_code(stop)
        if code is None:
            raise
        print(stop_message(stop, argv[0], argv[1:]), file=sys.stderr, flush=True)
        return code
    except Exception as error:  # noqa: BLE001 - the one place that turns errors into exit codes
        code = exit_code(error)
        if debug or code is None:
            raise
        print(f"tus {argv[0]}: error: {one_line(error)}", file=sys.stderr)
        return code


def stopped_exit_code(stop: SystemExit) -> int | None:
    """128 + signal for a run stopped by SIGTERM/SIGUSR1 (ours, or Lightning's SIGTERMException,
    whose code is 0 and which a signal between Lightning's handlers and ours may still raise);
    None for any other exit."""
    if isinstance(stop, TrainingStopped):
        return 128 + stop.signum
    if type(stop).__name__ == "SIGTERMException":
        return 128 + (requested_signal() or int(signal.SIGTERM))
    return None


def exit_code(error: BaseException) -> int | None:
    """2 for usage and config errors, 1 for data/weights/run-dir errors, None: a bug (traceback)."""
    from tus.config import ConfigError, is_storage_error

    if isinstance(error, ConfigError):
        return 2
    if is_storage_error(error):  # a full disk, a read-only mount: the user's to fix, not a bug
        return 1
    if isinstance(error, (ValueError, FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError, UnicodeError)):
        return 1
    return None


def one_line(error: BaseException) -> str:
    if isinstance(error, OSError) and error.filename is not None:
        from tus.config import as_storage_error

        error = as_storage_error(error, error.filename)
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    return text or type(error).__name__


# Lightning's per-Trainer banners: said once per fold x seed they bury the progress bar.
_LIBRARY_CHATTER = re.compile(r"^(GPU available|TPU available|HPU available|LOCAL_RANK|💡 Tip|You are using a CUDA device|Seed set to|`Trainer\.fit` stopped|Loading `train_dataloader` to estimate)")


def quiet_libraries() -> None:
    """Drop Lightning's banners ("GPU available", tips, LOCAL_RANK, seed lines); keep its
    warnings and DDP start-up messages."""
    import logging

    class DropChatter(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return not _LIBRARY_CHATTER.match(record.getMessage())

    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero", "lightning.pytorch.accelerators.cuda", "lightning.fabric.utilities.seed"):
        logging.getLogger(name).addFilter(DropChatter())


if __name__ == "__main__":
    sys.exit(main())
