"""Bound of H3 (``attention_error_bound("h3", ...)``) through its reduction to gated linear
attention with computed keys (docs/methods/h3.md).

H3 is ``o_t = sum_{j<=t} sum_c q_t[c] D_tj[c, e] ks_j[c] v_j[e]`` with the shifted keys
``ks_j[c] = sum_{i<m} shift[c, i] k_{j-i}[c]`` and decays ``D_tj = exp((t - j) log_decay)``:
per key channel (one gated problem) or per entry (one per value column, ``d_v = 1``).

- **quantization**: every operand rounded to the storage format (``q, k, v``, ``shift``,
  ``log_decay``): the reduced problem's quantization model
  (:func:`attnprec.analysis.bounds.ssm._quantization`), with the shifted keys' perturbation
  ``|ks~ - ks| <= sum_i |shift~_i - shift_i| |k~_{j-i}| + |shift_i| |k~_{j-i} - k_{j-i}|``
  (no cancellation: every term bounded in magnitude);
- **rounding**: :func:`attnprec.analysis.bounds.gated.gated_rounding` on the stored reduced
  problem, the shifted keys computed by the kernel (two loads, a product and ``m - 1``
  additions per tap, in any order: within ``((1 + u_l)^2 (1 + u)^m - 1) sum_i |shift_i|
  |k_{j-i}|`` plus the loads' and underflows' absolute terms; the error is relative to
  that sum, not to ``|ks_j|``, so it is passed per key), the loaded log-decays; the taps
  possibly applied after the products ``k v`` (an underflow of ``k v`` carried by ``|s_i|``:
  ``Computed.k_und``, ``step_sums``); both levels;
- approximation: 0 (the method is exact).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from attnprec.analysis.bounds.attention import DEFAULT_CONFIDENCE, ErrorBound
from attnprec.analysis.bounds.gated import Computed, gated_rounding, gated_rounding_state
from attnprec.analysis.bounds.quotient import unbounded
from attnprec.analysis.bounds.rounding import U64, gamma, upper
from attnprec.analysis.bounds.ssm import (
    _call,
    _check_common,
    _columns,
    _loads,
    _quantization,
    _Reduced,
    _to_channels,
)
from attnprec.analysis.precision import Precision

__all__ = ["h3_bound"]

#: Absolute error of one float64 product that may underflow (the least subnormal).
_TINY = 2.0**-1074


def _conv(sh: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The causal shift convolution in float64: ``sh [B, d_k or 1, m]``, ``x [B, T, d_k]``."""
    from attnprec.attention.h3 import shift_keys

    m = sh.shape[-1]
    return shift_keys(x, sh, x.new_zeros(x.shape[0], m - 1, x.shape[-1]))


def _keys(sh: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(ks, mag)`` of the exact shifted keys of ``sh``, ``k`` (float64): ``ks`` signed with
    ``|ks| >= |exact|`` (the float64 value moved away from 0 by its error) and ``mag >=
    sum_i |sh_i| |k_{j-i}|``; and the float64 value itself."""
    m = sh.shape[-1]
    val = _conv(sh, k)
    mag = upper(_conv(sh.abs(), k.abs()), m + 1) + m * _TINY
    err = upper(gamma(m + 1, U64) * mag, 2) + m * _TINY
    up = val.abs() + err
    return torch.where(val < 0, -up, up), mag, val


def _gates(ld: torch.Tensor, T: int) -> torch.Tensor:
    """``log_decay [B, d_k, w]`` -> the log-gates ``[B w, T, d_k]`` of the reduced problem
    (one per value column per entry, ``w = d_v``; one problem per channel, ``w = 1``)."""
    B, d, w = ld.shape
    return _columns(ld.transpose(-1, -2).unsqueeze(1).expand(B, T, w, d))


def _computed_keys(
    shs: torch.Tensor, ks: torch.Tensor, prec: Precision
) -> tuple[torch.Tensor, torch.Tensor]:
    """Absolute bound ``[B, T, d_k]`` of ``|ks^ - ks|`` for the shifted keys a kernel computes
    from the loaded ``shift`` and ``k`` (stored float64 values): per tap two loads (``x~ = x
    (1 + theta) + eta``, ``|theta| <= u_l``, ``|eta| <= h_l``) and a product, then ``m - 1``
    additions in any order (``m`` roundings on every path), each product or addition
    possibly underflowing (``u_f``); and whether the result may overflow (the magnitude
    bound reaches compute's or accumulate's overflow threshold)."""
    ul, hl, up, uf = _loads(prec)
    m = shs.shape[-1]
    mag = upper(_conv(shs.abs(), ks.abs()), m + 1) + m * _TINY
    rel = math.expm1(2 * math.log1p(ul) + m * math.log1p(up))
    grow = math.exp(m * math.log1p(up))
    sum_sh = shs.abs().sum(-1).unsqueeze(-2)  # [B, 1, d_k or 1]: >= sum over the valid taps
    sum_k = _conv(torch.ones_like(shs), ks.abs())
    absolute = grow * (hl * (1 + ul) * (sum_sh + sum_k) + m * hl * hl + 2 * m * uf)
    err = upper(rel * mag + absolute, m + 8)  # (sum_sh, sum_k: sums over the m taps)
    over = (mag + err) >= prec.products_overflow()[0]
    return err, over


def h3_bound(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    precision: Any = None,
    *,
    causal: bool | None = None,
    scale: float | None = None,
    confidence: float | None = None,
    target: str | None = None,
    rows: Any = None,
    seed: int = 0,
    typical_confidence: float = DEFAULT_CONFIDENCE,
    evaluation: str = "pairs",
    shift: torch.Tensor,
    log_decay: torch.Tensor,
    **how: Any,
) -> ErrorBound:
    """Error bound of H3 (``attention_error_bound("h3", ...)``).

    Parameters
    ----------
    q, k, v : torch.Tensor
        ``[..., T, d_k]``, ``[..., T, d_k]``, ``[..., T, d_v]`` as the user holds them (taken
        as exact); the implementation is assumed to see every operand, ``shift`` and
        ``log_decay`` included, rounded to ``precision.storage``, and to keep the shifted
        keys in compute (not rounded to storage).
    precision : Precision or format-like
        The declaration; ``block=None`` covers the recurrence (and any parallel scan of it),
        an integer block the chunked form with span sums inside chunks
        (:mod:`attnprec.analysis.bounds.gated`).
    causal, scale, confidence, target, rows, seed, typical_confidence, evaluation, **how
        As in :func:`attnprec.analysis.bounds.ssm.selective_scan_bound`.
    shift, log_decay
        As in :func:`attnprec.attention.h3_attention`.

    Returns
    -------
    ErrorBound
        Guarantee: ``|o^ - o*| <= total`` elementwise, ``o*`` the exact output on the
        inputs as given and ``o^`` any implementation rounding as declared (the sound
        level); ``typical`` the probabilistic level. Decays formed as differences of prefix
        sums over the whole sequence are not covered (the gated model).

    Raises
    ------
    ValueError, TypeError
        Bad shapes, signs, dtypes or keywords (naming them), non-finite inputs, an operand
        that overflows the storage format.
    """
    from attnprec.attention.h3 import check_h3

    _check_common("h3", causal, scale, target, confidence, typical_confidence, how)
    sh, ld, batch = check_h3(q, k, v, shift, log_decay)
    c = _call(
        "h3", how, q, k, v, precision, batch, rows, seed, confidence, typical_confidence,
        evaluation,
    )  # fmt: skip
    if (empty := c.empty()) is not None:
        return empty
    prec, idx = c.prec, c.rows_here
    T, d_k = q.shape[-2:]
    d_v = v.shape[-1]
    nb = math.prod(batch)
    (Q, Qs), (K, Ks), (V, Vs) = c.operand("q", q), c.operand("k", k), c.operand("v", v)
    (SH, SHs), (LD, LDs) = c.operand("shift", sh), c.operand("log_decay", ld)
    per_entry = LD.shape[-1] != 1
    m = SH.shape[-1]

    def red(x: torch.Tensor) -> torch.Tensor:
        """A query- or key-side ``[B, T, d]`` tensor in the reduced batch (per entry, every
        value column sees the same keys)."""
        return _columns(x.unsqueeze(2).expand(nb, T, d_v, x.shape[-1])) if per_entry else x

    # quantization: the reduced problem of the given inputs (keys as magnitudes) and the
    # perturbations of the keys and log-gates, bounded term by term
    kg, _, _ = _keys(SH, K)
    ks_s, _, _ = _keys(SHs, Ks)
    dsh, dk_in = (SHs - SH).abs(), (Ks - K).abs()
    dks = upper(_conv(dsh, Ks.abs()) + _conv(SH.abs(), dk_in), 2 * m + 4)
    # a product that underflows loses at most _TINY; only where a term is not exactly 0
    live = _conv((dsh > 0).double(), (Ks != 0).double()) + _conv(
        (SH != 0).double(), (dk_in > 0).double()
    )
    dks = dks + torch.where(live > 0, 2 * m * _TINY, 0.0)
    Vr, Vsr = (_columns(x) if per_entry else x for x in (V, Vs))
    given = _Reduced(red(Q), red(kg.abs()), _gates(LD, T), Vr, None, 0.0)
    stored = _Reduced(red(Qs), red(ks_s), _gates(LDs, T), Vsr, None, 0.0)
    dlg = _gates((LDs - LD).abs(), T)
    quant = _quantization(given, stored, red(dks), dlg, idx, c.state)
    # rounding: the gated model with the computed keys' errors, per key
    err, over = _computed_keys(SHs, Ks, prec)
    # relative where the key is larger than its error, else absolute (|ks_s| is never 0:
    # _keys moves it away from 0 by its own error; a key of 2e-323 as relative made
    # k_rel ~ 1e263, and the loads' absolute part times it a key of 1e225 (a review)
    kmag = ks_s.abs()
    rel_ok = kmag > err
    k_rel = upper(torch.where(rel_ok, err / kmag.clamp_min(1e-300), 0.0), 2)
    k_abs = torch.where(rel_ok, 0.0, err)
    ul, hl, up, _ = _loads(prec)
    # the taps may come after the products k v (sum_i s_i (k_{j-i} v_j), reassociated): an
    # underflow of k v is carried by |s_i| alone, so per tap max(1, |s_i|) max(1, |k_{j-i}|)
    # (loaded, with the roundings that carry it), and m - 1 more sums per step in the state
    one = lambda x: (x.abs() * (1 + ul) + hl).clamp_min(1.0)  # noqa: E731
    k_und = upper(_conv(one(SHs), one(Ks)) * math.exp(5 * math.log1p(up)), m + 6)
    comp = Computed(
        gate_rel=ul, gate_abs=hl, gate_max=float(LDs.abs().max().item()),
        k_rel=red(k_rel), k_abs=red(k_abs), k_und=red(k_und), step_sums=m - 1,
    )  # fmt: skip
    rnd = (gated_rounding_state if c.state else gated_rounding)(
        stored.q, stored.k, stored.v, prec, 1.0, stored.lg, c.lam, idx, computed=comp
    )
    # a shifted key that may overflow reaches every later row, and every row where chunks
    # pass their states as one product over all chunks (gated._chunk_reach)
    reach = torch.cumsum(over.any(-1).to(torch.int64), -1) > 0  # [B, T]
    if prec.block is not None:
        reach = reach[..., -1:].expand_as(reach)
    reach = red(reach.unsqueeze(-1))[..., 0]  # [B', T]
    if idx is not None:
        reach = reach[:, idx]
    why = {f"shifted keys in {prec.compute.name}": reach.unsqueeze(-1)}
    rnd = {**rnd, **unbounded(rnd["sound"], rnd["typical"], why)}
    return c.assemble(quant, rnd, _to_channels(nb, d_v, c.shape) if per_entry else None)
