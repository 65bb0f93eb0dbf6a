import cv2
import numpy as np
import pandas as pd
import pytest

from tus.data.crop import crop_manifest, detect_fields_of_view
from tus.data.images import OutputExistsError, content_hash, read_grayscale, write_grayscale

DUAL_VIEW_BOXES = [(24, 44, 254, 276), (272, 40, 500, 280)]


def speckle(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Log-compressed Rayleigh speckle: dark holes and bright grains like a real B-mode view."""
    envelope = np.hypot(rng.standard_normal((height, width)), rng.standard_normal((height, width)))
    return np.clip(100 + 25 * np.log(envelope + 1e-6), 0, 255).astype(np.uint8)


def screenshot(seed: int, boxes=DUAL_VIEW_BOXES, shape=(300, 520)) -> np.ndarray:
    """A scanner screenshot: views on black, a header text line, a ruler and a bottom bar."""
    rng = np.random.default_rng(seed)
    image = np.zeros(shape, np.uint8)
    for x0, y0, x1, y1 in boxes:
        image[y0:y1, x0:x1] = speckle(rng, y1 - y0, x1 - x0)
    cv2.putText(image, "TESTICOLO DX 12.3 cm  ESAOTE", (10, 28), cv2.FONT_HERSHEY_SIMPLEX, 0.8, 255, 2)
    cv2.rectangle(image, (shape[1] - 12, 40), (shape[1] - 8, 280), 230, -1)
    for y in range(40, 281, 20):
        cv2.line(image, (shape[1] - 18, y), (shape[1] - 8, y), 230, 1)
    cv2.line(image, (0, shape[0] - 6), (shape[1] - 1, shape[0] - 6), 200, 3)
    cv2.putText(image, "+ 1.85cm", (shape[1] // 2 - 40, shape[0] - 12), cv2.FONT_HERSHEY_PLAIN, 1.0, 255, 1)
    return image


def assert_boxes_close(found, expected, tolerance=3):
    assert len(found) == len(expected), found
    for box, truth in zip(found, expected):
        assert max(abs(a - b) for a, b in zip(box, truth)) <= tolerance, (box, truth)


def test_dual_view_screenshot_gives_two_boxes_left_to_right():
    assert_boxes_close(detect_fields_of_view(screenshot(0)), DUAL_VIEW_BOXES)


def test_single_view_gives_one_box_and_text_alone_gives_none():
    single = screenshot(1, boxes=[(60, 50, 420, 270)])
    assert_boxes_close(detect_fields_of_view(single), [(60, 50, 420, 270)])
    text_only = screenshot(2, boxes=[])
    assert detect_fields_of_view(text_only) == []


def test_detection_options_margin_max_views_and_threshold():
    image = screenshot(3)
    with_margin = detect_fields_of_view(image, margin=30)
    # Grown by 30 px on every side, then clipped to the 520x300 image.
    assert_boxes_close(with_margin, [(0, 14, 284, 300), (242, 10, 520, 300)])
    assert with_margin[1][2] == 520
    only_largest = detect_fields_of_view(image, max_views=1)
    assert_boxes_close(only_largest, [DUAL_VIEW_BOXES[1]])
    assert detect_fields_of_view(image, threshold=254) == []
    assert detect_fields_of_view(image, min_area_fraction=0.5) == []


def test_detection_rejects_color_images():
    with pytest.raises(ValueError, match="uint8"):
        detect_fields_of_view(np.zeros((10, 10, 3), np.uint8))


@pytest.fixture
def source_dataset(tmp_path):
    folder = tmp_path / "source"
    rows = []
    for index in range(5):
        path = f"images/shot_{index}.png"
        write_grayscale(folder / path, screenshot(10 + index))
        rows.append({"path": path, "patient_id": f"P{index // 2}", "label": index % 2, "site": "modena"})
    pd.DataFrame(rows).to_csv(folder / "manifest.csv", index=False)
    return folder


def folder_hashes(folder):
    return {str(path.relative_to(folder)): content_hash(path) for path in sorted(folder.rglob("*")) if path.is_file()}


def test_crop_manifest_writes_one_row_per_view_inheriting_the_source(source_dataset, tmp_path):
    before = folder_hashes(source_dataset)
    manifest = crop_manifest(source_dataset / "manifest.csv", tmp_path / "cropped", preview_count=4)
    assert folder_hashes(source_dataset) == before
    assert manifest == tmp_path / "cropped" / "manifest.csv"
    crops = pd.read_csv(manifest)
    assert len(crops) == 10
    assert list(crops.columns) == ["path", "patient_id", "label", "site", "source_path", "view_index", "box", "sample_id"]
    assert crops["sample_id"].is_unique
    assert crops["sample_id"].iloc[0] == "images/shot_0.png#view0"
    assert crops["sample_id"].iloc[1] == "images/shot_0.png#view1"
    assert crops["view_index"].tolist() == [0, 1] * 5
    assert crops["label"].tolist() == [index % 2 for index in range(5) for _ in range(2)]
    assert crops["patient_id"].tolist() == [f"P{index // 2}" for index in range(5) for _ in range(2)]
    assert (crops["site"] == "modena").all()
    for row in crops.itertuples():
        x0, y0, x1, y1 = (int(value) for value in row.box.split(","))
        assert max(abs(a - b) for a, b in zip((x0, y0, x1, y1), DUAL_VIEW_BOXES[row.view_index])) <= 3
        crop = read_grayscale(manifest.parent / row.path)
        source = read_grayscale(manifest.parent / row.source_path)
        np.testing.assert_array_equal(crop, source[y0:y1, x0:x1])
    preview = read_grayscale(tmp_path / "cropped" / "preview.png")
    assert preview.shape == (512, 512)
    assert preview.max() > 0


def test_crop_manifest_keeps_existing_sample_ids_and_accepts_an_empty_out_dir(source_dataset, tmp_path):
    frame = pd.read_csv(source_dataset / "manifest.csv")
    frame["sample_id"] = [f"scan-{index}" for index in range(len(frame))]
    frame.to_csv(source_dataset / "with_ids.csv", index=False)
    (tmp_path / "empty").mkdir()
    crops = pd.read_csv(crop_manifest(source_dataset / "with_ids.csv", tmp_path / "empty"))
    assert crops["sample_id"].tolist()[:2] == ["scan-0#view0", "scan-0#view1"]


def test_crop_manifest_refuses_a_non_empty_out_dir(source_dataset, tmp_path):
    out_dir = tmp_path / "taken"
    out_dir.mkdir()
    (out_dir / "keep.txt").write_text("do not touch")
    with pytest.raises(OutputExistsError, match="taken"):
        crop_manifest(source_dataset / "manifest.csv", out_dir)
    assert [path.name for path in out_dir.iterdir()] == ["keep.txt"]
    with pytest.raises(OutputExistsError):
        crop_manifest(source_dataset / "manifest.csv", source_dataset)


def test_crop_manifest_with_fixed_boxes(source_dataset, tmp_path):
    boxes = [[0, 0, 260, 300], [260, 0, 520, 300], [100, 100, 140, 120]]
    crops = pd.read_csv(crop_manifest(source_dataset / "manifest.csv", tmp_path / "fixed", fixed_boxes=boxes))
    assert len(crops) == 15
    assert crops["box"].tolist()[:3] == ["0,0,260,300", "260,0,520,300", "100,100,140,120"]
    assert read_grayscale(tmp_path / "fixed" / crops["path"].iloc[2]).shape == (20, 40)
    with pytest.raises(ValueError, match="does not fit"):
        crop_manifest(source_dataset / "manifest.csv", tmp_path / "bad", fixed_boxes=[[0, 0, 600, 300]])
    assert not (tmp_path / "bad").exists()


def test_crop_manifest_names_the_image_without_a_view_and_leaves_nothing_behind(source_dataset, tmp_path):
    write_grayscale(source_dataset / "images" / "blank.png", screenshot(99, boxes=[]))
    frame = pd.read_csv(source_dataset / "manifest.csv")
    frame.loc[len(frame)] = {"path": "images/blank.png", "patient_id": "P9", "label": 0, "site": "modena"}
    frame.to_csv(source_dataset / "manifest.csv", index=False)
    with pytest.raises(ValueError, match="blank.png"):
        crop_manifest(source_dataset / "manifest.csv", tmp_path / "out")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["source"]


def test_crop_manifest_resolves_absolute_paths(source_dataset, tmp_path):
    frame = pd.read_csv(source_dataset / "manifest.csv")
    frame["path"] = [str(source_dataset / path) for path in frame["path"]]
    frame.to_csv(tmp_path / "absolute.csv", index=False)
    crops = pd.read_csv(crop_manifest(tmp_path / "absolute.csv", tmp_path / "abs_out", preview_count=0))
    assert len(crops) == 10
    assert crops["source_path"].iloc[0] == str(source_dataset / "images" / "shot_0.png")
