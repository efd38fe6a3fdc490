"""Argument handling shared by the attention methods (dtypes, state arguments, normalizers)."""

from __future__ import annotations

import torch

from attnprec._validate import broadcast_shapes, check_bool, check_int, check_qkv, compute_dtype

__all__ = [
    "prepare",
    "check_state_args",
    "check_state",
    "check_chunk_size",
    "guard_normalizer",
    "lower_mask",
    "DEFAULT_CHUNK",
]

#: Tokens per chunk in the chunked (parallel) forms; only the rounding depends on it.
DEFAULT_CHUNK = 64


def lower_mask(n: int, diagonal: int = 0, device: torch.device | None = None) -> torch.Tensor:
    """``[n, n]`` bool, True where ``j <= i + diagonal`` (key j visible to query i).

    Built by comparison: ``torch.tril`` is orders of magnitude slower on small CPU tensors,
    which dominates the one-token-per-call recurrence.
    """
    i = torch.arange(n, device=device)
    return i.unsqueeze(-1) + diagonal >= i


def prepare(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.dtype]:
    """Validate ``q, k, v`` and return them in the compute dtype, with the output dtype.

    float64/float32 compute in their own dtype; float16/bfloat16 in float32 (returned in
    the input dtype by the caller).
    """
    check_qkv(q, k, v, causal)
    cd = compute_dtype(q)
    return q.to(cd), k.to(cd), v.to(cd), q.dtype


def empty_result(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out_dtype: torch.dtype,
    state: object,
    return_state: bool,
    batch: tuple[int, ...] | None = None,
) -> torch.Tensor | tuple[torch.Tensor, object]:
    """The result for no queries: an empty ``[..., 0, d_v]`` output (and the carried state
    unchanged). Without ``state=`` there is no state to return: an error naming it.
    ``batch``: the batch dims when parameters add to those of ``q, k, v``."""
    if batch is None:
        batch = broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    y = torch.zeros(*batch, 0, v.shape[-1], dtype=out_dtype, device=q.device)
    if not return_state:
        return y
    if state is None:
        raise ValueError(
            "state: an empty sequence has no state of its own; pass the state to carry "
            "(state=) or at least one token"
        )
    return y, state


def check_state_args(causal: bool, state: object, return_state: bool) -> None:
    """The recurrent form is the causal one: ``state``/``return_state`` need ``causal=True``
    (``return_state`` a bool: ``"no"`` returned a state, a review)."""
    check_bool("return_state", return_state)
    if (state is not None or return_state) and not causal:
        raise ValueError("state: carrying a state (state= or return_state=True) needs causal=True")


def check_state(
    state: object,
    cls: type,
    kind: str,
    dtype: torch.dtype,
    note: str = "",
    **shapes: tuple[int, ...],
) -> None:
    """Raise an error naming ``state`` unless it is a ``cls`` (``kind``: "a SelectiveScanState")
    whose tensor fields ``shapes`` (field name -> expected shape; ``note`` says where that
    shape comes from) have those shapes and ``dtype`` (the compute dtype)."""
    if not isinstance(state, cls):
        raise TypeError(f"state: expected {kind}, got {type(state).__name__}")
    for name, shape in shapes.items():
        got = getattr(state, name)
        if tuple(got.shape) != shape:
            raise ValueError(
                f"state: expected {name} of shape {shape}{note}, got {tuple(got.shape)}"
            )
    for name in shapes:
        got = getattr(state, name)
        if got.dtype != dtype:
            raise TypeError(f"state: expected {name} of dtype {dtype}, got {got.dtype}")


def check_chunk_size(chunk_size: object) -> int:
    """Return ``chunk_size`` as a positive int."""
    return check_int("chunk_size", chunk_size, 1)


def guard_normalizer(den: torch.Tensor, name: str, reason: str, allow_nonpositive: bool) -> None:
    """Raise ``ValueError`` naming ``name`` if a normalizer is ``<= 0`` (NaN passes through).

    A normalizer that vanishes or turns negative makes the quotient meaningless (inf, or
    weights of the wrong sign); ``allow_nonpositive=True`` returns the raw quotient instead.
    """
    if check_bool("allow_nonpositive", allow_nonpositive):
        return
    bad = den <= 0
    if bool(bad.any()):
        raise ValueError(
            f"{name}: the normalizer sum_j w_ij is <= 0 for {int(bad.sum())} output row(s) "
            f"({reason}); pass allow_nonpositive=True to get the raw quotient (inf/NaN/"
            "sign-flipped rows)"
        )
