"""Rounding bound of log-space (Heinsen) attention, ``w_ij = sum_c exp(scale (q_ic + k_jc))``.

Any algorithm of the family :mod:`._expprod` describes: the chunked Triton kernel (per
channel running maxima of ``scale k``, state rescaled once per block, queries shifted by
``max_c (scale q_ic + m_c)``) or a direct ``exp(scale (q_ic + k_jc) - M_i)``; each
channel's keys shifted by their own maximum (one maximum shared by the channels is not
covered: channels far below it flush, 30-150x outside, docs/bounds/attention.md); unless
``precision.sums == "linear"``, also kernels that hold their partial sums as logs rounded
to compute (the signed log-space sums of :mod:`attnprec.attention.log`, a recurrent state
of logs). The exponents' own errors: the rounding of ``scale q`` and of ``scale k`` (none
when the scale is a power of two) and of the scale itself into compute (none where compute
holds it: a Python float is rounded to the tensor's format first), and the loads.
"""

from __future__ import annotations

import torch

from attnprec.analysis.bounds._expprod import (
    Exponents,
    chord_reach,
    expprod_block,
    expprod_state,
    log_keys,
    log_tail,
)
from attnprec.analysis.bounds._rows import Block, Visible, padding_max, sequence_max, stream
from attnprec.analysis.bounds.rounding import U64
from attnprec.analysis.bounds.softmax import (
    Loaded,
    exact_product,
    rep_units,
    scaled_underflow,
)
from attnprec.analysis.precision import Precision

__all__ = ["log_rounding"]


def _scale_error(sc: float, precision: Precision) -> tuple[float, float]:
    """Relative and absolute error of ``fl(fl(sc) x)`` against ``sc x``: the scale's
    representation in compute (none where compute holds it) and the product (none for a
    power of two), and the product's underflow (:func:`.softmax.scaled_underflow`)."""
    u = precision.compute.u
    rep = rep_units(sc, precision.compute) * u
    prod = 0.0 if exact_product(sc) else u
    return rep + prod + rep * prod, scaled_underflow(sc, precision) * (1 + 4 * U64)


def log_rounding(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    precision: Precision,
    sc: float,
    causal: bool | Visible,
    lam: float,
    rows: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Per output element ``[B, rows, d_v]``: ``"sound"``, ``"typical"`` and the masks of
    the intermediates that may overflow (``"unbounded:<name>"``); stored inputs float64
    ``[B, n, d]`` (see :func:`.softmax.softmax_rounding`)."""
    ld = Loaded(precision)
    rnd, eta = _scale_error(sc, precision)

    # the key side once for the sequence (each block takes its keys' slice)
    Y_all = sc * k
    y_err_all = U64 * Y_all.abs()
    eY_all = rnd * Y_all.abs() * (1 + rnd) + abs(sc) * ld.err(k) * (1 + rnd) + eta
    # the largest key exponent as the kernel computes it (a shift by every key's)
    y_hi = Y_all + eY_all + y_err_all
    y_hi = y_hi + 4 * U64 * (y_hi.abs() + eY_all + y_err_all)
    y_max = sequence_max(causal, lambda: y_hi)
    y_top = padding_max(y_hi, causal)  # (_past_exp)
    keys_ls = None
    if precision.sums != "linear":  # (the level's delta split with the log-space event)
        lam, tail = log_tail(lam, k.shape[-2], k.shape[-1])
        # (a value that loads to 0 is no term; loads keep signs)
        one_sign = (v >= 0).all(-2) | (v <= 0).all(-2)
        keys_ls = log_keys(Y_all, eY_all, ld.abs(v), precision, tail, one_sign)
    X_all = sc * q
    eX_all = rnd * X_all.abs() * (1 + rnd) + abs(sc) * ld.err(q) * (1 + rnd) + eta
    chords = chord_reach(X_all, Y_all, eX_all, eY_all, precision)  # once per sequence
    over_kv = ld.over(k).any(-1) | ld.over(v).any(-1)
    key_shift_err = (eY_all + y_err_all).amax((-1, -2))

    def block(blk: Block) -> dict[str, torch.Tensor]:
        keys = blk.held
        X = sc * blk.q
        ex = Exponents(
            X=X,
            Y=Y_all[:, keys],
            x_err=U64 * X.abs(),
            y_err=y_err_all[:, keys],
            eX=eX_all[:, blk.idx],
            eY=eY_all[:, keys],
            per_channel=True,
            key_over=over_kv,  # (every key of the sequence: Loaded.rows_over)
            log_sums=keys_ls,
            y_max=y_max,
            chords=chords,
            key_shift_err=key_shift_err,
            y_top=y_top,
        )
        return expprod_block(blk, ex, precision, lam)[0]

    # width 1: a block's [rows, keys, channels] terms are formed a key chunk at a time
    # (_expprod.CHUNK), its whole-block arrays are [rows, keys]; counted per channel, a
    # sampled row at 2^20 tokens took a block of its own, each re-forming its keys' side
    # (docs/benchmarks.md)
    return stream(block, q, k, v, causal, rows, width=1)


def log_rounding_state(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    precision: Precision,
    sc: float,
    causal: bool,
    lam: float,
    rows: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """:func:`log_rounding`'s sound bound from per-channel key states (:mod:`._state`):
    ``O((n + rows) C d_v)`` time. The same model (both shift models, any schedule the
    declaration allows, linear sums), each per-term factor bounded by one that separates
    into a row and a key part: ``Lambda_ijc <= alpha_ic + beta_jc`` (``|X + Y| <= |X| +
    |Y|``; the key's distance to the row's shift at most to the sequence's largest key
    exponent); the per-key deviations ``|v_j - y_i|`` through :func:`._state.deviation`. So
    it is never below the pair evaluation with its factors evaluated exactly (docs/bounds/
    attention.md, "State evaluation"); ``"typical"`` the probabilistic level at ``lam``
    (:func:`._expprod.expprod_state`). Rows whose float64 states cannot hold their terms
    (:data:`._state.GAP`) take the pair evaluation."""
    if precision.sums != "linear":
        raise ValueError(
            "evaluation: 'state' models partial sums held as values; declare "
            "Precision(..., sums='linear') or use evaluation='pairs'"
        )
    rnd, eta = _scale_error(sc, precision)
    ld = Loaded(precision)
    Y = sc * k
    y_err = U64 * Y.abs()
    eY = rnd * Y.abs() * (1 + rnd) + abs(sc) * ld.err(k) * (1 + rnd) + eta
    qr = q if rows is None else q[:, rows]  # the rows evaluated (expprod_state)
    X = sc * qr
    eX = rnd * X.abs() * (1 + rnd) + abs(sc) * ld.err(qr) * (1 + rnd) + eta
    y_hi = Y + eY + y_err
    y_hi = y_hi + 4 * U64 * (y_hi.abs() + eY + y_err)
    y_max = sequence_max(causal, lambda: y_hi)
    y_top = padding_max(y_hi, causal)  # (_past_exp)
    return expprod_state(
        Exponents(X, Y, U64 * X.abs(), y_err, eX, eY, per_channel=True,
                  key_over=ld.over(k).any(-1) | ld.over(v).any(-1), y_max=y_max, y_top=y_top),
        q, v, precision, causal, lam, rows,
        lambda idx: log_rounding(q, k, v, precision, sc, causal, lam, idx),
    )  # fmt: skip
