"""Tests for 2-D neighborhood attention: every backend against a brute-force NATTEN reference."""

from __future__ import annotations

import importlib.util
import warnings

import pytest
import torch
import torch.nn.functional as F

from anomalib_recon.components import neighborhood_attention as na_mod
from anomalib_recon.components.neighborhood_attention import (
    NA_BACKEND_ENV_VAR,
    NeighborhoodAttention2D,
    available_backends,
    na_backend,
    neighborhood_attention_2d,
)


# --------------------------------------------------------------------------------------------------
# brute-force reference: NATTEN's case-by-case window/bias formulas, one query at a time
# --------------------------------------------------------------------------------------------------
def _ref_window_start(i: int, length: int, k: int, d: int) -> int:
    nb = k // 2
    if d == 1:
        return max(i - nb, 0) + (length - i - nb - 1 if i + nb >= length else 0)
    if i - nb * d < 0:
        return i % d
    if i + nb * d >= length:
        r, full = i % d, (length // d) * d
        rem = length - full
        return length - rem + r - 2 * nb * d if r < rem else full + r - k * d
    return i - nb * d


def _ref_bias_start(i: int, length: int, k: int, d: int) -> int:
    nb = k // 2
    if d == 1:
        return nb + (nb - i if i < nb else 0) + (length - i - 1 - nb if i + nb >= length else 0)
    if i - nb * d < 0:
        return k - 1 - i // d
    if i + nb * d >= length:
        return (length - i - 1) // d
    return nb


def reference_na(q, k, v, kernel_size, dilation=1, rpb=None, scale=None):
    """Loop over queries: gather the k*k keys of the clamped (dilated) window, add the bias, softmax."""
    _, _, H, W, D = q.shape
    scale = D**-0.5 if scale is None else scale
    out = torch.empty_like(v)
    for i in range(H):
        rows = [_ref_window_start(i, H, kernel_size, dilation) + t * dilation for t in range(kernel_size)]
        brow = [_ref_bias_start(i, H, kernel_size, dilation) + t for t in range(kernel_size)]
        for j in range(W):
            cols = [_ref_window_start(j, W, kernel_size, dilation) + t * dilation for t in range(kernel_size)]
            bcol = [_ref_bias_start(j, W, kernel_size, dilation) + t for t in range(kernel_size)]
            keys = k[:, :, rows][:, :, :, cols].flatten(2, 3)  # (B, heads, k*k, D)
            vals = v[:, :, rows][:, :, :, cols].flatten(2, 3)
            logits = torch.einsum("bhd,bhnd->bhn", q[:, :, i, j] * scale, keys)
            if rpb is not None:
                logits = logits + rpb[:, brow][:, :, bcol].flatten(1)
            out[:, :, i, j] = torch.einsum("bhn,bhnd->bhd", logits.softmax(-1), vals)
    return out


def _qkv(shape, dtype=torch.float64, seed=0, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen, dtype=dtype).requires_grad_(requires_grad) for _ in range(3)]


def test_reference_agrees_with_sub_grid_definition():
    """The two ways to state NATTEN's windows (case formulas vs clamping inside sub-grids) agree."""
    for length, k, d in [(7, 7, 1), (9, 3, 3), (13, 3, 2), (12, 5, 2), (20, 3, 4), (11, 3, 3)]:
        keys, bias = na_mod._axis_neighborhood(length, k, d, torch.device("cpu"))
        for i in range(length):
            start = _ref_window_start(i, length, k, d)
            assert keys[i].tolist() == [start + t * d for t in range(k)], (length, k, d, i)
            assert bias[i].tolist() == [_ref_bias_start(i, length, k, d) + t for t in range(k)]
            assert all(p % d == i % d and 0 <= p < length for p in keys[i].tolist())


CASES = [  # (H, W, kernel, dilation, with rpb)
    (7, 7, 7, 1, True),  # map == kernel: global attention
    (9, 12, 5, 1, True),  # H != W, borders on both sides
    (10, 8, 3, 1, False),
    (13, 11, 3, 2, True),  # dilated, lengths not multiples of the dilation
    (12, 14, 5, 2, False),
    (9, 9, 3, 3, True),
]


@pytest.mark.parametrize(("H", "W", "ks", "dil", "with_rpb"), CASES)
def test_pure_matches_reference_fp64_forward_and_backward(H, W, ks, dil, with_rpb):
    """All forms of the pure backend (index gather, masked dense, blocked) against the loop reference."""
    heads, D = 2, 4
    q, k, v = _qkv((1, heads, H, W, D), requires_grad=True)
    rpb = torch.randn(heads, 2 * ks - 1, 2 * ks - 1, dtype=torch.float64, requires_grad=True) if with_rpb else None
    scale = 0.37
    inputs = [q, k, v] + ([rpb] if with_rpb else [])
    ref = reference_na(q, k, v, ks, dil, rpb, scale)
    grad = torch.randn_like(ref)
    g_ref = torch.autograd.grad(ref, inputs, grad)
    # tile 3/4 make several blocks (and an overlapping last block) on these small maps
    for form, tile in (("gather", 8), ("dense", 8), ("blocked", 3), ("blocked", 4), ("blocked", 8)):
        out = na_mod._pure(q, k, v, ks, dil, rpb, scale, 0.0, form=form, tile=tile)
        assert (out - ref).abs().max() < 1e-12, (form, tile)
        g_out = torch.autograd.grad(out, inputs, grad)
        for a, b in zip(g_out, g_ref, strict=True):
            assert (a - b).abs().max() < 1e-10, (form, tile)


def test_public_function_fp32_and_default_scale():
    q, k, v = _qkv((1, 3, 11, 9, 8), dtype=torch.float32)
    rpb = 0.1 * torch.randn(3, 5, 5)
    out = neighborhood_attention_2d(q, k, v, 3, dilation=2, rpb=rpb, backend="pure")
    ref = reference_na(q.double(), k.double(), v.double(), 3, 2, rpb.double())
    assert out.dtype == torch.float32
    assert out.shape == q.shape
    assert (out.double() - ref).abs().max() < 1e-5


def test_rpb_changes_output_and_gets_gradient():
    q, k, v = _qkv((1, 2, 8, 8, 4))
    rpb = torch.zeros(2, 5, 5, dtype=torch.float64, requires_grad=True)
    base = neighborhood_attention_2d(q, k, v, 3, rpb=None, backend="pure")
    out = neighborhood_attention_2d(q, k, v, 3, rpb=rpb, backend="pure")
    assert torch.allclose(base, out)  # zero bias == no bias
    (out**2).sum().backward()
    assert rpb.grad is not None and rpb.grad.abs().sum() > 0
    biased = neighborhood_attention_2d(q, k, v, 3, rpb=rpb.detach() + torch.randn(2, 5, 5, dtype=torch.float64))
    assert (biased - base).abs().max() > 1e-3


def test_large_map_uses_gather_memory():
    """64x64 with k=7 runs with O(HW k^2) memory (an HW x HW mask would be 16.7M entries per head)."""
    q, k, v = _qkv((1, 2, 64, 64, 8), dtype=torch.float32)
    out = neighborhood_attention_2d(q, k, v, 7, backend="pure")
    assert out.shape == q.shape and torch.isfinite(out).all()
    # spot-check a corner and an interior query against the reference window
    i, j = 0, 37
    rows = range(0, 7)
    cols = range(j - 3, j + 4)
    keys = k[0, :, list(rows)][:, :, list(cols)].flatten(1, 2)
    vals = v[0, :, list(rows)][:, :, list(cols)].flatten(1, 2)
    attn = torch.einsum("hd,hnd->hn", q[0, :, i, j] * 8**-0.5, keys).softmax(-1)
    assert torch.allclose(out[0, :, i, j], torch.einsum("hn,hnd->hd", attn, vals), atol=1e-5)


# --------------------------------------------------------------------------------------------------
# module
# --------------------------------------------------------------------------------------------------
def _manual_module(module, x):
    """NATTEN 0.14's module written out: pad to the window, qkv, reference NA, crop, proj."""
    B, H, W, C = x.shape
    win = module.kernel_size * module.dilation
    xp = F.pad(x, (0, 0, 0, max(0, win - W), 0, max(0, win - H)))
    Hp, Wp = xp.shape[1:3]
    qkv = module.qkv(xp).reshape(B, Hp, Wp, 3, module.num_heads, module.head_dim).permute(3, 0, 4, 1, 2, 5)
    out = reference_na(qkv[0], qkv[1], qkv[2], module.kernel_size, module.dilation, module.rpb, module.scale)
    out = out.permute(0, 2, 3, 1, 4).reshape(B, Hp, Wp, C)[:, :H, :W]
    return module.proj(out)


@pytest.mark.parametrize(
    ("H", "W", "ks", "dil"), [(4, 4, 7, 1), (2, 2, 3, 1), (1, 1, 3, 1), (5, 9, 3, 2), (3, 12, 5, 1), (10, 9, 3, 1)]
)
def test_module_small_map_padding_matches_manual(H, W, ks, dil):
    torch.manual_seed(0)
    module = NeighborhoodAttention2D(16, 4, ks, dilation=dil, backend="pure").double()
    x = torch.randn(2, H, W, 16, dtype=torch.float64, requires_grad=True)
    out = module(x)
    assert out.shape == x.shape
    ref = _manual_module(module, x)
    assert (out - ref).abs().max() < 1e-12
    g_out = torch.autograd.grad(out.sum(), [x, module.qkv.weight, module.rpb])
    g_ref = torch.autograd.grad(ref.sum(), [x, module.qkv.weight, module.rpb])
    for a, b in zip(g_out, g_ref, strict=True):
        assert (a - b).abs().max() < 1e-10


def test_padded_tokens_are_keys_with_qkv_bias():
    """A 4x4 map with k=7 is not the same as global attention over the 16 real tokens: the 33 zero-padded
    tokens take part as keys (carrying the qkv bias), exactly as in NATTEN."""
    torch.manual_seed(0)
    module = NeighborhoodAttention2D(8, 2, 7, relative_position_bias=False).double()
    nn_init = torch.nn.init
    nn_init.normal_(module.qkv.bias, std=1.0)
    x = torch.randn(1, 4, 4, 8, dtype=torch.float64)
    out = module(x)
    qkv = module.qkv(x).reshape(1, 16, 3, 2, 4).permute(2, 0, 3, 1, 4)
    glob = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2]).permute(0, 2, 1, 3).reshape(1, 4, 4, 8)
    assert (out - module.proj(glob)).abs().max() > 1e-3


def test_module_attributes_init_and_state_dict_layout():
    module = NeighborhoodAttention2D(64, 4, 7, dilation=2, backend="pure")
    assert module.qkv.in_features == 64 and module.qkv.out_features == 192
    assert module.proj.in_features == module.proj.out_features == 64
    assert module.rpb.shape == (4, 13, 13) and module.rpb.requires_grad
    assert 0.01 < module.rpb.std().item() < 0.03 and module.rpb.abs().max() <= 2.0
    assert (module.kernel_size, module.dilation, module.num_heads, module.backend) == (7, 2, 4, "pure")
    assert module.scale == pytest.approx(16**-0.5)
    assert set(module.state_dict()) == {"qkv.weight", "qkv.bias", "rpb", "proj.weight", "proj.bias"}
    no_bias = NeighborhoodAttention2D(64, 4, 3, relative_position_bias=False, qkv_bias=False, qk_scale=0.5)
    assert no_bias.rpb is None and no_bias.qkv.bias is None and no_bias.scale == 0.5
    module.backend = "flex"
    assert module.backend == "flex"


def test_module_attention_dropout_only_in_training():
    torch.manual_seed(0)
    module = NeighborhoodAttention2D(8, 2, 3, attn_drop=0.5)
    x = torch.randn(1, 6, 6, 8)
    module.eval()
    assert torch.equal(module(x), module(x))
    module.train()
    assert not torch.equal(module(x), module(x))


# --------------------------------------------------------------------------------------------------
# errors and backend selection
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dim": 30, "num_heads": 4, "kernel_size": 3}, "divisible"),
        ({"dim": 32, "num_heads": 4, "kernel_size": 4}, "odd"),
        ({"dim": 32, "num_heads": 4, "kernel_size": 1}, "odd"),
        ({"dim": 32, "num_heads": 4, "kernel_size": 3, "dilation": 0}, "dilation"),
        ({"dim": 32, "num_heads": 4, "kernel_size": 3, "backend": "cuda"}, "Unknown"),
    ],
)
def test_constructor_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NeighborhoodAttention2D(**kwargs)


def test_input_errors():
    module = NeighborhoodAttention2D(8, 2, 3)
    with pytest.raises(ValueError, match="channels-last"):
        module(torch.randn(1, 8, 5, 5))  # NCHW by mistake
    with pytest.raises(ValueError, match="channels-last"):
        module(torch.randn(5, 5, 8))
    with pytest.raises(ValueError, match="Unknown"):
        module.backend = "fast"
    q = torch.randn(1, 2, 6, 6, 4)
    with pytest.raises(ValueError, match="smaller than"):
        neighborhood_attention_2d(q, q, q, 7)
    with pytest.raises(ValueError, match="5-D"):
        neighborhood_attention_2d(q[0], q[0], q[0], 3)
    with pytest.raises(ValueError, match="rpb"):
        neighborhood_attention_2d(q, q, q, 3, rpb=torch.zeros(2, 3, 3))
    with pytest.raises(ValueError, match="do not match"):
        neighborhood_attention_2d(q, q[:, :1], q, 3)
    with pytest.raises(ValueError, match="Unknown"):
        neighborhood_attention_2d(q, q, q, 3, backend="triton")
    with pytest.raises(ValueError, match="Unknown"), na_backend("fastest"):
        pass


def test_available_backends_and_auto_on_cpu():
    names = available_backends()
    assert names[-1] == "pure"
    assert ("natten" in names) == (importlib.util.find_spec("natten") is not None)
    q = torch.randn(1, 2, 8, 8, 4)
    assert na_mod._resolve_backend("auto", q, None, False) == "pure"  # CPU tensors never pick natten/flex


def test_forcing_a_backend(monkeypatch):
    q = torch.randn(1, 2, 8, 8, 4)
    assert na_mod._resolve_backend("flex", q, None, False) == "flex"
    with na_backend("pure"):
        assert na_mod._resolve_backend("flex", q, None, False) == "pure"
        with na_backend("flex"):
            assert na_mod._resolve_backend("auto", q, None, False) == "flex"
        assert na_mod._resolve_backend("auto", q, None, False) == "pure"
    monkeypatch.setenv(NA_BACKEND_ENV_VAR, "pure")
    assert na_mod._resolve_backend("flex", q, None, False) == "pure"
    monkeypatch.setenv(NA_BACKEND_ENV_VAR, "gpu")
    with pytest.raises(ValueError, match=NA_BACKEND_ENV_VAR):
        na_mod._resolve_backend("auto", q, None, False)
    monkeypatch.delenv(NA_BACKEND_ENV_VAR)
    with pytest.raises(ValueError, match="dropout"):
        na_mod._resolve_backend("flex", q, None, True)
    assert na_mod._resolve_backend("auto", q, None, True) == "pure"


@pytest.mark.parametrize(
    ("compiling", "exporting", "jit_tracing", "onnx", "expected"),
    [
        (False, False, False, False, False),  # eager
        (True, False, False, False, False),  # plain torch.compile keeps natten/flex
        (True, True, False, False, True),  # torch.export (dynamo: compiling and exporting)
        (False, False, True, False, True),  # TorchScript tracing
        (False, False, False, True, True),  # ONNX export
    ],
)
def test_export_detection_follows_the_shared_is_tracing(monkeypatch, compiling, exporting, jit_tracing, onnx, expected):
    """The module asks the package's one ``is_tracing`` whether a graph is captured; plain compiling is not export.
    While exporting, "auto" runs the pure backend in its branch-free gather form, and nothing is cached."""
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: compiling)
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: exporting)
    monkeypatch.setattr(torch.jit, "is_tracing", lambda: jit_tracing)
    monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: onnx)
    from anomalib_recon.components.tracing import is_tracing

    assert is_tracing() == any((compiling, exporting, jit_tracing, onnx))
    assert na_mod._exporting() == expected
    forms = []
    original = na_mod._pure_blocked
    monkeypatch.setattr(na_mod, "_pure_blocked", lambda *a: forms.append("blocked") or original(*a))
    na_mod._reset_caches()
    q, k, v = _qkv((1, 2, 20, 17, 4))
    assert na_mod._resolve_backend("auto", q, None, False) == "pure"  # CPU: pure either way
    out = na_mod._pure(q, k, v, 7, 1, None, 0.5, 0.0)
    assert forms == ([] if expected else ["blocked"])  # exporting: the gather form, eager: the blocked form
    assert (out - na_mod._pure(q, k, v, 7, 1, None, 0.5, 0.0, form="gather")).abs().max() < 1e-12
    assert (len(na_mod._neighborhood_cache) == 0) == is_tracing()  # no cache entries made while tracing


@pytest.mark.skipif(not na_mod._flex_available(), reason="torch has no flex_attention")
def test_auto_falls_back_when_natten_refuses(monkeypatch):
    """Under "auto", a natten failure (e.g. no kernel for this head_dim) warns once and uses flex."""

    def broken_natten(*args):
        raise NotImplementedError("no kernel for head_dim 4")

    monkeypatch.setattr(na_mod, "_resolve_backend", lambda *args: "natten")
    monkeypatch.setattr(na_mod, "_natten", broken_natten)
    monkeypatch.setattr(na_mod, "_natten_failures", set())
    q, k, v = _qkv((1, 2, 8, 8, 4), dtype=torch.float32)
    with pytest.warns(UserWarning, match="natten failed"):
        out = neighborhood_attention_2d(q, k, v, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # second call: remembered, no new warning
        out2 = neighborhood_attention_2d(q, k, v, 3)
    ref = na_mod._pure(q, k, v, 3, 1, None, 0.5, 0.0)
    assert (out - ref).abs().max() < 1e-5 and torch.equal(out, out2)
    with pytest.raises(NotImplementedError):  # an explicit request is not silently replaced
        neighborhood_attention_2d(q, k, v, 3, backend="natten")


@pytest.mark.skipif(not na_mod._flex_available(), reason="torch has no flex_attention")
def test_flex_refuses_cpu_training_with_clear_error():
    q = torch.randn(1, 2, 8, 8, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match="no backward pass on CPU"):
        neighborhood_attention_2d(q, q, q, 3, backend="flex")


# --------------------------------------------------------------------------------------------------
# flex (eager on CPU, forward only) and natten against pure
# --------------------------------------------------------------------------------------------------
@pytest.mark.skipif(not na_mod._flex_available(), reason="torch has no flex_attention")
@pytest.mark.parametrize(
    ("H", "W", "ks", "dil", "with_rpb"), [(9, 12, 5, 1, True), (13, 11, 3, 2, True), (7, 7, 7, 1, False)]
)
def test_flex_eager_matches_pure_fp32(H, W, ks, dil, with_rpb):
    q, k, v = _qkv((2, 2, H, W, 16), dtype=torch.float32)
    rpb = 0.5 * torch.randn(2, 2 * ks - 1, 2 * ks - 1) if with_rpb else None
    with torch.no_grad():
        out = neighborhood_attention_2d(q, k, v, ks, dil, rpb, backend="flex")
        ref = neighborhood_attention_2d(q, k, v, ks, dil, rpb, backend="pure")
    assert (out - ref).abs().max() < 1e-5


def _natten_version() -> tuple[int, ...]:
    natten = pytest.importorskip("natten")
    return na_mod._parse_version(natten.__version__)


@pytest.mark.parametrize(("H", "W", "ks", "dil"), [(9, 12, 5, 1), (13, 11, 3, 2), (8, 8, 7, 1), (14, 16, 3, 4)])
def test_natten_forward_matches_pure(H, W, ks, dil):
    version = _natten_version()
    from natten.functional import na2d

    q, k, v = _qkv((2, 2, H, W, 16), dtype=torch.float32)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if version >= (0, 20):  # heads-last layout, no relative position bias
            out = na2d(*(t.permute(0, 2, 3, 1, 4) for t in (q, k, v)), kernel_size=ks, dilation=dil)
            out = out.permute(0, 3, 1, 2, 4)
        else:
            out = neighborhood_attention_2d(q, k, v, ks, dil, backend="natten")
        ref = neighborhood_attention_2d(q, k, v, ks, dil, backend="pure")
        via_backend = neighborhood_attention_2d(q, k, v, ks, dil, backend="natten")
    assert (out - ref).abs().max() < 1e-5
    assert (via_backend - ref).abs().max() < 1e-5


def test_natten_cpu_training_error():
    version = _natten_version()
    if version < (0, 20) or na_mod._get_natten().has_cuda:
        pytest.skip("this natten can train on CPU")
    q = torch.randn(1, 2, 8, 8, 16, requires_grad=True)
    with pytest.raises(RuntimeError, match="forward-only"):
        neighborhood_attention_2d(q, q, q, 3, backend="natten")


def test_natten_backend_rpb_support_matches_version():
    version = _natten_version()
    q = torch.randn(1, 2, 8, 8, 16)
    rpb = torch.zeros(2, 5, 5)
    if version >= (0, 20):
        with pytest.raises(ValueError, match="no relative position bias"):
            neighborhood_attention_2d(q, q, q, 3, rpb=rpb, backend="natten")
    else:
        out = neighborhood_attention_2d(q, q, q, 3, rpb=rpb + 0.3, backend="natten")
        ref = neighborhood_attention_2d(q, q, q, 3, rpb=rpb + 0.3, backend="pure")
        assert (out - ref).abs().max() < 1e-5


# --------------------------------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------------------------------
@pytest.mark.export
@pytest.mark.parametrize(
    ("ks", "example", "dynamic", "checks"),
    [
        (3, (1, 8, 8), False, [(1, 8, 8)]),
        # one graph with symbolic batch/H/W covers small (padded) and large maps
        (7, (2, 5, 6), True, [(1, 4, 4), (3, 12, 10), (1, 1, 2)]),
    ],
    ids=["static-8x8-k3", "dynamic-k7"],
)
def test_onnx_and_openvino_export(tmp_path, ks, example, dynamic, checks):
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    module = NeighborhoodAttention2D(32, 4, ks).eval()
    path = tmp_path / "na.onnx"
    dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim("height"), 2: torch.export.Dim("width")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (torch.randn(*example, 32),),
            str(path),
            dynamo=True,
            opset_version=18,
            input_names=["x"],
            dynamic_shapes=({**dims},) if dynamic else None,
        )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    pytest.importorskip("openvino")
    from anomalib_recon.deploy import compile_openvino

    compiled = compile_openvino(path)  # fp32: CPUs with AVX-512 BF16 would otherwise run it in bf16
    for shape in checks:
        x = torch.randn(*shape, 32)
        with torch.no_grad():
            expected = module(x).numpy()
        got = session.run(None, {"x": x.numpy()})[0]
        assert got.shape == expected.shape
        assert abs(got - expected).max() < 1e-5, shape
        got_ov = compiled(x.numpy())[compiled.output(0)]
        assert abs(got_ov - expected).max() < 1e-5, shape


# --------------------------------------------------------------------------------------------------
# GPU
# --------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_backends_match_pure(dtype):
    """Compiled flex (and natten when installed) against pure in fp32 on the same values, fwd and bwd."""
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    gen = torch.Generator(device="cuda").manual_seed(0)
    base = [torch.randn(2, 4, 20, 17, 16, device="cuda", generator=gen).to(dtype) for _ in range(3)]
    rpb32 = 0.3 * torch.randn(4, 13, 13, device="cuda", generator=gen)

    def run(backend, inputs_dtype, with_rpb):
        q, k, v = (t.detach().clone().to(inputs_dtype).requires_grad_() for t in base)
        rpb = rpb32.clone().requires_grad_() if with_rpb else None
        out = neighborhood_attention_2d(q, k, v, 7, 2, rpb, backend=backend, scale=0.3)
        leaves = [q, k, v] + ([rpb] if with_rpb else [])
        return out.float(), [g.float() for g in torch.autograd.grad(out.float().square().sum(), leaves)]

    names = ["flex"] + (["natten"] if "natten" in available_backends() else [])
    for name in names:
        with_rpb = name == "flex" or na_mod._get_natten().supports_rpb
        ref, g_ref = run("pure", torch.float32, with_rpb)
        out, grads = run(name, dtype, with_rpb)
        assert (out - ref).abs().max() < tol * max(1.0, ref.abs().max().item()), name
        for g, gr in zip(grads, g_ref, strict=True):
            assert (g - gr).abs().max() < tol * max(1.0, gr.abs().max().item()), name
    module = NeighborhoodAttention2D(64, 4, 7).cuda()  # 4x4 map: padded to 7x7 inside
    x = torch.randn(2, 4, 4, 64, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        out_auto = module(x)
        module.backend = "pure"
        out_pure = module(x)
    assert (out_auto.float() - out_pure.float()).abs().max() < tol * max(1.0, out_pure.abs().max().item())


def test_auto_form_on_large_maps_equals_gather_form(monkeypatch):
    """Above the dense limit the eager default is the blocked form; it must equal the export (gather) form."""
    q, k, v = _qkv((2, 2, 20, 17, 4))
    rpb = torch.randn(2, 13, 13, dtype=torch.float64)
    seen = []
    original = na_mod._pure_blocked
    monkeypatch.setattr(na_mod, "_pure_blocked", lambda *a: seen.append(a[-1]) or original(*a))
    auto = na_mod._pure(q, k, v, 7, 1, rpb, 0.5, 0.0)
    gather = na_mod._pure(q, k, v, 7, 1, rpb, 0.5, 0.0, form="gather")
    assert seen == [8]  # blocked, with the 7x7 tile choice
    assert (auto - gather).abs().max() < 1e-12
    with pytest.raises(ValueError, match="form must be"):
        na_mod._pure(q, k, v, 7, 1, rpb, 0.5, 0.0, form="sparse")


@pytest.mark.parametrize("size", [12, 20])  # dense form / blocked form
def test_training_after_an_inference_mode_forward(size):
    """Index tensors cached under inference_mode (Lightning's validation) must not leak into a later backward."""
    na_mod._reset_caches()
    layer = NeighborhoodAttention2D(8, 2, 7, backend="pure")
    x = torch.rand(1, size, size, 8)  # channels-last
    with torch.inference_mode():
        expected = layer(x)
    out = layer(x.clone().requires_grad_(True))
    out.sum().backward()
    assert torch.allclose(out.detach(), expected, atol=1e-6)
    assert layer.qkv.weight.grad is not None and layer.qkv.weight.grad.abs().sum() > 0
