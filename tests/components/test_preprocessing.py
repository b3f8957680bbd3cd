"""The size-to-pre-processor rule every model with an ``image_size`` argument shares."""

import pytest
import torch
from anomalib.pre_processing import PreProcessor
from torchvision.transforms.v2 import Resize

from anomalib_recon.components.preprocessing import sized_pre_processor
from anomalib_recon.models import GRNR, AMINet


def _resize_size(pre_processor: PreProcessor) -> list[int]:
    return next(t for t in pre_processor.transform.transforms if isinstance(t, Resize)).size


@pytest.mark.parametrize("model_cls", [AMINet, GRNR])
def test_true_with_a_size_builds_the_models_pre_processor_at_that_size(model_cls):
    pre = sized_pre_processor(model_cls, 96, True)
    assert isinstance(pre, PreProcessor)
    assert list(_resize_size(pre)) == [96, 96]
    assert list(_resize_size(sized_pre_processor(model_cls, (64, 96), True))) == [64, 96]


def test_a_given_pre_processor_or_no_size_passes_through():
    own = PreProcessor(transform=Resize((32, 32)))
    assert sized_pre_processor(AMINet, 96, own) is own
    assert sized_pre_processor(AMINet, None, True) is True
    assert sized_pre_processor(AMINet, 96, False) is False


def test_a_bad_size_is_one_clear_error_at_construction():
    with pytest.raises(ValueError, match="image_size must be a positive int"):
        sized_pre_processor(AMINet, (0, 64), True)
    with pytest.raises(ValueError, match="image_size must be a positive int"):
        GRNR(backbone="tf_efficientnet_lite0", weights=None, image_size=(64, 64, 3))


def _transform_types(pre_processor: PreProcessor) -> list[str]:
    return [type(t).__name__ for t in pre_processor.transform.transforms]


def test_model_arguments_of_the_pre_processor_pass_through_with_or_without_a_size():
    """A model's own pre-processor arguments (NAFRAD's ``normalize_input``, InpFormerPP's ``crop_size``) go through
    the same recipe, with a size and without one (the model's default size)."""
    from anomalib_recon.models import NAFRAD, InpFormerPP

    plain = sized_pre_processor(NAFRAD, 512, True, normalize_input=False)
    normalised = sized_pre_processor(NAFRAD, 512, True, normalize_input=True)
    assert _transform_types(plain) == ["Resize"] and list(_resize_size(plain)) == [512, 512]
    assert _transform_types(normalised) == ["Resize", "Normalize"]
    assert _transform_types(sized_pre_processor(NAFRAD, None, True, normalize_input=True)) == ["Resize", "Normalize"]
    paper = sized_pre_processor(InpFormerPP, None, True, crop_size=None)  # 448 -> 392, the paper's default
    assert _transform_types(paper) == ["Resize", "CenterCrop", "Normalize"]
    assert list(paper.transform.transforms[1].size) == [392, 392]
    cropped = sized_pre_processor(InpFormerPP, 96, True, crop_size=80)
    assert list(_resize_size(cropped)) == [96, 96] and list(cropped.transform.transforms[1].size) == [80, 80]
    own = PreProcessor(transform=Resize((32, 32)))
    assert sized_pre_processor(NAFRAD, 512, own, normalize_input=True) is own  # a given one wins
    assert sized_pre_processor(NAFRAD, 512, False, normalize_input=True) is False


LITE0 = {"backbone": "tf_efficientnet_lite0", "weights": None, "evaluator": False, "visualizer": False}
TINY = {
    "NAFRAD": ({"base_channels": 32, "latent_channels": 32, "seg_base_width": 8, "normalize_input": True}, 512),
    "AGPNet": ({"decoder_embed_dim": 32, "decoder_num_heads": 2, "decoder_depth": 1}, 96),
    "InpFormerPP": ({"decoder_depth": 1, "seg_channels": (8, 8), "crop_size": 80}, 96),
}


@pytest.mark.parametrize("name", sorted(TINY))
def test_each_model_builds_its_pre_processor_with_the_recipe_and_reads_the_size_back(name):
    """NAFRAD, AGPNet and InpFormerPP: ``image_size`` (and the model's own pre-processor arguments) give exactly the
    recipe's pre-processor, and the torch model is built for the size read back from it (after InpFormerPP's crop)."""
    import anomalib_recon.models as models

    cls = getattr(models, name)
    kwargs, size = TINY[name]
    model = cls(**LITE0, **kwargs, image_size=size)
    extra = {k: kwargs[k] for k in ("normalize_input", "crop_size") if k in kwargs}
    recipe = sized_pre_processor(cls, size, True, **extra)
    assert _transform_types(model.pre_processor) == _transform_types(recipe)
    images = torch.rand(1, 3, size + 8, size + 24, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(model.pre_processor.transform(images), recipe.transform(images), atol=0, rtol=0)
    expected = (80, 80) if name == "InpFormerPP" else (size, size)
    assert tuple(model.input_size) == expected
    if name != "NAFRAD":  # NAFRAD's torch model only checks the size (a multiple of 256), it stores none
        assert tuple(model.model.image_size) == expected
