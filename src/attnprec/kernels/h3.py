"""H3's built-in implementation under audit: PyTorch, not Triton (H3 has no kernel of its
own), with a declared precision like the Triton kernels'.

:func:`h3_attention` rounds ``shift`` and ``log_decay`` once to the storage dtype (as every
operand of the kernels), computes in float32 (:func:`attnprec.attention.h3_attention`: the
shift convolution in float32, then the chunked gated computation with chunks of
:data:`CHUNK` tokens) and stores the output rounded to nearest even.
"""

from __future__ import annotations

from typing import Any

import torch

from attnprec._validate import check_bool
from attnprec.analysis.precision import Format, Precision, round_to
from attnprec.attention.h3 import H3State
from attnprec.attention.h3 import h3_attention as _h3
from attnprec.kernels._common import KERNEL_DTYPES

__all__ = ["h3_attention", "precision_for", "CHUNK"]

#: Tokens per chunk of the gated computation (the declaration's block).
CHUNK = 64


def precision_for(dtype: torch.dtype, interpreted: bool = False) -> Precision:
    """The declaration of :func:`h3_attention`: storage ``dtype`` for every operand and the
    output, float32 compute and accumulate, round to nearest even at the store, chunks of
    :data:`CHUNK` tokens (span sums of the log-decays inside a chunk, the state between
    chunks), the default elementary model. ``interpreted`` does not change it (no Triton)."""
    if dtype not in KERNEL_DTYPES:
        raise TypeError(f"dtype: kernels take float16, bfloat16 or float32, got {dtype}")
    check_bool("interpreted", interpreted)  # does not change the declaration
    fp32 = Format.of("fp32")
    return Precision(Format.of(dtype), fp32, fp32, "rne", block=CHUNK)


def h3_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    shift: Any,
    log_decay: Any,
    causal: bool = True,
    state: H3State | None = None,
    return_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, H3State]:
    """H3 attention (:func:`attnprec.attention.h3_attention`) under :func:`precision_for`.

    Parameters
    ----------
    q, k, v : torch.Tensor
        float16, bfloat16 or float32 (one dtype, the storage).
    shift, log_decay
        As the method; any float dtype: each is rounded once to the storage dtype.
    causal, state, return_state
        As the method.

    Returns
    -------
    torch.Tensor or (torch.Tensor, H3State)
        ``[..., T, d_v]`` in the storage dtype (and the state, float32).

    Raises
    ------
    TypeError, ValueError
        A dtype other than float16, bfloat16 or float32, or q, k, v of different dtypes;
        the method's errors (each naming the argument).

    Notes
    -----
    Error: within ``attention_error_bound("h3", q, k, v, precision_for(dtype), shift=,
    log_decay=)`` of the exact output on the inputs as given (from the zero state).
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    dtype = q.dtype
    if dtype not in KERNEL_DTYPES:
        raise TypeError(f"q: kernels take float16, bfloat16 or float32, got {dtype}")
    if not (k.dtype == v.dtype == dtype):
        raise TypeError(f"q, k, v: expected one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    fmt = Format.of(dtype)
    params = {}
    for name, x in (("shift", shift), ("log_decay", log_decay)):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"{name}: expected a float tensor, got {type(x).__name__}")
        params[name] = round_to(x.detach().to("cpu", torch.float64), fmt).to(q.device)
    return _h3(
        q, k, v, **params, causal=causal, chunk_size=CHUNK, state=state,
        return_state=return_state,
    )  # fmt: skip
