"""Certified reference of H3 (``reference("h3", ...)``).

The recurrence ``S_t = lambda o S_{t-1} + ks_t v_t^T``, ``o_t = q_t S_t`` in ball arithmetic
(python-flint ``arb`` or ``mpmath.iv``) on the inputs as given, with the machinery of the
state-space references (:mod:`._reference_ssm`: precision doubling until every output's
radius is at most ``2^-60`` of its magnitude, rows, NaN propagation). The shifted keys
``ks_t = sum_i shift_i k_{t-i}`` and the decays ``exp(log_decay)`` are balls computed from the
exact floats: never float64 values taken as exact (which is why this is not
``reference("gated", ...)`` on the shifted keys; the two agree where the shift is exact,
e.g. ``shift = [1]``, as the tests check).
"""

from __future__ import annotations

from typing import Any

import torch

from attnprec.analysis import _reference_ball as ball
from attnprec.analysis._reference_ssm import _common, _flat, certify
from attnprec.analysis.reference import Reference

__all__ = ["h3_reference"]


def h3_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool | None = None,
    scale: float | None = None,
    backend: str = "auto",
    rows: Any = None,
    shift: torch.Tensor,
    log_decay: torch.Tensor,
) -> Reference:
    """Certified reference of H3 (``reference("h3", ...)``).

    The exact output of :func:`attnprec.attention.h3_attention` on the inputs as given
    (``shift`` and ``log_decay`` taken as the exact numbers they hold), by the recurrence in
    ball arithmetic (module docstring).

    Parameters
    ----------
    q, k, v : torch.Tensor
        ``[..., T, d_k]``, ``[..., T, d_k]``, ``[..., T, d_v]``; NaN entries give NaN in the
        outputs they reach (row t through ``q_t`` or a ``k_s``, ``s <= t``; column e through
        a ``v_s[e]``), infinities are rejected.
    causal, scale, backend, rows
        As in :func:`attnprec.analysis._reference_ssm.selective_scan_reference`.
    shift, log_decay
        As in :func:`attnprec.attention.h3_attention`.

    Returns
    -------
    Reference
        ``|exact - value| <= radius`` elementwise (the guarantee), ``[..., rows, d_v]``, on
        q's device.

    Raises
    ------
    ValueError, TypeError
        As :func:`attnprec.analysis._reference_ssm.selective_scan_reference`.
    """
    from attnprec.attention.h3 import check_h3

    _common("h3", causal, scale)
    sh, ld, batch = check_h3(q, k, v, shift, log_decay)
    m = sh.shape[-1]

    def setup(be: ball._Backend, qf: Any, kf: Any, vf: Any, items: Any) -> Any:
        shb = be.arr(_flat(sh, (*batch, *sh.shape[-2:]))[items])  # [nb, d_k or 1, m]
        # the decays [nb, d_k, d_v or 1]
        g = be.exp(be.arr(_flat(ld, (*batch, *ld.shape[-2:]))[items]))
        keys: dict[int, Any] = {}

        def step(t: int, h: Any, emit: bool) -> tuple[Any, Any]:
            keys[t] = be.arr(kf[:, t])
            keys.pop(t - m, None)  # the shift reaches m - 1 keys back
            ks = shb[:, :, 0] * keys[t]  # ks_t = sum_i shift_i k_{t-i}, exact balls
            for i in range(1, min(m, t + 1)):
                ks = ks + shb[:, :, i] * keys[t - i]
            w = ks[:, :, None] * be.arr(vf[:, t])[:, None, :]  # [nb, d_k, d_v]
            h = w if h is None else g * h + w
            return h, (be.arr(qf[:, t])[:, :, None] * h).sum(axis=1) if emit else None

        return step

    return certify("h3", q, k, v, batch, backend, rows, setup, q.shape[-1] * v.shape[-1])
