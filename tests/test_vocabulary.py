"""One name per concept: constructor arguments, helper names, config spelling and the input-normalisation contract of
every registered model (CLI flags and YAML keys are the package's API)."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import pytest
import torch
import yaml

import anomalib_recon.models as models
from tests.test_contract import CONTRACT_KWARGS

ROOT = Path(__file__).resolve().parents[1]

SYNONYMS = {
    "input_size": "image_size",
    "decoder_heads": "decoder_num_heads",
    "decoder_dim": "decoder_embed_dim",
    "lr_decay_at": "lr_milestones",
    "lr_decay_epoch": "lr_milestones",
    "lr_decay_gamma": "lr_gamma",
    "lr_decay_factor": "lr_gamma",
    "feature_stats_max_images": "stats_max_images",
}
"""A name that is no longer ours -> the one name every model uses for that concept."""

MODELS = list(models.__all__)


def _torch_models(cls: type) -> list[type]:
    module = importlib.import_module(cls.__module__.rsplit(".", 1)[0] + ".torch_model")
    return [
        value
        for name, value in vars(module).items()
        if inspect.isclass(value) and value.__module__ == module.__name__ and name == f"{cls.__name__}Model"
    ]


def _params(cls: type) -> list[str]:
    return [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "args", "kwargs")]


@pytest.mark.parametrize("name", MODELS)
def test_constructor_arguments_use_the_one_name_per_concept(name):
    cls = getattr(models, name)
    torch_classes = _torch_models(cls)
    assert torch_classes, f"{name}: no {name}Model in its torch_model.py"
    for klass in (cls, *torch_classes):
        params = _params(klass)
        used = {p: SYNONYMS[p] for p in params if p in SYNONYMS}
        assert not used, f"{klass.__name__} uses {used} (old name -> the package's name)"
        assert "image_size" in params, f"{klass.__name__} takes no image_size"
        if "backbone" in params:
            assert params[:3] == ["backbone", "layers", "weights"], f"{klass.__name__}: {params[:3]}"
        else:
            assert "layers" not in params and "weights" not in params


@pytest.mark.parametrize("name", MODELS)
def test_layer_defaults_come_from_resolve_layers(name):
    module = importlib.import_module(getattr(models, name).__module__.rsplit(".", 1)[0] + ".torch_model")
    assert not hasattr(module, "default_layers")
    if "layers" in _params(getattr(models, name)):
        assert callable(getattr(module, "resolve_layers", None)), f"{name}: no resolve_layers(backbone, layers)"


def test_configs_spell_class_paths_one_way():
    """Models as ``anomalib_recon.models.<Name>`` (their import path), data as a full ``anomalib``/ours path."""
    configs = sorted((ROOT / "configs").glob("*.yaml"))
    assert configs
    for path in configs:
        config = yaml.safe_load(path.read_text())
        model = config["model"]["class_path"]
        assert model.startswith("anomalib_recon.models.") and model.rsplit(".", 1)[1] in MODELS, (path.name, model)
        assert model.count(".") == 2, (path.name, model)
        data = config["data"]["class_path"]
        assert data.startswith(("anomalib.data.", "anomalib_recon.data.")), (path.name, data)


@pytest.mark.parametrize("name", MODELS)
def test_pre_processor_does_exactly_what_the_model_declares(name):
    """``input_normalization`` is the contract listed in the README: the default pre-processor resizes, then
    normalises with ImageNet statistics ("imagenet") or leaves [0, 1] images as they are ("none")."""
    from torchvision.transforms.v2.functional import normalize, resize

    from anomalib_recon.components.preprocessing import IMAGENET_MEAN, IMAGENET_STD

    kwargs, size, _ = CONTRACT_KWARGS[name]
    cls = getattr(models, name)
    model = cls(**({**kwargs, "weights": None} if "weights" in _params(cls) else kwargs))
    assert model.input_normalization in ("imagenet", "none")
    images = torch.rand(2, 3, size + 16, size + 32, generator=torch.Generator().manual_seed(0))
    expected = resize(images, [size, size], antialias=False)
    if model.input_normalization == "imagenet":
        expected = normalize(expected, list(IMAGENET_MEAN), list(IMAGENET_STD))
    torch.testing.assert_close(model.pre_processor.transform(images), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", MODELS)
def test_the_torch_model_is_built_for_the_resize_else_image_size(name, monkeypatch):
    """One recipe for the size (``ReconModuleMixin.model_input_size``): the pre-processor's Resize when there is one;
    without one (``pre_processor=False``), ``image_size``, never silently the model's default."""
    from anomalib.pre_processing import PreProcessor
    from torchvision.transforms.v2 import Resize

    kwargs, size, _ = CONTRACT_KWARGS[name]
    cls = getattr(models, name)
    kwargs = {**kwargs, "weights": None} if "weights" in _params(cls) else dict(kwargs)
    lightning_module = importlib.import_module(cls.__module__)
    (torch_cls,) = _torch_models(cls)
    built: list[tuple[int, int]] = []

    class Spy(torch_cls):  # type: ignore[misc, valid-type]
        def __init__(self, *args, **kw):
            built.append(tuple(kw["image_size"]))
            super().__init__(*args, **kw)

    monkeypatch.setattr(lightning_module, torch_cls.__name__, Spy)
    other = size * 2
    cls(**{**kwargs, "image_size": other, "pre_processor": False})
    cls(**{**kwargs, "image_size": other, "pre_processor": PreProcessor(transform=Resize((size, size)))})
    assert built == [(other, other), (size, size)]
