"""Argument checks private to ``lognum`` (the layer imports nothing else of ours)."""

from __future__ import annotations

import numpy as np
import torch

#: Every lognum computation runs in float64 and rounds once to the output dtype.
COMPUTE = torch.float64


def check_float(name: str, x: object) -> torch.Tensor:
    """Return ``x`` if it is a real floating-point tensor with values, else raise
    ``TypeError`` (``ValueError`` for one on the meta device) naming it."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.is_complex() or not x.is_floating_point():
        raise TypeError(f"{name}: expected a real floating-point tensor, got dtype {x.dtype}")
    if x.is_meta:
        raise ValueError(f"{name}: a tensor on device meta holds no values")
    return x


def check_bool(name: str, x: object) -> bool:
    """Return ``x`` if it is a bool, else raise ``TypeError`` naming it (a string such as
    ``"False"`` is truthy: it must not pass as True; NumPy's ``bool_`` and a one-element
    ``torch.bool`` tensor are taken)."""
    if isinstance(x, torch.Tensor) and x.dtype == torch.bool and x.numel() == 1:
        return bool(x)
    if not isinstance(x, (bool, np.bool_)):
        raise TypeError(f"{name}: expected a bool, got {type(x).__name__}")
    return bool(x)


def out_dtype(*xs: torch.Tensor) -> torch.dtype:
    """The promoted floating dtype of the inputs: the dtype results are returned in."""
    dt = xs[0].dtype
    for x in xs[1:]:
        dt = torch.promote_types(dt, x.dtype)
    return dt


def broadcast_shapes(*shapes: tuple[int, ...] | torch.Size) -> torch.Size:
    """``torch.broadcast_shapes`` (raising ``RuntimeError`` likewise) without its first
    call's cost: torch 2.13 imports ``torch.fx``'s symbolic shapes there, 0.5-0.8 s."""
    try:
        return torch.Size(np.broadcast_shapes(*(tuple(s) for s in shapes)))
    except ValueError as e:
        raise RuntimeError(str(e)) from None


def broadcast(names: tuple[str, ...], *xs: torch.Tensor) -> list[torch.Tensor]:
    """Broadcast tensors, raising ``ValueError`` naming the first one that does not fit."""
    shape = xs[0].shape
    for name, x in zip(names[1:], xs[1:], strict=True):
        try:
            shape = broadcast_shapes(shape, x.shape)
        except RuntimeError:
            raise ValueError(
                f"{name}: shape {tuple(x.shape)} does not broadcast with {tuple(shape)}"
            ) from None
    return [x.broadcast_to(shape) for x in xs]


def check_dim(name: str, dim: object, ndim: int) -> int:
    """Normalize a dimension index, raising ``TypeError``/``ValueError`` naming it."""
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"{name}: expected an int, got {type(dim).__name__}")
    nd = max(ndim, 1)
    if not -nd <= dim < nd:
        raise ValueError(f"{name}: {dim} is out of range for a tensor with {ndim} dimensions")
    return dim % nd
