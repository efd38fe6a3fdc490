"""The FP8 attention recipe (FlashAttention-3, Transformer Engine): its declaration and a
PyTorch emulation of it, the built-in reference kernel of ``attnprec audit --dtype e4m3``.

The recipe (docs/fp8.md): q, k, v are quantized to e4m3 (or e5m2) with float32 scale
factors, one per tensor or one per block of rows of each head (the kernel holds
``round(x / s)`` and the descales ``s``); the logits are the dot products of the codes,
accumulated in float32 and multiplied by ``scale * s_q * s_k``; the softmax runs in
float32; the probabilities (at most 1) are multiplied by a constant ``c`` and cast to the
FP8 format; the product ``P8 V8`` is accumulated in float32, multiplied by the value
descales (per block of keys) and divided by ``c`` and by the row sum (of the float32
probabilities); the output is stored in bfloat16.
"""

from __future__ import annotations

from typing import Any

import torch

from attnprec._validate import (
    broadcast_shapes,
    check_finite,
    check_masks,
    check_qkv,
    resolve_scale,
)
from attnprec.analysis.bounds.rounding import _elementary
from attnprec.analysis.precision import (
    Format,
    Precision,
    fp8_weights_scale,
    quantize,
    round_to,
)

__all__ = ["FP8_FORMATS", "fp8_precision", "fp8_softmax_attention", "check_fp8_format"]

#: The FP8 formats of the recipe.
FP8_FORMATS: tuple[str, ...] = ("e4m3", "e5m2")


def check_fp8_format(fmt: Any) -> Format:
    """The FP8 :class:`~attnprec.analysis.precision.Format` named by ``fmt``.

    Parameters
    ----------
    fmt : str, Format or torch.dtype
        A format-like naming e4m3 or e5m2.

    Returns
    -------
    Format
        The format (a validator: it computes no numbers).

    Raises
    ------
    ValueError, TypeError
        If ``fmt`` is not e4m3 or e5m2 (naming ``fmt``).
    """
    f = Format.of(fmt)
    if f.name not in FP8_FORMATS:
        raise ValueError(f"fmt: expected one of {FP8_FORMATS}, got {f.name!r}")
    return f


def fp8_precision(
    fmt: Any = "e4m3",
    scaling: str | int = "tensor",
    *,
    weights_scale: float | None = None,
    output: Any = "bf16",
    compute: Any = "fp32",
    accumulate: Any = "fp32",
    block: int | None = None,
    elementary: Any = "default",
) -> Precision:
    """The declaration of the FP8 recipe: storage ``fmt`` with ``scaling``, float32 compute
    and accumulation, the weights cast to ``fmt`` after multiplying by ``weights_scale``
    (default :func:`~attnprec.analysis.precision.fp8_weights_scale`: 256 for e4m3, 32768
    for e5m2), the output stored to ``output``.

    Parameters
    ----------
    fmt : str, Format or torch.dtype, optional
        The FP8 storage format, e4m3 (default) or e5m2.
    scaling : "tensor" or int, optional
        One scale per tensor (default), or one per block of that many rows.
    weights_scale : float, optional
        Factor on the weights before their cast to ``fmt``.
    output : format-like, optional
        Format of the output store (default bf16).
    compute, accumulate : format-like, optional
        Formats of elementwise operations and of sums (default fp32).
    block : int, optional
        Keys per block of the schedule (None: any schedule).
    elementary : Elementary or str, optional
        The exp/log/division accuracy model (default ``"default"``).

    Returns
    -------
    Precision
        Every bound under it holds for every schedule it allows (``block`` None: any). A
        constructor: it computes no numbers.

    Raises
    ------
    ValueError, TypeError
        An unknown or non-FP8 ``fmt``, a bad ``scaling``, ``weights_scale`` or
        ``elementary`` (each named).
    """
    f = check_fp8_format(fmt)
    c = fp8_weights_scale(f) if weights_scale is None else weights_scale
    el = _elementary(elementary)
    return Precision(
        f, compute, accumulate, block=block, elementary=el, scaling=scaling, weights=f,
        weights_scale=c, output=output,
    )  # fmt: skip


def fp8_softmax_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    window: int | None = None,
    key_mask: torch.Tensor | None = None,
    fmt: Any = "e4m3",
    scaling: str | int = "tensor",
    weights_scale: float | None = None,
    output: Any = "bf16",
) -> torch.Tensor:
    """Softmax attention by the FP8 recipe (module docstring), emulated exactly on the CPU.

    Parameters
    ----------
    q, k, v : torch.Tensor
        ``[..., n_q, d_k]``, ``[..., n_k, d_k]``, ``[..., n_k, d_v]``: the inputs in high
        precision (finite), quantized here with :func:`~attnprec.analysis.precision.quantize`.
    causal, scale, window, key_mask
        As :func:`attnprec.attention.softmax_attention`.
    fmt : {"e4m3", "e5m2"}
        The FP8 format of q, k, v and of the cast weights.
    scaling : "tensor" or int
        Scale factors per tensor, or per block of this many rows (tokens) of each head.
    weights_scale : float, optional
        The constant the weights are multiplied by before their cast (default the largest
        power of two within the format's max).
    output : format-like or None
        The output's format (default bf16); None: ``fmt``, as in :func:`fp8_precision`.

    Returns
    -------
    torch.Tensor
        ``[..., n_q, d_v]`` in the output format's dtype.

    Notes
    -----
    Error: within ``attention_error_bound("softmax", q, k, v, fp8_precision(fmt, scaling,
    weights_scale=..., output=..., block=ONE_PASS))`` of the exact softmax attention of the
    inputs as given (quantization included): one pass, each row shifted by its largest
    visible logit (the default ``block=None`` also covers one shift by the whole
    sequence's maximum, future keys included, under which causal rows' cast weights may
    vanish: unbounded, a review); tested on every input family, both formats and both scale
    kinds (docs/fp8.md has the measured figures).

    Raises
    ------
    ValueError, TypeError
        Bad shapes or non-finite inputs, an unknown format, a bad ``scaling`` or
        ``weights_scale`` (each naming the argument).
    """
    prec = fp8_precision(fmt, scaling, weights_scale=weights_scale, output=output)
    f = prec.storage
    n_q, n_k, d_k, _ = check_qkv(q, k, v, causal)
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_finite(name, x)
    batch = broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    sc = torch.tensor(resolve_scale(scale, d_k), dtype=torch.float32)
    (qc, sq), (kc, sk), (vc, sv) = (quantize(x, f, scaling) for x in (q, k, v))
    f32 = torch.float32
    qc, kc, vc = qc.to(f32), kc.to(f32), vc.to(f32)  # FP8 codes: exact in float32
    sq, sk, sv = sq.to(f32), sk.to(f32), sv.to(f32)  # float32 scales (exact)
    # logits: codes' dot products in float32, times the descale (scale s_q) s_k in float32
    descale = (sq * sc) * sk.transpose(-1, -2)
    x = (qc @ kc.transpose(-1, -2)) * descale
    visible = torch.ones(x.shape[-2:], dtype=torch.bool)
    if causal:
        visible = torch.tril(visible)
    if window is not None or key_mask is not None:
        check_masks(causal, window, key_mask, batch, n_q, n_k)
        if window is not None:
            i = torch.arange(n_q)
            visible = visible & (i.unsqueeze(-1) - torch.arange(n_k) < window)
        if key_mask is not None:
            visible = visible & key_mask.cpu().unsqueeze(-2)
    x = x.masked_fill(~visible, float("-inf"))
    m = x.amax(-1, keepdim=True)
    p = torch.exp(x - m)
    row_sum = p.sum(-1, keepdim=True)
    c = torch.tensor(prec.weights_scale, dtype=f32)
    p8 = round_to(p * c, f).to(f32)  # the weights cast to FP8 (codes)
    if scaling == "tensor":
        o = (p8 @ vc) * sv
    else:  # per block of keys: descale each block's partial sum, then add them
        o = torch.zeros(*p8.shape[:-1], vc.shape[-1], dtype=f32)
        blk = int(scaling)
        for s0 in range(0, n_k, blk):
            sl = slice(s0, s0 + blk)
            o = o + (p8[..., sl] @ vc[..., sl, :]) * sv[..., s0 : s0 + 1, :]
    o = (o / c) / row_sum
    return o.to(prec.output_format.torch_dtype or f32)
