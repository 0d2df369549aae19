"""Activation smoothing before int8 (`exporter/smoothing.py`): the model computes the same function, and an
outlier channel of a norm's output is moved into the weights that read it."""

from __future__ import annotations

import pytest

from conftest import make_tiny_model

from medusa_export.exporter.smoothing import activation_maxima, smooth_activations

torch = pytest.importorskip("torch")
CALIBRATION = [[5, 17, 33, 2, 90, 41, 7], [250, 3, 3, 8, 120, 66]]


def _outlier_model():
    """The tiny model with channel 3 of every norm feeding q/k/v 40x larger: the kind of outlier real models have."""
    model = make_tiny_model(seed=3)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[3] *= 40
    return model


def _spread(maxima) -> float:
    """The largest channel over the median channel of the q/k/v inputs, worst layer."""
    return max(float(m.max() / m.median()) for (_, name), m in maxima.items() if name == "qkv")


def test_smoothing_keeps_the_function_and_flattens_the_outlier_channel():
    model = _outlier_model()
    ids = torch.tensor([[9, 8, 7, 100, 200, 11, 12, 13]])
    with torch.no_grad():
        before = model(ids).logits
    spread = _spread(activation_maxima(model, CALIBRATION))
    scales = smooth_activations(model, CALIBRATION, alpha=0.5)
    with torch.no_grad():
        after = model(ids).logits
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    assert all(int(s.argmax()) == 3 for (_, name), s in scales.items() if name == "qkv")  # the outlier: largest scale
    assert _spread(activation_maxima(model, CALIBRATION)) < spread / 4


@pytest.mark.parametrize("alpha", [0.0, 1.0, -0.5])
def test_smoothing_refuses_a_strength_outside_0_1(alpha):
    with pytest.raises(ValueError, match="0 < alpha < 1"):
        smooth_activations(make_tiny_model(), CALIBRATION, alpha)
