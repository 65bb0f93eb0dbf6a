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
    """The setup recipe's install command with $(PIP_INSTALL) expanded, minus the venv prefix."""
    text = (REPO / "Makefile").read_text()
    pip_install = re.search(r"^PIP_INSTALL\s*:?=\s*(.+)$", text, re.MULTILINE).group(1).strip()
    recipe = re.search(r"^\t\$\(BIN\)/\$\(PIP_INSTALL\)(.*)$", text, re.MULTILINE).group(1)
    return f"{pip_install}{recipe}".strip()


def test_base_image_is_an_official_pytorch_image_pinned_to_the_locked_torch(dockerfile):
    frm = [arguments for name, arguments in dockerfile if name == "FROM"]
    assert frm == ["${BASE_IMAGE} AS runtime", "runtime AS test"]
    base = build_args(dockerfile)["BASE_IMAGE"]
    match = re.fullmatch(r"pytorch/pytorch:(\d+\.\d+\.\d+)-cuda(\d+\.\d+)-cudnn(\d+)-runtime", base)
    assert match, f"{base}: not a version-pinned pytorch/pytorch runtime tag"
    assert "latest" not in base
    locked = re.search(r"^torch==(\S+)$", (REPO / "requirements.lock").read_text(), re.MULTILINE).group(1)
    assert match.group(1) == locked.split("+")[0]
    # The lock's CUDA wheels are the ones that tag ships (cu130: nvidia-*-cu13 packages).
    assert match.group(2).split(".")[0] == "13" and "nvidia-cudnn-cu13" in (REPO / "requirements.lock").read_text()


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
    assert args["CUDA_VERSION"] == "13.0" and "cuda${CUDA_VERSION}" in next(a for n, a in dockerfile if n == "ARG" and a.startswith("BASE_IMAGE"))
    text = (DOCKER / "Dockerfile").read_text()
    assert re.search(r"CUDA 13\.0 build needs driver >= 580", text)
    assert re.search(r"--build-arg CUDA_VERSION=12\.\d", text)
    volumes = [v for name, arguments in dockerfile if name == "VOLUME" for v in json.loads(arguments)]
    assert "/cache" in volumes and ("ENV", "TUS_CACHE_DIR=/cache/tus") in dockerfile


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


def test_slurm_script_requests_two_gpus_one_task_each():
    script = DOCKER / "slurm_2xl40s.sbatch"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    directives = dict(re.findall(r"^#SBATCH\s+(--[\w-]+)=(\S+)", text, re.MULTILINE))
    assert directives["--gres"] == "gpu:2" and directives["--ntasks-per-node"] == "2" and directives["--nodes"] == "1"
    sruns = re.findall(r"^\s*srun (.+)$", text, re.MULTILINE)
    assert len(sruns) == 2 and all("tus-pretrain" in line for line in sruns)
    assert "--trainer.devices=2" in text and "--trainer.strategy=ddp" in text


def test_slurm_script_cpus_nccl_site_variables_and_rank0_bar():
    text = (DOCKER / "slurm_2xl40s.sbatch").read_text()
    sruns = re.findall(r"^\s*srun (.+)$", text, re.MULTILINE)
    assert all(line.startswith('--cpus-per-task="${CPUS}"') for line in sruns)
    assert 'CPUS="${SLURM_CPUS_PER_TASK:-8}"' in text
    assert "LOADER_WORKERS=$(( CPUS > 1 ? CPUS - 1 : 0 ))" in text and '"--data.num_workers=${LOADER_WORKERS}"' in text
    exports = dict(re.findall(r"^export (\w+)=(\S+)", text, re.MULTILINE))
    assert exports["NCCL_P2P_LEVEL"] == '"${NCCL_P2P_LEVEL:-PXB}"' and exports["NCCL_DEBUG"] == '"${NCCL_DEBUG:-WARN}"'
    assert exports["TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC"] == '"${NCCL_TIMEOUT_S}"'
    for variable in ("PARTITION", "ACCOUNT", "GPU_TYPE"):
        assert re.search(rf'^{variable}="\$\{{{variable}:-', text, re.MULTILINE), variable
    assert re.search(r'^cd "\$\{SLURM_SUBMIT_DIR:-\$PWD\}"$', text, re.MULTILINE)
    # Run the rank-0 wrapper as srun would, with a stub `tus`: only rank 1 turns its bar off.
    wrapper = re.search(r"^RANK0_ONLY='(.+)'$", text, re.MULTILINE).group(1).replace("exec tus pretrain", "echo")
    for rank, bar_off in (("0", False), ("1", True)):
        out = subprocess.run(["bash", "-c", wrapper, "tus-pretrain", "--x=1"], env={"SLURM_PROCID": rank, "PATH": "/usr/bin:/bin"}, capture_output=True, text=True, check=True).stdout
        assert ("--trainer.enable_progress_bar=false" in out) == bar_off and "--x=1" in out


def test_readme_commands_exist_and_include_the_ddp_run():
    text = (DOCKER / "README.md").read_text()
    assert "--gpus all" in text and "--shm-size" in text
    assert "torchrun" in text and "wandb sync" in text
    used = set(re.findall(r"\$TUS (\S+)", text)) | set(re.findall(r"-m tus\.cli (\S+)", text))
    assert used and used <= set(STAGES), used - set(STAGES)
    for line in re.findall(r"^\s+\$TUS .+$", text, re.MULTILINE):
        shlex.split(line.replace("\\", ""))  # every example is a well-formed shell line
