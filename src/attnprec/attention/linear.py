"""Linear attention (Katharopoulos et al. 2020): ``w_ij = phi(q_i) . phi(k_j)``."""

from __future__ import annotations

from collections.abc import Callable

import torch

from attnprec._validate import check_float
from attnprec.attention._common import (
    DEFAULT_CHUNK,
    check_chunk_size,
    check_state_args,
    prepare,
)
from attnprec.attention._feature import FeatureState, run_features

__all__ = ["linear_attention", "elu1"]


def elu1(x: torch.Tensor) -> torch.Tensor:
    """The feature map ``elu(x) + 1`` (``x + 1`` for ``x > 0``, ``exp(x)`` otherwise).

    Computed as ``exp(x)`` on the negative side rather than ``(exp(x) - 1) + 1``, so small
    features keep their relative accuracy (one exp, or one addition, per entry).

    Parameters
    ----------
    x : torch.Tensor
        Any real floating tensor.

    Returns
    -------
    torch.Tensor
        ``x``'s shape and dtype, positive where ``x`` is finite (0 where ``exp`` underflows);
        NaN propagates.

    Notes
    -----
    Error: for ``x > 0`` one rounding in ``x``'s dtype (the addition); otherwise the
    error of torch's ``exp``.
    """
    return torch.where(x > 0, x + 1, torch.exp(torch.clamp(x, max=0)))


FeatureMap = Callable[[torch.Tensor], torch.Tensor]


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _resolve_map(feature_map: str | FeatureMap | None) -> FeatureMap:
    if feature_map is None:
        return _identity
    if isinstance(feature_map, str):
        if feature_map == "elu1":
            return elu1
        raise ValueError(f"feature_map: expected 'elu1', a callable or None, got {feature_map!r}")
    if not callable(feature_map):
        raise TypeError(f"feature_map: expected 'elu1', a callable or None, got {feature_map!r}")
    return feature_map


def _apply(phi: FeatureMap, x: torch.Tensor, which: str) -> torch.Tensor:
    f = phi(x)
    try:
        check_float("feature_map", f)
    except TypeError as e:
        raise TypeError(f"{e} (returned for {which})") from None
    if f.shape[:-1] != x.shape[:-1]:
        raise ValueError(
            f"feature_map: must map [..., n, d] to [..., n, F], got {tuple(x.shape)} -> "
            f"{tuple(f.shape)} for {which}"
        )
    return f.to(x.dtype)


def linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    feature_map: str | FeatureMap | None = "elu1",
    causal: bool = False,
    allow_nonpositive: bool = False,
    chunk_size: int = DEFAULT_CHUNK,
    state: FeatureState | None = None,
    return_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, FeatureState]:
    """Linear attention: ``y_i = sum_j (phi(q_i).phi(k_j)) v_j / sum_j phi(q_i).phi(k_j)``.

    No scale is applied (the feature map carries any scaling).

    Parameters
    ----------
    q, k, v : torch.Tensor
        ``[..., n_q, d_k]``, ``[..., n_k, d_k]``, ``[..., n_k, d_v]``, one float dtype
        (float16/bfloat16 computed in float32, returned in the input dtype).
    feature_map : "elu1", callable or None
        ``"elu1"`` is :func:`elu1`; a callable maps ``[..., n, d_k]`` to ``[..., n, F]``
        (applied to q and to k, in the compute dtype); None: q and k are the features
        already (the convention of the Triton kernel and of the bounds).
    causal : bool
        Key ``j`` attends only to queries ``i >= j`` (requires ``n_q == n_k``).
    allow_nonpositive : bool
        A normalizer ``<= 0`` (a map that is not positive, or ``exp`` underflowing in
        :func:`elu1` for entries below about -745 in float64, -103 in float32) raises
        ``ValueError`` naming ``feature_map`` unless this is set.
    chunk_size, state, return_state
        As in :func:`attnprec.attention.polynomial_attention` (one token per call with
        ``state`` is the recurrent form, O(F d_v) per token).

    Returns
    -------
    torch.Tensor or (torch.Tensor, FeatureState)
        ``[..., n_q, d_v]`` in q's dtype, and the state if requested.

    Notes
    -----
    Error (unit roundoff u; features as computed, i.e. exact inputs ``phi(q_i)``,
    ``phi(k_j)``): with ``K = F + n_k + 3``, ``N^abs_i = sum_{j,f} |phi_f(q_i) phi_f(k_j)|
    |v_j|`` and ``D^abs_i`` the same without ``|v_j|``, ``|y~_i - y_i| <= (gamma_K N^abs_i +
    |y_i| gamma_K D^abs_i) / (D_i - gamma_K D^abs_i) + u |y~_i|``. :func:`elu1` adds a
    relative error of one rounding (``x > 0``) or of ``exp`` per feature.
    """
    check_state_args(causal, state, return_state)
    phi = _resolve_map(feature_map)
    q, k, v, out_dtype = prepare(q, k, v, causal)
    chunk_size = check_chunk_size(chunk_size)
    return run_features(
        "linear",
        lambda x: _apply(phi, x, "q"),
        lambda x: (_apply(phi, x, "k"), None),
        q,
        k,
        v,
        causal=causal,
        chunk_size=chunk_size,
        state=state,
        name="feature_map",
        reason="the features of q and k have a non-positive inner product sum",
        allow_nonpositive=allow_nonpositive,
        out_dtype=out_dtype,
        return_state=return_state,
    )
