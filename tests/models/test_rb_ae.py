"""RB-AE / NDP-Net: RBAM against brute force, losses against their formulas, both stages' wiring, the learning-rate
schedule per stage, the reference rule (single process, DDP, checkpoint, export), learning and bad input."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from anomalib.data import ImageBatch
from lightning.pytorch.callbacks import Callback
from PIL import Image
from torch.nn import functional as F

from anomalib_recon.components.guards import NonFiniteError
from anomalib_recon.models.image.rb_ae import RBAE
from anomalib_recon.models.image.rb_ae.loss import (
    RBAEReconstructionLoss,
    RBAESegmentationLoss,
    mask_coverage,
    perception_loss,
    ssim_loss,
)
from anomalib_recon.models.image.rb_ae.torch_model import (
    MSFDM,
    REFERENCE_FROM_FILE,
    REFERENCE_UNSET,
    RBAEModel,
    ReferenceAttention,
    resolve_layers,
)
from tests.conftest import cpu_engine, folder_datamodule, write_textured_category

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LITE0 = "tf_efficientnet_lite0"
TINY = {"backbone": LITE0, "weights": None, "image_size": 64, "seg_channels": 8, "reconstruction_steps": 2}


def tiny(**kwargs) -> RBAE:
    """A small RBAE (Lite0 strides 4/8/16/32: 16, 8, 4 and 2 px maps at 64 px), random weights, no visualizer."""
    return RBAE(**{**TINY, "visualizer": False, **kwargs})


def textures(n: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    """Gray stripe textures in [0, 1], ``(n, 3, size, size)``, each with its own phase and noise."""
    gen = torch.Generator().manual_seed(seed)
    rows = torch.arange(size).float().view(-1, 1)
    cols = torch.arange(size).float().view(1, -1)
    images = []
    for _ in range(n):
        phase = float(torch.rand(1, generator=gen)) * 2 * math.pi
        noise = 0.02 * torch.randn(size, size, generator=gen)
        image = 0.5 + 0.2 * torch.sin(cols / 3 + phase) * torch.cos(rows / 5) + noise
        images.append(image.clamp(0, 1).expand(3, size, size))
    return torch.stack(images).contiguous()


def _training_step(model: RBAE, images: torch.Tensor, monkeypatch: pytest.MonkeyPatch) -> tuple[torch.Tensor, list]:
    """The model's own ``training_step`` without a trainer (optimisers and ``manual_backward`` stubbed); returns the
    loss and the optimisers."""
    optimizers = [_Optimizer(o) for o in model.configure_optimizers()]
    monkeypatch.setattr(model, "optimizers", lambda: optimizers)
    monkeypatch.setattr(model, "manual_backward", lambda loss: loss.backward())
    for o in optimizers:  # keep the gradients of the step for the assertions
        monkeypatch.setattr(o, "zero_grad", lambda: None)
    model.train()
    return model.training_step(ImageBatch(image=images), 0)["loss"], optimizers


class _Optimizer:
    """What ``training_step`` uses of a ``LightningOptimizer``: ``optimizer``, ``zero_grad`` and ``step`` (a no-op, so
    the weights of the step stay those the loss was computed with)."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.steps = 0

    def zero_grad(self) -> None:
        self.optimizer.zero_grad()

    def step(self) -> None:
        self.steps += 1


def _record(monkeypatch: pytest.MonkeyPatch, obj: object, name: str) -> dict:
    """Replace ``obj.name`` by a wrapper that keeps its last output (key ``"out"``)."""
    seen: dict = {}
    original = getattr(obj, name)

    def wrapper(*args, **kwargs):
        seen["out"] = original(*args, **kwargs)
        return seen["out"]

    monkeypatch.setattr(obj, name, wrapper)
    return seen


def _gradients(params: list[torch.nn.Parameter]) -> tuple[bool, float]:
    """(every parameter got a gradient, total |gradient|)."""
    return all(p.grad is not None for p in params), sum(float(p.grad.abs().sum()) for p in params if p.grad is not None)


IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


# ------------------------------------------------------------------------------------------------------------- layers
def test_default_layers_are_the_last_at_strides_4_8_16_32():
    assert resolve_layers("resnet18.tv_in1k") == ["layer1", "layer2", "layer3", "layer4"]
    assert resolve_layers(LITE0) == ["blocks.1", "blocks.2", "blocks.4", "blocks.6"]
    assert resolve_layers(LITE0, [1, 2]) == [1, 2]


def test_paper_encoder_is_a_trainable_resnet18_with_four_scales():
    model = RBAEModel("resnet18.tv_in1k", weights=None, image_size=(64, 64))
    assert model.channels == [64, 128, 256, 512] and model.strides == [4, 8, 16, 32]
    assert all(p.requires_grad for p in model.encoder.parameters())
    assert [m.value.out_channels for m in model.rbam] == [64, 128, 256, 512]
    assert [m.qk_channels for m in model.rbam] == [32, 64, 128, 256]  # d = C / 2


# --------------------------------------------------------------------------------------------------------------- RBAM
def test_rbam_is_softmax_attention_over_reference_positions_brute_force():
    """F'_p = Σ_j softmax_j(q_p · k_j / √d) v_j with q from the input and k, v from the reference, position by
    position in float64; attention rows sum to 1."""
    torch.manual_seed(0)
    rbam = ReferenceAttention(6).double()
    features, reference = torch.randn(2, 6, 3, 4).double(), torch.randn(1, 6, 2, 5).double()
    out = rbam(features, reference)
    q = torch.einsum("oc,bchw->bhwo", rbam.query.weight[:, :, 0, 0], features) + rbam.query.bias
    k = torch.einsum("oc,chw->hwo", rbam.key.weight[:, :, 0, 0], reference[0]) + rbam.key.bias
    v = torch.einsum("oc,chw->hwo", rbam.value.weight[:, :, 0, 0], reference[0]) + rbam.value.bias
    k, v = k.reshape(-1, 3), v.reshape(-1, 6)
    for b in range(2):
        for y in range(3):
            for x in range(4):
                logits = torch.stack([q[b, y, x] @ k[j] / math.sqrt(3) for j in range(10)])
                weights = torch.exp(logits - logits.max()) / torch.exp(logits - logits.max()).sum()
                expected = sum(weights[j] * v[j] for j in range(10))
                torch.testing.assert_close(out[b, :, y, x], expected)
    attention = rbam.attention(features, reference)
    assert attention.shape == (2, 12, 10)
    torch.testing.assert_close(attention.sum(-1), torch.ones(2, 12, dtype=torch.float64))


def test_rbam_lets_no_defect_through_a_uniform_reference_but_plain_skips_do():
    """Every RBAM output is a convex combination of reference values: with a spatially uniform reference the
    repaired maps are the same for an image and its defective copy, whatever the defect. Plain skips pass it."""
    torch.manual_seed(0)
    model = RBAEModel(LITE0, weights=None, image_size=(64, 64)).eval()
    plain = RBAEModel(LITE0, weights=None, image_size=(64, 64), use_rbam=False).eval()
    image = textures(1)
    defective = image.clone()
    defective[..., 20:40, 20:40] = torch.tensor([0.1, 0.1, 0.9]).view(1, 3, 1, 1)
    with torch.no_grad():
        reference = [f.mean(dim=(2, 3), keepdim=True).expand_as(f) for f in model.encode(textures(1, seed=5))]
        for net, same in ((model, True), (plain, False)):
            repaired = [net.repair(net.encode(x), reference) for x in (image, defective)]
            gap = max(float((a - b).abs().max()) for a, b in zip(*repaired, strict=True))
            assert (gap < 1e-5) == same, (net.use_rbam, gap)


# -------------------------------------------------------------------------------------------------------------- shapes
def test_inference_shapes_for_sizes_not_multiples_of_32():
    torch.manual_seed(0)
    model = RBAEModel(LITE0, weights=None, image_size=(64, 64)).eval()
    for size in ((64, 64), (72, 40)):
        with torch.no_grad():
            out = model(torch.rand(2, 3, *size))
        assert out.anomaly_map.shape == (2, 1, *size)
        assert out.pred_score.shape == (2,)
        assert bool(((out.anomaly_map >= 0) & (out.anomaly_map <= 1)).all())


def test_image_score_is_the_max_of_the_21px_average_pooled_map():
    torch.manual_seed(0)
    model = RBAEModel(LITE0, weights=None, image_size=(64, 64)).eval()
    images = textures(2)
    with torch.no_grad():
        out = model(images)
    pooled = F.avg_pool2d(out.anomaly_map.double(), 21, stride=1, padding=10, count_include_pad=True)
    torch.testing.assert_close(out.pred_score.double(), pooled.flatten(1).amax(1), atol=1e-6, rtol=0)


def test_msfdm_reads_the_features_their_reconstruction_and_the_difference():
    """The MSFDM's first convolution per scale sees exactly cat[E_s(x), E_s(x̂), |E_s(x) − E_s(x̂)|]."""
    torch.manual_seed(0)
    msfdm = MSFDM([4, 6], width=8).eval()
    seen = []
    for reduce in msfdm.reduce:
        reduce[0].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    f = [torch.randn(2, 4, 8, 8), torch.randn(2, 6, 4, 4)]
    r = [torch.randn(2, 4, 8, 8), torch.randn(2, 6, 4, 4)]
    logits = msfdm(f, r, (32, 32))
    assert logits.shape == (2, 1, 32, 32)
    for got, a, b in zip(seen, f, r, strict=True):
        torch.testing.assert_close(got, torch.cat([a, b, (a - b).abs()], dim=1))


# ------------------------------------------------------------------------------------------------------------- losses
def _ssim_brute(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean SSIM in float64: Gaussian window 11×11, σ = 1.5, reflect padding, c1 = 0.01², c2 = 0.03²."""
    a, b = a.double(), b.double()
    g = torch.exp(-((torch.arange(11).double() - 5) ** 2) / (2 * 1.5**2))
    window = (g[:, None] * g[None, :]) / g.sum() ** 2
    c = a.shape[1]
    weight = window.expand(c, 1, 11, 11)

    def blur(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(x, (5, 5, 5, 5), mode="reflect"), weight, groups=c)

    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b, cov = blur(a * a) - mu_a**2, blur(b * b) - mu_b**2, blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    ssim = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return ssim.mean()


def test_reconstruction_loss_is_mse_plus_one_minus_ssim_plus_weighted_perception():
    torch.manual_seed(0)
    x = textures(2)
    x_hat = (x + 0.1 * torch.randn_like(x)).clamp(0, 1)
    torch.testing.assert_close(ssim_loss(x, x), torch.tensor(0.0), atol=1e-6, rtol=0)
    torch.testing.assert_close(ssim_loss(x_hat, x).double(), 1 - _ssim_brute(x_hat, x), atol=1e-5, rtol=0)
    mask = torch.zeros(2, 1, 64, 64)
    mask[:, :, 8:40, 8:40] = 1
    aug, clean = [torch.randn(2, 5, 16, 16)], [torch.randn(2, 5, 16, 16)]
    losses = RBAEReconstructionLoss(perception_loss_weight=0.3)(x_hat, x, mask, aug, clean)
    expected = ((x_hat - x) ** 2).mean() + ssim_loss(x_hat, x) + 0.3 * perception_loss(aug, clean, mask)
    torch.testing.assert_close(losses["loss"], expected)
    without = RBAEReconstructionLoss(perception_loss_weight=0.0)(x_hat, x, mask, aug, clean)
    torch.testing.assert_close(without["loss"], ((x_hat - x) ** 2).mean() + ssim_loss(x_hat, x))


def test_perception_loss_per_position_brute_force():
    """Fully covered positions pay max(0, cos − margin), untouched positions 1 − cos, partly covered ones nothing;
    each term is a mean over its positions, then the scales are averaged."""
    torch.manual_seed(0)
    mask = torch.zeros(2, 1, 16, 16)
    mask[0, :, 2:9, 3:12] = 1  # partial coverage on the 4×4 grid's cells
    aug = [torch.randn(2, 3, 8, 8).double(), torch.randn(2, 3, 4, 4).double()]
    clean = [torch.randn(2, 3, 8, 8).double(), torch.randn(2, 3, 4, 4).double()]
    got = perception_loss(aug, clean, mask, margin=0.2)
    terms = []
    for a, c in zip(aug, clean, strict=True):
        h = a.shape[-1]
        cell = 16 // h
        defect, normal = [], []
        for b in range(2):
            for y in range(h):
                for x in range(h):
                    cover = float(mask[b, 0, y * cell : (y + 1) * cell, x * cell : (x + 1) * cell].mean())
                    cos = float(F.cosine_similarity(a[b, :, y, x], c[b, :, y, x], dim=0))
                    if cover >= 0.5:
                        defect.append(max(0.0, cos - 0.2))
                    elif cover == 0:
                        normal.append(1 - cos)
        assert defect and normal and len(defect) + len(normal) < 2 * h * h  # all three kinds of position occur
        terms.append(np.mean(defect) + np.mean(normal))
    assert got.item() == pytest.approx(np.mean(terms), abs=1e-9)


def test_perception_loss_without_defects_is_the_normal_term_only():
    a, c = [torch.randn(1, 3, 4, 4)], [torch.randn(1, 3, 4, 4)]
    got = perception_loss(a, c, torch.zeros(1, 1, 16, 16))
    torch.testing.assert_close(got, (1 - F.cosine_similarity(a[0], c[0], dim=1)).mean())
    torch.testing.assert_close(mask_coverage(torch.ones(1, 1, 16, 16), (4, 4)), torch.ones(1, 1, 4, 4))


def test_segmentation_loss_is_focal_gamma_2_plus_dice():
    torch.manual_seed(0)
    p = torch.rand(2, 1, 8, 8).clamp(0.01, 0.99)
    m = (torch.rand(2, 1, 8, 8) > 0.7).float()
    got = RBAESegmentationLoss(focal_gamma=2.0)(p, m)
    p_t = torch.where(m == 1, p, 1 - p)
    focal = (-((1 - p_t) ** 2) * torch.log(p_t)).mean()
    dice = (1 - (2 * (p * m).sum((1, 2, 3)) + 1) / (p.sum((1, 2, 3)) + m.sum((1, 2, 3)) + 1)).mean()
    torch.testing.assert_close(got["loss"], focal + dice)


# ------------------------------------------------------------------------------------------------------------- wiring
def test_stage_one_step_reconstructs_the_clean_image_from_the_defective_one(monkeypatch):
    """Stage 1 through ``training_step``: the encoder sees [x_a; x; x_ref] (ImageNet-normalised), the RBAMs repair
    the maps of x_a with the reference's maps, and the loss is MSE(x̂, x) + (1 − SSIM(x̂, x)) + λ·L_per(E(x_a), E(x))
    with the *clean* images as targets. Encoder, RBAM and decoder get gradients, the MSFDM none."""
    torch.manual_seed(0)
    model = tiny(anomaly_probability=1.0, perception_loss_weight=0.7)
    net = model.model
    net.set_reference(textures(1, seed=9), 0)
    images = textures(2, seed=1)
    synthesized = _record(monkeypatch, model, "synthesize")
    seen: dict = {"rbam": []}
    net.encoder.register_forward_hook(lambda m, args, out: seen.update(encoder_in=args[0], encoder_out=list(out)))
    for rbam in net.rbam:
        rbam.register_forward_pre_hook(lambda m, args: seen["rbam"].append(args))
    net.decoder.register_forward_hook(lambda m, args, out: seen.update(reconstruction=out))
    loss, _ = _training_step(model, images, monkeypatch)
    augmented, mask = synthesized["out"]
    assert mask.sum() > 0 and (augmented - images).abs().amax() > 0.1  # the defects change the input
    normalised = (torch.cat([augmented, images, net.reference_image]) - IMAGENET_MEAN) / IMAGENET_STD
    torch.testing.assert_close(seen["encoder_in"], normalised)
    for (features, reference), out in zip(seen["rbam"], seen["encoder_out"], strict=True):
        torch.testing.assert_close(features, out[:2])
        torch.testing.assert_close(reference, out[4:])
    x_hat = seen["reconstruction"]
    aug_maps = [f[:2] for f in seen["encoder_out"]]
    clean_maps = [f[2:4].detach() for f in seen["encoder_out"]]
    expected = ((x_hat - images) ** 2).mean() + 1 - _ssim_brute(x_hat, images).float()
    expected = expected + 0.7 * perception_loss(aug_maps, clean_maps, mask)
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    for name in ("encoder", "rbam", "decoder"):
        complete, total = _gradients(list(getattr(net, name).parameters()))
        assert complete and total > 0, name
    assert all(p.grad is None for p in net.msfdm.parameters())


def test_stage_one_without_perception_loss_encodes_no_clean_images(monkeypatch):
    torch.manual_seed(0)
    model = tiny(perception_loss_weight=0.0)
    seen: dict = {}
    model.model.encoder.register_forward_hook(lambda m, args, out: seen.update(batch=args[0].shape[0]))
    _training_step(model, textures(2), monkeypatch)
    assert seen["batch"] == 3  # x_a (2) and the reference


def test_stage_two_step_trains_only_the_msfdm_on_the_synthetic_mask(monkeypatch):
    """Stage 2 through ``training_step``: P = σ(MSFDM(E(x_a), E(x̂))) with x̂ the (frozen) reconstruction of x_a; the
    loss is Focal(P, M; γ=2) + Dice(P, M) against the synthesizer's mask. Only the MSFDM gets gradients; encoder,
    RBAM and decoder are frozen and in eval mode (their batch-norm statistics do not move)."""
    torch.manual_seed(0)
    model = tiny(reconstruction_steps=0, anomaly_probability=1.0)
    net = model.model
    net.set_reference(textures(1, seed=9), 0)
    images = textures(2, seed=2)
    running = net.encoder.bn1.running_mean.clone() if hasattr(net.encoder, "bn1") else None
    synthesized = _record(monkeypatch, model, "synthesize")
    logits = _record(monkeypatch, net, "segmentation_logits")
    loss, optimizers = _training_step(model, images, monkeypatch)
    assert model.stage == "segmentation" and not net.encoder.training and net.msfdm.training
    augmented, mask = synthesized["out"]
    with torch.no_grad():
        x_hat, features = net.reconstruct(augmented)
        expected_logits = net.msfdm(features, net.encode(x_hat), (64, 64))
    torch.testing.assert_close(logits["out"].detach(), expected_logits, atol=1e-5, rtol=1e-4)
    p = torch.sigmoid(expected_logits).clamp(1e-6, 1 - 1e-6)
    p_t = torch.where(mask == 1, p, 1 - p)
    dice = 1 - (2 * (p * mask).sum((1, 2, 3)) + 1) / (p.sum((1, 2, 3)) + mask.sum((1, 2, 3)) + 1)
    torch.testing.assert_close(loss, (-((1 - p_t) ** 2) * torch.log(p_t)).mean() + dice.mean(), atol=1e-5, rtol=1e-4)
    complete, total = _gradients(net.segmentation_parameters())
    assert complete and total > 0
    assert all(p.grad is None for p in net.reconstruction_parameters())
    assert optimizers[1].steps == 1 and optimizers[0].steps == 0
    if running is not None:
        torch.testing.assert_close(net.encoder.bn1.running_mean, running)


def test_stage_learning_rate_decays_after_80_percent_of_each_stage():
    model = tiny(lr=1e-3, lr_milestones=(0.8,), lr_gamma=0.1)
    model._stage_steps = {"reconstruction": 10.0, "segmentation": 5.0}
    stage1 = [model.stage_lr("reconstruction", t) for t in range(10)]
    stage2 = [model.stage_lr("segmentation", t) for t in range(5)]
    assert stage1 == pytest.approx([1e-3] * 8 + [1e-4] * 2)
    assert stage2 == pytest.approx([1e-3] * 4 + [1e-4])
    model = tiny(lr=1e-3, lr_milestones=(2, 3), lr_gamma=0.5)  # epochs counted from each stage's start
    model._batches_per_epoch = 4.0
    assert [model.stage_lr("segmentation", t) for t in (0, 7, 8, 11, 12)] == pytest.approx(
        [1e-3, 1e-3, 5e-4, 5e-4, 2.5e-4]
    )


# ---------------------------------------------------------------------------------------------------------- reference
def _loader(images: torch.Tensor, batch_size: int = 2) -> list[ImageBatch]:
    return [ImageBatch(image=images[i : i + batch_size]) for i in range(0, images.shape[0], batch_size)]


def test_reference_rule_picks_the_image_closest_to_the_mean_descriptor_first_on_a_tie():
    """Brute force: each image's GAP descriptor computed alone in float64, the mean, the Euclidean distances; the
    rule takes the first minimiser. The closest image is put in twice (read in other batches, so its two distances
    differ in the last bits), and the tie goes to the first copy."""
    torch.manual_seed(0)
    model = tiny(stats_max_images=7).eval()
    images = torch.cat([textures(3, seed=3), 0.7 * textures(3, seed=4) + 0.15])
    with torch.no_grad():
        desc = torch.cat([model.model.reference_descriptor(images[i : i + 1]) for i in range(6)])
    best = int(torch.argmin((desc - desc.mean(0)).norm(dim=1)))
    images = torch.cat([images, images[best : best + 1]])  # a duplicate of the closest image at index 6
    with torch.no_grad():
        desc = torch.cat([model.model.reference_descriptor(images[i : i + 1]) for i in range(7)])
    distances = (desc - desc.mean(0)).norm(dim=1)
    assert distances[best] == distances[6] == distances.min()
    assert (distances > distances.min() + 1e-3 * distances.max()).sum() == 5  # no near-tie with the others
    assert model.choose_reference(_loader(images, 3)) == best
    torch.testing.assert_close(model.model.reference_image, images[best : best + 1])
    assert int(model.model.reference_index) == best
    model.stats_max_images = 2  # only the first two images compete
    assert model.choose_reference(_loader(images, 3)) in (0, 1)


def test_reference_by_index_or_file_and_clear_errors(tmp_path):
    images = textures(4, seed=6)
    model = tiny(reference=2)
    assert model.choose_reference(_loader(images)) == 2
    torch.testing.assert_close(model.model.reference_image, images[2:3])
    with pytest.raises(ValueError, match="holds 4 images"):
        tiny(reference=7).choose_reference(_loader(images))
    path = tmp_path / "golden.png"
    Image.fromarray((images[1].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(path)
    from_file = tiny(reference=str(path))
    assert from_file.choose_reference() == REFERENCE_FROM_FILE
    torch.testing.assert_close(from_file.model.reference_image, images[1:2], atol=1 / 255, rtol=0)
    with pytest.raises(ValueError, match="does not exist"):
        tiny(reference=str(tmp_path / "missing.png")).choose_reference()
    assert int(tiny().model.reference_index) == REFERENCE_UNSET


def test_reference_rule_refuses_non_finite_encoder_features():
    model = tiny()
    with torch.no_grad():
        model.model.encoder.conv_stem.weight.fill_(float("nan"))
    with pytest.raises(NonFiniteError, match="NaN or inf while choosing the reference"):
        model.choose_reference(_loader(textures(2)))


# ------------------------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lr": 0.0}, "lr must be"),
        ({"lr": float("nan")}, "lr must be"),
        ({"weight_decay": -1.0}, "weight_decay"),
        ({"perception_loss_weight": -0.1}, "perception_loss_weight"),
        ({"perception_margin": 1.0}, "perception_margin"),
        ({"anomaly_probability": 0.0}, "anomaly_probability"),
        ({"stats_max_images": 0}, "stats_max_images"),
        ({"reconstruction_steps": -1}, "reconstruction_steps"),
        ({"reconstruction_steps": None, "reconstruction_epochs": 0, "segmentation_epochs": 0}, "must be positive"),
        ({"reference": -1}, "index >= 0"),
        ({"anomaly_source_path": "/no/such/folder"}, "not a folder"),
        ({"image_size": 16}, "at least 32"),
        ({"score_kernel_size": 65}, "score_kernel_size"),
        ({"lr_milestones": (0.5, 3)}, "lr_milestones"),
        ({"backbone": "vit_tiny_patch16_224"}, "timm CNN"),
    ],
)
def test_bad_settings_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny(**kwargs)


def test_bad_inputs_get_one_clear_error():
    model = tiny().model.eval()
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.rand(1, 1, 64, 64))
    with pytest.raises(ValueError, match="at least 32x32"):
        model(torch.rand(1, 3, 16, 64))
    bad = torch.rand(1, 3, 64, 64)
    bad[0, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        model(bad)
    with pytest.raises(ValueError, match=r"must be \(1, 3, 64, 64\)"):
        model.set_reference(torch.rand(1, 3, 32, 32), 0)
    with pytest.raises(TypeError, match="reference must be"):
        tiny(reference=True)


# ------------------------------------------------------------------------------------------------- through the Engine
class _Recorder(Callback):
    """Stage (before each step), learning rate of each optimizer step, weights after every step; validations."""

    def __init__(self) -> None:
        self.stages, self.lrs, self.snapshots, self.validated_at = [], [], [], []

    @staticmethod
    def _snapshot(pl_module) -> dict:
        return {k: v.detach().clone() for k, v in pl_module.model.named_parameters()}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if not self.snapshots:
            self.snapshots.append(self._snapshot(pl_module))
        self.stages.append(pl_module.stage)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.snapshots.append(self._snapshot(pl_module))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.lrs.append(optimizer.param_groups[0]["lr"])

    def on_validation_start(self, trainer, pl_module) -> None:
        self.validated_at.append(trainer.global_step)


def _changed(before: dict, after: dict, prefixes: tuple[str, ...]) -> bool:
    return any(not torch.equal(before[k], after[k]) for k in before if k.startswith(prefixes))


@pytest.mark.slow
def test_two_stages_in_one_fit_update_only_their_parameters(tmp_path, tiny_category):
    """reconstruction_steps=2, max_steps=5 (mid-epoch): steps 1-2 move encoder/RBAM/decoder only, steps 3-5 the
    MSFDM only, each with its learning rate decayed after half of its stage; the final weights are validated; the
    reference was chosen at fit start and is unchanged by training."""
    recorder = _Recorder()
    model = tiny(evaluator=False, lr=1e-3, lr_milestones=(0.5,))
    engine = cpu_engine(tmp_path, max_steps=5, callbacks=[recorder])
    engine.fit(model, datamodule=folder_datamodule(tiny_category, batch_size=4))  # 2 batches per epoch
    assert engine.trainer.global_step == 5
    assert recorder.stages == ["reconstruction"] * 2 + ["segmentation"] * 3
    assert recorder.lrs == pytest.approx([1e-3, 1e-4, 1e-3, 1e-3, 1e-4])  # after round(0.5·2) = 1, round(0.5·3) = 2
    assert recorder.validated_at[-1] == 5
    stage1, stage2 = ("encoder.", "rbam.", "decoder."), ("msfdm.",)
    for step, stage in enumerate(recorder.stages):
        before, after = recorder.snapshots[step], recorder.snapshots[step + 1]
        assert _changed(before, after, stage1) == (stage == "reconstruction"), step
        assert _changed(before, after, stage2) == (stage == "segmentation"), step
    assert model.model.has_reference and int(model.model.reference_index) >= 0


@pytest.mark.slow
def test_budget_that_ends_in_stage_one_is_refused(tmp_path, tiny_category):
    with pytest.raises(ValueError, match="before stage 2"):
        cpu_engine(tmp_path, max_steps=2).fit(tiny(evaluator=False), datamodule=folder_datamodule(tiny_category))
    epochs = tiny(reconstruction_steps=None, reconstruction_epochs=3, segmentation_epochs=1, evaluator=False)
    assert epochs.trainer_arguments == {"max_epochs": 4, "num_sanity_val_steps": 0}
    with pytest.raises(ValueError, match="reconstruction_epochs=3"):  # 2 batches per epoch: stage 2 at step 6
        cpu_engine(tmp_path, max_steps=5).fit(epochs, datamodule=folder_datamodule(tiny_category, batch_size=4))


@pytest.mark.slow
def test_reference_under_ddp_equals_the_single_process_choice(tmp_path):
    """2-process DDP: each rank reads its share of the 5 training images, the descriptors are gathered, and both
    ranks store the same reference image and index, equal to one process choosing from all 5 images in dataset
    order with the same initial weights."""
    from torch.utils.data import DataLoader

    from tests.ddp import assert_same_state, fit_ddp

    root = write_textured_category(tmp_path / "data", size=64, n_train=5, n_good=1, n_defect=1)
    args = {**TINY, "reconstruction_steps": 0, "visualizer": False}
    torch.manual_seed(0)
    model = RBAE(**args)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    states = fit_ddp(model, folder_datamodule(root, batch_size=2), tmp_path, max_steps=1)
    assert_same_state(states, ["model.reference_image", "model.reference_index"])
    single = RBAE(**args)
    single.load_state_dict(initial)
    datamodule = folder_datamodule(root, batch_size=2)
    datamodule.setup()
    dataset = datamodule.train_data
    loader = DataLoader(dataset, batch_size=2, shuffle=False, collate_fn=dataset.collate_fn)
    index = single.choose_reference(loader)
    assert int(states[0]["model.reference_index"]) == index
    torch.testing.assert_close(states[0]["model.reference_image"], single.model.reference_image, atol=0, rtol=0)


@pytest.mark.slow
def test_trained_model_finds_pasted_defects_and_keeps_its_reference_in_checkpoint_and_onnx(tmp_path):
    """40 reconstruction + 60 segmentation steps on 64-px stripes (ImageNet Lite0, lr 1e-3): every pasted-defect test
    image scores above every normal one and the map is higher inside the defects than outside. The checkpoint
    restores the reference, and the ONNX graph carries it (ONNX Runtime equals torch; another reference changes
    torch's outputs)."""
    root = write_textured_category(tmp_path / "data", size=64, n_train=16, n_good=6, n_defect=6, defect=14)
    torch.manual_seed(0)
    model = RBAE(backbone=LITE0, image_size=64, seg_channels=16, reconstruction_steps=40, lr=1e-3, visualizer=False)
    engine = cpu_engine(tmp_path / "run", max_steps=100)
    datamodule = folder_datamodule(root, batch_size=4)
    engine.fit(model, datamodule=datamodule)
    model.eval()
    good = torch.stack([_read(p) for p in sorted((root / "test" / "good").glob("*.png"))])
    bad = torch.stack([_read(p) for p in sorted((root / "test" / "defect").glob("*.png"))])
    masks = torch.stack([_read(p)[:1] for p in sorted((root / "ground_truth" / "defect").glob("*.png"))]) > 0.5
    with torch.no_grad():
        out_good, out_bad = model.model(good), model.model(bad)
    assert out_bad.pred_score.min() > out_good.pred_score.max()  # measured: 0.69-0.74 vs 0.36-0.39
    inside = out_bad.anomaly_map[masks].mean()
    outside = out_bad.anomaly_map[~masks].mean()
    assert inside > outside + 0.2, (float(inside), float(outside))  # measured: 0.81 vs 0.38

    ckpt = tmp_path / "model.ckpt"
    engine.trainer.save_checkpoint(ckpt)
    loaded = RBAE.load_from_checkpoint(ckpt, weights_only=True).eval()
    torch.testing.assert_close(loaded.model.reference_image, model.model.reference_image, atol=0, rtol=0)
    assert int(loaded.model.reference_index) == int(model.model.reference_index) >= 0

    ort = pytest.importorskip("onnxruntime")
    onnx_file = loaded.to_onnx(tmp_path / "onnx", input_size=(64, 64), opset_version=18)
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    x = bad[:2]
    exported = dict(zip(names, session.run(None, {session.get_inputs()[0].name: x.numpy()}), strict=True))
    with torch.no_grad():
        expected = loaded(x)
        np.testing.assert_allclose(exported["anomaly_map"], expected.anomaly_map.numpy(), atol=1e-4, rtol=0)
        loaded.model.set_reference(good[:1].flip(-1), 0)  # another reference changes the torch outputs
        other = loaded(x)
    assert float((other.anomaly_map - expected.anomaly_map).abs().max()) > 1e-3


def _read(path: Path) -> torch.Tensor:
    return torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)
