"""2-D neighborhood attention (NA) with NATTEN 0.14/0.15 semantics and three interchangeable backends.

Neighborhood attention (Hassani et al., "Neighborhood Attention Transformer", CVPR 2023) lets every query
attend to exactly ``k x k`` keys around it. Near the borders the window is shifted inward (its start is
clamped) instead of being zero-padded, so every query always sees ``k**2`` real keys. With dilation ``d``
the map is split into ``d x d`` interleaved sub-grids and the clamped window lives inside the query's
sub-grid. A learnable relative-position bias ``rpb[heads, 2k-1, 2k-1]`` is added to the logits at index
``key - query + k - 1`` per axis (in sub-grid units).

Backends (all compute the same function):

* ``"natten"``: the ``natten`` package (optional, never imported on the CPU path of ``"auto"``).
  natten >= 0.20 has no relative-position bias, so it is used for ``rpb=None`` only; natten < 0.20 is used
  through its unfused ``na2d_qk``/``na2d_av`` ops, which take the bias.
* ``"flex"``: ``torch.nn.attention.flex_attention`` with the neighborhood as a block mask and the bias as
  a ``score_mod``; compiled (``torch.compile``, cached) on CUDA, eager elsewhere. PyTorch's flex has no
  CPU backward, so on CPU it is forward-only.
* ``"pure"``: exact pure PyTorch (index gathers of the ``k x k`` neighbors, or a masked dense product for
  small maps). Works everywhere, differentiable, and exportable with ``torch.onnx.export(dynamo=True)``.

``"auto"`` picks natten (fused natten on a CUDA tensor, bias permitting), then flex (CUDA), then pure, and
always pure while ``torch.export``/``torch.onnx``/``torch.jit`` is tracing. A backend can be forced for
everything with :func:`na_backend` (context manager) or the environment variable
``ANOMALIB_RECON_NA_BACKEND``; a forced backend overrides the per-module/per-call choice.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import warnings
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp
from torch import Tensor, nn

from .tracing import is_tracing

__all__ = [
    "NA_BACKEND_ENV_VAR",
    "NABlock",
    "NeighborhoodAttention2D",
    "available_backends",
    "na_backend",
    "neighborhood_attention_2d",
]

NA_BACKEND_ENV_VAR = "ANOMALIB_RECON_NA_BACKEND"
_BACKENDS = ("auto", "natten", "flex", "pure")
# "pure" has three exact forms: a masked dense product (O(N^2) per head) for maps of at most this many tokens,
# a blocked form (query blocks against the key block that holds their windows) for larger eager maps, and an
# index-gather form (O(N k^2 D) memory) for tracing/export, where sizes may be symbolic.
_DENSE_MAX_TOKENS = 256

_forced_backend: ContextVar[str | None] = ContextVar("anomalib_recon_na_backend", default=None)


# --------------------------------------------------------------------------------------------------
# backend selection
# --------------------------------------------------------------------------------------------------
def _check_backend_name(name: object) -> str:
    if not isinstance(name, str) or name not in _BACKENDS:
        msg = f"Unknown neighborhood-attention backend {name!r}; choose one of {list(_BACKENDS)}."
        raise ValueError(msg)
    return name


@contextlib.contextmanager
def na_backend(name: str) -> Iterator[None]:
    """Force one backend for every neighborhood attention call inside the ``with`` block.

    Overrides the module's ``backend`` attribute and the ``backend`` argument, e.g. ``na_backend("pure")``
    around an export. The environment variable ``ANOMALIB_RECON_NA_BACKEND`` does the same process-wide.
    """
    token = _forced_backend.set(_check_backend_name(name))
    try:
        yield
    finally:
        _forced_backend.reset(token)


def _get_forced_backend() -> str | None:
    forced = _forced_backend.get()
    if forced is not None:
        return forced
    env = os.environ.get(NA_BACKEND_ENV_VAR, "").strip()
    if not env:
        return None
    if env not in _BACKENDS:
        msg = f"{NA_BACKEND_ENV_VAR}={env!r} is not a neighborhood-attention backend; use one of {list(_BACKENDS)}."
        raise ValueError(msg)
    return env


def _exporting() -> bool:
    """A graph is captured for export (torch.export / ONNX / TorchScript tracing): only the pure backend's
    branch-free index form works there.

    The shared :func:`~anomalib_recon.components.tracing.is_tracing` is also true under a plain ``torch.compile``,
    which keeps the natten/flex backends (flex is fused by the caller's compile), so compiling alone is not export.
    """
    return is_tracing() and (torch.compiler.is_exporting() or not torch.compiler.is_compiling())


@dataclass(frozen=True)
class _NattenInfo:
    module: Any
    version: tuple[int, ...]
    has_cuda: bool  # compiled CUDA kernels (libnatten) are present
    supports_rpb: bool  # natten < 0.20: unfused QK/AV ops with relative-position bias


_natten_probe: list[_NattenInfo | None] = []  # [] = not probed yet
_natten_failures: set[tuple] = set()  # (head_dim, v_dim, dtype, kernel, dilation) natten refused under "auto"


def _parse_version(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def _natten_has_cuda(natten: Any, version: tuple[int, ...]) -> bool:
    """Whether natten was built with its CUDA library; the check moved between natten versions."""
    if version >= (0, 20):
        for modname, attr in (("natten._environment", "HAS_LIBNATTEN"), ("natten", "HAS_LIBNATTEN")):
            try:
                return bool(getattr(importlib.import_module(modname), attr))
            except (ImportError, AttributeError):
                continue
        return False
    has_cuda = getattr(natten, "has_cuda", None)
    if callable(has_cuda):
        try:
            return bool(has_cuda())
        except Exception:  # a broken natten build must not break the fallbacks
            return False
    # natten 0.14 had no query function; its wheels were built per CUDA version.
    return torch.cuda.is_available()


def _get_natten() -> _NattenInfo | None:
    """Import natten lazily (once) and describe what it can do; None when it is not installed or broken."""
    if _natten_probe:
        return _natten_probe[0]
    info = None
    try:
        natten = importlib.import_module("natten")
        version = _parse_version(str(getattr(natten, "__version__", "0")))
        functional = importlib.import_module("natten.functional")
        supports_rpb = version < (0, 20) and (hasattr(functional, "na2d_qk") or hasattr(functional, "natten2dqkrpb"))
        info = _NattenInfo(natten, version, _natten_has_cuda(natten, version), supports_rpb)
    except Exception:  # any import failure means "natten not usable"
        info = None
    _natten_probe.append(info)
    return info


def _find_flex() -> bool:
    try:
        return importlib.util.find_spec("torch.nn.attention.flex_attention") is not None
    except (ImportError, ValueError):
        return False


_HAS_FLEX = _find_flex()  # found without importing it (importing flex_attention costs ~0.5 s)


def _flex_available() -> bool:
    return _HAS_FLEX


def available_backends() -> list[str]:
    """Backends that can run on this machine, fastest first; ``"pure"`` is always there.

    ``"flex"`` needs ``torch.nn.attention.flex_attention`` (forward-only on CPU); ``"natten"`` needs the
    ``natten`` package (forward-only on CPU for natten >= 0.20 without its CUDA library).
    """
    names = []
    if _get_natten() is not None:
        names.append("natten")
    if _flex_available():
        names.append("flex")
    names.append("pure")
    return names


def _needs_grad(*tensors: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _resolve_backend(
    requested: str, q: Tensor, rpb: Tensor | None, attn_dropout: bool, kv: tuple[Tensor, ...] = ()
) -> str:
    """Turn ``"auto"`` (or a forced name) into the backend that runs this call, checking it can."""
    name = _get_forced_backend() or _check_backend_name(requested)
    if name == "auto":
        if _exporting() or attn_dropout:
            return "pure"
        if q.is_cuda:
            natten = (
                _get_natten() if not torch.compiler.is_compiling() else (_natten_probe[0] if _natten_probe else None)
            )
            if natten is not None and natten.has_cuda and (rpb is None or natten.supports_rpb):
                return "natten"
            if _flex_available():
                return "flex"
        return "pure"
    if name != "pure" and attn_dropout:
        msg = f"Attention dropout is only supported by the 'pure' backend, not {name!r}; set attn_drop=0 or use 'pure'."
        raise ValueError(msg)
    if name == "natten":
        natten = _get_natten()
        if natten is None:
            msg = "Backend 'natten' requested but the natten package is not installed; use 'auto', 'flex' or 'pure'."
            raise RuntimeError(msg)
        if rpb is not None and not natten.supports_rpb:
            msg = (
                f"natten {'.'.join(map(str, natten.version))} has no relative position bias; use backend "
                "'flex' or 'pure', or relative_position_bias=False."
            )
            raise ValueError(msg)
        if natten.version >= (0, 20) and not (natten.has_cuda and q.is_cuda) and _needs_grad(q, rpb, *kv):
            msg = "natten without its CUDA library (or on CPU tensors) is forward-only; use 'pure' for training."
            raise RuntimeError(msg)
    if name == "flex":
        if not _flex_available():
            msg = "Backend 'flex' needs torch.nn.attention.flex_attention (PyTorch >= 2.5); use 'pure'."
            raise RuntimeError(msg)
        if not q.is_cuda and _needs_grad(q, rpb, *kv):
            msg = "PyTorch's flex_attention has no backward pass on CPU; use backend 'pure' for CPU training."
            raise RuntimeError(msg)
    return name


# --------------------------------------------------------------------------------------------------
# neighborhoods (NATTEN semantics)
# --------------------------------------------------------------------------------------------------
def _window_start(index: Tensor, length: Any, kernel_size: int, dilation: int) -> tuple[Tensor, Tensor]:
    """NATTEN window of the queries at ``index`` along one axis: first key position and its bias index.

    Position ``i`` lies in sub-grid ``i % d`` at sub-grid index ``i // d``; the window start is clamped to
    ``[0, n_sub - k]`` where ``n_sub`` is the length of that sub-grid. The bias index of a key is
    ``key_sub - query_sub + k - 1``. Plain integer arithmetic, usable in flex mask/score mods and in export.
    """
    if dilation == 1:
        start = torch.clamp(index - kernel_size // 2, min=0).clamp(max=length - kernel_size)
        return start, start - index + (kernel_size - 1)
    phase = index % dilation
    sub = index // dilation
    sub_len = (length - phase + (dilation - 1)) // dilation
    start = torch.minimum(torch.clamp(sub - kernel_size // 2, min=0), sub_len - kernel_size)
    return phase + dilation * start, start - sub + (kernel_size - 1)


def _axis_neighborhood(length: Any, kernel_size: int, dilation: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Per-axis neighborhoods: key positions ``(length, k)`` and bias indices ``(length, k)``.

    Built from ``arange`` so ``length`` may be symbolic during export.
    """
    start, bias = _window_start(torch.arange(length, device=device), length, kernel_size, dilation)
    offsets = torch.arange(kernel_size, device=device)
    return start[:, None] + dilation * offsets, bias[:, None] + offsets


_neighborhood_cache: dict[tuple, tuple[Tensor, Tensor]] = {}


def _neighborhood_2d(
    height: Any, width: Any, kernel_size: int, dilation: int, device: torch.device
) -> tuple[Tensor, Tensor]:
    """Flat key indices ``(H*W, k*k)`` into the ``H*W`` tokens and flat bias indices into ``(2k-1)**2``."""
    cacheable = not is_tracing() and isinstance(height, int) and isinstance(width, int)
    # Tensors made under inference_mode cannot be saved for backward later: cache them separately.
    key = (height, width, kernel_size, dilation, str(device), torch.is_inference_mode_enabled())
    if cacheable and key in _neighborhood_cache:
        return _neighborhood_cache[key]
    keys_h, bias_h = _axis_neighborhood(height, kernel_size, dilation, device)
    keys_w, bias_w = _axis_neighborhood(width, kernel_size, dilation, device)
    k2 = kernel_size * kernel_size
    keys = (keys_h[:, None, :, None] * width + keys_w[None, :, None, :]).reshape(-1, k2)
    bias = (bias_h[:, None, :, None] * (2 * kernel_size - 1) + bias_w[None, :, None, :]).reshape(-1, k2)
    if cacheable:
        if len(_neighborhood_cache) > 64:
            _neighborhood_cache.clear()
        _neighborhood_cache[key] = (keys, bias)
    return keys, bias


# --------------------------------------------------------------------------------------------------
# backends
# --------------------------------------------------------------------------------------------------
def _softmax(logits: Tensor, out_dtype: torch.dtype) -> Tensor:
    if logits.dtype in (torch.float16, torch.bfloat16):
        return torch.softmax(logits, dim=-1, dtype=torch.float32).to(out_dtype)
    return torch.softmax(logits, dim=-1).to(out_dtype)


def _axis_tiles(length: int, kernel_size: int, dilation: int, tile: int, device: torch.device) -> tuple[Tensor, ...]:
    """Query tiles along one axis and the key span that holds all their windows (blocked form).

    Returns query positions ``(n_tiles, tile)``, key positions ``(n_tiles, span)``, the per-axis bias index of each
    (query, key) pair or ``-1`` where the key is outside the query's window ``(n_tiles, tile, span)``, and for every
    position the flat ``tile_index * tile + offset`` that holds its output (the last tile may overlap its neighbour).
    """
    keys_ax, bias_ax = _axis_neighborhood(length, kernel_size, dilation, device)
    tile = min(tile, length)
    starts = list(range(0, length - tile + 1, tile))
    if starts[-1] + tile < length:
        starts.append(length - tile)
    starts_t = torch.tensor(starts, device=device)
    q_pos = starts_t[:, None] + torch.arange(tile, device=device)
    windows = keys_ax[q_pos]  # (n_tiles, tile, k)
    k_min = windows.amin(dim=(1, 2))
    span = min(length, int((windows.amax(dim=(1, 2)) - k_min).max()) + 1)
    k_pos = k_min.clamp(max=length - span)[:, None] + torch.arange(span, device=device)
    match = windows[..., None] == k_pos[:, None, None, :]  # (n_tiles, tile, k, span)
    bias = torch.where(match.any(2), (bias_ax[q_pos][..., None] * match).sum(2), -1)
    owner = torch.empty(length, dtype=torch.long, device=device)
    for index, start in enumerate(starts):  # later tiles overwrite: each position has exactly one owner
        owner[start : start + tile] = index * tile + torch.arange(tile, device=device)
    return q_pos, k_pos, bias, owner


_tiles_cache: dict[tuple, tuple[Tensor, ...]] = {}


def _tiles_2d(height: int, width: int, kernel_size: int, dilation: int, tile: int, device: torch.device) -> tuple:
    """2-D tiling: per-axis query/key positions and owners, plus the flat bias index ``(tiles, T*T, S*S)``.

    The bias index points into the ``(2k-1)**2`` relative position table; ``(2k-1)**2`` marks keys outside the window.
    """
    key = (height, width, kernel_size, dilation, tile, str(device), torch.is_inference_mode_enabled())
    if key in _tiles_cache:
        return _tiles_cache[key]
    qh, kh, bh, oh = _axis_tiles(height, kernel_size, dilation, tile, device)
    qw, kw, bw, ow = _axis_tiles(width, kernel_size, dilation, tile, device)
    side = 2 * kernel_size - 1
    inside = (bh[:, None, :, None, :, None] >= 0) & (bw[None, :, None, :, None, :] >= 0)
    flat = bh[:, None, :, None, :, None] * side + bw[None, :, None, :, None, :]
    index = torch.where(inside, flat, side * side)  # (th, tw, Th, Tw, Sh, Sw)
    nth, ntw, Th, Tw, Sh, Sw = index.shape
    index = index.reshape(nth * ntw, Th * Tw, Sh * Sw)
    if len(_tiles_cache) > 64:
        _tiles_cache.clear()
    _tiles_cache[key] = out = (qh, kh, oh, qw, kw, ow, index)
    return out


def _tile(x: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """``(B, heads, H, W, D)`` -> ``(B, heads, tiles, rows_per_tile * cols_per_tile, D)``."""
    B, heads, _, _, D = x.shape
    (nth, r), (ntw, c) = rows.shape, cols.shape
    x = x.index_select(2, rows.reshape(-1)).index_select(3, cols.reshape(-1))
    return x.reshape(B, heads, nth, r, ntw, c, D).permute(0, 1, 2, 4, 3, 5, 6).reshape(B, heads, nth * ntw, r * c, D)


def _untile(out: Tensor, qh: Tensor, qw: Tensor, oh: Tensor, ow: Tensor) -> Tensor:
    """Inverse of :func:`_tile` for the query blocks, keeping each position's owning block."""
    B, heads, _, _, D = out.shape
    (nth, r), (ntw, c) = qh.shape, qw.shape
    out = out.reshape(B, heads, nth, ntw, r, c, D).permute(0, 1, 2, 4, 3, 5, 6).reshape(B, heads, nth * r, ntw * c, D)
    return out.index_select(2, oh).index_select(3, ow)


def _pure_blocked(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kernel_size: int,
    dilation: int,
    rpb: Tensor | None,
    scale: float,
    dropout_p: float,
    tile: int,
) -> Tensor:
    """Blocked form: each ``tile x tile`` block of queries attends densely to the small key block holding all
    its windows; keys outside a query's window are masked. Same result as the gather form, far less memory
    traffic on CPU (no per-query copy of the k*k neighbours).
    """
    heads, H, W = q.shape[1:4]
    qh, kh, oh, qw, kw, ow, index = _tiles_2d(H, W, kernel_size, dilation, tile, q.device)
    acc_dtype = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    logits = (_tile(q * scale, qh, qw) @ _tile(k, kh, kw).transpose(-1, -2)).to(acc_dtype)  # (B, h, tiles, TT, SS)
    table = rpb.reshape(heads, -1).to(acc_dtype) if rpb is not None else q.new_zeros((1, 1), dtype=acc_dtype)
    table = table.expand(table.shape[0], (2 * kernel_size - 1) ** 2)
    table = torch.cat([table, table.new_full((table.shape[0], 1), float("-inf"))], dim=1)
    attn = _softmax(logits + table[:, index], v.dtype)
    if dropout_p > 0.0:
        attn = F.dropout(attn, p=dropout_p)
    return _untile(attn @ _tile(v, kh, kw), qh, qw, oh, ow)


def _block_tile(kernel_size: int, dilation: int) -> int:
    """Query block side for the blocked form, chosen by timing sides 4, 8 and 16 on a 2-core CPU: 4 for 3x3
    windows, 8 for 7x7 (the key block is ``tile + dilation * (kernel_size - 1)`` wide)."""
    return 4 if dilation * (kernel_size - 1) <= 3 else 8


def _pure(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kernel_size: int,
    dilation: int,
    rpb: Tensor | None,
    scale: float,
    dropout_p: float,
    form: str | None = None,
    tile: int | None = None,
) -> Tensor:
    """Exact pure-PyTorch NA in one of three forms with identical results.

    ``form=None`` picks: masked ``"dense"`` for small maps, ``"blocked"`` for larger ones (eager), and the
    index ``"gather"`` form when tracing for export (symbolic sizes; its graph exports cleanly).
    """
    B, heads, H, W, D = q.shape
    n = H * W
    if form is None and (_exporting() or not isinstance(n, int)):
        form = "gather"
    elif form is None:
        form = "dense" if n <= _DENSE_MAX_TOKENS else "blocked"
    if form == "blocked":
        tile = tile or _block_tile(kernel_size, dilation)
        return _pure_blocked(q, k, v, kernel_size, dilation, rpb, scale, dropout_p, tile)
    acc_dtype = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    keys, bias_idx = _neighborhood_2d(H, W, kernel_size, dilation, q.device)
    qf = (q * scale).reshape(B, heads, n, D)
    kf = k.reshape(B, heads, n, D)
    vf = v.reshape(B, heads, n, v.shape[-1])
    rpb_g = None if rpb is None else rpb.reshape(heads, -1)[:, bias_idx].to(acc_dtype)  # (heads, n, k*k)
    if form == "dense":
        logits = (qf @ kf.transpose(-1, -2)).to(acc_dtype)  # (B, heads, n, n)
        src = rpb_g if rpb_g is not None else torch.zeros((), dtype=acc_dtype, device=q.device).expand(1, *keys.shape)
        index = keys.expand(src.shape[0], *keys.shape)
        mask = torch.full((src.shape[0], n, n), float("-inf"), dtype=acc_dtype, device=q.device)
        logits = logits + mask.scatter(2, index, src)
        attn = _softmax(logits, v.dtype)
        if dropout_p > 0.0:
            attn = F.dropout(attn, p=dropout_p)
        out = attn @ vf
    elif form == "gather":
        k2 = keys.shape[-1]
        flat = keys.reshape(-1)
        k_nb = torch.index_select(kf, 2, flat).reshape(B, heads, n, k2, D)
        v_nb = torch.index_select(vf, 2, flat).reshape(B, heads, n, k2, vf.shape[-1])
        logits = (qf.unsqueeze(-2) @ k_nb.transpose(-1, -2)).squeeze(-2).to(acc_dtype)  # (B, heads, n, k*k)
        if rpb_g is not None:
            logits = logits + rpb_g
        attn = _softmax(logits, v.dtype)
        if dropout_p > 0.0:
            attn = F.dropout(attn, p=dropout_p)
        out = (attn.unsqueeze(-2) @ v_nb).squeeze(-2)
    else:
        msg = f"form must be 'dense', 'gather', 'blocked' or None, got {form!r}"
        raise ValueError(msg)
    return out.reshape(B, heads, H, W, v.shape[-1])


_block_mask_cache: dict[tuple, Any] = {}
_compiled_flex: list[Any] = []


def _flex_na(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    rpb: Tensor | None,
    block_mask: Any,
    height: int,
    width: int,
    kernel_size: int,
    dilation: int,
    scale: float,
) -> Tensor:
    """flex_attention over flattened tokens; score_mod adds the bias at the key's offset in the window."""
    from torch.nn.attention.flex_attention import flex_attention

    score_mod = None
    if rpb is not None:
        last = 2 * kernel_size - 2

        def score_mod(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            qr, qc = q_idx // width, q_idx % width
            start_r, bias_r = _window_start(qr, height, kernel_size, dilation)
            start_c, bias_c = _window_start(qc, width, kernel_size, dilation)
            row = ((kv_idx // width - start_r) // dilation + bias_r).clamp(0, last)  # clamp: masked-out keys
            col = ((kv_idx % width - start_c) // dilation + bias_c).clamp(0, last)
            return score + rpb[h, row, col]

    return flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale)


def _flex_block_mask(height: int, width: int, kernel_size: int, dilation: int, device: torch.device) -> Any:
    """BlockMask of the neighborhoods (cached per map size), from arithmetic on the token indices."""
    from torch.nn.attention.flex_attention import create_block_mask

    key = (height, width, kernel_size, dilation, str(device), torch.is_inference_mode_enabled())
    cached = _block_mask_cache.get(key)
    if cached is not None:
        return cached
    span = kernel_size * dilation

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        start_r, _ = _window_start(q_idx // width, height, kernel_size, dilation)
        start_c, _ = _window_start(q_idx % width, width, kernel_size, dilation)
        off_r = kv_idx // width - start_r
        off_c = kv_idx % width - start_c
        inside = (off_r >= 0) & (off_r < span) & (off_c >= 0) & (off_c < span)
        if dilation > 1:
            inside = inside & (off_r % dilation == 0) & (off_c % dilation == 0)
        return inside

    n = height * width
    block_mask = create_block_mask(mask_mod, B=None, H=None, Q_LEN=n, KV_LEN=n, device=device)
    if not torch.compiler.is_compiling():
        if len(_block_mask_cache) > 64:
            _block_mask_cache.clear()
        _block_mask_cache[key] = block_mask
    return block_mask


def _flex(q: Tensor, k: Tensor, v: Tensor, kernel_size: int, dilation: int, rpb: Tensor | None, scale: float) -> Tensor:
    B, heads, H, W, D = q.shape
    n = H * W
    block_mask = _flex_block_mask(H, W, kernel_size, dilation, q.device)
    args = (
        q.reshape(B, heads, n, D),
        k.reshape(B, heads, n, D),
        v.reshape(B, heads, n, v.shape[-1]),
        rpb,
        block_mask,
        H,
        W,
        kernel_size,
        dilation,
        scale,
    )
    if torch.compiler.is_compiling():  # already inside the caller's torch.compile: flex is fused there
        out = _flex_na(*args)
    elif q.is_cuda:
        if not _compiled_flex:
            _compiled_flex.append(torch.compile(_flex_na, dynamic=False))
        # Every map size/dtype/batch is one specialisation; allow more than dynamo's default 8 of them.
        limit_name = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
        with torch._dynamo.config.patch(**{limit_name: 64}):
            out = _compiled_flex[0](*args)
    else:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
            out = _flex_na(*args)
    return out.reshape(B, heads, H, W, v.shape[-1])


def _natten(
    q: Tensor, k: Tensor, v: Tensor, kernel_size: int, dilation: int, rpb: Tensor | None, scale: float
) -> Tensor:
    info = _get_natten()
    if info is None:  # pragma: no cover - guarded by _resolve_backend
        msg = "natten is not installed."
        raise RuntimeError(msg)
    functional = importlib.import_module("natten.functional")
    if info.version >= (0, 20):
        # natten >= 0.20: fused op, heads-last layout (B, H, W, heads, D), no relative position bias.
        out = functional.na2d(
            q.permute(0, 2, 3, 1, 4),
            k.permute(0, 2, 3, 1, 4),
            v.permute(0, 2, 3, 1, 4),
            kernel_size=kernel_size,
            dilation=dilation,
            scale=scale,
        )
        return out.permute(0, 3, 1, 2, 4)
    # natten < 0.20: unfused QK(+rpb) -> softmax -> AV, heads-first layout (as NATTEN 0.14's module).
    q = q * scale
    if hasattr(functional, "na2d_qk"):
        attn = functional.na2d_qk(q, k, kernel_size=kernel_size, dilation=dilation, rpb=rpb)
        attn = attn.softmax(dim=-1)
        return functional.na2d_av(attn, v, kernel_size=kernel_size, dilation=dilation)
    attn = functional.natten2dqkrpb(q, k, rpb, kernel_size, dilation)
    attn = attn.softmax(dim=-1)
    return functional.natten2dav(attn, v, kernel_size, dilation)


# --------------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------------
def _check_kernel_dilation(kernel_size: object, dilation: object) -> None:
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 3 or kernel_size % 2 == 0:
        msg = f"kernel_size must be an odd integer >= 3 (as in NATTEN), got {kernel_size!r}."
        raise ValueError(msg)
    if isinstance(dilation, bool) or not isinstance(dilation, int) or dilation < 1:
        msg = f"dilation must be an integer >= 1, got {dilation!r}."
        raise ValueError(msg)


def _attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kernel_size: int,
    dilation: int,
    rpb: Tensor | None,
    backend: str,
    scale: float,
    dropout_p: float = 0.0,
) -> Tensor:
    name = _resolve_backend(backend, q, rpb, dropout_p > 0.0, (k, v))
    if name == "natten":
        if _get_forced_backend() is not None or backend == "natten":
            return _natten(q, k, v, kernel_size, dilation, rpb, scale)
        config = (q.shape[-1], v.shape[-1], q.dtype, kernel_size, dilation)
        if config not in _natten_failures:
            try:
                return _natten(q, k, v, kernel_size, dilation, rpb, scale)
            except (RuntimeError, ValueError, NotImplementedError, TypeError) as error:
                # "auto" must not fail because natten lacks a kernel for this head_dim/dtype: use flex.
                _natten_failures.add(config)
                warnings.warn(f"natten failed ({error}); falling back to flex/pure for {config}.", stacklevel=2)
        name = "flex" if _flex_available() else "pure"
    if name == "flex":
        return _flex(q, k, v, kernel_size, dilation, rpb, scale)
    return _pure(q, k, v, kernel_size, dilation, rpb, scale, dropout_p)


def neighborhood_attention_2d(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kernel_size: int,
    dilation: int = 1,
    rpb: Tensor | None = None,
    backend: str = "auto",
    scale: float | None = None,
) -> Tensor:
    """2-D neighborhood attention on ``(B, heads, H, W, head_dim)`` tensors; returns the same layout.

    Each query attends to the ``kernel_size x kernel_size`` keys of its (border-clamped, optionally dilated)
    neighborhood. ``rpb`` is the ``(heads, 2k-1, 2k-1)`` relative-position bias, ``scale`` defaults to
    ``head_dim ** -0.5``. The map must be at least ``kernel_size * dilation`` along both axes (the module
    :class:`NeighborhoodAttention2D` pads smaller maps).
    """
    _check_kernel_dilation(kernel_size, dilation)
    _check_backend_name(backend)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.ndim != 5:
            msg = f"{name} must be a 5-D tensor (B, heads, H, W, head_dim), got {getattr(t, 'shape', type(t))}."
            raise ValueError(msg)
    if k.shape != q.shape or v.shape[:-1] != q.shape[:-1]:
        msg = f"q, k, v shapes do not match: {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}."
        raise ValueError(msg)
    _, heads, height, width, head_dim = q.shape
    window = kernel_size * dilation
    if not _exporting() and (height < window or width < window):
        msg = (
            f"Map {height}x{width} is smaller than kernel_size*dilation={window}; pad it (NeighborhoodAttention2D "
            "zero-pads small maps before the qkv projection)."
        )
        raise ValueError(msg)
    if rpb is not None and tuple(rpb.shape) != (heads, 2 * kernel_size - 1, 2 * kernel_size - 1):
        msg = f"rpb must have shape {(heads, 2 * kernel_size - 1, 2 * kernel_size - 1)}, got {tuple(rpb.shape)}."
        raise ValueError(msg)
    return _attend(q, k, v, kernel_size, dilation, rpb, backend, head_dim**-0.5 if scale is None else scale)


class NeighborhoodAttention2D(nn.Module):
    """NATTEN-0.14-compatible 2-D neighborhood attention layer on channels-last ``(B, H, W, C)`` maps.

    ``qkv`` (Linear ``dim -> 3*dim``), ``rpb`` and ``proj`` have NATTEN's names and layouts, so NATTEN
    state dicts load as they are. Maps smaller than ``kernel_size * dilation`` are zero-padded bottom/right
    before the qkv projection (the padded tokens are real keys carrying the qkv bias) and the output is
    cropped, as NATTEN does. ``backend`` (``"auto" | "natten" | "flex" | "pure"``) may be changed at any time.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        kernel_size: int,
        dilation: int = 1,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        relative_position_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if not isinstance(dim, int) or not isinstance(num_heads, int) or dim < 1 or num_heads < 1:
            msg = f"dim and num_heads must be positive integers, got dim={dim!r}, num_heads={num_heads!r}."
            raise ValueError(msg)
        if dim % num_heads:
            msg = f"dim ({dim}) must be divisible by num_heads ({num_heads})."
            raise ValueError(msg)
        _check_kernel_dilation(kernel_size, dilation)
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5 if qk_scale is None else qk_scale
        self.kernel_size = kernel_size
        self.dilation = dilation
        self.window_size = kernel_size * dilation
        self.backend = backend
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        if relative_position_bias:
            self.rpb = nn.Parameter(torch.zeros(num_heads, 2 * kernel_size - 1, 2 * kernel_size - 1))
            nn.init.trunc_normal_(self.rpb, std=0.02, a=-2.0, b=2.0)
        else:
            self.register_parameter("rpb", None)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    @property
    def backend(self) -> str:
        """Backend name used by :meth:`forward` (a forced backend, see :func:`na_backend`, wins)."""
        return self._backend

    @backend.setter
    def backend(self, name: str) -> None:
        self._backend = _check_backend_name(name)

    def extra_repr(self) -> str:
        """Layer hyper-parameters for ``print(module)``."""
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, head_dim={self.head_dim}, kernel_size={self.kernel_size}, "
            f"dilation={self.dilation}, rel_pos_bias={self.rpb is not None}, backend={self.backend!r}"
        )

    def forward(self, x: Tensor) -> Tensor:
        """Attend within neighborhoods of a ``(B, H, W, C)`` map and return a map of the same shape."""
        if not isinstance(x, Tensor) or x.ndim != 4 or x.shape[-1] != self.dim:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x)
            msg = f"Expected a channels-last (B, H, W, {self.dim}) tensor, got {shape}; permute NCHW maps first."
            raise ValueError(msg)
        B, H, W, C = x.shape
        if _exporting():
            # branch-free so H and W may stay symbolic during export
            pad_b = torch.sym_max(0, self.window_size - H)
            pad_r = torch.sym_max(0, self.window_size - W)
            x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        elif min(H, W) < self.window_size:
            x = F.pad(x, (0, 0, 0, max(0, self.window_size - W), 0, max(0, self.window_size - H)))
        Hp, Wp = x.shape[1], x.shape[2]
        qkv = self.qkv(x).reshape(B, Hp, Wp, 3, self.num_heads, self.head_dim).permute(3, 0, 4, 1, 2, 5)
        q, k, v = qkv[0], qkv[1], qkv[2]
        dropout_p = self.attn_drop.p if self.training else 0.0
        out = _attend(q, k, v, self.kernel_size, self.dilation, self.rpb, self.backend, self.scale, dropout_p)
        out = out.permute(0, 2, 3, 1, 4).reshape(B, Hp, Wp, C)[:, :H, :W, :]
        return self.proj_drop(self.proj(out))


def _reset_caches() -> None:
    """Forget cached neighborhoods, block masks and the natten probe (tests, device changes)."""
    _neighborhood_cache.clear()
    _tiles_cache.clear()
    _block_mask_cache.clear()
    _natten_probe.clear()
    _natten_failures.clear()


class NABlock(nn.Module):
    """Pre-norm neighbourhood self-attention block on channels-last maps ``(B, H, W, D)`` (NAFRAD's NSA block, the
    blocks of LGFDR's local tower).

    ``x = x + DropPath(NA(LN(x)))``; ``x = x + DropPath(MLP(LN(x)))``, the MLP of width ``mlp_ratio · D`` with GELU;
    attention by :class:`NeighborhoodAttention2D` (any backend, the pure path exports).

    Args:
        dim: Channels ``D``.
        num_heads: Attention heads.
        kernel_size: Neighbourhood side (odd).
        mlp_ratio: MLP expansion (NAFRAD 2, LGFDR 4).
        drop_path: Stochastic-depth rate of both residual branches (0: none).
        relative_position_bias: Learned bias per head and relative offset.
        na_backend: ``"auto"``, ``"natten"``, ``"flex"`` or ``"pure"`` (see :class:`NeighborhoodAttention2D`).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        kernel_size: int = 7,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        relative_position_bias: bool = True,
        na_backend: str = "auto",
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = NeighborhoodAttention2D(
            dim,
            num_heads,
            kernel_size,
            qkv_bias=True,
            relative_position_bias=relative_position_bias,
            backend=na_backend,
        )
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=nn.GELU)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, H, W, D) -> (B, H, W, D)``."""
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))
