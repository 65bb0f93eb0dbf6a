"""The one door through which tus reads a weights file: nothing in it can run code.

A weights file is accepted in three forms only:

- a TorchScript archive (``torch.jit.save``; its program is TorchScript, not Python, and its
  constants go through TorchScript's own restricted unpickler), read with ``torch.jit.load``;
- a safetensors file (a JSON header plus raw tensor bytes), read with ``safetensors``;
- a ``torch.save`` file of tensors and plain containers (a state dict, a Lightning checkpoint),
  read with ``torch.load(weights_only=True)``, whose unpickler only builds allow-listed types.

Anything else (a pickle of arbitrary Python objects, a text file, an empty file, a folder) is
refused with a one-line :class:`CheckpointError` naming the file and saying what it is. A
pickle is inspected without being executed (``torch.serialization.get_unsafe_globals_in_checkpoint``
lists the globals it would import), and torch's own message is never passed on, because it
suggests loading the file with ``weights_only=False``, which would run any payload in it.
Libraries that would unpickle a path themselves (torch-fidelity, timm) are handed what this
module loaded instead of the path.
"""

from __future__ import annotations

import json
import pickle
import pickletools
import re
import struct
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from tus.data.images import DataError

ACCEPTED = "tus reads TorchScript archives, safetensors files and torch.save files of tensors (state dicts)"
# How many bytes are sniffed to tell text from binary.
SNIFF_BYTES = 4096


class CheckpointError(DataError):
    """A weights file is missing, unsafe, unreadable or does not fit; the message names the file."""


class UnsafeCheckpointError(CheckpointError):
    """A file that would run code if unpickled: refused, never set aside as merely corrupt."""


def load_weights(path: str | Path) -> torch.jit.ScriptModule | dict[str, Any] | Any:
    """Load ``path`` safely: a ``ScriptModule`` (eval mode, CPU) for TorchScript, else what the file holds.

    safetensors files give a flat ``{name: tensor}`` dict; ``torch.save`` files give their content as
    ``torch.load(weights_only=True)`` rebuilds it (usually a dict). Raises :class:`CheckpointError` (one line)
    for a missing, empty, text, unsafe or unreadable file.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: weights file not found")
    if not path.is_file():
        raise CheckpointError(f"{path}: is a folder, not a weights file")
    with open(path, "rb") as handle:
        head = handle.read(SNIFF_BYTES)
    if not head:
        raise CheckpointError(f"{path}: is empty (0 bytes), not a weights file")
    if _is_safetensors(head, path.stat().st_size):
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as error:
            raise CheckpointError(f"{path}: corrupt safetensors file ({_first_line(error)})") from error
    if zipfile.is_zipfile(path):
        if is_torchscript(path):
            return _load_torchscript(path)
        return _torch_load(path)
    if _looks_like_text(head):
        _refuse_text(path, head)  # raises
    return _torch_load(path)


def check_weight_values(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], source: str | Path) -> None:
    """Refuse weights that would load but cannot be the trained network (issue 23).

    - a floating-point tensor of the model given as integers or booleans (an int8 export was cast to
      float and used as the pretrained init, giving chance-level results with no warning);
    - NaN or infinite values;
    - every floating-point tensor all zeros (an emptied file).
    A single all-zero weight matrix or kernel (2 or more dimensions) is reported on stderr, not
    refused: it can be real (a zero-initialised layer never trained) but is rarely meant.
    """
    shared = [name for name in expected if name in state]
    wrong = [name for name in shared if expected[name].is_floating_point() and not state[name].is_floating_point()]
    if wrong:
        name = wrong[0]
        raise CheckpointError(
            f"{source}: {len(wrong)} tensor(s) are {str(state[name].dtype).removeprefix('torch.')} where the model holds floating-point weights (e.g. {name}); refused: a quantised or converted file is not these weights"
        )
    floating = [name for name in shared if state[name].is_floating_point()]
    non_finite = [name for name in floating if not bool(torch.isfinite(state[name]).all())]
    if non_finite:
        raise CheckpointError(f"{source}: {len(non_finite)} tensor(s) hold NaN or infinite values (e.g. {non_finite[0]}); refused")
    zero = [name for name in floating if state[name].numel() and not bool(state[name].any())]
    if floating and len(zero) == len(floating):
        raise CheckpointError(f"{source}: every weight tensor is all zeros; refused: not a trained network")
    matrices = [name for name in zero if state[name].ndim >= 2]
    if matrices:
        print(f"warning: {source}: {len(matrices)} weight tensor(s) are all zeros (e.g. {matrices[0]})", file=sys.stderr, flush=True)


def is_torchscript(path: str | Path) -> bool:
    """Whether ``path`` is a TorchScript archive (a zip with a ``code/`` folder), without loading it."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name for name in archive.namelist())


def read_export_json(path: str | Path) -> dict:
    """The parsed ``.json`` of an export (``NAME.json`` beside ``NAME.safetensors``); one-line errors."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; an export is NAME.safetensors with NAME.json beside it")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: not valid JSON ({_first_line(error)})") from error
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    return meta


def _is_safetensors(head: bytes, size: int) -> bool:
    """safetensors starts with a little-endian u64 header length followed by a JSON object."""
    if len(head) < 9:
        return False
    (header_length,) = struct.unpack("<Q", head[:8])
    return 0 < header_length <= size - 8 and head[8:9] == b"{"


def _looks_like_text(head: bytes) -> bool:
    if b"\x00" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as error:
        # A multi-byte character cut by the sniff window is still text.
        return error.start >= len(head) - 3
    return True


def _refuse_text(path: Path, head: bytes) -> None:
    text = head.decode("utf-8", errors="replace")
    if text.lstrip().startswith(("{", "[")):
        kind = "a JSON text file"
    elif text.startswith(("c", "(")) and "\n" in text[:80] and text.rstrip().endswith("."):
        kind = "a text-protocol Python pickle, which could run code"
    else:
        kind = "a text file"
    first = text.strip().splitlines()[0][:60] if text.strip() else ""
    error_type = UnsafeCheckpointError if "pickle" in kind else CheckpointError
    raise error_type(f"{path}: is {kind} (starts {first!r}), not a weights file; {ACCEPTED}")


def _load_torchscript(path: Path) -> torch.jit.ScriptModule:
    try:
        with warnings.catch_warnings():
            # torch.jit.load is deprecated in favour of torch.export, but these files are TorchScript.
            warnings.simplefilter("ignore", FutureWarning)
            return torch.jit.load(str(path), map_location="cpu").eval()
    except Exception as error:  # a corrupt archive raises RuntimeError, zipfile or torch internals
        raise CheckpointError(f"{path}: corrupt TorchScript archive ({_first_line(error)})") from error


def _torch_load(path: Path) -> Any:
    try:
        with warnings.catch_warnings():
            # torch warns about pickle protocols its safe unpickler may not support; the error says enough.
            warnings.simplefilter("ignore", UserWarning)
            # A file object, not the path: torch.load would pick a reader by the file name's suffix.
            with open(path, "rb") as handle:
                return torch.load(handle, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        names = _unsafe_globals(path, str(error))
        if names:
            shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
            raise UnsafeCheckpointError(f"{path}: refused: a pickle of Python objects (needs {shown}), which can run code when loaded; {ACCEPTED}") from error
        raise CheckpointError(f"{path}: not a loadable weights file (unknown or corrupt format); {ACCEPTED}") from error
    except Exception as error:  # corrupt zips, truncated pickles, foreign formats
        raise CheckpointError(f"{path}: not a loadable weights file ({_first_line(error)}); {ACCEPTED}") from error


def _unsafe_globals(path: Path, torch_message: str) -> list[str]:
    """The Python globals (``posix.system``...) a pickle would import, found without running it.

    Zip checkpoints are scanned by torch; for a legacy ``torch.save`` file torch's message names the
    global it stopped at; a bare pickle is walked opcode by opcode (``pickletools``, which executes nothing).
    """
    if zipfile.is_zipfile(path):
        try:
            return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        except (RuntimeError, ValueError, OSError, pickle.UnpicklingError, zipfile.BadZipFile):
            return []
    named = re.findall(r"GLOBAL (\S+)", torch_message)
    if named:
        return named
    names: list[str] = []
    strings: list[str] = []
    try:
        with open(path, "rb") as handle:
            for opcode, argument, _ in pickletools.genops(handle):
                if opcode.name == "GLOBAL":
                    names.append(str(argument).replace(" ", "."))
                elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                    names.append(f"{strings[-2]}.{strings[-1]}")
                elif isinstance(argument, str):
                    strings.append(argument)
    except (ValueError, EOFError, pickle.UnpicklingError, UnicodeDecodeError):
        pass  # not (or no longer) a pickle: the globals seen so far are the answer
    return names


def _first_line(error: BaseException) -> str:
    """The first line of an error's text, without torch's advice to disable ``weights_only``."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else type(error).__name__
    if "weights_only" in text or "WeightsUnpickler" in text:
        return type(error).__name__
    return text[:200]


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict safely with :func:`load_weights` (a TorchScript file gives its module's state dict);
    Lightning/timm wrappers (``state_dict``, ``model``) and DDP's ``module.`` are removed."""
    path = Path(path)
    state = load_weights(path)
    if isinstance(state, torch.jit.ScriptModule):
        state = dict(state.state_dict())
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a state dict, got {type(state).__name__}")
    tensors = {str(k).removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path}: holds no tensors (keys {sorted(map(str, state))[:5]}), not a state dict")
    return tensors
