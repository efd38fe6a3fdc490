"""Argument checks private to ``lognum`` (the layer imports nothing else of ours)."""

from __future__ import annotations

import numpy as np
import torch

#: Every lognum computation runs in float64 and rounds once to the output dtype.
COMPUTE = torch.float64


#: The smallest float64 subnormal and 1, as module globals: a product of literals would be
#: folded when the module compiles, not computed under the caller's floating-point mode.
_TINY, _ONE = 5e-324, 1.0
#: Whether torch's worker threads keep subnormals, per thread count (a thread's
#: floating-point mode is fixed when it is created, from its creator's).
_WORKERS_OK: dict[int, bool] = {}


def _workers_keep_subnormals() -> bool:
    # an elementwise pass and a product, each large enough to run on every thread
    n = 2 * 32768 * torch.get_num_threads()
    ok = bool((torch.full((n,), 2.0**-1070, dtype=torch.float64) * 1.0).ne(0).all())
    a = torch.full((256, 256), 2.0**-1070, dtype=torch.float64)
    return ok and bool((a @ torch.eye(256, dtype=torch.float64)).ne(0).all())


def check_gradual_underflow(fresh: bool = False) -> None:
    """Raise ``RuntimeError`` if subnormal numbers are flushed to zero in this thread or
    in torch's worker threads (``torch.set_flush_denormal(True)``).

    Every guarantee of this library (certified radii, sound bounds, the log-space
    primitives' accuracy) assumes IEEE gradual underflow; under the mode, subnormal inputs
    read as zero, and the caller's tensors keep values the library's work no longer sees.
    Worker threads keep the mode they were created with, so the mode is probed there too:
    once per thread count, or afresh (``fresh``: the certified references and bounds, at a
    millisecond or so; a pool grown under the mode and shrunk back keeps its count, a
    review)."""
    threads = torch.get_num_threads()
    ok = _TINY * _ONE != 0.0
    if ok and (fresh or threads not in _WORKERS_OK):
        _WORKERS_OK[threads] = _workers_keep_subnormals()
    if not (ok and _WORKERS_OK[threads]):
        if ok:
            # the main thread may have been switched back; the workers were not: re-probe
            # next time (after torch.set_num_threads, which may start new workers)
            del _WORKERS_OK[threads]
        raise RuntimeError(
            "torch.set_flush_denormal(True) is in effect: subnormal numbers are flushed to "
            "zero, and attnprec's certified radii and bounds assume IEEE gradual underflow. "
            "Call torch.set_flush_denormal(False) before attnprec (torch's worker threads "
            "keep the mode they were started with: if they were started under it, also "
            "call torch.set_num_threads(1))"
        )


def check_float(name: str, x: object) -> torch.Tensor:
    """Return ``x`` if it is a real floating-point tensor with values, else raise
    ``TypeError`` (``ValueError`` for one on the meta device) naming it; and
    :func:`check_gradual_underflow`, which every guarantee needs."""
    check_gradual_underflow()
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
