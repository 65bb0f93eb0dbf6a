"""`tus demo` says what it is doing: a line when each step starts (step k of n, time so far) and
when it ends (its time), and progress bars unless --no-progress (issue 23: it was silent for minutes)."""

from __future__ import annotations

import time

from tus.cli.demo import STAGES, stage


def test_each_step_prints_a_start_and_an_end_line(capsys):
    timings: dict[str, float] = {}
    with stage("1. first", timings):
        time.sleep(0.01)
    timings["1. first"] = 61.0  # as if the first step had taken a minute
    with stage("2. second", timings):
        pass
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert lines[0] == f"=== 1. first (step 1 of {STAGES}; 0 s so far) ==="
    assert lines[1] == "--- 1. first: 0 s"
    assert lines[2] == f"=== 2. second (step 2 of {STAGES}; 61 s so far) ==="
    assert lines[3] == "--- 2. second: 0 s"


def test_demo_steps_are_counted_right():
    import inspect

    from tus.cli import demo

    assert inspect.getsource(demo.run_demo).count("with stage(") == STAGES


def test_the_report_names_the_diffusion_runs_size_from_its_config(tmp_path):
    from tus.cli.demo import _diffusion_size

    (tmp_path / "config.yaml").write_text("data:\n  image_size: 32\ntrainer:\n  max_steps: 1000\n")
    assert _diffusion_size(tmp_path) == "32 px, 1000 steps"
