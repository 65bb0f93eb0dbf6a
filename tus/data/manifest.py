"""The manifest: one CSV row per image, its schema, loading and validation.

Columns: ``path`` (relative to the manifest's folder, or absolute), ``patient_id``,
``label`` (0/1, optional for unlabelled data; with ``label_names`` any of K >= 2 classes, written
as the index 0..K-1 or the class's name; names without ``label_names`` are inferred, sorted),
``organ`` (optional), ``sample_id``
(optional; defaults to ``path`` as written, so ids survive copying a manifest), and any
extra columns, which are kept. Validation collects *every* problem, each naming its CSV line
and file, instead of stopping at the first.

DICOM rows (see :mod:`tus.data.images`): a multi-frame DICOM (a cine loop) becomes rows when
the manifest is loaded, by ``dicom_frames`` (``data.dicom_frames``): ``middle`` (the default:
one row, frame F // 2, usually the settled probe position rather than the moment it lands),
``first``, an index ``k`` (from 0), or ``all`` (one row per frame, ``sample_id`` and ``path``
``<as written>#frame<k>``; every frame keeps the row's patient, so folds, which are assigned by
patient, never split a loop). A ``path`` may also name one frame itself (``loop.dcm#frame3``).
A ``patient_id`` or ``organ`` cell reading ``from_dicom`` takes the file's PatientID or
BodyPartExamined; a missing column or an empty cell stays as for any image (tus never reads a
DICOM's identifiers unasked). No other header element is read, so patient names never reach an
output.
"""

from __future__ import annotations

import csv
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from tus.data.configs import check_dicom_frames
from tus.data.images import (
    DataError,
    ImageReadError,
    content_hash,
    dicom_frame_count,
    dicom_pixel_problem,
    frame_reference,
    is_dicom,
    not_an_image_file,
    read_dicom_header,
    read_grayscale,
    split_frame,
)

LABEL_VALUES = (0, 1)
# The frame attribute (DataFrame.attrs) that holds the class names when labels were names or
# ``label_names`` was given; absent for a plain 0/1 manifest.
LABEL_NAMES_ATTR = "label_names"
# Columns tus derives when loading; a manifest must not carry them itself.
DERIVED_COLUMNS = ("abs_path", "line")
# A patient_id / organ cell with this value is read from the DICOM's PatientID / BodyPartExamined.
FROM_DICOM = "from_dicom"
FROM_DICOM_TAGS = {"patient_id": "PatientID", "organ": "BodyPartExamined"}


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
    dicom_frames: str | int = "middle",
    label_names: list[str] | tuple[str, ...] | None = None,
) -> tuple[pd.DataFrame, list[Problem]]:
    """Validate a manifest and return (frame, problems); an empty list means it is good.

    ``require_patients`` defaults to ``require_labels``: grouped cross-validation needs
    patients, an unlabelled pretraining pool does not (each image is then its own group).
    Labels are converted to int (-1 where absent) and ``patient_id`` to str. Multi-frame DICOMs
    are expanded or reduced to frames by ``dicom_frames`` (see the module's docstring).
    ``label_names`` (``data.label_names``): the K class names, index = label; labels may then be
    indices 0..K-1 or these names. Without it labels are 0/1, or names (classes inferred, sorted).
    The class names, when there are any, are in ``frame.attrs[LABEL_NAMES_ATTR]``.
    """
    path = Path(path)
    dicom_frames = check_dicom_frames(dicom_frames)
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

    frame = expand_dicom_rows(frame, dicom_frames, where, problems)
    labels, names = _parse_labels(frame, require_labels, where, problems, label_names)
    frame["label"] = labels
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
        problems.extend(_check_class_sizes(path, frame, num_folds, names))
    if names:
        frame.attrs[LABEL_NAMES_ATTR] = list(names)
    return frame, problems


def chosen_frames(count: int, dicom_frames: str) -> list[int]:
    """The frame indices ``dicom_frames`` (all, first, middle or an index) picks of a ``count``-frame
    cine loop; an index may be out of range (the caller says so with its context)."""
    if dicom_frames == "all":
        return list(range(count))
    return [0 if dicom_frames == "first" else count // 2 if dicom_frames == "middle" else int(dicom_frames)]


def expand_dicom_rows(frame: pd.DataFrame, dicom_frames: str, where, problems: list[Problem]) -> pd.DataFrame:
    """Rows with ``from_dicom`` cells filled and multi-frame DICOMs turned into frame rows (a
    frame parsed by :func:`read_manifest`); what is wrong is appended to ``problems``."""
    dicom_frames = check_dicom_frames(dicom_frames)
    asks = {column: frame[column].str.strip().str.lower() == FROM_DICOM for column in FROM_DICOM_TAGS if column in frame.columns}
    rows = []
    for index, row in enumerate(frame.itertuples(index=False)):
        record = row._asdict()
        file, named_frame = split_frame(record["abs_path"])
        asked = [column for column, mask in asks.items() if mask.iloc[index]]
        if not_an_image_file(file) is not None or not is_dicom(file):
            for column in asked:
                problems.append(Problem(where(row), f"{column} '{FROM_DICOM}' but {file.name} is not a DICOM file"))
                record[column] = ""
            rows.append(record)
            continue
        try:
            header = read_dicom_header(file)
        except ImageReadError as error:
            problems.append(Problem(where(row), f"unreadable DICOM ({error})"))
            rows.append(record)
            continue
        for column in asked:
            value = str(header.get(FROM_DICOM_TAGS[column], "") or "").strip()
            if not value:
                problems.append(Problem(where(row), f"{column} '{FROM_DICOM}' but the DICOM has no {FROM_DICOM_TAGS[column]}"))
            record[column] = value
        count = dicom_frame_count(header)
        if named_frame is not None or count == 1:
            rows.append(record)
            continue
        chosen = chosen_frames(count, dicom_frames)
        if chosen[-1] >= count:
            problems.append(Problem(where(row), f"data.dicom_frames {dicom_frames} but the DICOM has {count} frame(s) (0..{count - 1})"))
            rows.append(record)
            continue
        for k in chosen:
            # One chosen frame keeps the row's ids; all frames get one id each, the patient shared.
            rows.append(
                {
                    **record,
                    "abs_path": frame_reference(record["abs_path"], k),
                    "path": frame_reference(record["path"], k),
                    "sample_id": frame_reference(record["sample_id"], k) if dicom_frames == "all" else record["sample_id"],
                }
            )
    return pd.DataFrame(rows, columns=frame.columns)


def _parse_labels(frame, require_labels, where, problems, label_names=None) -> tuple[list[int], list[str] | None]:
    """The labels as class indices (-1 where absent or bad) and the class names (None for 0/1 labels)."""
    if "label" not in frame.columns:
        return [-1] * len(frame), list(label_names) if label_names else None
    texts = [str(text).strip() for text in frame["label"]]
    names = list(label_names) if label_names else None
    if names is None:
        # Only names in the column (at least two) and no data.label_names: the classes are the
        # names found, sorted. Numbers and names mixed stay 0/1 labels (the names are reported).
        given = {text for text in texts if text}
        found = sorted(text for text in given if _as_integer(text) is None)
        names = found if len(found) >= 2 and len(found) == len(given) else None
    labels = []
    for row, text in zip(frame.itertuples(), texts):
        if text == "":
            if require_labels:
                problems.append(Problem(where(row), "missing label"))
            labels.append(-1)
            continue
        value = _as_integer(text)
        if names is None:
            if value is None or value not in LABEL_VALUES:
                problems.append(Problem(where(row), f"label '{text}' is not one of {list(LABEL_VALUES)} (set data.label_names for more classes)"))
                value = -1
        elif value is None:
            if text not in names:
                problems.append(Problem(where(row), f"label '{text}' is not one of the classes {names}"))
            value = names.index(text) if text in names else -1
        elif not 0 <= value < len(names):
            problems.append(Problem(where(row), f"label '{text}' is not 0..{len(names) - 1} or one of {names}"))
            value = -1
        labels.append(value)
    return labels, names


def _as_integer(text: str) -> int | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return int(value) if value.is_integer() else None


def _check_files(frame: pd.DataFrame, decode_images: bool, where, report_cross_patient_duplicates: bool) -> list[Problem]:
    problems = []
    patients_by_hash: dict[str, set[str]] = defaultdict(set)
    rows_by_hash: dict[str, list] = defaultdict(list)
    checked_dicoms: set[Path] = set()
    for row in frame.itertuples():
        file, _ = split_frame(row.abs_path)
        if (problem := not_an_image_file(file)) is not None:
            problems.append(Problem(where(row), f"image {problem}: {file}" if problem.startswith("file not found") else f"{file} {problem}"))
            continue
        if decode_images and file not in checked_dicoms and is_dicom(file):
            checked_dicoms.add(file)
            dicom_problems = _check_dicom_file(file)
            problems.extend(Problem(where(row), message) for message in dicom_problems)
            if dicom_problems:
                continue
        if decode_images:
            try:
                read_grayscale(row.abs_path)
            except ImageReadError as error:
                problems.append(Problem(where(row), f"unreadable or corrupt image ({error})"))
                continue
        if not report_cross_patient_duplicates:
            continue
        digest = content_hash(row.abs_path)
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


def _check_dicom_file(file: Path) -> list[str]:
    """A DICOM's problems before decoding: no pixel data, no decoder for its compression, frames
    whose stored size differs from the header's Rows x Columns (or a truncated pixel stream)."""
    try:
        header = read_dicom_header(file)
        if (problem := dicom_pixel_problem(file, header)) is not None:
            return [f"{file.name}: {problem}"]
    except ImageReadError as error:
        return [f"unreadable DICOM ({error})"]
    sizes = _dicom_frame_sizes(file, header)
    expected = (int(header.get("Columns", 0)), int(header.get("Rows", 0)))
    unequal = {k: size for k, size in enumerate(sizes) if size is not None and size != expected}
    if unequal:
        shown = ", ".join(f"frame {k}: {w}x{h}" for k, (w, h) in list(unequal.items())[:5])
        return [f"{file.name}: frames of unequal size: the header says {expected[0]}x{expected[1]} (WxH) but {shown}{' ...' if len(unequal) > 5 else ''}"]
    return []


def _dicom_frame_sizes(file: Path, header) -> list[tuple[int, int] | None]:
    """Each frame's stored (width, height): from each compressed frame's own codestream header
    (None where PIL cannot read it, e.g. JPEG-LS); an uncompressed stream of the wrong length is
    reported as a frame of size (0, 0)."""
    import io

    import pydicom
    from PIL import Image

    dataset = pydicom.dcmread(file, force=True)
    frames = dicom_frame_count(header)
    syntax = dataset.file_meta.get("TransferSyntaxUID") if hasattr(dataset, "file_meta") else None
    if syntax is None or not syntax.is_encapsulated:
        rows, columns = int(dataset.get("Rows", 0)), int(dataset.get("Columns", 0))
        samples, bits = int(dataset.get("SamplesPerPixel", 1)), int(dataset.get("BitsAllocated", 8))
        expected = rows * columns * samples * frames * bits // 8
        found = len(dataset.get("PixelData", b"") or b"")
        # Uncompressed frames all have the header's size; only a short stream makes some of them wrong.
        return [] if found >= expected else [(0, 0)] * frames
    sizes: list[tuple[int, int] | None] = []
    for data in pydicom.encaps.generate_frames(dataset.PixelData, number_of_frames=frames):
        try:
            with Image.open(io.BytesIO(data)) as image:
                sizes.append(image.size)
        except Exception:  # a codec PIL cannot parse (JPEG-LS, RLE): the decoder checks it later
            sizes.append(None)
    return sizes


def _check_class_sizes(path: Path, frame: pd.DataFrame, num_folds: int, names: list[str] | None = None) -> list[Problem]:
    problems = []
    labelled = frame[frame["label"] >= 0]
    for label in range(len(names) if names else len(LABEL_VALUES)):
        patients = labelled.loc[labelled["label"] == label, "patient_id"].nunique()
        if patients < num_folds:
            problems.append(
                Problem(
                    str(path),
                    f"class {label}{f' ({names[label]})' if names else ''} has {patients} patient(s), fewer than the {num_folds} folds: some test fold would have no sample of this class",
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
    dicom_frames: str | int = "middle",
    label_names: list[str] | tuple[str, ...] | None = None,
) -> pd.DataFrame:
    """Validate and return the manifest frame; raise :class:`ManifestError` on any problem."""
    frame, problems = check_manifest(
        path,
        require_labels=require_labels,
        require_patients=require_patients,
        num_folds=num_folds,
        decode_images=decode_images,
        dicom_frames=dicom_frames,
        label_names=label_names,
    )
    if problems:
        raise ManifestError(path, problems)
    names = frame.attrs.get(LABEL_NAMES_ATTR)
    frame = frame.reset_index(drop=True)
    if names:
        frame.attrs[LABEL_NAMES_ATTR] = names
    return frame


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
        names = frame.attrs.get(LABEL_NAMES_ATTR)
        lines.append("labels: " + ", ".join(f"{int(k)}{f' ({names[int(k)]})' if names and k >= 0 else ''}: {int(v)} ({v / len(frame):.1%})" for k, v in counts.items()))
    if "organ" in frame.columns:
        counts = frame["organ"].replace("", "(none)").value_counts()
        lines.append("organs: " + ", ".join(f"{k}: {v}" for k, v in counts.items()))
    return "\n".join(lines)
