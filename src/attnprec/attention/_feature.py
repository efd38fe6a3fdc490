"""The chunked engine under every feature-map method (taylor, polynomial, linear, favor and
the linearized semirings).

The weights are ``w_ij = phi(q_i) . psi(k_j)`` and the output
``y_i = sum_j w_ij v_j / sum_j w_ij``. The state after keys ``j < t`` is

    num = sum_j psi(k_j) v_j^T  [..., F, d_v],   den = sum_j psi(k_j)  [..., F],

both held in units of ``exp(shift)``: a key map may return ``psi(k_j)`` as
``exp(a_j) f_j`` (FAVOR+ features overflow otherwise), and the state keeps the running
maximum of ``a_j`` as its shift. A query map may scale ``phi(q_i)`` by any positive
per-row factor: it cancels in the quotient.

Memory is O(chunk * F + F * d_v): keys and queries are processed ``chunk_size`` at a time,
the causal form as a masked product inside a chunk plus the carried state, never the
``[n, F, d_v]`` cumulative tensor. ``chunk_size=1`` is the recurrence itself,
``S_t = S_{t-1} + psi(k_t) v_t^T``, ``y_t = phi(q_t) S_t / phi(q_t) z_t``.

Rounding (float64 or float32 with unit roundoff u): every product ``phi_f(q_i) psi_f(k_j)
v_j`` enters the numerator through at most ``F + n_k + 3`` roundings after the features,
whatever the chunking, so with feature products of relative error ``e_f``
``|num~ - num| <= ((1 + e_f)(1 + gamma_{F+n_k+3}) - 1) sum_{j,f} |phi_f psi_f| |v_j|``, and the
same for ``den`` with ``|v_j|`` replaced by 1; the quotient adds one rounding. Each method
states its ``e_f``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from attnprec.attention._common import empty_result, guard_normalizer, lower_mask

__all__ = ["FeatureState", "run_features", "QueryMap", "KeyMap"]

QueryMap = Callable[[torch.Tensor], torch.Tensor]
KeyMap = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]


@dataclass(frozen=True)
class FeatureState:
    """Recurrent state of a feature-map method after the keys seen so far.

    Attributes
    ----------
    method : str
        The method (and its feature map) that produced it; a state is only accepted back
        by the same method with the same parameters' feature count.
    num : torch.Tensor
        ``[..., F, d_v]``: ``sum_j exp(a_j - shift) f(k_j) v_j^T``.
    den : torch.Tensor
        ``[..., F]``: ``sum_j exp(a_j - shift) f(k_j)``.
    shift : torch.Tensor
        ``[...]``: the log-scale of ``num`` and ``den`` (``0`` for maps without one).
    """

    method: str
    num: torch.Tensor
    den: torch.Tensor
    shift: torch.Tensor


def _check_state(
    state: object, method: str, f: int, d_v: int, dtype: torch.dtype, batch: tuple[int, ...]
) -> FeatureState:
    if not isinstance(state, FeatureState):
        raise TypeError(f"state: expected a FeatureState, got {type(state).__name__}")
    if state.method != method:
        raise ValueError(f"state: produced by {state.method!r}, not {method!r}")
    # (the batch dims too: a state of another batch broadcast into the output's shape, a
    # review)
    if tuple(state.num.shape) != (*batch, f, d_v):
        raise ValueError(
            f"state: expected [{', '.join(map(str, batch))}{', ' if batch else ''}{f} "
            f"features, d_v={d_v}], got {tuple(state.num.shape)}"
        )
    if state.num.dtype != dtype:
        raise TypeError(f"state: expected dtype {dtype}, got {state.num.dtype}")
    return state


def _absorb(
    st: FeatureState | None, method: str, kf: torch.Tensor, a: torch.Tensor, v: torch.Tensor
) -> FeatureState:
    """Add keys ``kf [..., C, F]`` (log-scales ``a [..., C]``) with values ``v`` to the state."""
    # A NaN key must not poison the shift of the other keys (causal rows before it).
    top = torch.where(torch.isnan(a), -torch.inf, a).amax(-1)
    m_new = top if st is None else torch.maximum(st.shift, top)
    kfs = kf * torch.exp(a - m_new.unsqueeze(-1)).unsqueeze(-1)
    num = kfs.transpose(-1, -2) @ v
    den = kfs.sum(-2)
    if st is not None:
        old = torch.exp(st.shift - m_new)
        num = num + old[..., None, None] * st.num
        den = den + old[..., None] * st.den
    return FeatureState(method, num, den, m_new)


def run_features(
    method: str,
    qmap: QueryMap,
    kmap: KeyMap,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    chunk_size: int,
    state: FeatureState | None,
    name: str,
    reason: str,
    allow_nonpositive: bool,
    out_dtype: torch.dtype,
    return_state: bool,
) -> torch.Tensor | tuple[torch.Tensor, FeatureState]:
    """Attention with weights ``qmap(q_i) . kmap(k_j)``: ``y`` in ``out_dtype``, with the
    state (in q's dtype) if ``return_state``.

    ``name`` and ``reason`` word the error raised when a normalizer is ``<= 0``.
    """
    n_k, d_v = v.shape[-2:]
    st = state
    if q.shape[-2] == 0:
        return empty_result(q, k, v, out_dtype, state, return_state)  # type: ignore[return-value]

    def keys(t0: int) -> tuple[torch.Tensor, torch.Tensor]:
        kf, a = kmap(k[..., t0 : t0 + chunk_size, :])
        if a is None:
            a = torch.zeros(kf.shape[:-1], dtype=kf.dtype, device=kf.device)
        if t0 == 0 and st is not None:
            batch = tuple(torch.broadcast_shapes(q.shape[:-2], kf.shape[:-2], v.shape[:-2]))
            _check_state(st, method, kf.shape[-1], d_v, kf.dtype, batch)
        return kf, a

    def quotient(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
        guard_normalizer(den, name, reason, allow_nonpositive)
        return num / den

    out: list[torch.Tensor] = []

    def finish() -> torch.Tensor | tuple[torch.Tensor, FeatureState]:
        assert st is not None
        y = torch.cat(out, dim=-2).to(out_dtype)
        return (y, st) if return_state else y

    if not causal:
        for t0 in range(0, n_k, chunk_size):
            kf, a = keys(t0)
            st = _absorb(st, method, kf, a, v[..., t0 : t0 + chunk_size, :])
        assert st is not None
        for t0 in range(0, q.shape[-2], chunk_size):
            qf = qmap(q[..., t0 : t0 + chunk_size, :])
            out.append(quotient(qf @ st.num, qf @ st.den.unsqueeze(-1)))
        return finish()
    for t0 in range(0, n_k, chunk_size):
        prev = st
        kf, a = keys(t0)
        vc = v[..., t0 : t0 + chunk_size, :]
        st = _absorb(prev, method, kf, a, vc)
        qf = qmap(q[..., t0 : t0 + chunk_size, :])
        # Row i is taken in units of exp(s_i), s_i the largest log-scale among the keys it
        # sees: with the chunk's shared shift, a row whose keys all lie far below a later
        # key of the chunk would underflow to a zero normalizer in float32.
        s = torch.cummax(torch.where(torch.isnan(a), -torch.inf, a), -1).values
        if prev is not None:
            s = torch.maximum(s, prev.shift.unsqueeze(-1))
        s = torch.where(s == -torch.inf, 0.0, s)
        mask = lower_mask(a.shape[-1], device=a.device)
        arg = torch.where(mask, a.unsqueeze(-2) - s.unsqueeze(-1), -torch.inf)
        w = torch.where(mask, (qf @ kf.transpose(-1, -2)) * torch.exp(arg), 0.0)
        num = w @ vc
        den = w.sum(-1, keepdim=True)
        if prev is not None:
            old = torch.exp(prev.shift.unsqueeze(-1) - s).unsqueeze(-1)
            num = num + old * (qf @ prev.num)
            den = den + old * (qf @ prev.den.unsqueeze(-1))
        out.append(quotient(num, den))
    return finish()
