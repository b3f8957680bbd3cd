"""Tests for residual anomaly maps and image-score reducers (C14)."""

import pytest
import torch
from torch.nn import functional as F

from anomalib_recon.components.aggregation import FeatureAggregator
from anomalib_recon.components.anomaly_map import (
    AnomalyMapGenerator,
    check_blur_fits,
    distance_map,
    make_blur,
    reduce_max,
    reduce_max_avgpool,
    reduce_std,
)


def residual_map(targets, recons, distance="cos", **kwargs) -> torch.Tensor:
    """One call of a fresh :class:`AnomalyMapGenerator` (the map every model builds)."""
    return AnomalyMapGenerator(distance=distance, **kwargs)(targets, recons)


def _pair(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 6, 6, generator=g), torch.randn(2, 4, 6, 6, generator=g)


def test_distances_match_manual_formulas():
    t, r = _pair()
    diff = t - r
    cos = (1 - F.cosine_similarity(t, r, dim=1)).unsqueeze(1)
    torch.testing.assert_close(distance_map(t, r, "cos"), cos)
    torch.testing.assert_close(distance_map(t, r, "l2"), diff.pow(2).sum(1, keepdim=True).sqrt())
    torch.testing.assert_close(distance_map(t, r, "l2sq_sum"), diff.pow(2).sum(1, keepdim=True))
    torch.testing.assert_close(distance_map(t, r, "l2sq_mean"), diff.pow(2).mean(1, keepdim=True))
    torch.testing.assert_close(distance_map(t, r, "cos*l2sq"), diff.pow(2).mean(1, keepdim=True) * cos)
    for d in ("cos", "l2", "l2sq_sum", "l2sq_mean", "cos*l2sq"):
        assert distance_map(t, t, d).abs().max().item() < 1e-5


def test_map_is_higher_where_recon_differs():
    target = torch.randn(1, 8, 8, 8)
    recon = target.clone()
    recon[:, :, 2, 5] = -target[:, :, 2, 5]  # one wrong position
    for d in ("cos", "l2", "cos*l2sq"):
        amap = residual_map([target], [recon], distance=d, out_size=32, align_corners=True)
        assert amap.shape == (1, 1, 32, 32)
        peak = divmod(int(amap.flatten().argmax()), 32)
        assert abs(peak[0] - 2 * 31 / 7) <= 1.5 and abs(peak[1] - 5 * 31 / 7) <= 1.5  # align_corners: i -> i·31/7
        assert amap[0, 0, 31, 0] < 1e-5  # far corner untouched


def test_multiscale_combine_upsamples_and_combines():
    t1, r1 = _pair(1)
    t2, r2 = torch.randn(2, 3, 3, 3), torch.randn(2, 3, 3, 3)
    m1 = distance_map(t1, r1, "cos")
    m2 = F.interpolate(distance_map(t2, r2, "cos"), size=(6, 6), mode="bilinear", align_corners=False)
    torch.testing.assert_close(residual_map([t1, t2], [r1, r2]), (m1 + m2) / 2)
    torch.testing.assert_close(residual_map([t1, t2], [r1, r2], combine="sum"), m1 + m2)
    torch.testing.assert_close(residual_map([t1, t2], [r1, r2], combine="prod"), m1 * m2)
    torch.testing.assert_close(residual_map([t1, t2], [r1, r2], combine=[0.25, 2.0]), 0.25 * m1 + 2 * m2)
    stats = [(0.5, 2.0), (1.0, 4.0)]
    torch.testing.assert_close(
        residual_map([t1, t2], [r1, r2], combine="sum", scale_stats=stats),
        (m1 - 0.5) / 2 + (m2 - 1.0) / 4,
    )


def test_product_after_blur_factorises_like_ami_net():
    t, r = _pair(2)
    gen = AnomalyMapGenerator(
        distance="cos*l2sq", out_size=24, align_corners=True, blur_sigma=1.0, product_after_blur=True
    )
    sq = residual_map([t], [r], "l2sq_mean", out_size=24, align_corners=True, blur_sigma=1.0)
    cos = residual_map([t], [r], "cos", out_size=24, align_corners=True, blur_sigma=1.0)
    torch.testing.assert_close(gen([t], [r]), sq * cos)
    early = residual_map([t], [r], "cos*l2sq", out_size=24, align_corners=True, blur_sigma=1.0)
    assert not torch.allclose(early, sq * cos)


def test_blur_preserves_constant_map_and_smooths_a_peak():
    t = torch.randn(1, 3, 8, 8)
    r = -t  # cosine distance exactly 2 everywhere
    amap = residual_map([t], [r], "cos", out_size=40, blur_sigma=4.0)  # default kernel 33
    torch.testing.assert_close(amap, torch.full_like(amap, 2.0))
    gen = AnomalyMapGenerator(distance="cos", blur_sigma=4.0, blur_kernel=5)
    assert gen.blur.kernel.shape[-1] == 5
    r2 = t.clone()
    r2[:, :, 4, 4] = -t[:, :, 4, 4]
    raw = residual_map([t], [r2], "cos")
    blurred = gen([t], [r2])
    assert blurred.max() < raw.max()
    torch.testing.assert_close(blurred.sum(), raw.sum(), rtol=0.05, atol=0)  # the kernel integrates to one


def test_reducers_on_known_map():
    amap = torch.arange(100, dtype=torch.float32).view(1, 1, 10, 10)
    amap = torch.cat([amap, -amap])
    torch.testing.assert_close(reduce_max(amap), torch.tensor([99.0, 0.0]))
    torch.testing.assert_close(reduce_std(amap), amap.flatten(1).std(dim=1, unbiased=False))
    assert reduce_std(amap, unbiased=True)[0] > reduce_std(amap)[0]
    torch.testing.assert_close(reduce_max(amap[:, 0]), reduce_max(amap))  # (B, H, W) accepted


def test_max_avgpool_equals_manual_computation():
    g = torch.Generator().manual_seed(3)
    amap = torch.rand(2, 1, 12, 12, generator=g)
    k, pad = 4, 2
    padded = F.pad(amap, (pad, pad, pad, pad))
    n = 12 + 2 * pad - k + 1
    manual = torch.stack(
        [
            torch.stack([padded[b, 0, i : i + k, j : j + k].sum() / (k * k) for i in range(n) for j in range(n)]).max()
            for b in range(2)
        ]
    )
    torch.testing.assert_close(reduce_max_avgpool(amap, kernel_size=k, padding=pad), manual)
    torch.testing.assert_close(reduce_max_avgpool(amap[:, 0], kernel_size=k, padding=pad), manual)  # (B, H, W)
    # pad 0: best mean of a full 4x4 window
    torch.testing.assert_close(reduce_max_avgpool(amap, 4), F.avg_pool2d(amap, 4, stride=1).flatten(1).amax(1))


def test_clear_errors():
    t, r = _pair()
    with pytest.raises(ValueError, match="distance must be one of"):
        residual_map([t], [r], distance="l1")
    with pytest.raises(ValueError, match="equal shape"):
        residual_map([t], [r[:, :3]])
    with pytest.raises(ValueError, match="equally long"):
        residual_map([t, t], [r])
    with pytest.raises(ValueError, match="weights"):
        residual_map([t], [r], combine=[1.0, 2.0])
    with pytest.raises(ValueError, match="combine must be one of"):
        AnomalyMapGenerator(combine="max")
    with pytest.raises(ValueError, match="reflect padding"):
        residual_map([t], [r], blur_sigma=4.0)  # 33x33 kernel on a 6x6 map
    with pytest.raises(ValueError, match="anomaly map"):
        reduce_max(torch.rand(4))
    with pytest.raises(ValueError, match="larger than the padded map"):
        reduce_max_avgpool(torch.rand(1, 1, 4, 4), kernel_size=8)


@pytest.mark.export
def test_onnx_export_matches_torch():
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.aggregator = FeatureAggregator(out_size=8, align_corners=True, layer_norm=True, smooth=True)
            self.decoder = torch.nn.Conv2d(8, 8, 1)
            self.deep_decoder = torch.nn.Conv2d(4, 4, 1)
            self.generator = AnomalyMapGenerator(
                distance="cos*l2sq", out_size=32, align_corners=True, blur_sigma=2.0, product_after_blur=True
            )
            self.l2_generator = AnomalyMapGenerator(
                distance="l2", out_size=32, combine=[0.3, 0.7], blur_sigma=1.0, blur_kernel=5
            )

        def forward(self, f1, f2):
            target = self.aggregator([f1, f2])  # AMI-Net-style target: 8 channels at 8x8
            targets, recons = [target, f2], [self.decoder(target), self.deep_decoder(f2)]  # two scales
            amap = self.generator(targets, recons)
            amap_l2 = self.l2_generator(targets, recons)
            return (
                amap,
                reduce_max_avgpool(amap_l2, kernel_size=8, padding=4),
                reduce_std(amap),
                reduce_max(amap_l2),
            )

    model = Tiny().eval()
    g = torch.Generator().manual_seed(0)
    inputs = (torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 4, 4, generator=g))
    with torch.no_grad():
        expected = model(*inputs)
    program = torch.onnx.export(model, inputs, dynamo=True, input_names=["f1", "f2"], verbose=False)
    session = ort.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    outputs = session.run(None, {"f1": inputs[0].numpy(), "f2": inputs[1].numpy()})
    assert len(outputs) == len(expected)
    for ref, out in zip(expected, outputs, strict=True):
        torch.testing.assert_close(torch.from_numpy(out), ref, atol=1e-5, rtol=0)


def test_image_score_is_the_box_filter_max_at_float64_accuracy():
    """``max(avg_pool2d(map, k, 1, k // 2))``, summed as two 1-D box filters: the same function for odd and even
    kernels, and in fp32 within 2.5e-7 of float64 on maps near 0.5 (PyTorch's 32×32 fp32 ``avg_pool2d`` is off by up
    to 5e-7 on these maps; NAFRAD's score, k = 32)."""
    g = torch.Generator().manual_seed(0)
    amap = torch.rand(2, 1, 40, 36, generator=g, dtype=torch.float64)
    for k in (1, 4, 5, 32):
        windows = torch.nn.functional.pad(amap, (k // 2,) * 4).unfold(2, k, 1).unfold(3, k, 1)  # brute force
        expected = windows.sum(dim=(-1, -2)).flatten(1).amax(1) / (k * k)
        torch.testing.assert_close(reduce_max_avgpool(amap, k, padding=k // 2), expected, atol=1e-12, rtol=0)
    near_half = (0.5 + 0.05 * torch.rand(16, 1, 128, 128, generator=g, dtype=torch.float64)).float()
    exact = torch.nn.functional.avg_pool2d(near_half.double(), 32, 1, 16).flatten(1).amax(1)
    error = (reduce_max_avgpool(near_half, 32, padding=16).double() - exact).abs().max()
    assert error < 2.5e-7, error


def test_check_blur_fits_names_the_model_arguments_and_the_smallest_size():
    """AGPNet/AMINet at 16 px used to be told to 'set a smaller blur_kernel or a larger out_size' (neither exists)."""
    with pytest.raises(ValueError) as info:
        check_blur_fits(4.0, None, 16, "AGPNet")  # 33x33 kernel: reflect padding needs at least 17 px
    message = str(info.value)
    assert message.startswith("AGPNet: blur_sigma=4 ")
    assert "image_size=16" in message and "at least 17x17" in message and "blur_sigma < 3.875" in message
    assert "out_size" not in message and "blur_kernel" not in message and "blur_sigma=None" in message
    check_blur_fits(4.0, None, 17, "AGPNet")  # the smallest size that works
    check_blur_fits(3.87, None, 16, "AGPNet")  # and a sigma just below the bound fits 16 px
    make_blur(3.87)(torch.rand(1, 1, 16, 16))  # which the blur itself confirms
    check_blur_fits(None, None, 2, "AGPNet")  # no blur: nothing to check
    check_blur_fits(0, None, 2, "AGPNet")
    with pytest.raises(ValueError, match=r"\(image_size=\(16, 40\)\).*at least 17x17") as info:
        check_blur_fits(4.0, None, (16, 40), "AMINet", allow_off=False)
    assert "blur_sigma=None" not in str(info.value)
    with pytest.raises(ValueError, match=r"5x5 .*at least 3x3.*a smaller blur_kernel"):  # explicit kernel
        check_blur_fits(4.0, 5, 2, "INPFormerPP")


def test_blur_on_a_too_small_map_speaks_model_vocabulary():
    t, r = torch.randn(1, 4, 6, 6), torch.randn(1, 4, 6, 6)
    with pytest.raises(ValueError) as info:
        AnomalyMapGenerator(distance="cos", out_size=16, blur_sigma=4.0)([t], [r])
    message = str(info.value)
    assert "blur_sigma=4" in message and "16x16" in message and "image_size of at least 17x17" in message
    assert "out_size" not in message and "blur_kernel" not in message
