"""The shared input/output checks (components/guards.py): each bad input gets its own message that says what to do."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from anomalib_recon.components import guards
from anomalib_recon.components.guards import (
    InputImageError,
    NonFiniteError,
    check_features,
    check_finite,
    check_images,
    check_model_input,
    check_optimizer_settings,
    is_finite_number,
    nonfinite_parameters,
)


def _images(**kwargs) -> torch.Tensor:
    return torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0), **kwargs)


@pytest.mark.parametrize(
    ("images", "match"),
    [
        ((_images() * 255).to(torch.uint8), r"uint8.*images\.float\(\) / 255"),
        (_images()[:, :1], r"1 channels.*repeat"),
        (torch.cat([_images(), _images()[:, :1]], 1), r"4 channels.*alpha"),
        (_images() * 255, r"reach 25\d.*divide by 255"),
        ((_images() - 0.45) / 0.225, r"normalised already"),
        (torch.zeros(0, 3, 8, 8), r"shape \(B, 3, H, W\)"),
        (torch.rand(8, 8), r"shape \(B, 3, H, W\)"),
        ([[0.5]], r"torch\.Tensor"),
    ],
    ids=["uint8", "gray", "rgba", "0-255", "normalised", "empty", "2d", "list"],
)
def test_bad_images_get_their_own_message(images, match):
    with pytest.raises(InputImageError, match=match) as info:
        check_images(images, "Toy")
    assert str(info.value).startswith("Toy: ")


def test_nan_pixels_are_counted_per_image():
    images = _images()
    images[1, 0, 2, 2] = float("nan")
    with pytest.raises(InputImageError, match="1 image"):
        check_images(images, "Toy")


def test_raw_images_and_slight_overshoot_pass():
    check_images(_images(), "Toy")
    check_images(_images()[0], "Toy")  # a single (3, H, W) image
    check_images(_images() * 1.2 - 0.1, "Toy")  # augmentation noise around [0, 1] is fine
    check_images(_images().double(), "Toy")


def test_checks_are_skipped_while_tracing(monkeypatch):
    monkeypatch.setattr(guards, "is_tracing", lambda: True)
    check_images((_images() * 255).to(torch.uint8), "Toy")
    check_finite("Toy", "the map", torch.tensor([float("nan")]))


def test_check_finite_raises_a_value_error_with_the_hint():
    with pytest.raises(NonFiniteError, match=r"Toy: NaN or inf in the map\. Retrain\.") as info:
        check_finite("Toy", "the map", torch.ones(2), torch.tensor([1.0, float("inf")]), hint="Retrain.")
    assert isinstance(info.value, ValueError) and isinstance(info.value, FloatingPointError)
    check_finite("Toy", "the map", torch.ones(2), None, torch.tensor([1, 2]))  # ints and None are ignored


@pytest.mark.parametrize(
    ("images", "match"),
    [
        (torch.zeros(3, 8, 8), r"Toy expects images as an RGB batch \(B, 3, H, W\), got \(3, 8, 8\); repeat grayscale"),
        (torch.zeros(2, 1, 8, 8), r"got \(2, 1, 8, 8\)"),
        ([1, 2], r"got list"),
        (torch.zeros(2, 3, 8, 6), r"Toy is built for 8x8 inputs \(its tokens\), got 8x6\. Resize the images"),
    ],
)
def test_model_input_is_an_rgb_batch_of_the_built_size(images, match):
    with pytest.raises(InputImageError, match=match):
        check_model_input("Toy", images, (8, 8), "its tokens")


def test_model_input_size_is_checked_only_eagerly_and_only_when_fixed(monkeypatch):
    check_model_input("Toy", torch.zeros(2, 3, 8, 6))  # no image_size: any size
    monkeypatch.setattr(guards, "is_tracing", lambda: True)
    check_model_input("Toy", torch.zeros(2, 3, 8, 6), (8, 8))  # a traced graph keeps its dynamic sizes
    with pytest.raises(InputImageError, match="RGB batch"):  # the channel count is static: always checked
        check_model_input("Toy", torch.zeros(2, 1, 8, 8), (8, 8))


def test_check_features_names_the_backbone_and_what_to_check():
    good, bad = torch.zeros(1, 4, 2, 2), torch.tensor([[float("nan")]])
    check_features("Toy", good, good)
    with pytest.raises(NonFiniteError, match=r"^Toy: NaN or inf in the teacher features\. Check the input"):
        check_features("Toy", good, bad, what="the teacher features")


def test_nonfinite_parameters_names_them():
    net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    assert nonfinite_parameters(net) == []
    with torch.no_grad():
        net[0].bias[1] = float("nan")
    net[1].running_mean[0] = float("inf")
    assert nonfinite_parameters(net) == ["0.bias", "1.running_mean"]


@pytest.mark.parametrize(
    ("args", "kwargs", "named"),
    [
        ((0.0, 0.0, (0.9, 0.99)), {}, "lr must be a finite number > 0, got 0.0"),
        ((float("nan"), 0.0), {}, "lr must be a finite number > 0, got nan"),
        ((True, 0.0), {}, "lr must be a finite number > 0, got True"),
        ((1e-3, -1e-4), {}, "weight_decay must be a finite number >= 0, got -0.0001"),
        ((1e-3, 0.0, (0.9, 1.0)), {}, "betas must be two numbers in [0, 1), got (0.9, 1.0)"),
        ((1e-3, 0.0, (0.9,)), {}, "betas must be two numbers in [0, 1), got (0.9,)"),
        ((float("inf"), 0.0), {"prefix": "flow_"}, "flow_lr must be a finite number > 0, got inf"),
    ],
)
def test_optimizer_settings_are_refused_naming_the_argument(args, kwargs, named) -> None:
    with pytest.raises(ValueError, match=re.escape(f"Model: {named}.")):
        check_optimizer_settings("Model", *args, **kwargs)


def test_usable_optimizer_settings_pass() -> None:
    check_optimizer_settings("Model", 1e-4, 0.0, (0.9, 0.999))
    check_optimizer_settings("Model", 1, 0.05)  # integers are numbers; no betas (SGD-like) is fine
    assert is_finite_number(1e-3) and not is_finite_number(float("inf")) and not is_finite_number(False)
