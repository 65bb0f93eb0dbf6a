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
    return dict(arguments.split("=", 1) if "=" in arguments else (arguments, "") for name, arguments in dockerfile if name == "ARG")


def makefile_install_command() -> str:
    """The setup recipe's install command with $(PIP_INSTALL) expanded, minus the venv prefix."""
    text = (REPO / "Makefile").read_text()
    pip_install = re.search(r"^PIP_INSTALL\s*:?=\s*(.+)$", text, re.M).group(1).strip()
    recipe = re.search(r"^\t\$\(BIN\)/\$\(PIP_INSTALL\)(.*)$", text, re.M).group(1)
    return f"{pip_install}{recipe}".strip()


def test_base_image_is_an_official_pytorch_image_pinned_to_the_locked_torch(dockerfile):
    frm = [arguments for name, arguments in dockerfile if name == "FROM"]
    assert frm == ["${BASE_IMAGE}"]
    base = build_args(dockerfile)["BASE_IMAGE"]
    match = re.fullmatch(r"pytorch/pytorch:(\d+\.\d+\.\d+)-cuda(\d+\.\d+)-cudnn(\d+)-runtime", base)
    assert match, f"{base}: not a version-pinned pytorch/pytorch runtime tag"
    assert "latest" not in base
    locked = re.search(r"^torch==(\S+)$", (REPO / "requirements.lock").read_text(), re.M).group(1)
    assert match.group(1) == locked.split("+")[0]
    # The lock's CUDA wheels are the ones that tag ships (cu130: nvidia-*-cu13 packages).
    assert match.group(2).split(".")[0] == "13" and "nvidia-cudnn-cu13" in (REPO / "requirements.lock").read_text()


def test_install_line_is_the_makefiles(dockerfile):
    command = makefile_install_command()
    assert command == 'python -m pip install --constraint requirements.lock --editable ".[dev]"'
    commands = [part.strip() for name, arguments in dockerfile if name == "RUN" for part in arguments.split("&&")]
    assert command in commands
    fid_weights = re.search(r"^FID_WEIGHTS_INSTALL\s*:?=\s*(.+)$", (REPO / "Makefile").read_text(), re.M).group(1).strip()
    assert fid_weights in commands
    copied = " ".join(arguments for name, arguments in dockerfile if name == "COPY")
    for needed in ("pyproject.toml", "requirements.lock", "README.md", "tus", "experiments"):
        assert needed in copied.split(), needed


def test_runs_as_a_non_root_user_after_the_installs(dockerfile):
    names = [name for name, _ in dockerfile]
    users = [(i, arguments) for i, (name, arguments) in enumerate(dockerfile) if name == "USER"]
    assert users, "no USER instruction: the container would run as root"
    last, user = users[-1]
    assert user.split(":")[0] not in ("root", "0")
    assert last > max(i for i, name in enumerate(names) if name == "RUN")
    assert "useradd" in " ".join(arguments for name, arguments in dockerfile if name == "RUN")


def test_entrypoint_volumes_and_context(dockerfile):
    entrypoints = [json.loads(arguments) for name, arguments in dockerfile if name == "ENTRYPOINT"]
    assert entrypoints == [["tus"]]
    volumes = [v for name, arguments in dockerfile if name == "VOLUME" for v in json.loads(arguments)]
    assert {"/data", "/runs"} <= set(volumes)
    patterns = [line for line in (DOCKER / "Dockerfile.dockerignore").read_text().splitlines() if line and not line.startswith("#")]
    assert patterns[0] == "*"  # deny by default, then allow: no .venv, data or runs in the context
    assert not {"!.venv", "!runs", "!data"} & set(patterns)


def test_slurm_script_requests_two_gpus_one_task_each():
    script = DOCKER / "slurm_2xl40s.sbatch"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    directives = dict(re.findall(r"^#SBATCH\s+(--[\w-]+)=(\S+)", text, re.M))
    assert directives["--gres"] == "gpu:2" and directives["--ntasks-per-node"] == "2" and directives["--nodes"] == "1"
    assert re.search(r"^\s*srun tus pretrain ", text, re.M)
    assert "trainer.devices=2" in text and "trainer.strategy=ddp" in text


def test_readme_commands_exist_and_include_the_ddp_run():
    text = (DOCKER / "README.md").read_text()
    assert "--gpus all" in text and "--shm-size" in text
    assert "trainer.devices=2 trainer.strategy=ddp" in text and "torchrun" in text and "wandb sync" in text
    used = set(re.findall(r"\$TUS (\S+)", text)) | set(re.findall(r"-m tus\.cli (\S+)", text))
    assert used and used <= set(STAGES), used - set(STAGES)
    for line in re.findall(r"^\s+\$TUS .+$", text, re.M):
        shlex.split(line.replace("\\", ""))  # every example is a well-formed shell line
