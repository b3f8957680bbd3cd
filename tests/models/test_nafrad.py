"""Tests for NAFRAD (Neighborhood Attention-based Feature Reconstruction).

The NA autoencoder halves a 64×64 feature grid six times, so every forward runs at 256 px; the tests keep the widths
small (N=32, M=64, U-Net base width 8) and batches at 1-2 images so that the file stays fast on 2 CPU cores.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from anomalib.data import InferenceBatch
from PIL import Image

from anomalib_recon.components.neighborhood_attention import NeighborhoodAttention2D
from anomalib_recon.components.preprocessing import resize_pre_processor
from anomalib_recon.models.image.nafrad import NAFRAD
from anomalib_recon.models.image.nafrad.loss import NAFRADLoss, downsample_mask
from anomalib_recon.models.image.nafrad.torch_model import (
    RESNET18,
    SWIN_L,
    NAAutoencoder,
    NAFRADModel,
    NAFRADTrainOutput,
    ResidualNABlock,
    resolve_backbone,
    rotation_range,
)

SMALL = {"base_channels": 32, "latent_channels": 64, "seg_base_width": 8}
LITE0 = "tf_efficientnet_lite0"
MAGNETIC_TILE = Path("/work/shared/datasets/magnetic_tile")


def _small_model(**kwargs) -> NAFRADModel:
    torch.manual_seed(0)
    return NAFRADModel(**{"backbone": LITE0, "weights": None, **SMALL, **kwargs})


def _small_module(**kwargs) -> NAFRAD:
    torch.manual_seed(0)
    args = {"backbone": LITE0, "weights": None, "evaluator": False, "visualizer": False, **SMALL, **kwargs}
    return NAFRAD(**args)


def textures(n: int, size: int = 256, seed: int = 0) -> torch.Tensor:
    """Regular sinusoidal 'fabric' textures with random phase and mild noise, RGB in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    out = []
    for _ in range(n):
        ph = torch.rand(2, generator=g) * 2 * math.pi
        base = 0.5 + 0.2 * torch.sin(2 * math.pi * xx / 16 + ph[0]) * torch.sin(2 * math.pi * yy / 16 + ph[1])
        img = base + 0.03 * torch.randn(size, size, generator=g)
        out.append(torch.stack([img, 0.9 * img, 0.8 * img]).clamp(0, 1))
    return torch.stack(out)


@pytest.fixture(scope="module")
def small_model() -> NAFRADModel:
    return _small_model()


@pytest.fixture(scope="module")
def reference_autoencoder() -> NAAutoencoder:
    return NAAutoencoder(195)


# ----------------------------------------------------------------------------------------------------- architecture
def test_autoencoder_parameter_counts_match_reference(reference_autoencoder):
    """nafrad.md §3: ≈19.59 M parameters for C=195 (ResNet18) and ≈22.05 M for C=579 (Swin-L)."""
    count = sum(p.numel() for p in reference_autoencoder.parameters())
    assert abs(count - 19.59e6) < 0.01e6, count
    assert abs(sum(p.numel() for p in NAAutoencoder(579).parameters()) - 22.05e6) < 0.01e6
    # 16 encoder + 16 decoder NSABlocks, each with one (heads, 13, 13) or (heads, 5, 5) bias table
    rpbs = [n for n, _ in reference_autoencoder.named_parameters() if n.endswith("attn.rpb")]
    assert len(rpbs) == 32
    no_rpb = NAAutoencoder(195, relative_position_bias=False)
    assert not [n for n, _ in no_rpb.named_parameters() if "rpb" in n]
    assert count - sum(p.numel() for p in no_rpb.parameters()) == sum(
        p.numel() for n, p in reference_autoencoder.named_parameters() if n.endswith("rpb")
    )
    no_na = NAAutoencoder(195, use_neighborhood_attention=False)
    assert not any(isinstance(m, ResidualNABlock) for m in no_na.modules())
    assert abs(sum(p.numel() for p in no_na.parameters()) - 5.82e6) < 0.01e6  # convs/deconvs only


def test_autoencoder_layout_follows_reference(reference_autoencoder):
    ae = reference_autoencoder
    rates = torch.linspace(0, 0.1, 16).tolist()

    def block_info(name):
        blocks = getattr(ae, name).blocks
        attn = blocks[0].attn
        drops = [b.drop_path.drop_prob if hasattr(b.drop_path, "drop_prob") else 0.0 for b in blocks]
        return len(blocks), attn.dim, attn.num_heads, attn.kernel_size, drops

    assert block_info("g_a1") == (2, 128, 8, 7, rates[0:2])
    assert block_info("g_a5") == (6, 256, 16, 7, rates[4:10])
    assert block_info("g_a7") == (2, 320, 20, 7, rates[10:12])
    assert block_info("h_a1") == (2, 192, 12, 3, rates[12:14])
    assert block_info("h_a3") == (2, 192, 12, 3, rates[14:16])
    # decoder: reversed depths slice the same schedule
    assert block_info("h_s0") == (2, 192, 12, 3, rates[0:2])
    assert block_info("g_s0") == (2, 320, 20, 7, rates[4:6])
    assert block_info("g_s2") == (6, 256, 16, 7, rates[6:12])
    assert block_info("g_s6") == (2, 128, 8, 7, rates[14:16])
    assert all(m.attn.head_dim == 16 for m in ae.modules() if hasattr(m, "attn"))
    assert ae.g_a0.kernel_size == (5, 5) and ae.g_s7.kernel_size == (5, 5) and ae.g_s7.out_channels == 195


def test_autoencoder_reaches_1x1_bottleneck_and_restores_grid():
    ae = NAAutoencoder(8, base_channels=32, latent_channels=32).eval()
    x = torch.randn(1, 8, 64, 128)
    bottleneck = []
    ae.h_a2.register_forward_hook(lambda m, i, o: bottleneck.append(o.shape))
    with torch.no_grad():
        assert ae(x).shape == x.shape
    assert bottleneck[0] == (1, 48, 1, 2)


def test_backbone_table_and_rotation_ranges():
    assert resolve_backbone("auto", "carpet") == SWIN_L
    assert resolve_backbone("auto", "toothbrush") == SWIN_L
    assert resolve_backbone("auto", "bottle") == RESNET18
    assert resolve_backbone("auto", None) == RESNET18
    assert resolve_backbone("auto", "magnetic_tile") == RESNET18
    assert resolve_backbone("swin_l") == SWIN_L
    assert resolve_backbone(LITE0) == LITE0
    assert rotation_range("capsule") == (0.0, 0.0)
    assert rotation_range("cable") == (-5.0, 5.0)
    assert rotation_range("grid") == (-90.0, 90.0)
    assert rotation_range("unknown") == (0.0, 0.0)


def test_resnet18_features_have_195_channels_on_a_64_grid():
    model = NAFRADModel("resnet18", weights=None, **SMALL).eval()
    assert model.in_channels == 195
    assert model.image_size_divisor == 256
    assert model.segmentor.encoder_segment.block1[0].in_channels == 390
    with torch.no_grad():
        assert model.get_features(torch.rand(1, 3, 256, 256)).shape == (1, 195, 64, 64)


def test_swin_backbone_layer_norms_its_stages():
    model = NAFRADModel("swin_tiny_patch4_window7_224", weights=None, image_size=(256, 256), **SMALL).eval()
    assert model.in_channels == 3 + 96 + 192
    assert model.feature_aggregator.layer_norm
    with torch.no_grad():
        features = model.get_features(torch.rand(1, 3, 256, 256))
    assert features.shape == (1, 291, 64, 64)
    stage0 = features[:, 3:99]
    assert stage0.mean(1).abs().max() < 1e-4  # per-token LN without affine -> zero mean over channels


def test_bgr_flip_happens_inside_the_model(small_model):
    rgb = _small_model(channel_order="rgb").eval()
    rgb.load_state_dict(small_model.state_dict())
    x = torch.rand(1, 3, 256, 256)
    with torch.no_grad():
        torch.testing.assert_close(small_model.eval().get_features(x), rgb.get_features(x.flip(1)))
        assert not torch.allclose(small_model.get_features(x), rgb.get_features(x))
        # the image channels come first in F, in BGR order
        torch.testing.assert_close(
            small_model.get_features(x)[:, :3],
            torch.nn.functional.interpolate(x.flip(1), size=64, mode="bilinear", align_corners=True),
        )


# -------------------------------------------------------------------------------------------------- forward / loss
def _batch(images: torch.Tensor):
    from anomalib.data import ImageBatch

    return ImageBatch(image=images)


def _asymmetric_images(n: int = 2, size: int = 256) -> torch.Tensor:
    """Images whose every rotation is visibly different (a ramp plus a bright off-centre block)."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    base = 0.2 + 0.5 * xx + 0.1 * yy
    base[size // 8 : size // 3, size // 8 : size // 2] = 0.95
    images = torch.stack([base, 0.8 * base, 0.6 * base])
    return images.unsqueeze(0).repeat(n, 1, 1, 1).clamp(0, 1)


class _Recorder:
    """Records what the reconstructor receives and what the loss compares during one real training step."""

    def __init__(self, module: NAFRAD) -> None:
        self.module = module
        self.synthesized = None
        self.model_inputs = None
        self.reconstructor_input = None
        self.reconstructor_output = None
        self.loss_args = None
        synthesize = module.synthesize

        def recording_synthesize(images):
            self.synthesized = synthesize(images)
            return self.synthesized

        module.synthesize = recording_synthesize
        self.handles = [
            module.model.register_forward_pre_hook(lambda m, args: setattr(self, "model_inputs", args)),
            module.model.reconstructor.register_forward_hook(self._reconstructor_hook),
            module.loss.register_forward_pre_hook(lambda m, args: setattr(self, "loss_args", args)),
        ]

    def _reconstructor_hook(self, module, args, output) -> None:
        self.reconstructor_input = args[0].detach()
        self.reconstructor_output = output.detach()


@pytest.mark.parametrize("standardize", [False, True])
def test_training_step_reconstructs_normal_features_from_defective_ones(standardize):
    """In a real training step, R gets the features of the *pseudo-anomalous* images and the MSE target is the
    features of the *normal* images; S reads the residual of the pseudo-anomalous features and its target is the
    synthetic mask; the loss is ``MSE + focal(γ=4) + L1`` of exactly those tensors. R and S get gradients (the
    segmentation terms reach R too), the frozen backbone none."""
    module = _small_module(
        anomaly_probability=1.0, rotation_probability=0.0, standardize_features=standardize, drop_path_rate=0.0
    )
    images = textures(2, seed=4)
    if standardize:
        module.fit_feature_statistics([_batch(textures(2, seed=8))])
    rec = _Recorder(module)
    module.train()
    torch.manual_seed(3)
    loss = module.training_step(_batch(images))["loss"]
    assert torch.isfinite(loss)
    normal, augmented, mask = rec.synthesized
    assert mask.sum() > 0
    module.eval()  # drop path off; the features do not depend on the mode
    with torch.no_grad():
        f_normal, f_augmented = module.model.get_features(normal), module.model.get_features(augmented)
    gap = (f_normal - f_augmented).abs().amax()
    assert gap > 0.05  # the synthetic defects change the features
    torch.testing.assert_close(rec.reconstructor_input, f_augmented, atol=1e-5, rtol=1e-4)
    reconstruction, target, prediction, loss_mask = rec.loss_args
    torch.testing.assert_close(reconstruction.detach(), rec.reconstructor_output)
    torch.testing.assert_close(target, f_normal, atol=1e-5, rtol=1e-4)
    assert (target - f_augmented).abs().amax() > 0.5 * gap
    torch.testing.assert_close(loss_mask, mask)
    assert prediction.shape == (2, 1, 64, 64)
    module.model.segmentor.train()  # the batch statistics of S's BatchNorm, as in the step
    with torch.no_grad():  # P = S(cat[(F̂ − F_aug)², F_aug]): the segmentation reads the defective features
        expected_p = module.model.segment(rec.reconstructor_output, f_augmented)
    torch.testing.assert_close(prediction, expected_p, atol=1e-5, rtol=1e-4)
    small = downsample_mask(mask, (64, 64))
    p = prediction.clamp(1e-6, 1 - 1e-6)
    p_t = torch.where(small == 1, p, 1 - p)
    expected = (
        ((reconstruction - f_normal) ** 2).mean()
        + (-((1 - p_t) ** 4) * torch.log(p_t)).mean()
        + (prediction - small).abs().mean()
    )
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-5)
    loss.backward()
    for name in ("reconstructor", "segmentor"):
        params = list(getattr(module.model, name).parameters())
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params), name
    assert all(p.grad is None for p in module.model.feature_extractor.parameters())


def test_training_rotates_normal_images_and_testing_perturbs_nothing():
    """Training rotates the normal images (table range for the category) before the synthesis; validation feeds
    the batch to the model untouched and is deterministic."""
    images = _asymmetric_images()
    module = _small_module(rotation_degrees=(90.0, 90.0), rotation_probability=1.0, anomaly_probability=0.0)
    rec = _Recorder(module)
    module.train()
    module.training_step(_batch(images.clone()))
    normal, augmented = rec.model_inputs
    rotated = torch.rot90(images, 1, dims=(-2, -1))  # +90° is counter-clockwise
    torch.testing.assert_close(normal[..., 2:-2, 2:-2], rotated[..., 2:-2, 2:-2], atol=1e-4, rtol=0)
    assert torch.equal(augmented, normal)  # anomaly_probability=0: no defect, empty mask
    assert rec.synthesized[2].sum() == 0

    # The reference's table: ±90° for grid, none for capsule (rotation_probability=1 to make it visible).
    torch.manual_seed(0)
    grid = _small_module(category="grid", rotation_probability=1.0, anomaly_probability=0.0)
    assert (grid.synthesize(images)[0] - images).abs().amax() > 0.3
    capsule = _small_module(category="capsule", rotation_probability=1.0, anomaly_probability=0.0)
    assert torch.equal(capsule.synthesize(images)[0], images)

    module.eval()
    rec.model_inputs = None
    batch = _batch(images.clone())
    with torch.no_grad():
        first = module.validation_step(batch)
        (seen,) = rec.model_inputs
        second = module.validation_step(_batch(images.clone()))
    assert torch.equal(seen, images)
    assert torch.equal(first.pred_score, second.pred_score)
    assert torch.equal(first.anomaly_map, second.anomaly_map)


def test_datamodule_category_sets_the_rotation_range():
    module = _small_module()
    assert module.rotation_degrees == (0.0, 0.0)
    module.follow_datamodule_category("screw")
    assert module.rotation_degrees == (-90.0, 90.0)
    module = _small_module()
    module.follow_datamodule_category("pill")
    assert module.rotation_degrees == (0.0, 0.0)
    explicit = _small_module(rotation_degrees=10.0)
    explicit.follow_datamodule_category("screw")
    assert explicit.rotation_degrees == (-10.0, 10.0)


def test_every_na_block_attends_and_shapes_the_reconstruction():
    """Each of the 32 NA layers of R runs once per forward and its output changes F̂ (zeroing it, one at a time)."""
    ae = NAAutoencoder(8, base_channels=32, latent_channels=32).eval()
    attentions = [m for m in ae.modules() if isinstance(m, NeighborhoodAttention2D)]
    assert len(attentions) == 32  # 16 encoder + 16 decoder NSABlocks
    calls = dict.fromkeys(map(id, attentions), 0)
    handles = [a.register_forward_hook(lambda m, i, o: calls.__setitem__(id(m), calls[id(m)] + 1)) for a in attentions]
    torch.manual_seed(0)
    x = torch.randn(1, 8, 64, 64)
    with torch.no_grad():
        reference = ae(x)
    assert set(calls.values()) == {1}
    for h in handles:
        h.remove()
    for attention in attentions:
        handle = attention.register_forward_hook(lambda m, i, o: torch.zeros_like(o))
        with torch.no_grad():
            changed = (ae(x) - reference).abs().amax()
        handle.remove()
        assert changed > 1e-4, attention


def test_na_blocks_attend_within_their_kernel():
    """g_a1's attention (kernel 7 on the 32×32 stage): a token change reaches only queries whose clamped 7×7
    window holds it (rows 17-23 for a token in row 20; rows <= 16 are untouched)."""
    ae = NAAutoencoder(8, base_channels=32, latent_channels=32).eval()
    attention = ae.g_a1.blocks[0].attn
    x = torch.randn(1, 32, 32, 32)
    y = x.clone()
    y[0, 20, 20] += 5.0
    with torch.no_grad():
        diff = (attention(y) - attention(x)).abs().amax(dim=(0, 3))  # (rows, cols)
    assert diff[:17].max() == 0 and diff[24:].max() == 0
    assert diff[17:24, 17:24].min() > 0 and diff[17:24, :17].max() == 0


def test_loss_compares_reconstruction_with_target_and_prediction_with_mask():
    """MSE(F̂, F_n) + focal(γ=4) + L1 checked against brute force; a perfect prediction costs ~0."""
    torch.manual_seed(0)
    rec, tgt = torch.randn(2, 5, 8, 8), torch.randn(2, 5, 8, 8)
    mask = torch.zeros(2, 1, 32, 32)
    mask[:, :, 8:20, 4:16] = 1
    small = downsample_mask(mask, (8, 8))
    p = torch.rand(2, 1, 8, 8).clamp(0.05, 0.95)
    losses = NAFRADLoss()(rec, tgt, p, mask)
    p_t = torch.where(small == 1, p, 1 - p)
    focal = (-torch.log(p_t) * (1 - p_t) ** 4).mean()
    torch.testing.assert_close(losses["reconstruction"], ((rec - tgt) ** 2).mean())
    torch.testing.assert_close(losses["focal"], focal)
    torch.testing.assert_close(losses["l1"], (p - small).abs().mean())
    perfect = NAFRADLoss()(tgt, tgt, small, mask)
    assert perfect["loss"] < 1e-4
    inverted = NAFRADLoss()(tgt, tgt, 1 - small, mask)
    assert inverted["focal"] > 1 and inverted["l1"] == 1


def test_train_and_eval_outputs(small_model):
    x = torch.rand(2, 3, 256, 256)
    small_model.train()
    out = small_model(x, x.clone())
    assert isinstance(out, NAFRADTrainOutput)
    c = small_model.in_channels
    assert out.normal_features.shape == out.augmented_features.shape == out.reconstruction.shape == (2, c, 64, 64)
    assert out.prediction.shape == (2, 1, 64, 64)
    small_model.eval()
    with torch.no_grad():
        pred = small_model(x)
    assert isinstance(pred, InferenceBatch)
    assert pred.pred_score.shape == (2,) and pred.anomaly_map.shape == (2, 1, 256, 256)
    # the map is P bilinearly upsampled ×4 from the feature grid: each interior 4×4 block of the map then averages to
    # the separable filter [1/8, 3/4, 1/8] of P (the block's samples sit at ±1/8 and ±3/8 of a cell from its centre)
    with torch.no_grad():
        features = small_model.get_features(x)
        p = small_model.segment(small_model.reconstructor(features), features)
    pooled = torch.nn.functional.avg_pool2d(pred.anomaly_map, 4)
    taps = torch.tensor([0.125, 0.75, 0.125])
    filtered = torch.nn.functional.conv2d(p, torch.outer(taps, taps).view(1, 1, 3, 3))
    torch.testing.assert_close(pooled[..., 1:-1, 1:-1], filtered, atol=1e-6, rtol=0)


def test_segmentation_gradients_reach_the_autoencoder(small_model):
    small_model.train()
    small_model.zero_grad()
    x = torch.rand(1, 3, 256, 256)
    out = small_model(x)
    out.prediction.mean().backward()  # segmentation term only
    grad = small_model.reconstructor.g_s7.weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_mask_downsampling_thresholds_bilinear_average():
    mask = torch.zeros(1, 1, 256, 256)
    mask[..., :128, :] = 1
    mask[..., 128, :] = 1  # a 1-px line misses the bilinear samples of its 4-px cell
    small = downsample_mask(mask, (64, 64))
    assert small.shape == (1, 1, 64, 64)
    assert small[..., :32, :].eq(1).all() and small[..., 32:, :].eq(0).all()


def test_ablation_variants_run():
    x = torch.rand(1, 3, 256, 256)
    for kwargs in ({"use_neighborhood_attention": False}, {"relative_position_bias": False}):
        model = _small_model(**kwargs).eval()
        with torch.no_grad():
            pred = model(x)
        assert pred.anomaly_map.shape == (1, 1, 256, 256) and torch.isfinite(pred.pred_score).all()
        has_rpb = any(n.endswith("rpb") for n, _ in model.named_parameters())
        assert not has_rpb


def test_lightning_module_defaults():
    module = _small_module()
    assert module.trainer_arguments == {"num_sanity_val_steps": 0}
    assert module.learning_type.value == "one_class"
    transforms = module.pre_processor.transform.transforms
    assert [type(t).__name__ for t in transforms] == ["Resize"]
    assert list(transforms[0].size) == [256, 256]
    normalized = NAFRAD.configure_pre_processor((512, 512), normalize_input=True).transform.transforms
    assert [type(t).__name__ for t in normalized] == ["Resize", "Normalize"]
    config = module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert config["lr_scheduler"]["interval"] == "epoch"
    assert optimizer.defaults["lr"] == 1e-4 and optimizer.defaults["weight_decay"] == 1e-8
    assert dict(scheduler.milestones) == {400: 1, 600: 1} and scheduler.gamma == 0.1
    trained = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert not trained & {id(p) for p in module.model.feature_extractor.parameters()}
    assert len(trained) == len(list(module.model.reconstructor.parameters())) + len(
        list(module.model.segmentor.parameters())
    )


def test_synthesis_keeps_normals_and_marks_anomalies():
    module = _small_module(category="grid", anomaly_probability=1.0)
    assert module.rotation_degrees == (-90.0, 90.0)
    torch.manual_seed(0)
    images = textures(2)
    normal, augmented, mask = module.synthesize(images)
    assert normal.shape == augmented.shape == images.shape and mask.shape == (2, 1, 256, 256)
    assert mask.sum() > 0 and set(mask.unique().tolist()) <= {0.0, 1.0}
    outside = mask.expand_as(normal) == 0
    torch.testing.assert_close(augmented[outside], normal[outside])
    assert not torch.allclose(augmented[~outside], normal[~outside])
    module = _small_module(anomaly_probability=0.0, rotation_probability=0.0)
    normal, augmented, mask = module.synthesize(images)
    assert torch.equal(normal, images) and torch.equal(augmented, images) and mask.sum() == 0


def test_skimage_textures_fill_the_synthetic_defects():
    """anomaly_source_path="skimage": every defect is cut from one of scikit-image's bundled photographs (read from
    the installed wheel, nothing downloaded) and blended inside the mask only."""
    pytest.importorskip("skimage")
    module = _small_module(anomaly_source_path="skimage", anomaly_probability=1.0, rotation_probability=0.0)
    sources = []
    generate = module.augmenter.generate_perturbation

    def recording(height, width, device=None, anomaly_source_path=None):
        sources.append(anomaly_source_path)
        return generate(height, width, device, anomaly_source_path)

    module.augmenter.generate_perturbation = recording
    images = torch.full((2, 3, 256, 256), 0.5)
    torch.manual_seed(0)
    _, augmented, mask = module.synthesize(images)
    assert sources and {Path(p).stem for p in sources} <= {"brick", "grass", "gravel"}
    assert all(Path(p).is_file() for p in sources)
    assert mask.sum() > 0
    outside = mask.expand_as(augmented) == 0
    assert augmented[~outside].std() > 0.02  # texture detail, not a flat fill
    torch.testing.assert_close(augmented[outside], images[outside])


# --------------------------------------------------------------------------------------------------- bad input
def test_clear_errors_on_bad_input(small_model):
    small_model.eval()
    with pytest.raises(ValueError, match="3, H, W"):
        small_model(torch.rand(1, 1, 256, 256))
    with pytest.raises(ValueError, match="multiple of 256"):
        small_model(torch.rand(1, 3, 200, 256))
    nan = torch.rand(1, 3, 256, 256)
    nan[..., :8, :8] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        small_model(nan)
    with pytest.raises(ValueError, match="channel_order"):
        _small_model(channel_order="hsv")
    with pytest.raises(ValueError, match="multiple of 32"):
        _small_model(base_channels=40)
    with pytest.raises(ValueError, match="anomaly_source_path"):
        _small_module(anomaly_source_path="/nonexistent/dtd")
    with pytest.raises(ValueError, match="rotation_degrees"):
        _small_module(rotation_degrees=(10.0, -10.0))
    with pytest.raises(ValueError, match="Unknown timm backbone"):
        NAFRADModel("not_a_backbone", weights=None)


def test_input_size_it_cannot_take_fails_at_construction():
    """The grid (input / feature stride) is halved 6 times and doubled back: inputs must be multiples of
    stride × 64. A wrong image_size or pre-processor Resize fails when the model is built, naming image_size."""
    for kwargs in (
        {"image_size": 200},
        {"image_size": (256, 320)},
        {"pre_processor": resize_pre_processor((128, 128))},
    ):
        with pytest.raises(ValueError, match=r"image_size=.*multiples of 256 \(256, 512, 768, ...\)"):
            _small_module(**kwargs)
    assert _small_module(image_size=(256, 512)).model.image_size_divisor == 256
    # Stride-8 layers: the constraint doubles, derived from the backbone's reductions.
    with pytest.raises(ValueError, match=r"multiples of 512"):
        _small_model(layers=[2, 3], image_size=(256, 256))
    stride8 = _small_model(layers=[2, 3], image_size=(512, 512)).eval()
    with torch.no_grad():
        assert stride8(torch.rand(1, 3, 512, 512)).anomaly_map.shape == (1, 1, 512, 512)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lr": -1.0}, r"NAFRAD: lr must be > 0 .*got -1.0"),
        ({"lr": 0.0}, r"lr must be > 0"),
        ({"lr": float("nan")}, r"lr must be > 0"),
        ({"weight_decay": -1e-8}, r"NAFRAD: weight_decay must be >= 0"),
        ({"focal_gamma": -1.0}, r"NAFRAD: focal_gamma must be >= 0"),
        ({"drop_path_rate": 1.0}, r"NAFRAD: drop_path_rate must be in \[0, 1\)"),
        ({"lr_gamma": 0.0}, r"lr_gamma must be in \(0, 1\]"),
        ({"stats_max_images": 0}, r"stats_max_images must be >= 1"),
    ],
)
def test_bad_training_settings_fail_at_construction(kwargs, match):
    """Settings that would fail inside torch at fit (Adam refuses lr=-1) or train nonsense are refused when the model
    is built, naming the argument."""
    with pytest.raises(ValueError, match=match):
        _small_module(**kwargs)


# ------------------------------------------------------------------------------------------------------ learning
def _real_or_generated_batch(n: int) -> torch.Tensor:
    files = sorted((MAGNETIC_TILE / "train" / "good").glob("*.jpg"))[:n]
    if len(files) < n:
        return textures(n, seed=5)
    images = [np.asarray(Image.open(f).convert("RGB").resize((256, 256)), dtype=np.float32) / 255 for f in files]
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()


def test_training_steps_lower_the_loss_on_a_fixed_batch():
    """A few Adam steps on one fixed (normal, pseudo-anomalous, mask) batch of real images lower the loss."""
    module = _small_module(weights="imagenet", lr=1e-3, anomaly_probability=1.0)
    torch.manual_seed(1)
    normal, augmented, mask = module.synthesize(_real_or_generated_batch(2))
    optimizer = module.configure_optimizers()["optimizer"]
    module.train()
    history = []
    for _ in range(6):
        out = module.model(normal, augmented)
        loss = module.loss(out.reconstruction, out.normal_features, out.prediction, mask)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(loss.item())
    assert all(b < a for a, b in itertools.pairwise(history)), history
    assert history[-1] < 0.85 * history[0], history


@pytest.mark.slow
def test_synthetic_anomalies_score_higher_inside_the_mask():
    """After a short training on textures, maps are higher on unseen synthetic defects than around them."""
    from torchmetrics.functional.classification import binary_auroc

    module = _small_module(weights="imagenet", lr=1e-3, anomaly_probability=1.0, rotation_probability=0.0)
    data = textures(16)
    optimizer = module.configure_optimizers()["optimizer"]
    torch.manual_seed(0)
    module.train()
    for _ in range(30):  # the Lightning training_step, as the Engine runs it
        loss = module.training_step(_batch(data[torch.randint(0, 16, (4,))]))["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    module.eval()
    torch.manual_seed(123)
    _, augmented, mask = module.synthesize(textures(6, seed=99))
    with torch.no_grad():
        amap = module.model(augmented).anomaly_map
    assert amap[mask > 0].mean() > amap[mask == 0].mean() + 0.03
    assert binary_auroc(amap.flatten(), mask.flatten().long()) > 0.7


# -------------------------------------------------------------------------------------------- export / checkpoint
@pytest.mark.slow
@pytest.mark.export
def test_onnx_and_openvino_export_match_torch(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    onnx = pytest.importorskip("onnx")
    module = _small_module(post_processor=False, standardize_features=True).eval()
    module.fit_feature_statistics([_batch(textures(2, seed=6))])
    assert module.model.feature_std.std() > 0.01  # non-trivial statistics that the graph must carry
    x = torch.rand(2, 3, 256, 256)
    with torch.no_grad():
        expected = module(x)
    path = module.to_onnx(tmp_path, input_size=(256, 256), opset_version=18)
    graph = onnx.load(str(path))
    assert {n.domain for n in graph.graph.node} <= {"", "ai.onnx"}  # pure NA: standard ops only
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    results = dict(zip(names, session.run(None, {session.get_inputs()[0].name: x.numpy()}), strict=True))
    np.testing.assert_allclose(results["pred_score"].reshape(-1), expected.pred_score.numpy(), atol=1e-4)
    np.testing.assert_allclose(results["anomaly_map"], expected.anomaly_map.numpy(), atol=1e-4)

    pytest.importorskip("openvino")
    from anomalib_recon.deploy import compile_openvino

    compiled = compile_openvino(path)  # fp32: CPUs with AVX-512 BF16 would otherwise compile in bf16
    ov_out = compiled([x.numpy()])
    ov_results = {o.get_any_name(): ov_out[o] for o in compiled.outputs}
    np.testing.assert_allclose(ov_results["pred_score"].reshape(-1), expected.pred_score.numpy(), atol=1e-4)
    np.testing.assert_allclose(ov_results["anomaly_map"], expected.anomaly_map.numpy(), atol=1e-4)


@pytest.mark.export
def test_export_parity_at_128px_stride2_layers_with_a_narrow_score_range(tmp_path):
    """ONNX Runtime and OpenVINO (fp32) keep the normalised ``pred_score`` within 1e-4 of torch at 128 px with
    ``layers=[0, 1]`` (stride-2 grid), the configuration where it once differed by 1.2e-3.

    anomalib's post-processor divides by the validation score range; after two training steps that range was 3.1e-3
    (measured through the Engine), so a raw difference of 3e-7 became 1e-4. The statistics are set to that range here
    instead of training. The NA blocks are left out (``use_neighborhood_attention=False``): the cause sat in the
    score, and the 32 NA blocks would add about a minute of tracing (the 256-px test above exports them).
    """
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    module = _small_module(layers=[0, 1], image_size=128, use_neighborhood_attention=False).eval()
    x = textures(4, size=128, seed=3)
    with torch.no_grad():
        raw = module.model(x)
    post = module.post_processor
    threshold = raw.pred_score.median()
    post._image_threshold.fill_(threshold)  # anomalib's buffer, set by validation otherwise
    post.image_min.fill_(threshold - 1.55e-3)
    post.image_max.fill_(threshold + 1.55e-3)
    post._pixel_threshold.fill_(raw.anomaly_map.median())
    post.pixel_min.fill_(raw.anomaly_map.min())
    post.pixel_max.fill_(raw.anomaly_map.max())
    with torch.no_grad():
        expected = module(x)
    assert ((expected.pred_score > 0) & (expected.pred_score < 1)).all()  # none clamped: every difference counts
    path = module.to_onnx(tmp_path, input_size=(128, 128), opset_version=18)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    results = dict(zip(names, session.run(None, {session.get_inputs()[0].name: x.numpy()}), strict=True))
    np.testing.assert_allclose(results["pred_score"].reshape(-1), expected.pred_score.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(results["anomaly_map"], expected.anomaly_map.numpy(), atol=1e-4, rtol=0)

    pytest.importorskip("openvino")
    from anomalib_recon.deploy import compile_openvino

    compiled = compile_openvino(path)
    ov_out = compiled([x.numpy()])
    ov_results = {o.get_any_name(): ov_out[o] for o in compiled.outputs}
    np.testing.assert_allclose(ov_results["pred_score"].reshape(-1), expected.pred_score.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(ov_results["anomaly_map"], expected.anomaly_map.numpy(), atol=1e-4, rtol=0)


@pytest.mark.slow
def test_checkpoint_round_trip_with_safe_loader(tmp_path):
    """Fit through the Engine with standardize_features: the statistics are the per-channel mean/std of the
    training features, measured at fit start, and the safe-loaded checkpoint carries them."""
    from tests.conftest import cpu_engine, folder_datamodule, write_textured_category

    root = write_textured_category(tmp_path / "data", size=256, n_train=3, n_good=1, n_defect=2, defect=40)
    datamodule = folder_datamodule(root, batch_size=2)
    torch.manual_seed(0)
    model = NAFRAD(backbone=LITE0, weights=None, visualizer=False, standardize_features=True, **SMALL)
    engine = cpu_engine(tmp_path / "results", max_steps=2)
    engine.fit(model, datamodule=datamodule)
    files = sorted((root / "train" / "good").glob("*.png"))
    raw = torch.stack([torch.from_numpy(np.asarray(Image.open(f).convert("RGB"), np.float32) / 255) for f in files])
    with torch.no_grad():
        features = model.model.get_features(raw.permute(0, 3, 1, 2), standardize=False).double()
    assert int(model.model.feature_stats_count) == 3
    torch.testing.assert_close(
        model.model.feature_mean.flatten().double(), features.mean((0, 2, 3)), atol=1e-4, rtol=1e-4
    )
    torch.testing.assert_close(
        model.model.feature_std.flatten().double(), features.std((0, 2, 3), correction=0), atol=1e-4, rtol=1e-3
    )
    ckpt = next((tmp_path / "results").rglob("*.ckpt"))
    loaded = NAFRAD.load_from_checkpoint(ckpt, weights_only=True)
    assert loaded.hparams["backbone"] == LITE0 and loaded.hparams["base_channels"] == 32
    assert loaded.model.feature_statistics_fitted
    torch.testing.assert_close(loaded.model.feature_std, model.model.feature_std)
    model.eval()
    loaded.eval()
    x = torch.rand(1, 3, 256, 256)
    with torch.no_grad():
        a, b = model(x), loaded(x)
    torch.testing.assert_close(a.pred_score, b.pred_score)
    torch.testing.assert_close(a.anomaly_map, b.anomaly_map)
    torch.testing.assert_close(loaded.post_processor.image_threshold, model.post_processor.image_threshold)


@pytest.mark.slow
def test_feature_statistics_under_ddp_equal_the_single_process_result(tmp_path):
    """Under 2-process DDP each rank measures its share of the first ``stats_max_images`` training images and the
    per-image moments are gathered: both ranks hold the same ``feature_mean``/``feature_std``, equal to one process
    reading exactly those images in dataset order (here 3 of 5, split 2 + 1 between the ranks)."""
    from torch.utils.data import DataLoader

    from tests.conftest import folder_datamodule, write_textured_category
    from tests.ddp import assert_same_state, fit_ddp

    root = write_textured_category(tmp_path / "data", size=256, n_train=5, n_good=1, n_defect=1, defect=40)
    args = {"backbone": LITE0, "weights": None, "visualizer": False, "standardize_features": True, **SMALL}
    torch.manual_seed(0)
    states = fit_ddp(NAFRAD(**args, stats_max_images=3), folder_datamodule(root, batch_size=2), tmp_path, max_steps=1)
    statistics = ["model.feature_mean", "model.feature_std", "model.feature_stats_count"]
    assert_same_state(states, statistics)
    assert int(states[0]["model.feature_stats_count"]) == 3

    single = NAFRAD(**args, stats_max_images=3)
    single.load_state_dict(states[0])  # the same (frozen) backbone
    datamodule = folder_datamodule(root, batch_size=2)
    datamodule.setup()
    dataset = datamodule.train_data
    loader = DataLoader(dataset, batch_size=2, shuffle=False, collate_fn=dataset.collate_fn)
    assert single.fit_feature_statistics(loader) == 3
    for name in ("feature_mean", "feature_std"):
        torch.testing.assert_close(states[0][f"model.{name}"], getattr(single.model, name), rtol=1e-6, atol=1e-7)
    single.stats_max_images = 5  # all five images give other statistics: the first three were the ones used
    single.fit_feature_statistics(loader)
    assert (states[0]["model.feature_mean"] - single.model.feature_mean).abs().max() > 1e-4
