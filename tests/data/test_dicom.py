"""DICOM input: pixel conventions against hand-computed values, cine loops as frame rows that never
cross folds, refusals by name (no pixel data, no decoder), and patient names kept out of outputs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tus.data.folds import assign_folds
from tus.data.images import ImageReadError, read_grayscale, write_dicom
from tus.data.manifest import ManifestError, check_manifest, load_manifest

pytest.importorskip("pydicom")


def _write_manifest(folder, rows):
    path = folder / "manifest.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_monochrome1_is_inverted_and_8bit_values_are_kept(tmp_path):
    pixels = np.array([[0, 10, 200], [255, 128, 1]], dtype=np.uint8)
    write_dicom(tmp_path / "m2.dcm", pixels, patient_id="p")
    write_dicom(tmp_path / "m1.dcm", pixels, patient_id="p", photometric="MONOCHROME1")
    assert read_grayscale(tmp_path / "m2.dcm").tolist() == [[0, 10, 200], [255, 128, 1]]
    # MONOCHROME1: the minimum is white, so grey = 255 - value.
    assert read_grayscale(tmp_path / "m1.dcm").tolist() == [[255, 245, 55], [0, 127, 254]]


def test_voi_window_matches_the_standards_linear_function(tmp_path):
    values = np.array([[0, 19999, 20000, 21000], [30000, 39999, 40000, 65535]], dtype=np.uint16)
    write_dicom(tmp_path / "w.dcm", values, patient_id="p", window=(30000, 20001))
    # PS3.3 C.11.2.1.2.1 by hand: c' = 29999.5, w' = 20000; x <= c' - w'/2 = 19999.5 -> 0,
    # x > c' + w'/2 = 39999.5 -> 255, else ((x - c') / w' + 0.5) * 255 (output range 0..65535 -> 0..255).
    expected = [[0, 0, round((20000 - 19999.5) / 20000 * 255), round((21000 - 19999.5) / 20000 * 255)], [round((30000 - 19999.5) / 20000 * 255), 255, 255, 255]]
    assert expected == [[0, 0, 0, 13], [128, 255, 255, 255]]
    assert read_grayscale(tmp_path / "w.dcm").tolist() == expected


def test_rgb_dicom_gets_the_luma_of_an_rgb_png(tmp_path):
    rgb = np.zeros((2, 2, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, 100, 50
    write_dicom(tmp_path / "rgb.dcm", rgb, patient_id="p", photometric="RGB")
    # ITU-R 601: 0.299 R + 0.587 G + 0.114 B = 59.8 + 58.7 + 5.7 = 124.2
    assert (read_grayscale(tmp_path / "rgb.dcm") == 124).all()
    from pydicom.pixels import convert_color_space

    # The same colour stored as YBR_FULL is converted back to RGB first (rounding: +-1 level).
    write_dicom(tmp_path / "ybr.dcm", convert_color_space(rgb, "RGB", "YBR_FULL"), patient_id="p", photometric="YBR_FULL")
    assert np.abs(read_grayscale(tmp_path / "ybr.dcm").astype(int) - 124).max() <= 1


def test_cine_loop_expands_to_frame_rows_with_one_patient_in_one_fold(tmp_path):
    loop = np.stack([np.full((8, 8), 10 * k, np.uint8) for k in range(5)])
    write_dicom(tmp_path / "loop.dcm", loop, patient_id="x", patient_name="Doe^Jane")
    rows = [{"path": "loop.dcm", "patient_id": "pA", "label": 1}]
    for i in range(8):
        image = np.full((8, 8), i, np.uint8)
        write_dicom(tmp_path / f"s{i}.dcm", image, patient_id="x")
        rows.append({"path": f"s{i}.dcm", "patient_id": f"p{i}", "label": i % 2})
    manifest = _write_manifest(tmp_path, rows)
    frame = load_manifest(manifest, dicom_frames="all")
    loop_rows = frame[frame["patient_id"] == "pA"]
    assert loop_rows["sample_id"].tolist() == [f"loop.dcm#frame{k}" for k in range(5)]
    assert [int(read_grayscale(p)[0, 0]) for p in loop_rows["abs_path"]] == [0, 10, 20, 30, 40]
    assert len(frame) == 13
    for seed in range(5):
        folds = assign_folds(frame, 3, seed)
        assert len(set(folds[frame["patient_id"].to_numpy() == "pA"])) == 1
    middle = load_manifest(manifest)  # default: the middle frame, the row's own sample_id
    row = middle[middle["patient_id"] == "pA"].iloc[0]
    assert row["sample_id"] == "loop.dcm" and int(read_grayscale(row["abs_path"])[0, 0]) == 20
    first = load_manifest(manifest, dicom_frames=4)
    assert int(read_grayscale(first[first["patient_id"] == "pA"].iloc[0]["abs_path"])[0, 0]) == 40
    with pytest.raises(ManifestError, match=r"line 2 \(loop.dcm\): data.dicom_frames 7 but the DICOM has 5 frame"):
        load_manifest(manifest, dicom_frames=7)


def test_from_dicom_reads_patient_id_and_body_part(tmp_path):
    write_dicom(tmp_path / "a.dcm", np.zeros((4, 4), np.uint8), patient_id="ID-7", body_part="THYROID")
    write_dicom(tmp_path / "b.dcm", np.zeros((4, 4), np.uint8), patient_id="")
    manifest = _write_manifest(tmp_path, [{"path": "a.dcm", "patient_id": "from_dicom", "organ": "from_dicom"}, {"path": "b.dcm", "patient_id": "from_dicom", "organ": ""}])
    frame, problems = check_manifest(manifest, require_labels=False)
    assert frame.loc[0, "patient_id"] == "ID-7" and frame.loc[0, "organ"] == "THYROID"
    assert [str(p) for p in problems] == ["manifest.csv line 3 (b.dcm): patient_id 'from_dicom' but the DICOM has no PatientID"]


def test_no_pixel_data_and_missing_decoder_are_named_with_their_row(tmp_path, monkeypatch):
    import pydicom
    from pydicom.pixels.decoders.base import Decoder
    from pydicom.uid import RLELossless

    write_dicom(tmp_path / "ok.dcm", np.zeros((4, 4), np.uint8), patient_id="p")
    report = pydicom.dcmread(tmp_path / "ok.dcm")
    del report.PixelData
    report.save_as(tmp_path / "report.dcm", enforce_file_format=True)
    rle = pydicom.dcmread(tmp_path / "ok.dcm")
    rle.compress(RLELossless)
    rle.save_as(tmp_path / "rle.dcm", enforce_file_format=True)
    assert read_grayscale(tmp_path / "rle.dcm").shape == (4, 4)
    # The decoder "uninstalled": every decoder reports itself unavailable.
    monkeypatch.setattr(Decoder, "is_available", property(lambda self: False))
    with pytest.raises(ImageReadError, match=r"rle.dcm: DICOM compressed as RLE Lossless .* but no decoder for it is installed"):
        read_grayscale(tmp_path / "rle.dcm")
    rows = [{"path": name, "patient_id": name, "label": 0} for name in ("ok.dcm", "report.dcm", "rle.dcm")]
    _, problems = check_manifest(_write_manifest(tmp_path, rows), require_labels=False)
    text = [str(p) for p in problems]
    assert len(text) == 2
    assert text[0].startswith("manifest.csv line 3 (report.dcm): report.dcm: DICOM without pixel data")
    assert text[1].startswith("manifest.csv line 4 (rle.dcm): rle.dcm: DICOM compressed as RLE Lossless")


def test_nothing_is_written_into_a_dicom(tmp_path):
    write_dicom(tmp_path / "a.dcm", np.zeros((4, 4), np.uint8), patient_id="p")
    with pytest.raises(FileExistsError, match="never writes into a DICOM"):
        write_dicom(tmp_path / "a.dcm", np.zeros((4, 4), np.uint8), patient_id="p")


def test_dicom_phantom_cv_keeps_patient_names_out_of_every_output(tmp_path):
    """A tiny CV on the DICOM phantom with every cine frame as a row: loops stay in one fold, ids
    come from PatientID (asked with from_dicom), and the PatientName is in no file written."""
    from tests.stages.test_finetune_cv import tiny_config
    from tus.data.phantom import PHANTOM_PATIENT_NAME, generate_phantom
    from tus.stages.finetune_cv import run_cv

    paths = generate_phantom(tmp_path / "phantom", num_patients=10, images_per_patient=(2, 3), image_size=32, positive_fraction=0.4, pool_size=0, dicom=True)
    written = pd.read_csv(paths.labeled_manifest)
    cine = written[written["path"].str.endswith("_cine.dcm")]
    assert len(cine) == 2 and (written["patient_id"] == "from_dicom").all()
    config = tiny_config(paths.labeled_manifest, tmp_path / "runs", "data.dicom_frames=all", "trainer.max_epochs=1", f"data.cache_dir={tmp_path / 'cache'}", "data.num_folds=2", "data.num_workers=0")
    run_dir = run_cv(config)
    folds = pd.read_csv(run_dir / "folds.csv", dtype=str)
    frames = folds[folds["sample_id"].str.contains("_cine.dcm#frame")]
    assert len(frames) >= 4  # two loops of 2-3 frames, one row each
    assert frames.groupby("patient_id")["fold"].nunique().eq(1).all()
    assert set(folds["patient_id"]) == {f"P{p:04d}" for p in range(10)}
    name_parts = [part.encode() for part in PHANTOM_PATIENT_NAME.split("^")]
    leaked = [str(f) for root in (run_dir, tmp_path / "cache") for f in root.rglob("*") if f.is_file() and any(part.lower() in f.read_bytes().lower() for part in name_parts)]
    assert leaked == []
    # The search does find the name where it is: in the DICOMs themselves (inputs, never written to).
    assert all(name_parts[0] in f.read_bytes() for f in (tmp_path / "phantom").rglob("*.dcm"))


def _jpeg(image: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def test_data_check_reports_frames_of_unequal_size_with_the_row(tmp_path, capsys):
    from pydicom import dcmread
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit

    from tus.cli.data import main

    write_dicom(tmp_path / "loop.dcm", np.zeros((3, 16, 16), np.uint8), patient_id="p")
    loop = dcmread(tmp_path / "loop.dcm")
    # Frame 1 is stored 24x16 although the header says 16x16 (a broken export).
    loop.PixelData = encapsulate([_jpeg(np.zeros((16, 16), np.uint8)), _jpeg(np.zeros((16, 24), np.uint8)), _jpeg(np.zeros((16, 16), np.uint8))])
    loop.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    loop["PixelData"].VR = "OB"
    loop.save_as(tmp_path / "broken.dcm", enforce_file_format=True)
    manifest = _write_manifest(tmp_path, [{"path": "broken.dcm", "patient_id": "a"}])
    assert main(["check", str(manifest), "--unlabeled"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "manifest.csv line 2 (broken.dcm#frame1): broken.dcm: frames of unequal size: the header says 16x16 (WxH) but frame 1: 24x16"


def test_crop_uses_the_dicom_ultrasound_regions_on_each_frame(tmp_path):
    from tus.data.crop import crop_manifest

    loop = np.zeros((2, 20, 30), np.uint8)
    loop[0, 5:15, 10:25] = 100
    loop[1, 5:15, 10:25] = 150
    # Regions' MaxX1/MaxY1 are inclusive: rows 5..14, columns 10..24 -> box (10, 5, 25, 15).
    write_dicom(tmp_path / "loop.dcm", loop, patient_id="p", regions=[(10, 5, 24, 14)])
    manifest = _write_manifest(tmp_path, [{"path": "loop.dcm", "patient_id": "from_dicom", "label": 1}])
    out = crop_manifest(manifest, tmp_path / "crops", dicom_frames="all")
    crops = pd.read_csv(out)
    assert crops["box"].tolist() == ["10,5,25,15", "10,5,25,15"]
    assert crops["sample_id"].tolist() == ["loop.dcm#frame0#view0", "loop.dcm#frame1#view0"]
    assert crops["patient_id"].tolist() == ["p", "p"]
    assert [int(read_grayscale(tmp_path / "crops" / p).mean()) for p in crops["path"]] == [100, 150]
    assert load_manifest(out)["label"].tolist() == [1, 1]


def test_dicom_frames_option_is_checked_where_it_is_given():
    from tus.config import ConfigError
    from tus.data.configs import ImageSourceConfig, LabeledDataConfig

    assert LabeledDataConfig().dicom_frames == "middle" and LabeledDataConfig(dicom_frames=" ALL ").dicom_frames == "all"
    assert LabeledDataConfig(dicom_frames=3).dicom_frames == "3"  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"^data.dicom_frames must be one of \['all', 'first', 'middle'\] or a frame index >= 0, got 'last'$"):
        LabeledDataConfig(dicom_frames="last")
    with pytest.raises(ConfigError, match="^dicom_frames must be"):
        ImageSourceConfig(manifest="m.csv", dicom_frames="-1")
