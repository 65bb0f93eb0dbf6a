"""The CV's shared progress bar counts whole epochs exactly (issue 23: it showed 5.999999999999998/6)."""

from __future__ import annotations

from types import SimpleNamespace

from tus.callbacks.progress import StageProgressBar, stage_progress


def test_shared_bar_counts_epochs_exactly_and_prints_one_decimal(capsys):
    # 3 folds x 2 epochs of 7 batches each: 1/7 seven times does not add up to 1 in floating point.
    with stage_progress(6, desc="cv", unit="epoch") as bar:
        assert bar is not None
        for fold in range(3):
            callback = StageProgressBar(shared=bar)
            trainer = SimpleNamespace(num_training_batches=7, is_global_zero=True, callback_metrics={})
            for _ in range(2):
                callback.on_train_epoch_start(trainer, None)
                for batch_idx in range(7):
                    callback.on_train_batch_end(trainer, None, None, None, batch_idx)
                    assert 0 < bar.n - callback._epoch_start <= 1
                callback.on_train_epoch_end(trainer, None)
            assert bar.n == 2 * (fold + 1)  # exactly, not 1.9999999999999998
    frames = [frame for frame in capsys.readouterr().err.replace("\n", "\r").split("\r") if "| " in frame]
    counts = [frame.rsplit("| ", 1)[1].split(" ")[0] for frame in frames]
    assert counts[-1] == "6.0/6"
    assert all(len(count.split("/")[0].split(".")[1]) == 1 for count in counts)  # one decimal in every frame


def test_one_decimal_is_enough_for_a_partial_epoch(capsys):
    with stage_progress(4, desc="cv") as bar:
        callback = StageProgressBar(shared=bar)
        trainer = SimpleNamespace(num_training_batches=3, is_global_zero=True, callback_metrics={})
        callback.on_train_epoch_start(trainer, None)
        callback.on_train_batch_end(trainer, None, None, None, 0)
        assert bar.n == 1 / 3
    assert "0.3/4" in capsys.readouterr().err
