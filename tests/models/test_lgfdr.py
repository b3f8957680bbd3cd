"""LGFDR: feature statistics against float64 brute force, training noise (train only, clean target), the locality of
the neighbourhood-attention tower and the globality of the ViT tower, the SRH gate against its formula, the map and
score against brute force, ``training_step`` wiring (what the loss compares, which parts get gradients), the
ablation switches, bad input, DDP statistics and learning on defects (tiny CPU settings)."""

from __future__ import annotations

import math

import pytest
import torch
from anomalib.data import ImageBatch, InferenceBatch
from torch.nn import functional as F

from anomalib_recon.components.anomaly_map import make_blur
from anomalib_recon.components.feature_extractor import probe_backbone
from anomalib_recon.components.neighborhood_attention import NeighborhoodAttention2D
from anomalib_recon.models.image.lgfdr import LGFDR
from anomalib_recon.models.image.lgfdr.loss import LGFDRLoss
from anomalib_recon.models.image.lgfdr.torch_model import (
    SWIN_L,
    GlobalTower,
    LocalTower,
    SelectiveReconstructionHead,
    resolve_layers,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = {
    "backbone": "tf_efficientnet_lite0",
    "weights": None,
    "image_size": 64,
    "local_embed_dim": 32,
    "local_depth": 1,
    "local_num_heads": 2,
    "embed_dim": 32,
    "depth": 1,
    "num_heads": 2,
}


def tiny(**kwargs) -> LGFDR:
    """A small LGFDR on a random-weight EfficientNet-Lite0: 176 channels on a 16×16 grid, 4×4 global tokens."""
    torch.manual_seed(0)
    return LGFDR(**{**TINY, **kwargs}, evaluator=False, visualizer=False)


def fitted(**kwargs) -> LGFDR:
    """:func:`tiny` with feature statistics fitted on a few random images."""
    model = tiny(**kwargs)
    model.model.fit_feature_statistics(
        [normalize(torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(1)))]
    )
    return model


def normalize(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (images - mean) / std


def mse64(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return ((a.double() - b.double()) ** 2).mean()


# ---------------------------------------------------------------------------------------------------- backbone
def test_resolve_layers_picks_the_stride_4_8_16_stages():
    assert resolve_layers(SWIN_L) == [0, 1, 2]
    assert resolve_layers("wide_resnet50_2.tv_in1k") == ["layer1", "layer2", "layer3"]
    assert resolve_layers("tf_efficientnet_lite0") == ["blocks.1", "blocks.2", "blocks.4"]
    assert resolve_layers("tf_efficientnet_lite0", [1, 2]) == [1, 2]
    with pytest.raises(ValueError, match="at least one"):
        resolve_layers(SWIN_L, [])
    # the paper's Swin-L stages 0-2 carry 192 + 384 + 768 = 1344 channels at strides 4, 8, 16 (meta-device probe)
    info = probe_backbone(SWIN_L).feature_info
    assert [(e["num_chs"], e["reduction"]) for e in info[:3]] == [(192, 4), (384, 8), (768, 16)]


def test_swin_stages_are_layer_normed_and_concatenated_on_the_stride_4_grid():
    model = LGFDR(
        backbone="swin_tiny_patch4_window7_224",
        weights=None,
        image_size=64,
        local_embed_dim=16,
        local_depth=1,
        local_num_heads=2,
        embed_dim=16,
        depth=1,
        num_heads=2,
        evaluator=False,
        visualizer=False,
    ).model.eval()
    assert model.in_channels == 96 + 192 + 384
    assert model.feature_aggregator.layer_norm
    with torch.no_grad():
        raw = model.raw_features(torch.randn(1, 3, 64, 64))
    assert raw.shape == (1, 672, 16, 16)
    assert raw[:, :96].mean(1).abs().max() < 1e-4  # stage 0: per-token LN without affine, zero mean over channels
    assert (raw[:, :96].var(1, correction=0) - 1).abs().max() < 1e-2


# ---------------------------------------------------------------------------------------------------- statistics
def test_feature_statistics_equal_float64_moments_over_every_pixel():
    model = tiny()
    net = model.model.eval()
    batches = [torch.randn(2, 3, 64, 64), torch.randn(3, 3, 64, 64)]
    assert not net.feature_statistics_fitted
    assert net.fit_feature_statistics(batches) == 5
    with torch.no_grad():
        raw = torch.cat([net.raw_features(b) for b in batches]).double()  # (5, C, 16, 16)
    per_channel = raw.permute(1, 0, 2, 3).reshape(raw.shape[1], -1)
    torch.testing.assert_close(net.feature_mean.flatten().double(), per_channel.mean(1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(
        net.feature_std.flatten().double(), per_channel.std(1, correction=0).clamp_min(1e-6), rtol=1e-5, atol=1e-6
    )
    with torch.no_grad():
        standardised = torch.cat([net.features(b) for b in batches]).double()
    flat = standardised.permute(1, 0, 2, 3).reshape(standardised.shape[1], -1)
    assert flat.mean(1).abs().max() < 1e-4
    live = per_channel.std(1) > 1e-3
    torch.testing.assert_close(
        flat.std(1, correction=0)[live], torch.ones(int(live.sum()), dtype=flat.dtype), atol=1e-4, rtol=0
    )
    state = model.state_dict()
    assert {"model.feature_mean", "model.feature_std", "model.feature_stats_count"} <= set(state)
    assert int(state["model.feature_stats_count"]) == 5


def test_feature_statistics_do_not_cancel_for_features_far_from_zero():
    """The variance is E[x²] − E[x]² of float64 sums: a channel with mean 1000 and std 0.01 keeps its std (float32
    sums of squares would lose it entirely)."""
    net = tiny().model
    c = net.in_channels
    values = 1000.0 + 0.01 * torch.randn(4, c, 16, 16, generator=torch.Generator().manual_seed(0))
    rows = torch.cat(
        [
            values.double().sum((2, 3)),
            (values.double() ** 2).sum((2, 3)),
            torch.full((4, 1), 256.0, dtype=torch.float64),
        ],
        dim=1,
    )
    net.set_feature_statistics(rows)
    expected = values.double().permute(1, 0, 2, 3).reshape(c, -1).std(1, correction=0)
    torch.testing.assert_close(net.feature_std.flatten().double(), expected, rtol=2e-3, atol=0)


def test_unfitted_statistics_are_refused_not_silently_identity(tmp_path):
    model = tiny()
    model.model.eval()
    with pytest.raises(RuntimeError, match="feature statistics are not fitted"):
        model.model(torch.randn(1, 3, 64, 64))
    with pytest.raises(RuntimeError, match="not fitted"):
        model.to_onnx(tmp_path, input_size=(64, 64))
    with pytest.raises(ValueError, match="no images"):
        model.model.fit_feature_statistics([])
    plain = tiny(standardize_features=False).model.eval()
    assert plain.feature_statistics_fitted and not hasattr(plain, "feature_mean")
    with torch.no_grad():
        images = torch.randn(1, 3, 64, 64)
        torch.testing.assert_close(plain.features(images), plain.raw_features(images))


# ---------------------------------------------------------------------------------------------------- noise
def test_feature_noise_is_gaussian_of_the_given_std_in_training_only():
    model = fitted(feature_noise_std=0.5)
    net = model.model
    images = normalize(torch.rand(4, 3, 64, 64))
    net.train()
    with torch.no_grad():
        out = net(images)
        clean = net.features(images)
    torch.testing.assert_close(out.features, clean)  # the target is the clean F
    noise = (out.noisy_features - out.features).double()
    assert abs(float(noise.mean())) < 0.01
    assert float(noise.std()) == pytest.approx(0.5, rel=0.02)  # 4·176·16·16 draws
    net.eval()
    with torch.no_grad():
        assert torch.equal(net.add_noise(clean), clean)
        a, b = net(images), net(images)
    torch.testing.assert_close(a.anomaly_map, b.anomaly_map, rtol=0, atol=0)  # inference is deterministic
    off = fitted(feature_noise_std=0.0).model.train()
    with torch.no_grad():
        out = off(images)
    assert torch.equal(out.noisy_features, out.features)


# ---------------------------------------------------------------------------------------------------- towers
def test_local_tower_output_depends_only_on_its_neighbourhood_receptive_field():
    """Two 3×3 NA blocks: an output cell sees at most 2 cells away per axis (border windows shift inward, NATTEN's
    rule, so the bound holds everywhere). Changing one input cell leaves every output farther than that untouched."""
    torch.manual_seed(0)
    tower = LocalTower(dim=8, out_channels=5, depth=2, num_heads=2, kernel_size=3, mlp_ratio=2.0).eval()
    assert all(isinstance(block.attn, NeighborhoodAttention2D) for block in tower.blocks)
    x = torch.randn(1, 12, 12, 8)
    y = x.clone()
    y[0, 6, 6] += 3.0 * torch.randn(8)  # not a uniform shift, which the pre-norm LayerNorm removes
    with torch.no_grad():
        diff = (tower(x) - tower(y)).abs().amax(dim=1)[0]  # (12, 12)
    rows, cols = torch.meshgrid(torch.arange(12), torch.arange(12), indexing="ij")
    near = ((rows - 6).abs() <= 2) & ((cols - 6).abs() <= 2)
    assert float(diff[~near].max()) == 0.0
    assert float(diff[6, 6]) > 1e-3 and float(diff[near].min()) > 0  # and it does attend across its window


def test_global_tower_mixes_every_token():
    """One changed input cell changes the reconstruction of every patch of the grid (global attention)."""
    torch.manual_seed(0)
    tower = GlobalTower(8, 5, embed_dim=16, depth=1, num_heads=2, mlp_ratio=2.0, patch_size=2, grid_size=(6, 6)).eval()
    x = torch.randn(1, 8, 12, 12)
    y = x.clone()
    y[0, :, 0, 0] += 3.0 * torch.randn(8)
    with torch.no_grad():
        diff = (tower(x) - tower(y)).abs().amax(dim=1)[0]
    per_patch = diff.reshape(6, 2, 6, 2).amax(dim=(1, 3))
    assert float(per_patch.min()) > 0


def test_global_tower_adds_fixed_sincos_positions_on_any_grid():
    torch.manual_seed(0)
    tower = GlobalTower(8, 5, embed_dim=16, depth=1, num_heads=2, mlp_ratio=2.0, patch_size=2, grid_size=(4, 4)).eval()
    x = torch.randn(2, 8, 12, 8)  # a 6×4 grid, not the cached 4×4 one
    with torch.no_grad():
        out = tower(x)
        tower.set_grid((6, 4))
        torch.testing.assert_close(tower(x), out)
    assert out.shape == (2, 5, 12, 8)


@pytest.mark.parametrize("towers", ["local", "global"])
def test_single_tower_ablation_builds_only_that_tower_and_no_srh(towers):
    net = fitted(towers=towers).model
    assert (net.local_tower is None) == (towers == "global")
    assert (net.global_tower is None) == (towers == "local")
    assert net.srh is None
    images = normalize(torch.rand(2, 3, 64, 64))
    net.train()
    out = net(images)
    assert out.gate is None
    only = out.local if towers == "local" else out.global_
    assert only is not None and out.reconstruction is only
    losses = LGFDRLoss()(out.reconstruction, out.features, out.local, out.global_)
    torch.testing.assert_close(losses["loss"].double(), mse64(only, out.features), rtol=1e-6, atol=1e-7)
    losses["loss"].backward()  # the one tower trains the shared stem through its own input
    for part in (net.stem, net.local_tower or net.global_tower):
        assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in part.parameters())


# ---------------------------------------------------------------------------------------------------- SRH
def test_spatial_srh_is_a_per_position_softmax_gate_of_a_3x3_conv():
    torch.manual_seed(0)
    srh = SelectiveReconstructionHead(4, "spatial")
    local, global_ = torch.randn(2, 4, 6, 6), torch.randn(2, 4, 6, 6)
    fused, gate = srh(local, global_)
    torch.testing.assert_close(fused, (local + global_) / 2)  # zero-initialised: the average to start with
    with torch.no_grad():
        srh.gate.weight.normal_()
        srh.gate.bias.normal_()
        fused, gate = srh(local, global_)
    logits = F.conv2d(torch.cat([local, global_], 1), srh.gate.weight, srh.gate.bias, padding=1)
    w_local = logits[:, 0].exp() / (logits[:, 0].exp() + logits[:, 1].exp())
    assert gate.shape == (2, 1, 6, 6)
    torch.testing.assert_close(gate[:, 0], w_local)
    torch.testing.assert_close(fused, w_local[:, None] * local + (1 - w_local[:, None]) * global_)
    assert float(gate.std()) > 0.05  # it does select per position


def test_channel_and_average_srh_follow_their_formulas():
    torch.manual_seed(0)
    srh = SelectiveReconstructionHead(40, "channel")
    local, global_ = torch.randn(2, 40, 5, 5), torch.randn(2, 40, 5, 5)
    fused, gate = srh(local, global_)
    z = srh.squeeze((local + global_).mean((2, 3)))
    a_l, a_g = srh.local_logits(z), srh.global_logits(z)
    w = torch.sigmoid(a_l - a_g)  # softmax over two = sigmoid of the difference
    assert gate.shape == (2, 40, 1, 1)
    torch.testing.assert_close(gate[:, :, 0, 0], w)
    torch.testing.assert_close(fused, w[..., None, None] * local + (1 - w[..., None, None]) * global_)
    average = SelectiveReconstructionHead(40, "average")
    assert not list(average.parameters())
    torch.testing.assert_close(average(local, global_)[0], (local + global_) / 2)


# ---------------------------------------------------------------------------------------------------- loss, map
def test_loss_formula_and_tower_weight():
    gen = torch.Generator().manual_seed(0)
    f, r, rl, rg = (torch.randn(2, 6, 4, 4, generator=gen) for _ in range(4))
    for weight in (1.0, 0.25, 0.0):
        out = LGFDRLoss(weight)(r, f, rl, rg)
        expected = mse64(r, f) + weight * (mse64(rl, f) + mse64(rg, f))
        torch.testing.assert_close(out["loss"].double(), expected, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(out["local"].double(), mse64(rl, f), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="NaN"):
        LGFDRLoss()(r, f * float("nan"), rl, rg)


def test_map_and_score_equal_brute_force():
    """map = blur_σ4(bilinear(mean_c (R − F)²)); score = max of the k×k box average (k = side / 8, zero padding
    k // 2 counted), computed directly in float64."""
    model = fitted()
    net = model.model.eval()
    images = normalize(torch.rand(2, 3, 64, 64))
    with torch.no_grad():
        details = net.details(images)
        pred = net(images)
    assert isinstance(pred, InferenceBatch) and pred.anomaly_map.shape == (2, 1, 64, 64)
    residual = ((details.reconstruction - details.features) ** 2).mean(1, keepdim=True)
    expected = make_blur(4.0)(F.interpolate(residual, size=(64, 64), mode="bilinear", align_corners=False))
    torch.testing.assert_close(pred.anomaly_map, expected, rtol=1e-5, atol=1e-6)
    assert net.score_kernel_size == 8
    pooled = F.avg_pool2d(pred.anomaly_map.double(), 8, stride=1, padding=4, count_include_pad=True)
    torch.testing.assert_close(pred.pred_score.double(), pooled.flatten(1).amax(1), rtol=1e-6, atol=1e-7)
    # the fused reconstruction is the one the map reads (not a tower's)
    fused, _ = net.srh(details.local, details.global_)
    torch.testing.assert_close(details.reconstruction, fused)


# ---------------------------------------------------------------------------------------------------- wiring
def test_training_step_compares_the_clean_features_with_the_denoised_reconstructions(monkeypatch):
    """Through ``training_step``: the towers receive ``F + σ·ε`` (σ = 0.5 here, so the noise is visible), the loss is
    ``MSE(R, F) + λ·(MSE(R_l, F) + MSE(R_g, F))`` with the *clean* ``F`` a fresh eval pass computes for the same
    images, and ``R`` is the SRH's fusion of the two towers. The stem, both towers and the SRH get gradients; the
    frozen backbone and the statistics none."""
    model = fitted(feature_noise_std=0.5, tower_loss_weight=0.5)
    net = model.model
    with torch.no_grad():
        net.srh.gate.weight.normal_(std=0.1)  # a gate that is not ½ everywhere, so a swapped fusion shows
    images = normalize(torch.rand(2, 3, 64, 64))
    recorded: dict = {}
    reconstruct = net.reconstruct

    def recording(inputs: torch.Tensor):
        recorded["inputs"] = inputs.detach().clone()
        recorded["out"] = reconstruct(inputs)
        return recorded["out"]

    monkeypatch.setattr(net, "reconstruct", recording)
    stats = (net.feature_mean.clone(), net.feature_std.clone())
    model.train()
    loss = model.training_step(ImageBatch(image=images), 0)["loss"]
    loss.backward()

    net.eval()
    with torch.no_grad():
        clean = net.features(images)
    noise = recorded["inputs"] - clean
    assert float(noise.std()) == pytest.approx(0.5, rel=0.05)
    fused, local, global_, gate = recorded["out"]
    torch.testing.assert_close(fused, gate * local + (1 - gate) * global_)
    expected = mse64(fused, clean) + 0.5 * (mse64(local, clean) + mse64(global_, clean))
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)

    for name in ("stem", "local_tower", "global_tower", "srh"):
        params = list(getattr(net, name).parameters())
        assert params and all(p.grad is not None for p in params), name
        assert sum(float(p.grad.abs().sum()) for p in params) > 0, name
    assert all(p.grad is None and not p.requires_grad for p in net.feature_extractor.parameters())
    torch.testing.assert_close(net.feature_mean, stats[0], rtol=0, atol=0)
    torch.testing.assert_close(net.feature_std, stats[1], rtol=0, atol=0)
    optimizer = model.configure_optimizers()["optimizer"]
    optimised = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert optimised == {id(p) for p in net.parameters() if p.requires_grad}
    assert not optimised & {id(p) for p in net.feature_extractor.parameters()}


def test_training_steps_lower_the_loss_on_a_fixed_batch():
    model = fitted(lr=3e-3, feature_noise_std=0.1)
    images = normalize(torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(3)))
    optimizer = model.configure_optimizers()["optimizer"]
    model.train()
    losses = []
    for _ in range(12):
        loss = model.training_step(ImageBatch(image=images), 0)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert losses[-1] < 0.6 * losses[0], losses


def test_statistics_are_measured_once_at_train_start_from_the_training_set():
    """``on_train_start`` fits the statistics from the training set through the shared loop (pre-processor applied);
    a second start (e.g. a resumed fit) keeps them."""
    from types import SimpleNamespace

    class Images(torch.utils.data.Dataset):
        def __init__(self, images: torch.Tensor) -> None:
            self.images = images

        def __len__(self) -> int:
            return len(self.images)

        def __getitem__(self, index: int) -> torch.Tensor:
            return self.images[index]

    model = tiny(stats_max_images=3)
    raw = torch.rand(5, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    model._trainer = SimpleNamespace(datamodule=SimpleNamespace(train_data=Images(raw), eval_batch_size=2))
    try:
        model.on_train_start()
        first = model.model.feature_mean.clone()
        model.model.feature_mean.add_(1.0)
        model.on_train_start()
    finally:
        model._trainer = None
    assert int(model.model.feature_stats_count) == 3
    torch.testing.assert_close(model.model.feature_mean, first + 1.0)  # not refitted
    reference = tiny(stats_max_images=3).model
    reference.fit_feature_statistics([model.pre_processor.transform(raw[:3])])
    torch.testing.assert_close(first, reference.feature_mean)


# ---------------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"image_size": 72}, r"image_size=72x72 .* multiples of 16"),
        ({"towers": "dual"}, "towers must be one of"),
        ({"srh_mode": "pixel"}, "srh_mode must be one of"),
        ({"feature_noise_std": -0.1}, "feature_noise_std must be a finite number >= 0"),
        ({"feature_noise_std": float("nan")}, "feature_noise_std must be a finite number >= 0"),
        ({"tower_loss_weight": -1.0}, "tower_loss_weight must be a finite number >= 0"),
        ({"kernel_size": 4}, "kernel_size must be a positive odd int"),
        ({"local_embed_dim": 30, "local_num_heads": 4}, "divisible by local_num_heads"),
        ({"embed_dim": 30}, "divisible by 4"),
        ({"lr": float("nan")}, "lr must be a finite number > 0"),
        ({"betas": (0.9, 1.0)}, r"betas must be two numbers in \[0, 1\)"),
        ({"weight_decay": -1.0}, "weight_decay must be a finite number >= 0"),
        ({"stats_max_images": 0}, "stats_max_images must be a positive number"),
        ({"lr_milestones": (0.5, 3)}, "lr_milestones"),
        ({"image_size": 16, "blur_sigma": 4.0}, r"LGFDR: blur_sigma=4 .* image_size"),
        ({"score_kernel_size": 0}, "score_kernel_size must be an int >= 1"),
    ],
)
def test_bad_settings_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny(**kwargs)


def test_bad_inputs_get_one_clear_error():
    net = fitted().model.eval()
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        net(torch.rand(1, 1, 64, 64))
    with pytest.raises(ValueError, match="image_size=72x72"):
        net(torch.rand(1, 3, 72, 72))
    images = torch.rand(1, 3, 64, 64)
    images[0, 0, 10, 10] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf in the backbone features"):
        net(images)
    # another accepted size works with the same weights (positions computed for its grid)
    with torch.no_grad():
        assert net(torch.rand(1, 3, 96, 64)).anomaly_map.shape == (1, 1, 96, 64)


# ---------------------------------------------------------------------------------------------------- learning
def stripes(n: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    """Regular stripes with random phase (normal), RGB in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    xx = torch.arange(size).float().view(1, -1).expand(size, size)
    out = []
    for _ in range(n):
        phase = float(torch.rand(1, generator=g)) * 2 * math.pi
        img = 0.5 + 0.25 * torch.sin(xx / 3.0 + phase) + 0.02 * torch.randn(size, size, generator=g)
        out.append(img.clamp(0, 1).expand(3, size, size))
    return torch.stack(out)


@pytest.mark.slow
@pytest.mark.parametrize("towers", ["both", "local", "global"])
def test_maps_are_higher_on_a_defect_after_training(towers):
    """After a short fit on stripes (Lite0 ImageNet weights), a dark square scores higher inside than outside and the
    defective image outscores the normal ones, for each tower choice."""
    torch.manual_seed(0)
    model = LGFDR(**{**TINY, "weights": "imagenet", "towers": towers, "lr": 3e-3}, evaluator=False, visualizer=False)
    train = normalize(stripes(16))
    model.model.fit_feature_statistics([train])
    optimizer = model.configure_optimizers()["optimizer"]
    model.train()
    for step in range(60):
        batch = train[(step * 4) % 16 : (step * 4) % 16 + 4]
        loss = model.training_step(ImageBatch(image=batch), 0)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    test = stripes(3, seed=7)
    defect = test[0].clone()
    defect[:, 24:40, 24:40] = 0.05
    model.eval()
    with torch.no_grad():
        out = model.model(normalize(torch.cat([defect[None], test[1:]])))
    amap = out.anomaly_map[0, 0]
    inside = amap[24:40, 24:40].mean()
    outside = torch.cat([amap[:16].flatten(), amap[48:].flatten()]).mean()
    assert float(inside) > 2 * float(outside)
    assert float(out.pred_score[0]) > float(out.pred_score[1:].max())


@pytest.mark.slow
def test_feature_statistics_under_ddp_equal_the_single_process_result(tmp_path):
    """Under 2-process DDP each rank reads its share of the first ``stats_max_images`` training images and the
    per-image moments are gathered: both ranks hold the statistics one process computes on exactly those images
    (3 of 5, split 2 + 1 between the ranks)."""
    from torch.utils.data import DataLoader

    from tests.conftest import folder_datamodule, write_textured_category
    from tests.ddp import assert_same_state, fit_ddp

    root = write_textured_category(tmp_path / "data", size=64, n_train=5, n_good=1, n_defect=1)
    torch.manual_seed(0)
    model = LGFDR(**TINY, stats_max_images=3, visualizer=False)
    states = fit_ddp(model, folder_datamodule(root, batch_size=2), tmp_path, max_steps=1)
    names = ["model.feature_mean", "model.feature_std", "model.feature_stats_count"]
    assert_same_state(states, names)
    assert int(states[0]["model.feature_stats_count"]) == 3

    single = LGFDR(**TINY, stats_max_images=3, visualizer=False)
    single.load_state_dict(states[0])
    datamodule = folder_datamodule(root, batch_size=2)
    datamodule.setup()
    dataset = datamodule.train_data
    loader = DataLoader(dataset, batch_size=2, shuffle=False, collate_fn=dataset.collate_fn)
    assert single.fit_feature_statistics(loader) == 3
    for name in ("feature_mean", "feature_std"):  # float32 features of other batch compositions: ~1e-7 apart
        torch.testing.assert_close(states[0][f"model.{name}"], getattr(single.model, name), rtol=1e-5, atol=1e-6)
    single.stats_max_images = 5  # all five images give other statistics: the first three were the ones used
    single.fit_feature_statistics(loader)
    assert (states[0]["model.feature_mean"] - single.model.feature_mean).abs().max() > 1e-4
