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
