"""Softmax attention, the conventional max-shifted form."""

from __future__ import annotations

import torch

from attnprec._validate import broadcast_shapes, check_masks, check_softcap, resolve_scale
from attnprec.attention._common import lower_mask, prepare

__all__ = ["softmax_attention", "causal_mask"]


def causal_mask(n: int, device: torch.device | None = None) -> torch.Tensor:
    """``[n, n]`` bool, True where key ``j`` is visible to query ``i`` (``j <= i``)."""
    return lower_mask(n, device=device)


def softmax_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    window: int | None = None,
    key_mask: torch.Tensor | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Softmax attention ``y_i = sum_j exp(s_ij) v_j / sum_j exp(s_ij)``, ``s = scale q.k``.

    Computed as ``exp(s_ij - max_j s_ij)`` (the shift cancels), so large logits do not
    overflow. Quadratic in n (the ``[..., n_q, n_k]`` weights); no recurrent form.

    Parameters
    ----------
    q, k, v : torch.Tensor
        ``[..., n_q, d_k]``, ``[..., n_k, d_k]``, ``[..., n_k, d_v]``, one float dtype
        (float16/bfloat16 computed in float32, returned in the input dtype).
    causal : bool
        Key ``j`` attends only to queries ``i >= j`` (requires ``n_q == n_k``).
    scale : float, optional
        Defaults to ``1/sqrt(d_k)``.
    window : int, optional
        A causal sliding window: query i sees keys ``i - window < j <= i``.
    key_mask : torch.Tensor, optional
        bool ``[..., n_k]`` (batch dims broadcasting), True for the keys attended, False
        for padding. A query that sees no key is a ``ValueError``.
    softcap : float, optional
        Logit soft-capping (Gemma 2): the logits become ``softcap * tanh(s / softcap)``.

    Returns
    -------
    torch.Tensor
        ``[..., n_q, d_v]`` in q's dtype.

    Notes
    -----
    Error (unit roundoff u, elementary functions within ``e_exp`` relative error): each
    logit has absolute error at most ``gamma_{d_k+1} scale sum_c |q_ic k_jc|``; with
    ``delta_ij`` that error plus the error ``u |s_ij - m_i|`` of the shift, each weight has
    relative error ``r_ij <= (1 + e_exp) exp(delta_ij + delta_i,max) - 1`` (the maximum is
    taken of the computed logits, so its error shifts every weight alike and cancels up
    to ``delta_i,max``); the sums add ``gamma_{n_k}``. Then
    ``|y~_i - y_i| <= (eps_i sum_j w_ij |v_j| + |y_i| eps_i sum_j w_ij) / ((1 - eps_i)
    sum_j w_ij) + u |y~_i|`` with ``eps_i = (1 + max_j r_ij)(1 + gamma_{n_k+1}) - 1``.
    """
    q, k, v, out_dtype = prepare(q, k, v, causal)
    n_q, n_k = q.shape[-2], k.shape[-2]
    s = resolve_scale(scale, q.shape[-1])
    logits = (q * s) @ k.transpose(-1, -2)
    if softcap is not None:
        cap = check_softcap(softcap)
        logits = cap * torch.tanh(logits / cap)
    if causal:
        logits = logits.masked_fill(~causal_mask(q.shape[-2], q.device), float("-inf"))
    if window is not None or key_mask is not None:
        batch = broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
        check_masks(causal, window, key_mask, batch, n_q, n_k)
        if window is not None:
            i = torch.arange(n_q, device=q.device)
            far = i.unsqueeze(-1) - torch.arange(n_k, device=q.device) >= window
            logits = logits.masked_fill(far, float("-inf"))
        if key_mask is not None:
            logits = logits.masked_fill(~key_mask.to(q.device).unsqueeze(-2), float("-inf"))
    if n_q == 0:  # no row: an empty product (amax refuses the empty dim)
        return (logits @ v).to(out_dtype)
    m = logits.amax(-1, keepdim=True)
    w = torch.exp(logits - m)
    return ((w @ v) / w.sum(-1, keepdim=True)).to(out_dtype)
