"""Tests for INP-Former++ (InpFormerPP) on anomalib's INP-Former blocks.

Tiny settings keep the file fast on one CPU thread: a random EfficientNet-Lite0 encoder (stages 1-3 concatenated on
the stride-8 grid: 176 channels, 8×8 tokens at 64 px), 2 decoder blocks, a 16/8-channel head; timm's ``test_vit``
(64-d, 6 blocks) for the ViT path.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from anomalib.data import InferenceBatch
from anomalib.models.image.inp_former.torch_model import InpFormerModel
from PIL import Image
from torch.nn import functional as F

from anomalib_recon.models.image.inp_former_pp import InpFormerPP
from anomalib_recon.models.image.inp_former_pp.lightning_model import few_shot_augment
from anomalib_recon.models.image.inp_former_pp.loss import (
    InpFormerPPLoss,
    hard_inp_coherence,
    soft_inp_coherence,
)
from anomalib_recon.models.image.inp_former_pp.torch_model import InpFormerPPModel, ResidualSegHead

LITE0 = "tf_efficientnet_lite0"
TINY = {"backbone": LITE0, "weights": None, "image_size": 64, "decoder_depth": 2, "seg_channels": (16, 8)}


def _module(**kwargs) -> InpFormerPP:
    torch.manual_seed(0)
    return InpFormerPP(**{**TINY, "evaluator": False, "visualizer": False, **kwargs})


def _images(n: int = 2, size: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def tiny() -> InpFormerPP:
    return _module()


# ----------------------------------------------------------------------------------------------------- losses
def test_soft_coherence_tends_to_hard_coherence_and_spreads_the_gradient():
    g = torch.Generator().manual_seed(0)
    query = torch.randn(2, 16, 8, generator=g)
    prototypes = torch.randn(2, 4, 8, generator=g, requires_grad=True)
    hard = hard_inp_coherence(query, prototypes)
    manual = (1 - F.cosine_similarity(query[:, :, None], prototypes[:, None], dim=-1)).amin(-1).mean()
    torch.testing.assert_close(hard, manual)  # anomalib's get_inp_loss is the base's min-distance loss
    gaps = [abs(soft_inp_coherence(query, prototypes, tau=t) - hard).item() for t in (1.0, 0.1, 0.01, 1e-4)]
    assert gaps[0] > 1e-2 and gaps[-1] < 1e-5
    assert gaps[0] > gaps[1] > gaps[2] > gaps[3]
    assert soft_inp_coherence(query, prototypes, reduction="none").shape == (2, 16)

    # the collapse fix: when every token is nearest to one INP, the hard loss moves only that INP, the soft one all
    anchor = prototypes.detach()[:, :1]
    collapsed = anchor + 0.05 * torch.randn(2, 16, 8, generator=g)
    nearest = F.cosine_similarity(collapsed[:, :, None], prototypes[:, None], dim=-1).argmax(-1)
    assert (nearest == 0).all()
    (hard_grad,) = torch.autograd.grad(hard_inp_coherence(collapsed, prototypes), prototypes)
    (soft_grad,) = torch.autograd.grad(soft_inp_coherence(collapsed, prototypes, tau=1.0), prototypes)
    unused = torch.tensor([False, True, True, True]).expand(2, 4)
    assert hard_grad[unused].abs().max() == 0
    assert soft_grad.norm(dim=-1).min() > 0


def test_model_tau_reaches_the_training_loss():
    """τ given to the model is the temperature of the loss it trains with: near 0 the soft coherence equals the hard
    one, at 1 it does not (the weights are close to uniform there)."""
    g = torch.Generator().manual_seed(2)
    query, prototypes = torch.randn(2, 16, 8, generator=g), torch.randn(2, 4, 8, generator=g)
    hard = hard_inp_coherence(query, prototypes)
    sharp = _module(tau=1e-4).loss.coherence_loss(query, prototypes)
    smooth = _module(tau=1.0).loss.coherence_loss(query, prototypes)
    torch.testing.assert_close(sharp, hard, atol=1e-6, rtol=0)
    assert float(smooth - hard) > 1e-2


def test_mse_soft_mining_scales_each_positions_gradient():
    """Switching the MSE term on adds exactly the MSE gradient times ``(e_i / mean e)^3`` per position."""
    g = torch.Generator().manual_seed(1)
    en = [torch.randn(2, 6, 4, 4, generator=g) for _ in range(2)]
    base = [torch.randn(2, 6, 4, 4, generator=g) for _ in range(2)]

    def grads(loss_fn: InpFormerPPLoss) -> list[torch.Tensor]:
        de = [b.clone().requires_grad_(True) for b in base]
        terms = loss_fn.reconstruction_loss(en, de)
        sum(terms.values()).backward()
        return [d.grad for d in de]

    with_mse = grads(InpFormerPPLoss(mse_mining=True))
    without = grads(InpFormerPPLoss(mse_mining=False))
    for e, d, on, off in zip(en, base, with_mse, without, strict=True):
        err = ((e - d) ** 2).mean(dim=1, keepdim=True)
        weights = (err / err.mean()) ** 3
        expected = 2 * (d - e) / d.numel() / len(en) * weights
        torch.testing.assert_close(on - off, expected, atol=1e-6, rtol=1e-4)
    assert not torch.allclose(with_mse[0] - without[0], 2 * (base[0] - en[0]) / base[0].numel() / 2)


# ----------------------------------------------------------------------------------------------------- architecture
def test_paper_defaults_and_shapes():
    with torch.device("meta"):  # sizes only, nothing downloaded or allocated
        paper = InpFormerPPModel(weights=None)
    assert paper.is_vit and paper.layers == [2, 3, 4, 5, 6, 7, 8, 9]
    assert (paper.embed_dim, paper.num_heads, len(paper.decoder)) == (768, 12, 8)
    assert paper.encoder_groups == paper.decoder_groups == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert tuple(paper.prototype_tokens.shape) == (6, 768)
    head = [m for m in paper.seg_head.layers if hasattr(m, "weight") and m.weight.dim() == 4]
    assert [tuple(m.weight.shape[:2]) for m in head] == [(768, 256), (256, 64), (1, 64)]  # ConvT: (in, out)
    assert paper.fusion == "mean" and paper.rec_map == "cos"

    vit = InpFormerPPModel("test_vit", weights=None, image_size=(64, 64), decoder_depth=2, seg_channels=(8, 8)).train()
    out = vit(_images(), _images(seed=1))
    assert [tuple(e.shape) for e in out.encoder_features] == [(2, 64, 4, 4)] * 2  # 6 blocks in two groups
    assert tuple(out.prototypes.shape) == (2, 6, 64) and tuple(out.query.shape) == (2, 16, 64)
    assert tuple(out.seg_prediction.shape) == (2, 1, 64, 64) and tuple(out.residual.shape) == (2, 64, 4, 4)

    head = ResidualSegHead(176, (16, 8))
    assert tuple(head(torch.randn(3, 176, 8, 8), (70, 50)).shape) == (3, 1, 70, 50)


def test_cnn_target_is_layer_normed_concatenation_on_one_grid(tiny):
    model = tiny.model
    assert (model.embed_dim, model.num_heads, model.stride) == (24 + 40 + 112, 8, 8)
    (target,) = model.extract(_images())
    assert tuple(target.shape) == (2, 176, 8, 8)
    # every stage is layer-normed per position: each channel slice has zero mean over its channels
    for lo, hi in ((0, 24), (24, 64), (64, 176)):
        assert target[:, lo:hi].mean(1).abs().max() < 1e-4
    model.eval()
    with torch.no_grad():
        pred = model(_images(3))
    assert isinstance(pred, InferenceBatch)
    assert tuple(pred.pred_score.shape) == (3,) and tuple(pred.anomaly_map.shape) == (3, 1, 64, 64)


def test_cos_l2_map_and_top_one_percent_score():
    module = _module(blur_sigma=None, rec_map="cos_l2")
    model = module.model.eval()
    x = _images()
    with torch.no_grad():
        rec, _ = model.predict_maps(x)
        en, de, _, _ = model.reconstruct(model.extract(x))
        pred = model(x)
    cos, _ = InpFormerModel.calculate_anomaly_maps(en, de, out_size=(64, 64))
    l2 = torch.stack([torch.linalg.vector_norm(e - d, dim=1, keepdim=True) for e, d in zip(en, de, strict=True)])
    l2 = F.interpolate(l2.mean(0), size=(64, 64), mode="bilinear", align_corners=True)
    torch.testing.assert_close(rec, 0.5 * (cos + l2), atol=1e-5, rtol=1e-5)
    top = pred.anomaly_map.flatten(1).topk(40, dim=1).values.mean(1)  # 1 % of 4096 pixels
    torch.testing.assert_close(pred.pred_score, top)


def _anomalib_inp_former(monkeypatch, backbone: str) -> InpFormerModel:
    """anomalib's own ``InpFormerModel`` with a randomly initialised encoder (it hard-codes ``pre_trained=True``)."""
    import timm

    create = timm.create_model
    with monkeypatch.context() as patch:
        patch.setattr(timm, "create_model", lambda *a, **k: create(*a, **{**k, "pretrained": False}))
        return InpFormerModel(backbone, remove_class_token=True)  # anomalib's InpFormer default


def _load_anomalib_weights(ours: InpFormerPPModel, ref: InpFormerModel) -> None:
    """Copy every weight of anomalib's model into ours (names differ only by anomalib's one-element lists)."""
    state = {f"encoder.model.{k}": v for k, v in ref.encoder.feature_extractor.state_dict().items()}
    state["prototype_tokens"] = ref.prototype_token[0].detach()
    state |= {f"aggregation.{k}": v for k, v in ref.aggregation[0].state_dict().items()}
    state |= {f"bottleneck.{k}": v for k, v in ref.bottleneck[0].state_dict().items()}
    state |= {f"decoder.{k}": v for k, v in ref.decoder.state_dict().items()}
    missing, unexpected = ours.load_state_dict(state, strict=False)
    assert not unexpected
    assert set(missing) == {"rec_min", "rec_max", "rec_stats_updates", "blur.kernel"}  # ours only, not weights


def test_plus_plus_off_equals_anomalibs_inp_former_on_shared_weights(monkeypatch):
    """``plus_plus=False`` against anomalib's ``InpFormerModel`` (DINOv2-reg ViT-S layout, random weights shared):
    the same map, score, training loss and gradients. Any change to the INP extractor, the decoder's use of the
    prototypes, the grouping, the map or the soft mining breaks the agreement."""
    backbone = "vit_small_patch14_reg4_dinov2"
    torch.manual_seed(0)
    ref = _anomalib_inp_former(monkeypatch, backbone)
    # built for the encoder's native 518 px so that both models resample the same position embedding per input
    module = InpFormerPP(
        backbone=backbone,
        weights=None,
        image_size=518,
        plus_plus=False,
        evaluator=False,
        visualizer=False,
        post_processor=False,
    )
    model = module.model
    assert module.loss.coherence == "hard" and not module.loss.mse_mining and model.seg_head is None
    _load_anomalib_weights(model, ref)
    x = _images(2, size=56)  # 4x4 tokens
    ref.eval()
    model.eval()
    with torch.no_grad():
        expected, got = ref(x), model(x)
    assert float(expected.anomaly_map.std()) > 1e-3  # not a constant map
    torch.testing.assert_close(got.anomaly_map, expected.anomaly_map, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(got.pred_score, expected.pred_score, atol=2e-6, rtol=1e-5)

    ref.train()
    model.train()
    ref_loss = ref(x)  # anomalib: soft-mining global cosine + 0.2 · hard INP coherence
    out = model(x)
    loss = module.loss.normal_loss(out.encoder_features, out.decoder_features, out.query, out.prototypes)["loss"]
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-5)
    ref_loss.backward()
    loss.backward()
    for ours, theirs in (
        (model.decoder[0].attn.kv.weight, ref.decoder[0].attn.kv.weight),
        (model.decoder[-1].mlp.fc2.weight, ref.decoder[-1].mlp.fc2.weight),
        (model.prototype_tokens, ref.prototype_token[0]),
    ):
        torch.testing.assert_close(ours.grad, theirs.grad, atol=1e-6, rtol=1e-4)


def test_decoder_reconstructs_from_each_images_own_prototypes(tiny, monkeypatch):
    """The INPs are extracted per image, and the decoder reads them: handing image 0 the INPs of image 1 changes
    its reconstruction (not its encoder target)."""
    model = tiny.model.eval()
    x = _images(2, seed=4)
    with torch.no_grad():
        en, de, _, prototypes = model.reconstruct(model.extract(x))
        assert float((prototypes[0] - prototypes[1]).abs().max()) > 1e-3  # measured 7e-3 at this random init
        extract = model.aggregation.forward
        monkeypatch.setattr(model.aggregation, "forward", lambda *a, **k: extract(*a, **k).flip(0))
        en_swapped, de_swapped, _, _ = model.reconstruct(model.extract(x))
    torch.testing.assert_close(en_swapped[0], en[0])
    change = (de_swapped[0] - de[0]).abs().mean() / de[0].abs().mean()
    assert float(change) > 1e-3  # measured 6e-3; exactly 0 if the decoder ignored the INPs


def test_fusion_min_max_scales_the_reconstruction_map_by_normal_training_statistics():
    """Default with the head: ``M_rec`` is scaled by the min/max seen on normal training images before it is averaged
    with the head's probability; the base (``rec`` only) keeps the raw map."""
    module = _module(blur_sigma=None)
    model = module.model
    assert model.rec_normalization == "minmax" and _module(plus_plus=False).model.rec_normalization == "none"
    x = _images(3, seed=6)
    model.train()
    with torch.no_grad():
        model(x)  # the first training batch sets the statistics
        model.eval()
        rec, seg = model.predict_maps(x)
        fused = model(x).anomaly_map
    assert float(rec.amax()) > float(rec.amin()) + 0.1  # a raw map with some range (measured 0.97-1.22)
    scaled_rec = 2 * fused - seg  # what was averaged with the head's probability
    torch.testing.assert_close(scaled_rec.amin(), torch.tensor(0.0), atol=1e-5, rtol=0)
    torch.testing.assert_close(scaled_rec.amax(), torch.tensor(1.0), atol=1e-5, rtol=0)
    torch.testing.assert_close(model.rec_min, rec.amin())
    torch.testing.assert_close(model.rec_max, rec.amax())


# ----------------------------------------------------------------------------------------------------- training
def test_residual_head_sends_no_gradient_upstream():
    for stop_gradient in (True, False):
        module = _module(seg_stop_gradient=stop_gradient)
        model = module.model.train()
        out = model(_images(), _images(seed=3))
        module.loss.segmentation_loss(out.seg_prediction, torch.zeros_like(out.seg_prediction)).backward()
        upstream = [model.prototype_tokens, *model.aggregation.parameters(), *model.bottleneck.parameters()]
        upstream += list(model.decoder.parameters())
        assert all(p.grad is not None for p in model.seg_head.parameters())
        if stop_gradient:
            assert all(p.grad is None for p in upstream)
            assert not out.residual.requires_grad
        else:  # the switch works: without the stop-gradient the head's loss reaches the decoder
            assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.decoder.parameters())


def test_training_steps_lower_the_loss():
    module = _module(warmup_iters=2, lr=2e-3)
    module._trainer = SimpleNamespace(estimated_stepping_batches=30)
    config = module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert config["lr_scheduler"]["interval"] == "step"
    model = module.model.train()
    images = _images(4, seed=5)
    torch.manual_seed(7)
    augmented, masks = module.synthesize(images)
    assert masks.shape == (4, 1, 64, 64) and set(masks.unique().tolist()) <= {0.0, 1.0}

    def total() -> torch.Tensor:
        out = model(images, augmented)
        terms = module.loss.normal_loss(out.encoder_features, out.decoder_features, out.query, out.prototypes)
        return terms["loss"] + module.loss.segmentation_loss(out.seg_prediction, masks)

    start = total().item()
    for _ in range(12):
        optimizer.zero_grad()
        total().backward()
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] < 2e-3  # warm-up done, cosine decay under way
    assert total().item() < 0.8 * start
    module._trainer = None


class _StepRecorder:
    """Records, during a real ``training_step``, what the torch model, the synthesis and the head receive."""

    def __init__(self, module: InpFormerPP) -> None:
        self.forward_args = self.output = self.synthesized = self.head_input = self.head_output = None
        model, forward, synthesize = module.model, module.model.forward, module.synthesize
        segment = model.pseudo_anomaly_segmentation

        def recording_forward(images, augmented=None):
            self.forward_args, self.output = (images, augmented), forward(images, augmented)
            return self.output

        def recording_synthesize(images):
            self.synthesized = synthesize(images)
            return self.synthesized

        def recording_segment(images):
            self.head_input, self.head_output = images, segment(images)
            return self.head_output

        model.forward, module.synthesize, model.pseudo_anomaly_segmentation = (
            recording_forward,
            recording_synthesize,
            recording_segment,
        )
        module.log = lambda *args, **kwargs: None  # no trainer to log to


def _normal_loss_formula(out, tau: float, coherence_weight: float, mse_weight: float) -> torch.Tensor:
    """Global cosine + MSE between encoder and decoder groups, plus the soft INP coherence, written out."""
    pairs = list(zip(out.encoder_features, out.decoder_features, strict=True))
    cosine = torch.stack([(1 - F.cosine_similarity(e.flatten(1), d.flatten(1), dim=1)).mean() for e, d in pairs])
    mse = torch.stack([((d - e) ** 2).mean() for e, d in pairs])
    query, inps = out.query, out.prototypes
    weights = torch.softmax(F.cosine_similarity(query[:, :, None], inps[:, None], dim=-1) / tau, dim=-1)
    coherence = (1 - F.cosine_similarity(query, weights @ inps, dim=-1)).mean()
    return cosine.mean() + mse_weight * mse.mean() + coherence_weight * coherence


def _seg_loss_formula(prediction: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Focal (γ = 2) + soft Dice between the head's probabilities and the synthetic mask, written out."""
    p = prediction.clamp(1e-6, 1 - 1e-6)
    p_t = torch.where(mask == 1, p, 1 - p)
    focal = (-((1 - p_t) ** 2) * torch.log(p_t)).mean()
    inter = (prediction * mask).flatten(1).sum(1)
    dice = 1 - (2 * inter + 1) / (prediction.flatten(1).sum(1) + mask.flatten(1).sum(1) + 1)
    return focal + dice.mean()


def _groups(model: InpFormerPPModel) -> dict[str, list[torch.nn.Parameter]]:
    return {
        "INP tokens": [model.prototype_tokens],
        "INP extractor": list(model.aggregation.parameters()),
        "bottleneck": list(model.bottleneck.parameters()),
        "decoder": list(model.decoder.parameters()),
        "segmentation head": list(model.seg_head.parameters()),
    }


def _trained(params: list[torch.nn.Parameter]) -> bool:
    return all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


def _untouched(params: list[torch.nn.Parameter]) -> bool:
    return all(p.grad is None or p.grad.abs().sum() == 0 for p in params)


LOSS_WEIGHTS = {"tau": 0.5, "coherence_weight": 0.3, "mse_weight": 0.7}


def test_joint_training_step_loss_and_gradients():
    """One real joint ``training_step``: the normal-modelling losses (soft-mining cosine + MSE, soft coherence with
    the model's τ) read the *normal* images, the head's Dice + focal reads the *pseudo-anomalous* copies and their
    masks (weighted by ``seg_loss_weight``), the head's input is the stop-gradient residual of those copies; every
    trained part gets a gradient, the frozen encoder none."""
    module = _module(anomaly_probability=1.0, seg_loss_weight=0.5, **LOSS_WEIGHTS)
    model = module.model
    record = _StepRecorder(module)
    module.train()
    images = _images(2, seed=8)
    torch.manual_seed(0)
    loss = module.training_step(SimpleNamespace(image=images))["loss"]
    seen, augmented = record.forward_args
    synthetic, masks = record.synthesized
    assert torch.equal(seen, images) and augmented is synthetic and masks.sum() > 0
    assert (augmented - images).abs().amax() > 0.1  # the copies carry synthetic defects
    assert record.head_input is augmented  # the head is trained on the pseudo-anomalous images ...
    out = record.output
    with torch.no_grad():
        torch.testing.assert_close(out.encoder_features[0], model.extract(images)[0])  # ... the losses on the normal
        en_aug, de_aug, _, _ = model.reconstruct(model.extract(augmented))
        torch.testing.assert_close(out.residual, model.residual(en_aug, de_aug))
    assert not out.residual.requires_grad
    expected = _normal_loss_formula(out, **LOSS_WEIGHTS) + 0.5 * _seg_loss_formula(out.seg_prediction, masks)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    for name, params in _groups(model).items():
        assert _trained(params), name
    assert all(p.grad is None for p in model.encoder.parameters())


def test_two_stage_training_steps_train_one_branch_each():
    """``schedule="two_stage"``: before ``seg_start`` a step trains only the reconstruction branch on the normal images
    (no pseudo-anomalies, no head); after it, only the head on the pseudo-anomalous copies (loss = ``seg_loss_weight``
    × Dice + focal), and the reconstruction statistics of the fusion stop moving."""
    module = _module(schedule="two_stage", seg_start=0.5, anomaly_probability=1.0, seg_loss_weight=0.5, **LOSS_WEIGHTS)
    model = module.model
    module._trainer = SimpleNamespace(estimated_stepping_batches=10, global_step=4)
    record = _StepRecorder(module)
    module.train()
    images = _images(2, seed=9)
    torch.manual_seed(0)
    loss = module.training_step(SimpleNamespace(image=images))["loss"]
    assert record.forward_args[1] is None and record.synthesized is None and record.head_input is None
    torch.testing.assert_close(loss, _normal_loss_formula(record.output, **LOSS_WEIGHTS))
    loss.backward()
    groups = _groups(model)
    head = groups.pop("segmentation head")
    assert all(_trained(params) for params in groups.values()) and _untouched(head)
    updates = int(model.rec_stats_updates)

    module.zero_grad()
    module._trainer.global_step = 5
    record.output = None
    loss = module.training_step(SimpleNamespace(image=images))["loss"]
    assert record.output is None  # no normal-modelling forward in the head stage
    augmented, masks = record.synthesized
    prediction, _ = record.head_output
    assert record.head_input is augmented and masks.sum() > 0
    torch.testing.assert_close(loss, 0.5 * _seg_loss_formula(prediction, masks))
    loss.backward()
    assert _trained(head) and all(_untouched(params) for params in groups.values())
    assert all(p.grad is None for p in model.encoder.parameters())
    assert int(model.rec_stats_updates) == updates
    module._trainer = None


def test_inference_map_measures_what_the_losses_train():
    """Eval: ``M_rec`` is the per-group ``1 − cos`` the cosine loss trains, upsampled and averaged; ``M_seg`` is the
    head on the residual exactly as in training (``pseudo_anomaly_segmentation``); the map fuses them as
    ``½(minmax(M_rec) + M_seg)`` and the score is the mean of its top 1 %."""
    module = _module(blur_sigma=None)
    model = module.model
    x = _images(2, seed=10)
    model.train()
    with torch.no_grad():
        model(x)  # normal training statistics for the min-max scaling
    model.eval()
    with torch.no_grad():
        en, de, _, _ = model.reconstruct(model.extract(x))
        per_group = [
            F.interpolate(
                (1 - F.cosine_similarity(e, d, dim=1))[:, None], size=(64, 64), mode="bilinear", align_corners=True
            )
            for e, d in zip(en, de, strict=True)
        ]
        rec = torch.stack(per_group).mean(0)
        seg = model.seg_head(model.residual(en, de), (64, 64))
        seg_training_path, _ = model.pseudo_anomaly_segmentation(x)
        out = model(x)
    torch.testing.assert_close(seg_training_path, seg)
    expected = 0.5 * ((rec - model.rec_min) / (model.rec_max - model.rec_min) + seg)
    torch.testing.assert_close(out.anomaly_map, expected, atol=1e-6, rtol=1e-5)
    top = expected.flatten(1).topk(int(64 * 64 * 0.01), dim=1).values.mean(1)
    torch.testing.assert_close(out.pred_score, top, atol=1e-6, rtol=1e-5)


def test_two_stage_schedule_switches_at_seg_start():
    module = _module(schedule="two_stage", seg_start=0.5)
    module._trainer = SimpleNamespace(estimated_stepping_batches=10, global_step=4)
    assert module._stage() == "reconstruction"
    module._trainer.global_step = 5
    assert module._stage() == "head"
    assert _module()._stage() == "joint"
    module._trainer = None


def _write_real_anomalies(root: Path) -> None:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    image = np.full((80, 80, 3), 255, np.uint8)
    mask = np.zeros((80, 80), np.uint8)
    mask[20:40, 30:50] = 255
    Image.fromarray(image).save(root / "images" / "a.png")
    Image.fromarray(mask).save(root / "masks" / "a_mask.png")


def test_semi_supervised_pastes_real_anomalous_regions(tmp_path):
    _write_real_anomalies(tmp_path / "real")
    module = _module(real_anomaly_path=str(tmp_path / "real"), real_anomaly_probability=1.0, anomaly_probability=0.0)
    images = torch.zeros(3, 3, 64, 64)  # the normalised mean colour
    augmented, masks = module.synthesize(images)
    white = (1 - module._mean) / module._std  # the pasted source, normalised
    area = masks.flatten(1).sum(1)
    assert torch.all(area == 16 * 16)  # 20×20 of 80 px resized to 64 px, rotated/flipped but kept whole
    inside = masks.expand_as(augmented).bool()
    torch.testing.assert_close(augmented[inside], white.expand_as(augmented)[inside])
    assert augmented[~inside].abs().max() == 0
    with pytest.raises(ValueError, match="must contain 'images/'"):
        _module(real_anomaly_path=str(tmp_path))


def test_few_shot_augmentation_keeps_shape_and_changes_images():
    torch.manual_seed(0)
    images = _images(4)
    out = few_shot_augment(images, gray_probability=1.0)
    assert out.shape == images.shape and torch.isfinite(out).all()
    assert not torch.allclose(out, images)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    rgb = out * std + mean  # grey images: equal channels after de-normalisation
    torch.testing.assert_close(rgb[:, 0], rgb[:, 1], atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------------- errors
def test_clear_errors_on_bad_input(tiny):
    model = tiny.model.eval()
    with pytest.raises(ValueError, match="RGB batch"):
        model(torch.rand(1, 1, 64, 64))
    with pytest.raises(ValueError, match="too small"):
        model(torch.rand(1, 3, 24, 24))
    with pytest.raises(TypeError, match="float image"):
        model(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
    with pytest.raises(ValueError, match="NaN/inf features"):
        model(torch.full((1, 3, 64, 64), float("nan")))
    with pytest.raises(ValueError, match="needs the segmentation head"):
        _module(plus_plus=False, fusion="mean")
    with pytest.raises(ValueError, match="tau must be > 0"):
        _module(tau=0.0)
    with pytest.raises(ValueError, match="crop_size"):
        _module(crop_size=96)
    with pytest.raises(ValueError, match="divide the embedding width"):
        _module(num_heads=5)
    with pytest.raises(ValueError, match="two_stage"):
        _module(plus_plus=False, schedule="two_stage")
    with pytest.raises(ValueError, match="Unknown timm backbone"):
        _module(backbone="no_such_net")
    with pytest.raises(ValueError, match="anomaly_source_path"):
        _module(anomaly_source_path="/no/such/folder")
    with pytest.raises(ValueError, match="finite training length"):
        _module().configure_optimizers()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lr": -1.0}, r"InpFormerPP: lr must be > 0 .*got -1.0"),
        ({"lr": float("nan")}, r"lr must be > 0"),
        ({"final_lr": -1e-4}, r"InpFormerPP: final_lr must be >= 0"),
        ({"warmup_iters": -1}, r"InpFormerPP: warmup_iters must be >= 0"),
        ({"weight_decay": -1e-4}, r"InpFormerPP: weight_decay must be >= 0"),
        ({"seg_loss_weight": -1.0}, r"InpFormerPP: seg_loss_weight must be >= 0"),
        ({"blur_kernel": 131}, r"InpFormerPP: blur_sigma=4 blurs the anomaly map with a 131x131 .*64x64"),
        ({"image_size": 16}, r"InpFormerPP: image_size \(16, 16\) .* too small .* image_size >= 32"),
    ],
)
def test_bad_settings_fail_at_construction(kwargs, match):
    """Optimizer settings that would fail at fit, a blur kernel larger than the map it blurs and an input too small
    for the encoder are refused when the model is built, naming the argument."""
    with pytest.raises(ValueError, match=match):
        _module(**kwargs)


def test_paper_pre_processor_resizes_448_and_crops_392():
    transforms = InpFormerPP.configure_pre_processor().transform.transforms
    assert [type(t).__name__ for t in transforms] == ["Resize", "CenterCrop", "Normalize"]
    assert list(transforms[1].size) == [392, 392]
    no_crop = InpFormerPP.configure_pre_processor(image_size=(128, 128)).transform.transforms
    assert [type(t).__name__ for t in no_crop] == ["Resize", "Normalize"]


# ----------------------------------------------------------------------------------------------------- export / ckpt
@pytest.mark.export
def test_onnx_and_openvino_export_match_torch(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    onnx = pytest.importorskip("onnx")
    # a 2-block random ViT keeps the export fast (a dynamic-batch EfficientNet takes ~25 s more to decompose)
    module = _module(backbone="test_vit", layers=[0, 1], decoder_depth=1, post_processor=False).eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        expected = module(x)
    path = module.to_onnx(tmp_path, input_size=(64, 64), opset_version=18)
    names = [init.name for init in onnx.load(str(path)).graph.initializer]
    for part in ("model.seg_head.", "model.decoder.", "model.aggregation.", "model.bottleneck.", "model.encoder."):
        assert any(n.startswith(part) for n in names), part
    assert not [n for n in names if "augmenter" in n or n.startswith("loss.")]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outputs = [o.name for o in session.get_outputs()]
    results = dict(zip(outputs, session.run(None, {session.get_inputs()[0].name: x.numpy()}), strict=True))
    np.testing.assert_allclose(results["pred_score"].reshape(-1), expected.pred_score.numpy(), atol=1e-4)
    np.testing.assert_allclose(results["anomaly_map"], expected.anomaly_map.numpy(), atol=1e-4)

    ov = pytest.importorskip("openvino")
    # OpenVINO's ONNX frontend, fp32 (on CPUs with AVX-512 BF16 it otherwise compiles in bf16: errors ~1e-3)
    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    ov_out = compiled([x.numpy()])
    ov_results = {o.get_any_name(): ov_out[o] for o in compiled.outputs}
    np.testing.assert_allclose(ov_results["pred_score"].reshape(-1), expected.pred_score.numpy(), atol=1e-4)
    np.testing.assert_allclose(ov_results["anomaly_map"], expected.anomaly_map.numpy(), atol=1e-4)


def _write_category(root: Path, seed: int = 0) -> None:
    g = np.random.default_rng(seed)
    for sub in ("train/good", "test/good", "test/defect", "ground_truth/defect"):
        (root / sub).mkdir(parents=True, exist_ok=True)

    def texture() -> np.ndarray:
        xx = np.mgrid[0:64, 0:64][1]
        base = 0.5 + 0.2 * np.sin(2 * math.pi * xx / 8 + g.uniform(0, 6)) + 0.03 * g.standard_normal((64, 64))
        return (np.clip(np.stack([base] * 3, -1), 0, 1) * 255).astype(np.uint8)

    for i in range(4):
        Image.fromarray(texture()).save(root / "train/good" / f"{i:03d}.png")
    Image.fromarray(texture()).save(root / "test/good/000.png")
    img, mask = texture(), np.zeros((64, 64), np.uint8)
    img[10:30, 20:40] = 255
    mask[10:30, 20:40] = 255
    Image.fromarray(img).save(root / "test/defect/000.png")
    Image.fromarray(mask).save(root / "ground_truth/defect/000_mask.png")


def test_engine_fit_and_safe_checkpoint_round_trip(tmp_path):
    """Two Engine steps (StableAdamW + warm-cosine, grad clip 0.1); the checkpoint loads with
    ``torch.load(weights_only=True)`` and with anomalib's loader."""
    from anomalib.data import Folder
    from anomalib.engine import Engine

    _write_category(tmp_path / "data")
    datamodule = Folder(
        name="tiny",
        root=tmp_path / "data",
        normal_dir="train/good",
        abnormal_dir="test/defect",
        normal_test_dir="test/good",
        mask_dir="ground_truth/defect",
        train_batch_size=2,
        eval_batch_size=2,
        num_workers=0,
        val_split_mode="same_as_test",
    )
    textures = tmp_path / "textures"
    textures.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(textures / "t.png")
    model = _module(rec_normalization="minmax", warmup_iters=1, anomaly_source_path=str(textures))
    engine = Engine(
        max_steps=2,
        default_root_dir=tmp_path / "results",
        logger=False,
        accelerator="cpu",
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    engine.fit(model, datamodule=datamodule)
    assert engine.trainer.global_step == 2 and engine.trainer.gradient_clip_val == 0.1
    assert int(model.model.rec_stats_updates) == 2 and model.model.rec_max > model.model.rec_min
    ckpt = next((tmp_path / "results").rglob("*.ckpt"))
    checkpoint = torch.load(ckpt, weights_only=True)  # plain floats in the scheduler and optimizer states, no numpy
    assert all(type(lr) is float for lr in checkpoint["lr_schedulers"][0]["schedule"])
    assert type(checkpoint["optimizer_states"][0]["param_groups"][0]["lr"]) is float
    (textures / "t.png").unlink()
    textures.rmdir()  # training data is not needed to restore the model elsewhere
    loaded = InpFormerPP.load_from_checkpoint(ckpt)  # anomalib's loader: weights_only=True
    assert loaded.hparams["backbone"] == LITE0 and loaded.hparams["rec_normalization"] == "minmax"
    torch.testing.assert_close(loaded.model.rec_max, model.model.rec_max)
    model.eval()
    loaded.eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        first, second = model(x), loaded(x)
    torch.testing.assert_close(first.pred_score, second.pred_score)
    torch.testing.assert_close(first.anomaly_map, second.anomaly_map)


def test_input_size_comes_from_a_user_pre_processor():
    """A user's own pre-processor (Resize 96) sets the size the model is built for; the default image_size (448 →
    392 crop) only builds the default pre-processor."""
    from anomalib_recon.components.preprocessing import resize_pre_processor

    args = {k: v for k, v in TINY.items() if k != "image_size"}
    model = InpFormerPP(**args, pre_processor=resize_pre_processor((96, 96)), evaluator=False, visualizer=False)
    assert model.model_image_size == (96, 96) and model.model.image_size == (96, 96)
    model.eval()
    with torch.no_grad():
        out = model.model(_images(2, size=96))
    assert out.anomaly_map.shape[-2:] == (96, 96) and torch.isfinite(out.pred_score).all()
