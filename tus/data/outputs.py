"""The output of a data command (``crop``, ``filter``, ``metrics``, ``noisy-labels``): claimed
before any work is done.

:func:`claim_output` refuses an ``--out`` folder that exists and is not empty (or a file that is
a folder, a device or a FIFO), creates its parent, and takes a lock beside it
(``.<name>.lock``, :mod:`filelock`), so that everything a mistake in ``--out`` can cost is
found before features are computed or images cropped: a read-only or full file system, a path
under ``/proc``, a second tus process writing the same ``--out`` (it is refused in one line
instead of failing at its final rename). The lock is released (and its file removed) when the
command ends; a killed process's lock is released by the operating system.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from tus.config import STORAGE_ERRNOS, StorageError
from tus.data.images import OutputExistsError, UsageError


def check_output_folder(path: Path, option: str) -> None:
    """Refuse an output folder that exists and is not an empty folder."""
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        what = "is not a folder" if not path.is_dir() else "output folder exists and is not empty"
        raise OutputExistsError(f"{option} {path}: {what}; refusing to overwrite (outputs go to a new folder)")


def check_output_file(path: Path, option: str) -> None:
    """Refuse an output file that is a folder, a device, a FIFO or a socket."""
    if path.is_dir():
        raise UsageError(f"{option} {path}: is a folder; give a file name")
    if path.exists() and not path.is_file():
        raise UsageError(f"{option} {path}: is not a regular file (a device, FIFO or socket); give a file name")


def cannot_write(option: str, path: Path, error: OSError) -> StorageError:
    reason = STORAGE_ERRNOS.get(error.errno or 0) or (os.strerror(error.errno) if error.errno else str(error))
    hint = " (a virtual file system such as /proc or /sys)" if error.errno in (errno.ENOENT, errno.EACCES) and str(path.resolve()).startswith(("/proc/", "/sys/")) else ""
    return StorageError(f"{option} {path}: cannot write there: {reason.lower()}{hint}")


@contextmanager
def claim_output(path: str | Path, option: str = "--out", *, folder: bool = True) -> Iterator[Path]:
    """Check and lock the output ``path`` (a new folder, or with ``folder=False`` a file) for
    the duration of the block; one-line errors name ``option``."""
    path = Path(path)
    if folder:
        check_output_folder(path, option)
    else:
        check_output_file(path, option)
    parent = path.absolute().parent
    lock_path = parent / f".{path.name}.lock"
    try:
        parent.mkdir(parents=True, exist_ok=True)
        with open(lock_path, "a"):  # can a file be made here at all? (filelock would only time out)
            pass
        lock = FileLock(lock_path, timeout=0)
        lock.acquire()
    except Timeout:
        raise UsageError(f"{option} {path}: another tus process is writing there; wait for it or choose another {option}") from None
    except OSError as error:
        raise cannot_write(option, path, error) from error
    try:
        if folder:  # the writer that held the lock before may have finished meanwhile
            check_output_folder(path, option)
        yield path
    except OSError as error:
        if error.errno in STORAGE_ERRNOS:  # a full disk while writing: one line naming the option
            raise cannot_write(option, path, error) from error
        raise
    finally:
        lock.release()
        lock_path.unlink(missing_ok=True)


@contextmanager
def staged_folder(out_dir: str | Path) -> Iterator[Path]:
    """A hidden sibling folder to write ``out_dir``'s contents into; renamed to ``out_dir`` (new or
    empty) when the block succeeds, removed when it fails, so a failure leaves no half-written
    output on the same file system."""
    out_dir = Path(out_dir)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.absolute().parent))
    try:
        yield staging
        if out_dir.exists():
            out_dir.rmdir()
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
