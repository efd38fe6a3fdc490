"""Chunked linear attention over given features (FAVOR+, the semiring linearizations)."""

from __future__ import annotations

import torch

from attnprec.kernels._common import (
    KernelState,
    check_state_args,
    finish,
    precision_for,
    prepare_qkv,
)
from attnprec.kernels._featured import BLOCK, BLOCK_F, run_featured

__all__ = ["linear_attention", "precision_for", "BLOCK", "BLOCK_F"]


def linear_attention(
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    state: KernelState | None = None,
    return_state: bool = False,
    feature_map: None = None,
) -> torch.Tensor | tuple[torch.Tensor, KernelState]:
    r"""``y_i = sum_j (phi_q_i . phi_k_j) v_j / sum_j phi_q_i . phi_k_j`` over given features.

    Parameters
    ----------
    phi_q, phi_k : torch.Tensor
        Features ``[..., n_q, m]``, ``[..., n_k, m]``; float16, bfloat16 or float32, on CUDA
        (or on the CPU under ``TRITON_INTERPRET=1``). Non-contiguous tensors are copied.
    v : torch.Tensor
        ``[..., n_k, d_v]``, the same dtype.
    causal : bool
        Query ``i`` sees keys ``j <= i`` (requires ``n_q == n_k``); chunks of
        :data:`BLOCK` tokens, the state ``S = sum_j phi_k_j v_j^T [m, d_v]`` carried between
        them in float32 (long prefills of few sequences in parallel segments).
    state : KernelState, optional
        Causal only: continue from the state of the preceding tokens (updated in place);
        one token per call is the decode step, O(m d_v) per token.
    return_state : bool
        Causal only: also return the state.
    feature_map : None
        Must be None: the features are given. Accepted so that one set of keywords
        (``feature_map=None``) serves this kernel, ``reference("linear", ...)`` and
        ``attention_error_bound("linear", ...)``.

    Returns
    -------
    torch.Tensor or (torch.Tensor, KernelState)
        ``[..., n_q, d_v]`` in the input dtype.

    Notes
    -----
    Error: elementwise within
    ``attnprec.analysis.bounds.graphs.rounding_bound("linear", phi_q, phi_k, v,
    precision_for(dtype, interpreted))`` of the exact quotient of the stored inputs (the
    graph is in docs/kernels.md); the raw quotient is returned where the normalizer is not
    positive (the bound is infinite there).
    NaN inputs reach the outputs that depend on them, as in the exact method: a key's or a
    value's the later queries (a value's its column), a query's its own row
    (docs/kernels.md).
    """
    if feature_map is not None:
        raise ValueError(
            "feature_map: the linear kernel takes given features phi(q), phi(k); "
            f"pass feature_map=None, got {feature_map!r}"
        )
    check_state_args(causal, state, return_state)
    fq, fk, vv, batch = prepare_qkv(phi_q, phi_k, v, causal, ("phi_q", "phi_k", "v"))
    m, dv = fq.shape[-1], vv.shape[-1]
    key = (m, dv, fq.dtype)
    st = state.check("linear", batch, key) if state is not None else None
    y, (s, z) = run_featured(fq, fk, vv, m, causal=causal, state=st)  # type: ignore[arg-type]
    return finish(y, "linear", (s, z), batch, key, return_state)
