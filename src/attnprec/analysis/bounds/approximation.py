"""A-posteriori approximation bounds: ``|y_method - y_target|`` on the inputs as stored.

Both outputs are evaluated in float64 with certified radii, row block by row block
(:mod:`._rows`), and the bound is their difference plus both radii:

    |y_method - y_target| <= |ŷ_method - ŷ_target| + eps_method + eps_target.

It is therefore the true approximation error up to the float64 evaluation errors: a
relative O(n u64) of the outputs while the logits' own float64 errors (``u64 |s|``) are
small, larger where they are not (fp32 logits near 1e16: bounds of 3.5-7.8 against errors
of 0.01-5.6, still sound), plus the smallest normal number for products below the normal
range. The weights of each method are normalized by its own normalizer, so a key whose
softmax weight underflows in float64 but whose polynomial or random-feature weight does
not is never dropped.

Methods and targets:

- taylor / polynomial / Taylor-linearized semirings: weights ``sum_p c_p s^p`` (Horner,
  elementwise radius), against softmax or the exact semiring ``sum_r c_r e^{lam_r s}``;
- FAVOR+ with a given projection (and FAVOR+-linearized semirings): weights
  ``sum_{r,f} exp(t_q,rf + t_k,rf)`` (log-sum-exp of the feature exponents), against the
  same targets.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from attnprec.analysis._reference_float64 import _polynomial_weights
from attnprec.analysis.bounds._rows import (
    Block,
    Normalized,
    Visible,
    logits64,
    normalize,
    normalize_signed,
    stream,
)
from attnprec.analysis.bounds.quantization import mixture_logw
from attnprec.analysis.bounds.rounding import U64, lse_bound, upper

__all__ = ["approximation_bound", "output_difference", "polynomial_output", "target_output"]


def target_output(
    blk: Block, sc: float, terms: tuple[tuple[float, float], ...] = ((1.0, 1.0),)
) -> Normalized:
    """The exact softmax (or semiring mixture) output of a row block, certified."""
    x, sig, _ = logits64(blk.q, blk.k, sc)
    logw, sigw = mixture_logw(x, sig, terms)
    return normalize(logw, sigw, blk.v, blk)


def polynomial_output(
    blk: Block, sc: float, coeffs: Sequence[float], coeff_rel: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, radius)`` of the polynomial-weight output of a row block; radius ``inf`` where
    the normalizer is not certified away from 0 (either sign)."""
    x, sig, _ = logits64(blk.q, blk.k, sc)
    w, e_w = _polynomial_weights(x.clone(), sig, tuple(coeffs), coeff_rel)
    _, _, nz, pos, _ = normalize_signed(blk, w, e_w, blk.v)
    return nz.y, torch.where(pos.unsqueeze(-1), nz.eps_y, math.inf)


def _favor_output(
    blk: Block, sc: float, W: torch.Tensor, terms: tuple[tuple[float, float], ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, radius)`` of FAVOR+ with projection ``W`` (and semiring ``terms``)."""
    from attnprec.analysis.bounds.favor import favor_exponents
    from attnprec.analysis.precision import Format, Precision

    f64 = Format.of("fp64")
    p64 = Precision(f64, f64, f64)
    X, xe, _ = favor_exponents(blk.q, W, sc, terms, False, p64)
    Y, ye, _ = favor_exponents(blk.k, W, sc, terms, True, p64)
    B, r, C = X.shape
    m = Y.shape[-2]
    logw = torch.empty(B, r, m, dtype=torch.float64)
    sigw = torch.empty_like(logw)
    step = max(1, (1 << 21) // max(B * r * C, 1))  # [B, r, step, C] temporaries
    for s0 in range(0, m, step):
        sl = slice(s0, s0 + step)
        t = X.unsqueeze(-2) + Y[:, sl].unsqueeze(-3)
        logw[..., sl] = torch.logsumexp(t, -1)
        err = (xe.unsqueeze(-2) + ye[:, sl].unsqueeze(-3)).amax(-1)
        sigw[..., sl] = lse_bound(t, U64, min_normal=2.0**-1022) + 2 * U64 * t.abs().amax(-1) + err
    nz = normalize(logw, upper(sigw, 4), blk.v, blk)
    return nz.y, nz.eps_y


def approximation_bound(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sc: float,
    causal: bool | Visible,
    *,
    coeffs: Sequence[float] | None = None,
    coeff_rel: float = 0.0,
    projection: torch.Tensor | None = None,
    terms: tuple[tuple[float, float], ...] = ((1.0, 1.0),),
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """``|y_method - y_target|`` per element ``[B, rows, d_v]`` for float64 ``[B, n, d]``
    inputs: polynomial weights ``coeffs`` (within relative ``coeff_rel`` of the exact
    ones), or FAVOR+ with ``projection``; the target is softmax, or the semiring with
    ``terms``. ``inf`` where the method's normalizer is not certified away from 0."""
    width = 1 if projection is None else projection.shape[0] * len(terms)

    def block(blk: Block) -> dict[str, torch.Tensor]:
        tgt = target_output(blk, sc, terms)
        if projection is not None:
            y, rad = _favor_output(blk, sc, projection.double(), terms)
        else:
            assert coeffs is not None
            y, rad = polynomial_output(blk, sc, coeffs, coeff_rel)
        out = upper((y - tgt.y).abs() * (1 + 2 * U64) + rad + tgt.eps_y, 3)
        return {"a": torch.where(torch.isnan(out), math.inf, out)}

    return stream(block, q, k, v, causal, rows, width=width)["a"]


def output_difference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    scale: float | None,
    rows: object = None,
    **kw: object,
) -> torch.Tensor:
    """:func:`approximation_bound` on inputs ``[..., n, d]`` as the public bounds take them
    (validated, batch dims broadcast, any float dtype taken as exact): ``[..., rows, d_v]``."""
    from attnprec._device import computing_on, work_device
    from attnprec._validate import broadcast_shapes, check_finite, check_qkv, resolve_scale
    from attnprec.analysis.bounds.attention import _flat, sample_rows

    n_q, _, d_k, d_v = check_qkv(q, k, v, causal)
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_finite(name, t)
    sc = resolve_scale(scale, d_k)
    batch = broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    work = work_device(q)
    fq, fk, fv = (_flat(x.to(work, torch.float64), batch) for x in (q, k, v))
    idx = sample_rows(n_q, rows)
    kw = {key: (x.to(work) if isinstance(x, torch.Tensor) else x) for key, x in kw.items()}
    with computing_on(work):
        out = approximation_bound(fq, fk, fv, sc, causal, rows=idx, **kw)  # type: ignore[arg-type]
    n_rows = n_q if idx is None else int(idx.numel())
    return out.reshape(*batch, n_rows, d_v).to(q.device)
