"""PNPT: shapes, the prompt pool against brute force, class inference, stream separation, the training and
inference wiring, the identical-shortcut mechanism, multi-class checkpoints/DDP/export, errors."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from anomalib.data import ImageBatch, InferenceBatch
from PIL import Image
from torch.nn import functional as F

from anomalib_recon.components.dual_attention import DualAttentionBlock
from anomalib_recon.models.image.pnpt import PNPT
from anomalib_recon.models.image.pnpt.anomaly_map import cosine_residual, residual_map
from anomalib_recon.models.image.pnpt.lightning_model import WarmupCosine
from anomalib_recon.models.image.pnpt.torch_model import ConditionalDecoderBlock, PNPTModel, resolve_layers
from tests.conftest import cpu_engine, write_textured_category

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = {
    "backbone": "tf_efficientnet_lite0",
    "weights": None,
    "embed_dim_per_scale": 16,
    "depth": 1,
    "decoder_depth": 1,
    "num_heads": 2,
}
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def tiny(size: int = 64, **kwargs) -> PNPT:
    """A small PNPT (Lite0 strides 4/8/16: 16x16, 8x8, 4x4 maps and a 4x4 token grid at 64 px)."""
    return PNPT(**{**TINY, **kwargs}, image_size=size, visualizer=False)


def write_checker_category(root: Path, size: int = 64, n_train: int = 8, n_test: int = 4, seed: int = 1) -> Path:
    """An MVTec-style category of noisy checkerboards (a texture unlike the stripes); defects are blue squares."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]

    def normal() -> np.ndarray:
        shift = rng.integers(0, 8, 2)
        board = (((yy + shift[0]) // 8 + (xx + shift[1]) // 8) % 2) * 120 + 60 + rng.normal(0, 4, (size, size))
        return np.repeat(board[..., None], 3, axis=2).clip(0, 255).astype(np.uint8)

    def save(array: np.ndarray, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(path)

    for i in range(n_train):
        save(normal(), root / "train" / "good" / f"{i:03d}.png")
    for i in range(n_test):
        save(normal(), root / "test" / "good" / f"{i:03d}.png")
        image, mask = normal(), np.zeros((size, size), np.uint8)
        y, x = rng.integers(8, size - 20, 2)
        image[y : y + 12, x : x + 12] = (20, 20, 200)
        mask[y : y + 12, x : x + 12] = 255
        save(image, root / "test" / "defect" / f"{i:03d}.png")
        save(mask, root / "ground_truth" / "defect" / f"{i:03d}_mask.png")
    return root


@pytest.fixture(scope="module")
def two_classes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two 64-px categories under one root: ``checker`` and ``stripes`` (8 train, 4 + 4 test images each)."""
    root = tmp_path_factory.mktemp("pnpt_classes")
    write_checker_category(root / "checker")
    write_textured_category(root / "stripes", size=64)
    return root


def multi(root: Path, batch_size: int = 4):
    from anomalib_recon.data import MultiCategory

    return MultiCategory(
        root=root, categories=["checker", "stripes"], train_batch_size=batch_size, eval_batch_size=batch_size,
        num_workers=0,
    )  # fmt: skip


def normalised(images: torch.Tensor) -> torch.Tensor:
    return (images - MEAN) / STD


def loader(dataset, batch_size: int = 3):
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=dataset.collate_fn)


def attach(model: PNPT, datamodule) -> None:
    """What ``setup("fit")`` does with a trainer: classes from the datamodule, its category lookup."""
    model.model.set_classes(datamodule.categories)
    model._category_fn = datamodule.category_of


# ---------------------------------------------------------------------------------------------------- shapes
def test_tokens_and_output_shapes():
    model = tiny()
    net = model.model
    assert net.channels == [24, 40, 112]
    assert net.feature_sizes == [(16, 16), (8, 8), (4, 4)]
    assert (net.patch_sizes, net.grid_size, net.embed_dim) == ([4, 2, 1], (4, 4), 48)
    net.set_classes(["a", "b", "c"])
    pool = net.prompt_pool
    assert pool.offsets.shape == (3, 16, 48)
    assert [p.shape for p in pool.priors()] == [(3, 24, 16, 16), (3, 40, 8, 8), (3, 112, 4, 4)]
    assert pool.keys.shape == (3, 112)
    images = torch.randn(2, 3, 64, 64)
    out = net.reconstruction_outputs(images, torch.tensor([0, 2]))
    assert [r.shape for r in out.sample] == [f.shape for f in out.features]
    assert [r.shape for r in out.prompt] == [f.shape for f in out.features]
    net.eval()
    with torch.no_grad():
        pred = net(images)
    assert isinstance(pred, InferenceBatch)
    assert pred.anomaly_map.shape == (2, 1, 64, 64)
    torch.testing.assert_close(pred.pred_score, pred.anomaly_map.flatten(1).amax(dim=1))


def test_paper_sizes_give_256_tokens_of_width_768_with_6_plus_4_blocks():
    """The inferred paper configuration: 16x16 tokens of 3x256 = 768 at 256 px, 6 SACE + 4 CSCD blocks, 8 heads
    (resnet18 stands in for WideResNet-50: same strides, the token shape does not depend on the channels)."""
    net = PNPTModel(backbone="resnet18", weights=None, image_size=(256, 256))
    assert resolve_layers("resnet18") == ["layer1", "layer2", "layer3"]
    assert (net.patch_sizes, net.grid_size, net.embed_dim) == ([4, 2, 1], (16, 16), 768)
    assert len(net.encoder) == 6 and len(net.decoder) == 4
    assert all(isinstance(b, DualAttentionBlock) for b in net.encoder)
    assert net.encoder[0].attn.num_heads == 8 and net.decoder[0].attn.num_heads == 8
    assert net.prompt_pool.offsets.shape == (1, 256, 768)


# ---------------------------------------------------------------------------------------------------- residual
def test_cosine_residual_is_one_minus_cos_without_float32_cancellation():
    """½‖f̂ − R̂‖² equals 1 − cos (float64 reference); for near-perfect reconstructions (1 − cos ≈ 1e-6) it keeps
    float32 precision where the direct 1 − cos loses it."""
    gen = torch.Generator().manual_seed(0)
    f = torch.randn(4, 64, 8, 8, generator=gen)
    far = torch.randn(4, 64, 8, 8, generator=gen)
    near = f + 1e-3 * torch.randn(4, 64, 8, 8, generator=gen) * f.norm(dim=1, keepdim=True) / 8
    for r in (far, near):
        reference = 1 - F.cosine_similarity(f.double(), r.double(), dim=1).unsqueeze(1)
        ours = cosine_residual(f, r)
        naive = 1 - F.cosine_similarity(f, r, dim=1).unsqueeze(1)
        ours_err = float(((ours.double() - reference).abs() / reference).max())
        naive_err = float(((naive.double() - reference).abs() / reference).max())
        assert ours_err < 1e-4, ours_err
        if r is near:
            assert float(reference.max()) < 1e-5
            assert naive_err > 100 * ours_err, (naive_err, ours_err)


def test_map_is_the_sum_over_scales_of_the_stream_mean_upsampled_then_blurred():
    from anomalib_recon.components.anomaly_map import make_blur

    gen = torch.Generator().manual_seed(0)
    sample = [torch.rand(2, 1, s, s, generator=gen) for s in (16, 8, 4)]
    prompt = [torch.rand(2, 1, s, s, generator=gen) for s in (16, 8, 4)]
    up = [F.interpolate(m, size=(64, 64), mode="bilinear", align_corners=False) for m in sample]
    up_p = [F.interpolate(m, size=(64, 64), mode="bilinear", align_corners=False) for m in prompt]
    torch.testing.assert_close(
        residual_map(sample, prompt, (64, 64)), sum(0.5 * (a + b) for a, b in zip(up, up_p, strict=True))
    )
    torch.testing.assert_close(residual_map(sample, prompt, (64, 64), "sample"), sum(up))
    torch.testing.assert_close(residual_map(sample, prompt, (64, 64), "prompt"), sum(up_p))
    torch.testing.assert_close(residual_map(sample, None, (64, 64)), sum(up))
    blur = make_blur(4.0)
    torch.testing.assert_close(
        residual_map(sample, prompt, (64, 64), blur=blur),
        blur(sum(0.5 * (a + b) for a, b in zip(up, up_p, strict=True))),
    )


def test_scale_weights_weigh_each_scale_in_the_sum_and_zero_leaves_it_out():
    from anomalib_recon.components.anomaly_map import make_blur

    gen = torch.Generator().manual_seed(0)
    sample = [torch.rand(2, 1, s, s, generator=gen) for s in (16, 8, 4)]
    prompt = [torch.rand(2, 1, s, s, generator=gen) for s in (16, 8, 4)]
    up = [
        F.interpolate(0.5 * (a + b), size=(64, 64), mode="bilinear", align_corners=False)
        for a, b in zip(sample, prompt, strict=True)
    ]
    blur = make_blur(4.0)
    weighted = residual_map(sample, prompt, (64, 64), blur=blur, scale_weights=(2.0, 0.5, 1.0))
    torch.testing.assert_close(weighted, blur(2.0 * up[0] + 0.5 * up[1] + up[2]))
    # a scale of weight 0 is not computed: a NaN there cannot reach the map
    coarse = residual_map(
        [s * float("nan") if i < 2 else s for i, s in enumerate(sample)], None, (64, 64), scale_weights=(0, 0, 1)
    )
    torch.testing.assert_close(coarse, F.interpolate(sample[2], size=(64, 64), mode="bilinear", align_corners=False))
    # the default weights are the plain sum, bit for bit
    assert torch.equal(
        residual_map(sample, prompt, (64, 64), scale_weights=(1, 1, 1)), residual_map(sample, prompt, (64, 64))
    )
    with pytest.raises(ValueError, match="one weight per scale"):
        residual_map(sample, prompt, (64, 64), scale_weights=(1.0, 1.0))


@pytest.mark.export
def test_model_scale_weights_set_the_map_and_travel_with_the_graph(tmp_path):
    """forward with scale_weights (0, 0, 1) = the stride-16 stream mean alone, upsampled, blurred; the ONNX graph of
    the Lightning model computes what its own forward does."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from anomalib_recon.components.anomaly_map import make_blur

    torch.manual_seed(0)
    model = tiny(scale_weights=(0.0, 0.0, 1.0)).eval()
    net = model.model
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        features = net.feature_extractor(normalised(images))
        sample, prompt = net.reconstruct(features)
        f, x, p = features[2], sample[2], prompt[2]
        m = 0.5 * ((1 - F.cosine_similarity(f, x, dim=1)) + (1 - F.cosine_similarity(f, p, dim=1)))
        expected = make_blur(4.0)(F.interpolate(m.unsqueeze(1), size=(64, 64), mode="bilinear", align_corners=False))
        raw = net(normalised(images))
        full = model(images)
    torch.testing.assert_close(raw.anomaly_map, expected, atol=1e-5, rtol=1e-4)
    assert model.hparams["scale_weights"] == (0.0, 0.0, 1.0)
    path = model.to_onnx(tmp_path, input_size=(64, 64), opset_version=18)
    session = ort.InferenceSession(str(path))
    names = [o.name for o in session.get_outputs()]
    outputs = dict(zip(names, session.run(None, {session.get_inputs()[0].name: images.numpy()}), strict=True))
    np.testing.assert_allclose(outputs["anomaly_map"], full.anomaly_map.numpy(), rtol=1e-4, atol=1e-4)


def test_inference_map_and_score_follow_the_formula():
    """forward = per scale ½[(1 − cos(f, R^x)) + (1 − cos(f, R^p))], upsampled, summed, blurred (σ 4); score = max."""
    from anomalib_recon.components.anomaly_map import make_blur

    torch.manual_seed(0)
    net = tiny().model.eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        features = net.feature_extractor(images)
        sample, prompt = net.reconstruct(features)
        per_scale = []
        for f, x, p in zip(features, sample, prompt, strict=True):
            m = 0.5 * ((1 - F.cosine_similarity(f, x, dim=1)) + (1 - F.cosine_similarity(f, p, dim=1)))
            per_scale.append(F.interpolate(m.unsqueeze(1), size=(64, 64), mode="bilinear", align_corners=False))
        expected = make_blur(4.0)(sum(per_scale))
        pred = net(images)
    torch.testing.assert_close(pred.anomaly_map, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(pred.pred_score, expected.flatten(1).amax(dim=1), atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------- blocks
def _brute_attention(attn, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """Per head and per query token, with explicit weight slices."""
    dim = x.shape[-1]
    heads, d = attn.num_heads, dim // attn.num_heads
    q = x @ attn.q.weight.T + attn.q.bias
    kv = context @ attn.kv.weight.T + attn.kv.bias
    k, v = kv[..., :dim], kv[..., dim:]
    out = torch.zeros_like(x)
    for b in range(x.shape[0]):
        for h in range(heads):
            sl = slice(h * d, (h + 1) * d)
            for i in range(x.shape[1]):
                logits = torch.stack([q[b, i, sl] @ k[b, j, sl] / math.sqrt(d) for j in range(context.shape[1])])
                w = torch.exp(logits - logits.max())
                out[b, i, sl] = (w / w.sum()) @ v[b, :, sl]
    return out @ attn.proj.weight.T + attn.proj.bias


def test_decoder_block_matches_the_formula_and_shares_weights_between_streams():
    """CSCD: X ← X + SA(LN1 X); X ← X + CA(LN2 X, LN_c P̃); X ← X + MLP(LN3 X); P ← P + SA(LN1 P); P ← P + MLP(LN3 P)
    with one set of weights; the prompt stream reads neither X nor the context."""
    torch.manual_seed(0)
    block = ConditionalDecoderBlock(16, 2, 2.0)
    with torch.no_grad():
        for p in block.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x, prompt, context = torch.randn(2, 5, 16), torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    with torch.no_grad():
        got_x, got_p = block(x, prompt, context)
        mlp = lambda t: block.mlp(block.norm3(t))  # noqa: E731
        want_x = x + _brute_attention(block.attn, block.norm1(x), block.norm1(x))
        want_x = want_x + _brute_attention(block.cross_attn, block.norm2(want_x), block.norm_context(context))
        want_x = want_x + mlp(want_x)
        want_p = prompt + _brute_attention(block.attn, block.norm1(prompt), block.norm1(prompt))
        want_p = want_p + mlp(want_p)
        torch.testing.assert_close(got_x, want_x, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got_p, want_p, atol=1e-5, rtol=1e-5)
        _, p_other = block(torch.randn(2, 5, 16), prompt, torch.randn(2, 5, 16))
    torch.testing.assert_close(p_other, got_p)  # the prompt stream never reads the sample or the context
    plain = ConditionalDecoderBlock(16, 2, 2.0, conditional=False)
    assert not hasattr(plain, "cross_attn")


def test_prompt_stream_takes_no_values_from_the_sample():
    """The identical-shortcut guard by construction: with a prompt equal at every position, the SACE alignment
    attention (queries and values from P, keys from X) returns it unchanged whatever X is, and CSCD's prompt stream
    never reads X, so R^p does not depend on the sample; R^x does. A block that mixes X's values into the prompt
    stream fails here."""
    torch.manual_seed(0)
    net = tiny(depth=2, decoder_depth=2).model.eval()
    constant = torch.randn(1, 1, net.embed_dim).expand(1, net.num_tokens, -1)

    def reconstruct(images: torch.Tensor):
        features = net.feature_extractor(images)
        prompt = constant.expand(images.shape[0], -1, -1)
        x = net.pos_embed(net.patch_embed(features))
        for block in net.encoder:
            x, prompt = block(x, prompt)
        context = prompt
        for block in net.decoder:
            x, prompt = block(x, prompt, context)
        return x, prompt

    with torch.no_grad():
        x1, p1 = reconstruct(torch.randn(2, 3, 64, 64))
        x2, p2 = reconstruct(torch.randn(2, 3, 64, 64))
    torch.testing.assert_close(p1, p2)
    assert float((x1 - x2).abs().max()) > 1e-2


# ---------------------------------------------------------------------------------------------------- prompt pool
def test_prompt_pool_priors_and_keys_are_the_class_means_of_the_frozen_features(two_classes):
    """Brute force: μ_{c,s} = mean of f_s over class c's training images, k_c = mean of GAP(f_3); read from the
    MultiCategory training set, each image's class from its path. Averaging over all images (a shared prior) or
    mixing up classes fails here."""
    datamodule = multi(two_classes)
    datamodule.setup()
    model = tiny()
    attach(model, datamodule)
    model.fit_prompt_pool(loader(datamodule.train_data))
    pool = model.model.prompt_pool
    assert bool(pool.fitted) and pool.class_names == ["checker", "stripes"]
    samples = datamodule.train_data.samples
    for c, name in enumerate(pool.class_names):
        rows = [i for i, cat in enumerate(samples.category) if cat == name]
        images = normalised(torch.stack([datamodule.train_data[i].image for i in rows]))
        with torch.no_grad():
            features = model.model.feature_extractor(images)
        for s, f in enumerate(features):
            torch.testing.assert_close(pool.priors()[s][c], f.mean(dim=0), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(pool.keys[c], features[-1].mean(dim=(0, 2, 3)), atol=1e-5, rtol=1e-5)
    assert float((pool.priors()[0][0] - pool.priors()[0][1]).abs().max()) > 1e-2  # two different priors

    shared = tiny(prompts="shared")
    attach(shared, datamodule)
    shared.fit_prompt_pool(loader(datamodule.train_data))
    assert shared.model.prompt_pool.offsets.shape[0] == 1
    everything = normalised(torch.stack([datamodule.train_data[i].image for i in range(len(samples))]))
    with torch.no_grad():
        first = shared.model.feature_extractor(everything)[0]
    torch.testing.assert_close(shared.model.prompt_pool.priors()[0][0], first.mean(dim=0), atol=1e-5, rtol=1e-5)


def test_prompt_is_the_embedded_prior_plus_the_class_offset():
    """P_c = HPE(μ_c) + pos + Δ_c, picked per image by class id; without the prior P_c = pos + Δ_c."""
    torch.manual_seed(0)
    net = tiny().model
    net.set_classes(["a", "b"])
    pool = net.prompt_pool
    with torch.no_grad():
        for prior in pool.priors():
            prior.normal_()
    ids = torch.tensor([1, 0, 1])
    tokens = net.prompt_tokens(ids, 3)
    for i, c in enumerate(ids.tolist()):
        want = net.pos_embed(net.patch_embed([p[c : c + 1] for p in pool.priors()]))[0] + pool.offsets[c]
        torch.testing.assert_close(tokens[i], want)
    net.prompt_prior = False
    torch.testing.assert_close(net.prompt_tokens(ids, 3)[0], net.pos_embed(pool.offsets[1:2])[0])


def test_class_inference_on_held_out_images(two_classes):
    """Without a class id the model picks argmax_c cos(GAP(f_3(x)), k_c): every held-out test image (normal and
    defective) of both classes is assigned its own class, and forward uses that class's prompt."""
    datamodule = multi(two_classes)
    datamodule.setup()
    torch.manual_seed(0)
    model = PNPT(**{**TINY, "weights": "imagenet"}, image_size=64, visualizer=False)
    attach(model, datamodule)
    model.fit_prompt_pool(loader(datamodule.train_data))
    test = datamodule.test_data
    images = normalised(torch.stack([test[i].image for i in range(len(test))]))
    truth = model.class_ids(list(test.samples.image_path), torch.device("cpu"))
    net = model.model.eval()
    with torch.no_grad():
        features = net.feature_extractor(images)
        inferred = net.infer_class(features)
        assert torch.equal(inferred, truth)
        assert set(truth.tolist()) == {0, 1} and len(truth) == 16
        default = net(images[:4]).anomaly_map
        torch.testing.assert_close(default, net(images[:4], class_ids=truth[:4]).anomaly_map)
        assert float((default - net(images[:4], class_ids=1 - truth[:4]).anomaly_map).abs().max()) > 1e-4


def test_a_pool_resizes_to_the_classes_of_a_state_dict():
    source = tiny().model
    source.set_classes(["magnetic_tile", "elpv_mono", "elpv_poly"])
    with torch.no_grad():
        source.prompt_pool.keys.normal_()
    target = tiny().model
    assert target.class_names == ["default"]
    target.load_state_dict(source.state_dict())
    assert target.class_names == ["magnetic_tile", "elpv_mono", "elpv_poly"]
    torch.testing.assert_close(target.prompt_pool.keys, source.prompt_pool.keys)
    torch.testing.assert_close(target.prompt_pool.offsets, source.prompt_pool.offsets)
    assert all(isinstance(v, torch.Tensor) for v in target.state_dict().values())


# ---------------------------------------------------------------------------------------------------- wiring
def _grads(module) -> tuple[bool, float]:
    params = list(module.parameters()) if isinstance(module, torch.nn.Module) else [module]
    return all(p.grad is not None for p in params), sum(float(p.grad.abs().sum()) for p in params if p.grad is not None)


@pytest.mark.filterwarnings("ignore:You are trying to `self.log")  # training_step without a Trainer
def test_training_step_uses_each_images_class_prompt_and_trains_both_streams(two_classes, monkeypatch):
    """``training_step`` on a real two-class batch: each image's prompt is its category's (from the datamodule),
    the loss is Σ_s mean(1 − cos(f_s, R^x_s)) + mean(1 − cos(f_s, R^p_s)) against the frozen backbone's features of
    the batch, and every trainable part gets a gradient (the offsets only for the classes in the batch); the
    backbone and the fitted priors/keys get none."""
    datamodule = multi(two_classes)
    datamodule.setup()
    torch.manual_seed(0)
    model = tiny()
    attach(model, datamodule)
    model.fit_prompt_pool(loader(datamodule.train_data))
    net = model.model
    train = datamodule.train_data
    rows = [0, 1, 2]  # all of class "checker" (the union lists the categories in order)
    paths = [train.samples.image_path[i] for i in rows]
    images = normalised(torch.stack([train[i].image for i in rows]))
    seen: dict = {}
    original_prompts, original_outputs = net.prompt_tokens, net.reconstruction_outputs

    def prompts(class_ids, batch):
        seen["ids"] = class_ids
        return original_prompts(class_ids, batch)

    def outputs(*args, **kwargs):
        seen["out"] = original_outputs(*args, **kwargs)
        return seen["out"]

    monkeypatch.setattr(net, "prompt_tokens", prompts)
    monkeypatch.setattr(net, "reconstruction_outputs", outputs)
    net.train()
    loss = model.training_step(ImageBatch(image=images, image_path=paths), 0)["loss"]
    loss.backward()
    assert seen["ids"].tolist() == [0, 0, 0]
    out = seen["out"]
    with torch.no_grad():
        features = net.feature_extractor(images)
    for got, want in zip(out.features, features, strict=True):
        torch.testing.assert_close(got, want)
    sample = sum(
        (1 - F.cosine_similarity(f, r.detach(), dim=1)).mean() for f, r in zip(features, out.sample, strict=True)
    )
    prompt = sum(
        (1 - F.cosine_similarity(f, r.detach(), dim=1)).mean() for f, r in zip(features, out.prompt, strict=True)
    )
    torch.testing.assert_close(loss.detach(), (sample + prompt).float(), atol=1e-5, rtol=1e-5)
    assert float(prompt) > 0 and float(sample) > 0
    for name in ("patch_embed", "encoder", "decoder", "norm", "heads"):
        complete, total = _grads(getattr(net, name))
        assert complete and total > 0, name
    offsets = net.prompt_pool.offsets.grad
    assert float(offsets[0].abs().sum()) > 0 and float(offsets[1].abs().sum()) == 0  # only "checker" was in it
    assert all(p.grad is None for p in net.feature_extractor.parameters())
    assert all(not b.requires_grad for b in (*net.prompt_pool.priors(), net.prompt_pool.keys))


@pytest.mark.filterwarnings("ignore:You are trying to `self.log")
def test_no_prompt_ablation_is_a_plain_reconstruction_transformer(monkeypatch):
    torch.manual_seed(0)
    model = tiny(prompts="none")
    net = model.model
    assert net.prompt_pool is None and not hasattr(net.decoder[0], "cross_attn")
    images = torch.randn(2, 3, 64, 64)
    out = net.reconstruction_outputs(images)
    assert out.prompt is None
    losses = model.loss(*out)
    assert float(losses["prompt"]) == 0 and torch.equal(losses["loss"], losses["sample"])
    net.eval()
    with torch.no_grad():
        pred = net(images)
        sample, _ = net.stream_residuals(net.reconstruction_outputs(images))
    torch.testing.assert_close(pred.anomaly_map, residual_map(sample, None, (64, 64), blur=net.blur))
    loss = model.training_step(ImageBatch(image=images, image_path=["a.png", "b.png"]), 0)["loss"]
    loss.backward()
    assert all(p.grad is not None for p in net.trainable_parameters())


def test_validation_uses_the_inferred_class_unless_oracle(two_classes, monkeypatch):
    datamodule = multi(two_classes)
    datamodule.setup()
    for selection, expect_ids in (("inferred", False), ("oracle", True)):
        model = tiny(prompt_selection=selection)
        attach(model, datamodule)
        seen = {}
        original = model.model.forward

        def forward(images, class_ids=None, _original=original, _seen=seen):
            _seen["ids"] = class_ids
            return _original(images, class_ids)

        monkeypatch.setattr(model.model, "forward", forward)
        test = datamodule.test_data
        paths = [test.samples.image_path[i] for i in (0, len(test) - 1)]
        batch = ImageBatch(image=torch.randn(2, 3, 64, 64), image_path=paths)
        model.eval()
        with torch.no_grad():
            model.validation_step(batch, 0)
        if expect_ids:
            assert seen["ids"].tolist() == [0, 1]
        else:
            assert seen["ids"] is None


def test_class_ids_need_the_category_of_each_image():
    model = tiny()
    assert model.class_ids(["x.png", "y.png"]).tolist() == [0, 0]  # one class: no lookup needed
    model.model.set_classes(["a", "b"])
    with pytest.raises(ValueError, match="MultiCategory"):
        model.class_ids(["x.png"])
    model._category_fn = {"x.png": "a", "y.png": "c"}.__getitem__
    assert model.class_ids(["x.png"]).tolist() == [0]
    with pytest.raises(ValueError, match="category 'c', not one of the model's classes"):
        model.class_ids(["y.png"])
    with pytest.raises(ValueError, match=r"no class for 'z\.png'"):
        model.class_ids(["z.png"])


def test_warmup_cosine_schedule():
    schedule = WarmupCosine(total=100, warmup=10, final=0.1)
    assert schedule(0) == pytest.approx(0.1) and schedule(9) == pytest.approx(1.0)
    assert schedule(10) == pytest.approx(1.0)
    assert schedule(55) == pytest.approx(0.1 + 0.9 * 0.5)
    assert schedule(100) == pytest.approx(0.1) and schedule(150) == pytest.approx(0.1)
    values = [schedule(t) for t in range(10, 101)]
    assert all(a >= b for a, b in itertools.pairwise(values))


def test_schedule_in_epochs_or_fraction_of_the_trainers_horizon():
    from types import SimpleNamespace

    model = tiny(warmup_epochs=2, final_lr=1e-5, lr=1e-4)
    model._trainer = SimpleNamespace(estimated_stepping_batches=300, num_training_batches=7, accumulate_grad_batches=1)
    schedule = model._schedule()
    assert (schedule.total, schedule.warmup, schedule.final) == (300, 14, pytest.approx(0.1))
    model = tiny(warmup_epochs=0.1)
    model._trainer = SimpleNamespace(estimated_stepping_batches=300, num_training_batches=7, accumulate_grad_batches=1)
    assert model._schedule().warmup == 30
    model._trainer = SimpleNamespace(estimated_stepping_batches=float("inf"), num_training_batches=7)
    assert model._schedule() is None
    model._trainer = None
    assert isinstance(model.configure_optimizers(), torch.optim.AdamW)


# ---------------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"prompts": "pool"}, "prompts must be one of"),
        ({"prompts": "none", "map_streams": "prompt"}, "needs a prompt stream"),
        ({"map_streams": "all"}, "map_streams must be one of"),
        ({"prompt_selection": "label"}, "prompt_selection must be one of"),
        ({"embed_dim_per_scale": 6}, "divisible by 4"),
        ({"decoder_depth": 0}, "decoder_depth must be an int >= 1"),
        ({"lr": float("nan")}, "lr must be a finite number"),
        ({"weight_decay": -1.0}, "weight_decay"),
        ({"betas": (0.9, 1.0)}, "betas"),
        ({"warmup_epochs": 1.5}, "warmup_epochs"),
        ({"final_lr": 1.0}, "final_lr"),
        ({"blur_sigma": 20.0}, "blur_sigma=20"),
        ({"scale_weights": (1.0, 1.0)}, "scale_weights must be three"),
        ({"scale_weights": (-1.0, 1.0, 1.0)}, "scale_weights must be three"),
        ({"scale_weights": (0.0, 0.0, 0.0)}, "at least one > 0"),
        ({"scale_weights": (float("nan"), 1.0, 1.0)}, "scale_weights must be three"),
        ({"size": 72}, "multiple of 16"),
    ],
)
def test_constructor_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny(**kwargs)


def test_input_errors():
    net = tiny().model
    net.set_classes(["a", "b"])
    with pytest.raises(ValueError, match="built for 64x64"):
        net(torch.randn(1, 3, 96, 96))
    with pytest.raises(ValueError, match="NaN or inf"):
        net(torch.full((1, 3, 64, 64), float("nan")))
    with pytest.raises(ValueError, match=r"class_ids must lie in \[0, 2\)"):
        net(torch.randn(1, 3, 64, 64), class_ids=torch.tensor([2]))
    with pytest.raises(ValueError, match="2 ids for 1 images"):
        net(torch.randn(1, 3, 64, 64), class_ids=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="unique class names"):
        net.set_classes(["a", "a"])


def test_a_class_without_training_images_is_refused(two_classes):
    datamodule = multi(two_classes)
    datamodule.setup()
    model = tiny()
    attach(model, datamodule)
    model.model.set_classes(["checker", "stripes", "wood"])
    with pytest.raises(ValueError, match=r"no normal training images of class\(es\) \['wood'\]"):
        model.fit_prompt_pool(loader(datamodule.train_data))


# ---------------------------------------------------------------------------------------------------- mechanism
@pytest.mark.slow
def test_the_prompt_stream_does_not_reproduce_a_pasted_anomaly(tiny_category):
    """The identical-shortcut test on tiny data (``benchmarks/pnpt_shortcut.py`` at full size): after a short fit on
    normal stripes, paste a blue square into normal test images and measure how much of the features' change inside
    it reaches each reconstruction (``Σ_mask |R(x_a) − R(x)| / Σ_mask |f(x_a) − f(x)|``). The sample stream, which
    reads the image, passes some of it on; the prompt stream (normal content, only re-arranged by the image) passes
    almost none."""
    from anomalib.data.utils import read_image

    from tests.conftest import folder_datamodule

    torch.manual_seed(0)
    model = PNPT(**{**TINY, "weights": "imagenet"}, image_size=64, lr=1e-3, warmup_epochs=0, visualizer=False)
    engine = cpu_engine(tiny_category.parent / "pnpt_leak", max_steps=10, limit_val_batches=0)
    engine.fit(model, datamodule=folder_datamodule(tiny_category))
    good = torch.stack([read_image(p, as_tensor=True) for p in sorted((tiny_category / "test" / "good").glob("*.png"))])
    bad = good.clone()
    bad[:, :, 20:40, 20:40] = torch.tensor([0.1, 0.1, 0.8]).view(1, 3, 1, 1)
    net = model.model.eval()
    with torch.no_grad():
        normal, anomalous = net.reconstruction_outputs(normalised(good)), net.reconstruction_outputs(normalised(bad))
    leaks = {}
    for stream in ("sample", "prompt"):
        moved = change = 0.0
        for s, (f_n, f_a) in enumerate(zip(normal.features, anomalous.features, strict=True)):
            mask = torch.zeros(1, 1, 64, 64)
            mask[..., 20:40, 20:40] = 1
            weight = F.interpolate(mask, size=f_n.shape[-2:], mode="area")
            r_n, r_a = getattr(normal, stream)[s], getattr(anomalous, stream)[s]
            moved += float(((r_a - r_n).abs().sum(1, keepdim=True) * weight).sum())
            change += float(((f_a - f_n).abs().sum(1, keepdim=True) * weight).sum())
        leaks[stream] = moved / change
    assert leaks["sample"] > 1e-3, leaks  # the sample stream does see the anomaly
    assert leaks["prompt"] < 0.2 * leaks["sample"], leaks


# ---------------------------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_multi_class_fit_test_and_checkpoint_round_trip(two_classes, tmp_path):
    """Through the Engine on MultiCategory: the pool gets the datamodule's classes and is fitted at the start of fit
    (equal to fitting it by hand on the final weights: the priors and keys never train); the test logs per-category
    metrics and their mean; the checkpoint restores the classes and the pool into a model built without them
    (``load_from_checkpoint`` and ``Engine.test(ckpt_path=...)``)."""
    torch.manual_seed(0)
    model = tiny()
    datamodule = multi(two_classes)
    engine = cpu_engine(tmp_path / "run", max_steps=3)
    engine.fit(model, datamodule=datamodule)
    pool = model.model.prompt_pool
    assert pool.class_names == ["checker", "stripes"] and bool(pool.fitted)
    fitted = [p.clone() for p in (*pool.priors(), pool.keys)]
    reference = tiny()
    reference.load_state_dict(model.state_dict())
    attach(reference, datamodule)
    reference.fit_prompt_pool(loader(datamodule.train_data))
    for got, want in zip(
        fitted, (*reference.model.prompt_pool.priors(), reference.model.prompt_pool.keys), strict=True
    ):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)

    (metrics,) = engine.test(model, datamodule=datamodule)
    for key in ("checker/image_AUROC", "stripes/image_AUROC", "mean/image_AUROC", "image_AUROC"):
        assert 0.0 <= float(metrics[key]) <= 1.0, key
    ckpt = tmp_path / "pnpt.ckpt"
    engine.trainer.save_checkpoint(ckpt)
    loaded = PNPT.load_from_checkpoint(ckpt, weights_only=True).eval()
    assert loaded.model.class_names == ["checker", "stripes"]
    images = normalised(torch.stack([datamodule.test_data[i].image for i in (0, len(datamodule.test_data) - 1)]))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(images).anomaly_map, model.model(images).anomaly_map)
    (again,) = cpu_engine(tmp_path / "again").test(tiny(), datamodule=multi(two_classes), ckpt_path=ckpt)
    assert again["mean/image_AUROC"] == pytest.approx(float(metrics["mean/image_AUROC"]), abs=1e-6)


@pytest.mark.slow
def test_ddp_fits_the_prompt_pool_from_every_ranks_images(two_classes, tmp_path):
    """Under 2-process DDP each rank reads half of the training set; the per-class sums are all-reduced, so both
    ranks hold the same pool, equal to a single-process fit on the same weights (up to the float32 differences of
    the backbone between batch compositions, about 1e-6)."""
    from tests.ddp import assert_same_state, fit_ddp

    torch.manual_seed(0)
    model = tiny(evaluator=False)
    states = fit_ddp(model, multi(two_classes, batch_size=2), tmp_path, max_steps=2, limit_val_batches=0)
    keys = [k for k in states[0] if k.startswith("model.prompt_pool.") and "offsets" not in k]
    assert_same_state(states, keys)
    assert bool(states[0]["model.prompt_pool.fitted"])
    datamodule = multi(two_classes)
    datamodule.setup()
    single = tiny(evaluator=False)
    single.load_state_dict(states[0])
    attach(single, datamodule)
    single.fit_prompt_pool(loader(datamodule.train_data))
    pool = single.model.prompt_pool
    for s, prior in enumerate(pool.priors()):
        torch.testing.assert_close(states[0][f"model.prompt_pool.prior_{s}"], prior, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(states[0]["model.prompt_pool.keys"], pool.keys, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.export
def test_onnx_and_openvino_infer_the_class_in_the_graph(two_classes, tmp_path):
    """Multi-class export: the graph infers each image's class (nearest key) and gathers its prompt. Images of the
    two classes in one batch match torch with their true class ids to 1e-4 in ONNX Runtime and OpenVINO (fp32)."""
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    pytest.importorskip("openvino")
    from anomalib_recon.deploy import compile_openvino

    datamodule = multi(two_classes)
    datamodule.setup()
    torch.manual_seed(0)
    model = PNPT(**{**TINY, "weights": "imagenet"}, image_size=64, visualizer=False, evaluator=False)
    attach(model, datamodule)
    model.fit_prompt_pool(loader(datamodule.train_data))
    with torch.no_grad():
        model.model.prompt_pool.offsets.normal_()  # prompts that differ between the classes beyond their priors
    model.eval()
    test = datamodule.test_data
    rows = [0, len(test) - 1]
    images = torch.stack([test[i].image for i in rows])
    truth = model.class_ids([test.samples.image_path[i] for i in rows], torch.device("cpu"))
    assert truth.tolist() == [0, 1]
    with torch.no_grad():
        expected = model(images)
        raw = model.model(normalised(images), class_ids=truth)
        swapped = model.model(normalised(images), class_ids=1 - truth)
    torch.testing.assert_close(model.post_processor(raw).anomaly_map, expected.anomaly_map)
    assert float((swapped.anomaly_map - raw.anomaly_map).abs().max()) > 1e-3  # the class matters

    path = model.to_onnx(tmp_path, input_size=(64, 64), opset_version=18)
    session = ort.InferenceSession(str(path))
    names = [o.name for o in session.get_outputs()]
    onnx_out = dict(zip(names, session.run(None, {session.get_inputs()[0].name: images.numpy()}), strict=True))
    compiled = compile_openvino(path)
    result = compiled(images.numpy())
    ov_out = {o.get_any_name(): result[o] for o in compiled.outputs}
    for outputs in (onnx_out, ov_out):
        for name in ("pred_score", "anomaly_map"):
            np.testing.assert_allclose(outputs[name], getattr(expected, name).numpy(), rtol=1e-4, atol=1e-4)
