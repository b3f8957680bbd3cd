"""The size-to-pre-processor rule every model with an ``image_size`` argument shares."""

import pytest
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
