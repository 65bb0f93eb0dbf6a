"""Grad-CAM++ of a chosen class of a 3-class classifier."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tus.eval.explain import add_markers, class_activation_maps, measure_marker_sensitivity, resolve_target_layer
from tus.methods.classifier import FineTuneModule, FineTuneOptimConfig
from tus.models.backbones import BackboneConfig


def test_cam_of_a_chosen_class_and_its_probabilities():
    torch.manual_seed(0)
    model = FineTuneModule(BackboneConfig(name="test_resnet", init="scratch"), FineTuneOptimConfig(), num_classes=3).eval()
    images = torch.randn(6, 1, 32, 32)
    marked, masks = add_markers(images, np.random.default_rng(0))
    with torch.no_grad():
        probabilities = model(images).softmax(1)
    predicted = probabilities.argmax(1)
    result = measure_marker_sensitivity(model, images, marked, masks, target_class=2)
    # The recorded probability is the chosen class's, for every image.
    assert np.allclose(result.probabilities_clean, probabilities[:, 2].numpy(), atol=1e-6)
    # Where the model predicts class 2 anyway, the chosen-class CAM is the predicted-class CAM.
    _, layer = resolve_target_layer(model, None, images)
    predicted_cams, _ = class_activation_maps(model, images, layer)
    chosen_cams, _ = class_activation_maps(model, images, layer, target_class=0)
    for row in range(len(images)):
        if int(predicted[row]) == 2:
            assert np.allclose(result.cams_clean[row], predicted_cams[row], atol=1e-5)
        if int(predicted[row]) == 0:
            assert np.allclose(chosen_cams[row], predicted_cams[row], atol=1e-5)
    assert not np.allclose(chosen_cams, result.cams_clean)
    # Without a chosen class, a 3-class model records each image's predicted-class probability.
    default = measure_marker_sensitivity(model, images, marked, masks)
    assert np.allclose(default.probabilities_clean, probabilities.max(1).values.numpy(), atol=1e-6)
    # The overlay titles name the class whose probability they give: the chosen or the predicted one.
    from tus.eval.explain import overlay_figure

    for run, classes in ((result, [2] * 6), (default, predicted.tolist())):
        titles = [a.get_title() for a in overlay_figure(run, [f"i{k}.png" for k in range(6)]).axes if a.images][::4]
        assert titles == [f"i{k}.png\npred {int(predicted[k])}, p({classes[k]})={float(run.probabilities_clean[k]):.2f}" for k in range(6)]
    with pytest.raises(ValueError, match="target class 3 is not a class of this 3-class model"):
        measure_marker_sensitivity(model, images, marked, masks, target_class=3)


def test_target_class_by_name_from_an_export_or_a_runs_checkpoint(tmp_path):
    """``--target-class diffuse``: an export names its classes in its config; a Lightning .ckpt
    inside a run dir takes them from the run's config.yaml (data.label_names), as the run wrote them."""
    import yaml

    from tus.data.images import UsageError
    from tus.methods.classifier import save_finetuned
    from tus.stages.explain import resolve_target_class

    names = ["homogeneous", "focal_lesion", "diffuse"]
    model = FineTuneModule(BackboneConfig(name="test_resnet", init="scratch"), FineTuneOptimConfig(), num_classes=3)
    export = save_finetuned(model, tmp_path / "export", image_size=32, label_names=names)
    run = tmp_path / "run"
    (run / "runs" / "fold0-seed0" / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"data": {"label_names": names, "image_size": 32}}))
    ckpt = run / "runs" / "fold0-seed0" / "checkpoints" / "last.ckpt"
    ckpt.write_bytes(b"")  # only its place in the run dir is read here
    for checkpoint in (export, ckpt):
        assert [resolve_target_class(checkpoint, name, 3) for name in names] == [0, 1, 2]
        assert resolve_target_class(checkpoint, "1", 3) == 1 and resolve_target_class(checkpoint, None, 3) is None
        with pytest.raises(UsageError, match=r"'cyst': not a class of this 3-class model \(an index 0..2 or one of \['homogeneous', 'focal_lesion', 'diffuse'\]\)"):
            resolve_target_class(checkpoint, "cyst", 3)
    # A binary run writes no names: a .ckpt then takes indices only.
    (run / "config.yaml").write_text(yaml.safe_dump({"data": {"image_size": 32}}))
    with pytest.raises(UsageError, match=r"'diffuse': not a class of this 3-class model \(an index 0..2\)"):
        resolve_target_class(ckpt, "diffuse", 3)
