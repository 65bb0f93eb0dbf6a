"""The manifest: one CSV row per image, its schema, loading and validation.

Columns: ``path`` (relative to the manifest's folder, or absolute), ``patient_id``,
``label`` (0/1, optional for unlabelled data), ``organ`` (optional), ``sample_id``
(optional; defaults to ``path`` as written, so ids survive copying a manifest), and any
extra columns, which are kept. Validation collects *every* problem, each naming its CSV line
and file, instead of stopping at the first.
"""

from __future__ import annotations

import csv
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from tus.data.images import DataError, ImageReadError, content_hash, not_an_image_file, read_grayscale

LABEL_VALUES = (0, 1)
# Columns tus derives when loading; a manifest must not carry them itself.
DERIVED_COLUMNS = ("abs_path", "line")


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a manifest, located by CSV line (the header is line 1)."""

    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


class ManifestError(DataError):
    """A manifest failed validation; ``problems`` lists every finding.

    Its text is one line (the first few problems; ``tus data check`` lists all of them).
    """

    SHOWN = 3

    def __init__(self, manifest: str | Path, problems: list[Problem]):
        self.manifest = Path(manifest)
        self.problems = problems
        if len(problems) == 1 and problems[0].where == str(manifest):
            text = f"{manifest}: {problems[0].message}"
        else:
            shown = "; ".join(str(p) for p in problems[: self.SHOWN])
            more = f"; ... and {len(problems) - self.SHOWN} more (tus data check lists all)" if len(problems) > self.SHOWN else ""
            text = f"{manifest}: {len(problems)} problem(s): {shown}{more}"
        super().__init__(text)


def read_manifest(path: str | Path) -> pd.DataFrame:
    """Parse a manifest CSV into a frame with resolved ``abs_path``, ``sample_id``, ``line``.

    Only parsing happens here (no image is opened); use :func:`check_manifest` or
    :func:`load_manifest` to validate.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: manifest not found")
    if path.stat().st_size == 0:
        raise ManifestError(path, [Problem(str(path), "empty file (0 bytes); a manifest needs a header line with a 'path' column")])
    header = _header(path)
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError as error:
        raise ManifestError(path, [Problem(str(path), "no header line; a manifest needs one with a 'path' column")]) from error
    except (pd.errors.ParserError, UnicodeDecodeError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ManifestError(path, [Problem(str(path), f"not a readable CSV ({reason})")]) from error
    # pandas renames a repeated header ("label", "label.1") and the second copy would be ignored.
    frame.columns = header if len(header) == len(frame.columns) else [str(c).strip() for c in frame.columns]
    clashes = [c for c in DERIVED_COLUMNS if c in frame.columns]
    if clashes:
        raise ManifestError(path, [Problem(str(path), f"reserved column(s) {clashes} must not be in the CSV")])
    if "path" not in frame.columns:
        raise ManifestError(path, [Problem(str(path), f"missing required column 'path' (found {list(frame.columns)})")])
    root = path.resolve().parent
    frame["abs_path"] = [str(_resolve(root, p)) for p in frame["path"]]
    if "sample_id" not in frame.columns:
        frame["sample_id"] = frame["path"]
    frame["line"] = range(2, len(frame) + 2)
    return frame


def _header(path: Path) -> list[str]:
    """The manifest's column names as written (stripped); refuses a column named twice."""
    try:
        # utf-8-sig: Excel's "CSV UTF-8" starts with a byte-order mark, which is not part of the
        # first column's name (pandas drops it too).
        with open(path, newline="", encoding="utf-8-sig") as handle:
            header = [name.strip() for name in next(csv.reader(handle), [])]
    except (UnicodeDecodeError, csv.Error) as error:
        raise ManifestError(path, [Problem(str(path), f"not a readable UTF-8 CSV ({error})")]) from error
    repeated = [name for name, count in Counter(header).items() if count > 1]
    if repeated:
        columns = ", ".join(f"'{name}' ({Counter(header)[name]} times)" for name in repeated)
        raise ManifestError(path, [Problem(str(path), f"header line names column {columns}; each column must appear once")])
    return header


def _resolve(root: Path, relative_or_absolute: str) -> Path:
    candidate = Path(relative_or_absolute)
    return candidate if candidate.is_absolute() else root / candidate


def check_manifest(
    path: str | Path,
    *,
    require_labels: bool = True,
    require_patients: bool | None = None,
    num_folds: int | None = None,
    decode_images: bool = True,
) -> tuple[pd.DataFrame, list[Problem]]:
    """Validate a manifest and return (frame, problems); an empty list means it is good.

    ``require_patients`` defaults to ``require_labels``: grouped cross-validation needs
    patients, an unlabelled pretraining pool does not (each image is then its own group).
    Labels are converted to int (-1 where absent) and ``patient_id`` to str.
    """
    path = Path(path)
    frame = read_manifest(path)
    require_patients = require_labels if require_patients is None else require_patients
    problems: list[Problem] = []

    def where(row) -> str:
        return f"{path.name} line {row.line} ({row.path})"

    for column, needed in (("label", require_labels), ("patient_id", require_patients)):
        if needed and column not in frame.columns:
            problems.append(Problem(str(path), f"missing required column '{column}' (found {list(frame.columns[:-3])})"))
    if problems:
        return frame, problems
    if frame.empty:
        return frame, [Problem(str(path), "manifest has no rows")]

    frame["label"] = _parse_labels(frame, require_labels, where, problems)
    if "patient_id" in frame.columns:
        frame["patient_id"] = frame["patient_id"].str.strip()
        for row in frame[frame["patient_id"] == ""].itertuples():
            if require_patients:
                problems.append(Problem(where(row), "empty patient_id"))
    else:
        frame["patient_id"] = frame["sample_id"]
    frame.loc[frame["patient_id"] == "", "patient_id"] = frame["sample_id"]
    if "organ" in frame.columns:
        frame["organ"] = frame["organ"].str.strip()

    for sample_id, rows in frame.groupby("sample_id").groups.items():
        if len(rows) > 1:
            lines = ", ".join(str(frame.at[i, "line"]) for i in rows)
            problems.append(Problem(f"{path.name} lines {lines}", f"duplicate sample_id '{sample_id}'"))

    # Identical images under two patients leak across CV folds; in an unlabelled pool
    # (no patients required) a duplicate is harmless and not reported.
    problems.extend(_check_files(frame, decode_images, where, report_cross_patient_duplicates=require_patients))
    if num_folds is not None and require_labels and "label" in frame.columns:
        problems.extend(_check_class_sizes(path, frame, num_folds))
    return frame, problems


def _parse_labels(frame, require_labels, where, problems) -> list[int]:
    if "label" not in frame.columns:
        return [-1] * len(frame)
    labels = []
    for row in frame.itertuples():
        text = str(row.label).strip()
        if text == "":
            if require_labels:
                problems.append(Problem(where(row), "missing label"))
            labels.append(-1)
            continue
        try:
            value = float(text)
        except ValueError:
            value = None
        if value is None or not value.is_integer() or int(value) not in LABEL_VALUES:
            problems.append(Problem(where(row), f"label '{text}' is not one of {list(LABEL_VALUES)}"))
            labels.append(-1)
        else:
            labels.append(int(value))
    return labels


def _check_files(frame: pd.DataFrame, decode_images: bool, where, report_cross_patient_duplicates: bool) -> list[Problem]:
    problems = []
    patients_by_hash: dict[str, set[str]] = defaultdict(set)
    rows_by_hash: dict[str, list] = defaultdict(list)
    for row in frame.itertuples():
        file = Path(row.abs_path)
        if (problem := not_an_image_file(file)) is not None:
            problems.append(Problem(where(row), f"image {problem}: {file}" if problem.startswith("file not found") else f"{file} {problem}"))
            continue
        if decode_images:
            try:
                read_grayscale(file)
            except ImageReadError as error:
                problems.append(Problem(where(row), f"unreadable or corrupt image ({error})"))
                continue
        if not report_cross_patient_duplicates:
            continue
        digest = content_hash(file)
        patients_by_hash[digest].add(row.patient_id)
        rows_by_hash[digest].append(row)
    for digest, patients in patients_by_hash.items():
        if len(patients) > 1:
            rows = rows_by_hash[digest]
            lines = ", ".join(f"line {r.line} ({r.path}, patient {r.patient_id})" for r in rows)
            problems.append(
                Problem(
                    f"{len(rows)} identical images",
                    f"the same image content belongs to different patients, which leaks across folds: {lines}",
                )
            )
    return problems


def _check_class_sizes(path: Path, frame: pd.DataFrame, num_folds: int) -> list[Problem]:
    problems = []
    labelled = frame[frame["label"] >= 0]
    for label in LABEL_VALUES:
        patients = labelled.loc[labelled["label"] == label, "patient_id"].nunique()
        if patients < num_folds:
            problems.append(
                Problem(
                    str(path),
                    f"class {label} has {patients} patient(s), fewer than the {num_folds} folds: some test fold would have no sample of this class",
                )
            )
    return problems


def load_manifest(
    path: str | Path,
    *,
    require_labels: bool = True,
    require_patients: bool | None = None,
    num_folds: int | None = None,
    decode_images: bool = True,
) -> pd.DataFrame:
    """Validate and return the manifest frame; raise :class:`ManifestError` on any problem."""
    frame, problems = check_manifest(
        path,
        require_labels=require_labels,
        require_patients=require_patients,
        num_folds=num_folds,
        decode_images=decode_images,
    )
    if problems:
        raise ManifestError(path, problems)
    return frame.reset_index(drop=True)


def write_manifest(frame: pd.DataFrame, path: str | Path) -> Path:
    """Write a derived manifest to a new file with absolute paths and explicit sample ids.

    Refuses to overwrite: derived manifests always go to new locations so an original is
    never replaced.
    """
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path}: exists; tus never overwrites a manifest")
    out = frame.drop(columns=[c for c in DERIVED_COLUMNS if c in frame.columns])
    if "abs_path" in frame.columns:
        out["path"] = frame["abs_path"]
    path.parent.mkdir(parents=True, exist_ok=True)
    out.to_csv(path, index=False)
    return path


def summarize(frame: pd.DataFrame) -> str:
    """A short human summary: images, patients, classes, organs and image sizes."""
    lines = [f"images: {len(frame)}", f"patients: {frame['patient_id'].nunique()}"]
    if "label" in frame.columns and (frame["label"] >= 0).any():
        counts = frame["label"].value_counts().sort_index()
        lines.append("labels: " + ", ".join(f"{int(k)}: {int(v)} ({v / len(frame):.1%})" for k, v in counts.items()))
    if "organ" in frame.columns:
        counts = frame["organ"].replace("", "(none)").value_counts()
        lines.append("organs: " + ", ".join(f"{k}: {v}" for k, v in counts.items()))
    return "\n".join(lines)
