"""docker/ lints: a pinned base, the Makefile's install line, non-root, volumes, entrypoint; the
SLURM script's resources; the README's commands exist. (No Docker engine here to build it.)"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from tus.cli.main import STAGES

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, comments dropped and continuation lines joined."""
    logical, current = [], ""
    for line in path.read_text().splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current += line.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        logical.append(current.strip())
        current = ""
    return [(words[0].upper(), words[1].strip() if len(words) > 1 else "") for words in (line.split(None, 1) for line in logical)]


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    return instructions(DOCKER / "Dockerfile")


def build_args(dockerfile) -> dict[str, str]:
    """ARG defaults, with ${NAME} references to earlier ARGs expanded."""
    values: dict[str, str] = {}
    for name, arguments in dockerfile:
        if name == "ARG":
            key, _, default = arguments.partition("=")
            values[key] = re.sub(r"\$\{(\w+)\}", lambda m: values[m.group(1)], default)
    return values


def makefile_install_command() -> str:
    """The setup recipe's install command with $(PIP_INSTALL) expanded, minus the venv prefix and
    the CPU=1 switch ($(TORCH_INDEX): empty by default)."""
    text = (REPO / "Makefile").read_text()
    pip_install = re.search(r"^PIP_INSTALL\s*:?=\s*(.+)$", text, re.MULTILINE).group(1).strip()
    recipe = re.search(r"^\t\$\(BIN\)/\$\(PIP_INSTALL\)(.*)$", text, re.MULTILINE).group(1).replace("$(TORCH_INDEX)", "")
    return " ".join(f"{pip_install}{recipe}".split())


def test_base_image_is_an_official_pytorch_image_pinned_to_the_locked_torch(dockerfile):
    frm = [arguments for name, arguments in dockerfile if name == "FROM"]
    assert frm == ["${BASE_IMAGE} AS runtime", "runtime AS test"]
    base = build_args(dockerfile)["BASE_IMAGE"]
    match = re.fullmatch(r"pytorch/pytorch:(\d+\.\d+\.\d+)-cuda(\d+\.\d+)-cudnn(\d+)-runtime", base)
    assert match, f"{base}: not a version-pinned pytorch/pytorch runtime tag"
    assert "latest" not in base
    locked = re.search(r"^torch==(\S+)$", (REPO / "requirements.lock").read_text(), re.MULTILINE).group(1)
    assert match.group(1) == locked.split("+")[0]
    # The default is a CUDA 12 build (drivers >= 525/570); the lock records PyPI's cu13 build.
    assert match.group(2).split(".")[0] == "12" and "nvidia-cudnn-cu13" in (REPO / "requirements.lock").read_text()


def test_install_line_is_the_makefiles(dockerfile):
    command = makefile_install_command()
    assert command == 'python -m pip install --constraint requirements.lock --editable ".[dev]"'
    stages = " ".join(f"{name} {arguments}" for name, arguments in dockerfile).split("FROM runtime AS test")
    runtime_runs = [part.strip() for name, arguments in instructions_of(stages[0]) if name == "RUN" for part in arguments.split("&&")]
    test_runs = [part.strip() for name, arguments in instructions_of(stages[1]) if name == "RUN" for part in arguments.split("&&")]
    # The runtime image installs the package without its test extras; the test stage adds them.
    assert command.replace('".[dev]"', ".") in runtime_runs and command not in runtime_runs
    assert command in test_runs
    commands = runtime_runs
    fid_weights = re.search(r"^FID_WEIGHTS_INSTALL\s*:?=\s*(.+)$", (REPO / "Makefile").read_text(), re.MULTILINE).group(1).strip()
    assert fid_weights in commands
    copied = " ".join(arguments for name, arguments in dockerfile if name == "COPY")
    for needed in ("pyproject.toml", "requirements.lock", "README.md", "tus", "experiments"):
        assert needed in copied.split(), needed


def instructions_of(text: str) -> list[tuple[str, str]]:
    """Split a space-joined instruction stream back into (INSTRUCTION, arguments) pairs."""
    keywords = r"(FROM|ARG|ENV|WORKDIR|COPY|RUN|USER|VOLUME|ENTRYPOINT|CMD)"
    parts = re.split(rf"(?:^|\s){keywords}\s", " " + text)
    return [(parts[i], parts[i + 1].strip()) for i in range(1, len(parts) - 1, 2)]


def test_cuda_build_arg_documented_driver_and_cache_volume(dockerfile):
    args = build_args(dockerfile)
    assert args["CUDA_VERSION"] == "12.8" and "cuda${CUDA_VERSION}" in next(a for n, a in dockerfile if n == "ARG" and a.startswith("BASE_IMAGE"))
    text = (DOCKER / "Dockerfile").read_text()
    assert re.search(r"CUDA 12\.8, which runs\s+# on host drivers >= 570", text) and "driver >= 580" in text
    assert "--build-arg CUDA_VERSION=13.0" in text  # the one-line switch to PyPI's build
    volumes = [v for name, arguments in dockerfile if name == "VOLUME" for v in json.loads(arguments)]
    assert "/cache" in volumes and ("ENV", "TUS_CACHE_DIR=/cache/tus") in dockerfile


def dockerignore_keeps(path: str) -> bool:
    """Whether docker/Dockerfile.dockerignore keeps ``path`` in the build context (last match wins)."""
    kept = True
    for line in (DOCKER / "Dockerfile.dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated, pattern = line.startswith("!"), line.lstrip("!").rstrip("/")
        if pattern == "*" or path == pattern or path.startswith(pattern + "/") or Path(path).match(pattern):
            kept = negated
    return kept


def test_every_copied_path_is_in_the_build_context(dockerfile):
    """`COPY tests` failed: the context filter dropped tests/. Every COPY source must pass it."""
    sources = [source for name, arguments in dockerfile if name == "COPY" for source in arguments.split()[:-1] if not source.startswith("--")]
    assert {"tests", "tus", "Makefile", "docker", "benchmarks"} <= set(sources)
    for source in sources:
        assert dockerignore_keeps(source), f"COPY {source}: dropped by docker/Dockerfile.dockerignore"
        assert (REPO / source).exists(), source
    for dropped in (".venv", "runs", "data", "tus/__pycache__/x.pyc", "runs/x/wandb"):
        assert not dockerignore_keeps(dropped), dropped


def test_makefile_cpu_switch_and_failures_passed_on():
    text = (REPO / "Makefile").read_text()
    assert re.search(r"^TORCH_INDEX := \$\(if \$\(CPU\),--extra-index-url https://download\.pytorch\.org/whl/cpu\)$", text, re.MULTILINE)

    # make -n: the install line with and without CPU=1 (nothing runs).
    def dry(*args: str) -> str:
        return subprocess.run(["make", "-n", "-B", "-f", str(REPO / "Makefile"), ".venv/.installed", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout

    assert "download.pytorch.org" not in dry() and "--extra-index-url https://download.pytorch.org/whl/cpu --editable" in dry("CPU=1")
    # A loop over studies stops at the first failing one (a for loop's status is its last command's).
    assert "|| exit $$?" in re.search(r"^tables:.*\n((?:\t.*\n)+)", text, re.MULTILINE).group(1)


def test_runs_as_a_non_root_user_after_the_installs(dockerfile):
    names = [name for name, _ in dockerfile]
    users = [(i, arguments) for i, (name, arguments) in enumerate(dockerfile) if name == "USER"]
    assert users, "no USER instruction: the container would run as root"
    last, user = users[-1]
    assert user.split(":")[0] not in ("root", "0")
    assert last > max(i for i, name in enumerate(names) if name == "RUN")
    assert users[0][1] == "tus"  # the runtime stage's user, before its VOLUME/ENTRYPOINT
    assert "useradd" in " ".join(arguments for name, arguments in dockerfile if name == "RUN")


def test_entrypoint_volumes_and_context(dockerfile):
    entrypoints = [json.loads(arguments) for name, arguments in dockerfile if name == "ENTRYPOINT"]
    assert entrypoints == [["tus"], ["python", "-m", "pytest"]]
    volumes = [v for name, arguments in dockerfile if name == "VOLUME" for v in json.loads(arguments)]
    assert {"/data", "/runs"} <= set(volumes)
    patterns = [line for line in (DOCKER / "Dockerfile.dockerignore").read_text().splitlines() if line and not line.startswith("#")]
    assert patterns[0] == "*"  # deny by default, then allow: no .venv, data or runs in the context
    assert not {"!.venv", "!runs", "!data"} & set(patterns)


SCRIPTS = ("slurm_2xl40s.sbatch", "slurm_diffusion.sbatch", "slurm_finetune_cv.sbatch")


def sbatch_directives(script: str) -> dict[str, str]:
    return dict(re.findall(r"^#SBATCH\s+(--[\w-]+)(?:=(\S+))?", (DOCKER / script).read_text(), re.MULTILINE))


@pytest.mark.parametrize("script", SCRIPTS)
def test_slurm_scripts_parse_signal_before_the_limit_and_requeue(script):
    subprocess.run(["bash", "-n", str(DOCKER / script)], check=True)
    directives = sbatch_directives(script)
    assert directives["--signal"] == "USR1@90" and "--requeue" in directives and directives["--open-mode"] == "append"
    text = (DOCKER / script).read_text()
    assert 'source "${TUS_HOME:-.}/docker/slurm_common.sh"' in text and "set -euo pipefail" in text


def test_slurm_script_requests_two_gpus_one_task_each():
    script = DOCKER / "slurm_2xl40s.sbatch"
    text = script.read_text()
    directives = sbatch_directives("slurm_2xl40s.sbatch")
    assert directives["--gres"] == "gpu:2" and directives["--ntasks-per-node"] == "2" and directives["--nodes"] == "1"
    sruns = re.findall(r"^\s*srun (.+)$", text, re.MULTILINE)
    assert len(sruns) == 2 and all("tus-pretrain" in line for line in sruns)
    assert "--trainer.devices=2" in text and "--trainer.strategy=ddp" in text
    assert sbatch_directives("slurm_diffusion.sbatch")["--gres"] == "gpu:1"
    assert "--gres" not in sbatch_directives("slurm_finetune_cv.sbatch")  # per array task, given at submit


def test_slurm_script_cpus_nccl_and_rank0_bar():
    text = (DOCKER / "slurm_2xl40s.sbatch").read_text()
    common = (DOCKER / "slurm_common.sh").read_text()
    sruns = re.findall(r"^\s*srun (.+)$", text, re.MULTILINE)
    assert all(line.startswith('--cpus-per-task="${CPUS}"') for line in sruns)
    assert 'CPUS="${SLURM_CPUS_PER_TASK:-8}"' in common
    assert "LOADER_WORKERS=$(( CPUS > 1 ? CPUS - 1 : 0 ))" in common and '"--data.num_workers=${LOADER_WORKERS}"' in text
    exports = dict(re.findall(r"^export (\w+)=(\S+)", text, re.MULTILINE))
    assert exports["NCCL_P2P_LEVEL"] == '"${NCCL_P2P_LEVEL:-PXB}"' and exports["NCCL_DEBUG"] == '"${NCCL_DEBUG:-WARN}"'
    assert exports["TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC"] == '"${NCCL_TIMEOUT_S}"'
    assert re.search(r'^cd "\$\{SLURM_SUBMIT_DIR:-\$PWD\}"$', text, re.MULTILINE)
    # Run the rank-0 wrapper as srun would, with a stub `tus`: only rank 1 turns its bar off.
    wrapper = re.search(r"^RANK0_ONLY='(.+)'$", text, re.MULTILINE).group(1).replace("exec tus pretrain", "echo")
    for rank, bar_off in (("0", False), ("1", True)):
        out = subprocess.run(["bash", "-c", wrapper, "tus-pretrain", "--x=1"], env={"SLURM_PROCID": rank, "PATH": "/usr/bin:/bin"}, capture_output=True, text=True, check=True).stdout
        assert ("--trainer.enable_progress_bar=false" in out) == bar_off and "--x=1" in out


FAKE_SBATCH = """#!/bin/bash
n=$(( $(cat "$LOG/n" 2>/dev/null || echo 0) + 1 )); echo $n > "$LOG/n"
printf '%s\\n' "$*" >> "$LOG/sbatch.log"
echo "$(( 1000 + n ))"
"""
FAKE_TUS = """#!/bin/bash
printf '%s\\n' "$*" >> "$LOG/tus.log"
echo "run dir: runs/20260101-000000-finetune"
echo "tasks: 12 (--task-index 0..11, e.g. sbatch --array=0-11); then tus finetune-cv --join runs/20260101-000000-finetune"
"""


def submit(tmp_path: Path, *args: str, **env: str) -> list[str]:
    for name, text in (("sbatch", FAKE_SBATCH), ("tus", FAKE_TUS)):
        (tmp_path / name).write_text(text)
        (tmp_path / name).chmod(0o755)
    run_env = {"PATH": f"{tmp_path}:/usr/bin:/bin", "LOG": str(tmp_path), **env}
    subprocess.run(["bash", str(DOCKER / "slurm_submit.sh"), *args], env=run_env, capture_output=True, text=True, check=True)
    return (tmp_path / "sbatch.log").read_text().splitlines()


def test_submit_puts_gpu_type_partition_and_account_into_sbatch(tmp_path):
    (line,) = submit(tmp_path, "pretrain", "--data.x=1", GPU_TYPE="l40s", PARTITION="gpu", ACCOUNT="proj")
    assert line.split() == ["--partition=gpu", "--account=proj", "--gres=gpu:l40s:2", str(DOCKER / "slurm_2xl40s.sbatch"), "--data.x=1"]
    (tmp_path / "sbatch.log").unlink()
    (tmp_path / "n").unlink()
    (line,) = submit(tmp_path, "diffusion")
    assert line.split() == ["--gres=gpu:1", str(DOCKER / "slurm_diffusion.sbatch")]  # no GPU_TYPE: any GPU


def test_submit_finetune_cv_prepares_one_run_dir_an_array_and_a_join(tmp_path):
    array, join = submit(tmp_path, "finetune-cv", "--config", "finetune/paper", GPU_TYPE="a100", GPUS_PER_JOB="2", CPUS_PER_TASK="8")
    (prepare,) = (tmp_path / "tus.log").read_text().splitlines()
    assert prepare.startswith("finetune-cv --prepare --trainer.accelerator=gpu --trainer.devices=1 --data.num_workers=3") and prepare.endswith("--config finetune/paper")
    assert array.split() == [
        "--parsable",
        "--gres=gpu:a100:2",
        "--cpus-per-task=8",
        "--array=0-5",
        "--export=ALL,GPUS_PER_JOB=2,TUS_TASKS=12",
        str(DOCKER / "slurm_finetune_cv.sbatch"),
        "runs/20260101-000000-finetune",
    ]
    assert "--dependency=afterany:1001" in join.split() and join.endswith("slurm_finetune_cv.sbatch --join runs/20260101-000000-finetune")


def test_array_task_runs_its_fold_seed_runs_one_job_step_each(tmp_path):
    """The array script under a fake srun: task 2 of a 2-GPU array over 5 runs trains run 4 only."""
    (tmp_path / "srun").write_text('#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\n"$@"\n')
    (tmp_path / "srun").chmod(0o755)
    (tmp_path / "tus").write_text('#!/bin/bash\necho "tus $*" >> "$LOG/tus.log"\n')
    (tmp_path / "tus").chmod(0o755)
    (tmp_path / "venv" / "bin").mkdir(parents=True)
    (tmp_path / "venv" / "bin" / "activate").write_text("")
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin", "LOG": str(tmp_path), "TUS_HOME": str(REPO), "TUS_VENV": str(tmp_path / "venv"), "SLURM_SUBMIT_DIR": str(tmp_path), "SLURM_JOB_ID": "9"}
    script = str(DOCKER / "slurm_finetune_cv.sbatch")
    subprocess.run(["bash", script, "runs/cv"], env={**env, "SLURM_ARRAY_TASK_ID": "2", "GPUS_PER_JOB": "2", "TUS_TASKS": "5"}, check=True, capture_output=True)
    assert (tmp_path / "tus.log").read_text().splitlines() == ["tus finetune-cv --run-dir runs/cv --task-index 4"]
    subprocess.run(["bash", script, "--join", "runs/cv"], env=env, check=True, capture_output=True)
    assert (tmp_path / "tus.log").read_text().splitlines()[-1] == "tus finetune-cv --join runs/cv"


def test_readme_commands_exist_and_include_the_ddp_run():
    text = (DOCKER / "README.md").read_text()
    assert "--gpus all" in text and "--shm-size" in text
    assert "torchrun" in text and "wandb sync" in text
    used = set(re.findall(r"\$TUS (\S+)", text)) | set(re.findall(r"-m tus\.cli (\S+)", text))
    assert used and used <= set(STAGES), used - set(STAGES)
    for line in re.findall(r"^\s+\$TUS .+$", text, re.MULTILINE):
        shlex.split(line.replace("\\", ""))  # every example is a well-formed shell line
