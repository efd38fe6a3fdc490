"""What every kernel wrapper shares: device and dtype checks, batch flattening, precision."""

from __future__ import annotations

import math
import os

import torch

from attnprec._validate import broadcast_shapes, check_bool, check_float
from attnprec.analysis.precision import Format, Precision

__all__ = [
    "KERNEL_DTYPES",
    "BLOCK",
    "interpreted",
    "check_kernel_tensor",
    "flatten_batch",
    "precision_for",
    "next_pow2",
]

#: Storage dtypes the kernels accept; all accumulate in float32.
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: Tokens per chunk of every attention kernel: their schedule's block (declared in
#: :func:`precision_for`, so the bounds count one state rescaling per chunk).
BLOCK = 32


def interpreted() -> bool:
    """True when Triton runs its CPU interpreter (``TRITON_INTERPRET=1``).

    Returns
    -------
    bool
        Whether ``TRITON_INTERPRET`` is set to a value other than ``""`` or ``"0"`` (read
        at each call).
    """
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_kernel_tensor(name: str, x: object) -> torch.Tensor:
    """Check dtype and device of a kernel operand and return it contiguous.

    Non-contiguous tensors are copied (documented in every kernel): the kernels address rows
    with one stride.

    Raises
    ------
    TypeError
        ``x`` is not a float16/bfloat16/float32 tensor.
    ValueError
        ``x`` is on a device the kernels cannot run on: CUDA is required unless the Triton
        interpreter is enabled, which runs on CPU tensors only.
    """
    x = check_float(name, x)
    if x.dtype not in KERNEL_DTYPES:
        raise TypeError(f"{name}: kernels take float16, bfloat16 or float32, got {x.dtype}")
    if interpreted():
        if x.device.type != "cpu":
            raise ValueError(
                f"{name}: the Triton interpreter (TRITON_INTERPRET=1) runs on CPU tensors, "
                f"got device {x.device}"
            )
    elif x.device.type != "cuda":
        raise ValueError(
            f"{name}: kernels need a CUDA tensor (or TRITON_INTERPRET=1 set before triton is "
            f"imported, for CPU tensors), got device {x.device}"
        )
    return x.contiguous()


def flatten_batch(x: torch.Tensor, batch: torch.Size) -> torch.Tensor:
    """Broadcast ``x [..., n, d]`` to ``batch`` and flatten to a contiguous ``[B, n, d]``."""
    return x.expand(*batch, *x.shape[-2:]).reshape(math.prod(batch), *x.shape[-2:]).contiguous()


def next_pow2(n: int, minimum: int = 16) -> int:
    """Smallest power of two >= max(n, minimum) (tl.dot and tl.arange need powers of two)."""
    p = minimum
    while p < n:
        p *= 2
    return p


def precision_for(dtype: torch.dtype, interpreted: bool) -> Precision:
    """The :class:`~attnprec.analysis.precision.Precision` every kernel here computes in.

    Storage is the input dtype; exp, features and every sum run in float32 (``tl.dot`` with
    ``input_precision="ieee"``, never tf32); the output is rounded once to the storage
    format, to nearest even; the schedule works in chunks of :data:`BLOCK` tokens
    (``block=BLOCK``); exp, log and division follow the default elementary model
    (``ex2.approx``, ``div.full`` on a GPU; NumPy under the interpreter). The Triton
    interpreter's float32->bfloat16 conversion truncates, so the kernels round bfloat16
    outputs explicitly (bit arithmetic, to nearest even) before converting: the store is
    RNE on a GPU and under the interpreter alike, and ``interpreted`` does not change the
    answer (it is part of the contract in docs/internals.md). The feature kernels fold
    their constants (the scale, the coefficients) into the query's features:
    ``constants="folded"``. A sequence continued from a ``state=`` a few tokens per call
    (the decode step) rescales its state at every call, not once per :data:`BLOCK` tokens:
    what it computes over the whole sequence is declared with ``block=1``
    (``dataclasses.replace(precision_for(...), block=1)``, as
    :func:`attnprec.kernels.decode.decode_step` documents); a review's one-token-per-call
    runs stayed within the ``block=BLOCK`` bound with 2.5-10x to spare, which that
    declaration does not promise.

    Parameters
    ----------
    dtype : torch.dtype
        The storage dtype: ``torch.float16``, ``torch.bfloat16`` or ``torch.float32``.
    interpreted : bool
        Whether the Triton interpreter runs (see :func:`interpreted`); checked, but it does
        not change the declaration.

    Returns
    -------
    Precision
        The declaration (a constructor: it computes no numbers); the kernels' error bounds
        are evaluated under it.

    Raises
    ------
    TypeError
        If ``dtype`` is not a kernel dtype or ``interpreted`` not a bool.
    """
    if dtype not in KERNEL_DTYPES:
        raise TypeError(f"dtype: kernels take float16, bfloat16 or float32, got {dtype}")
    check_bool("interpreted", interpreted)  # bfloat16 stores are rounded explicitly, above
    fp32 = Format.of("fp32")
    return Precision(Format.of(dtype), fp32, fp32, "rne", block=BLOCK, constants="folded")


def prepare_qkv(
    q: object, k: object, v: object, causal: bool, names: tuple[str, str, str] = ("q", "k", "v")
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Size]:
    """Validate kernel operands and flatten them to ``[B, n, d]`` with one batch shape.

    Returns ``(q, k, v, batch)`` contiguous, ``batch`` the broadcast leading shape.
    """
    from attnprec._validate import check_qkv

    qq, kk, vv = (check_kernel_tensor(nm, x) for nm, x in zip(names, (q, k, v), strict=True))
    try:
        check_qkv(qq, kk, vv, causal)
    except (TypeError, ValueError) as e:
        msg = str(e)
        for old, new in ((", ".join("qkv"), ", ".join(names)), *zip("qkv", names, strict=True)):
            if msg.startswith(f"{old}:"):
                msg = new + msg[len(old) :]
                break
        raise type(e)(msg) from None
    batch = broadcast_shapes(qq.shape[:-2], kk.shape[:-2], vv.shape[:-2])
    return flatten_batch(qq, batch), flatten_batch(kk, batch), flatten_batch(vv, batch), batch


class KernelState:
    """Causal state of a kernel after some tokens: float32 tensors, flattened over the batch.

    Pass it back as ``state=`` (with ``causal=True``) to continue the sequence, or to
    :func:`attnprec.kernels.decode_step` to advance every row by one token in one launch.
    The tensors are updated in place by either. ``cache`` holds what ``decode_step`` keeps
    with the state (its plan, captured CUDA graphs).
    """

    def __init__(self, kind: str, tensors: tuple[torch.Tensor, ...], batch: torch.Size, key: tuple):
        self.kind = kind
        self.tensors = tensors
        self.batch = batch
        self.key = key  # sizes/parameters that must match the next call
        # what decode_step keeps with the state: feature tables, captured CUDA graphs
        self.cache: dict = {}

    def clone(self) -> KernelState:
        """An independent copy (the tensors cloned; no cached decode graphs)."""
        return KernelState(self.kind, tuple(t.clone() for t in self.tensors), self.batch, self.key)

    def nbytes(self) -> int:
        """Bytes of the state tensors (what a decode step reads and writes back)."""
        return sum(t.numel() * t.element_size() for t in self.tensors)

    def check(self, kind: str, batch: torch.Size, key: tuple) -> tuple[torch.Tensor, ...]:
        """Return the tensors if this state continues a ``kind`` call with ``batch``/``key``."""
        if self.kind != kind:
            raise ValueError(f"state: comes from a {self.kind!r} kernel, not {kind!r}")
        if self.batch != batch or self.key != key:
            raise ValueError(
                f"state: made for batch {tuple(self.batch)} and sizes {self.key}, "
                f"got batch {tuple(batch)} and sizes {key}"
            )
        return self.tensors


def finish(
    y: torch.Tensor,
    kind: str,
    tensors: tuple[torch.Tensor, ...],
    batch: torch.Size,
    key: tuple,
    return_state: bool,
) -> torch.Tensor | tuple[torch.Tensor, KernelState]:
    """Restore the batch dims of the flattened output ``y``; with the state if requested."""
    y = y.reshape(*batch, *y.shape[-2:])
    return (y, KernelState(kind, tensors, batch, key)) if return_state else y


def check_state_args(causal: bool, state: object, return_state: bool) -> None:
    """``state``/``return_state`` only make sense for the causal form."""
    check_bool("causal", causal)
    check_bool("return_state", return_state)
    if (state is not None or return_state) and not causal:
        raise ValueError("state: state and return_state require causal=True")
    if state is not None and not isinstance(state, KernelState):
        raise TypeError(f"state: expected a KernelState, got {type(state).__name__}")


#: Causal prefill of few sequences: with fewer than TARGET_PROGRAMS batch rows, each
#: sequence is cut into segments of at least SEG_MIN_CHUNKS chunks that run in parallel,
#: their starting states combined from the segments' key totals (docs/kernels.md); the
#: per-segment float32 buffers stay within SEG_BYTES.
TARGET_PROGRAMS = 256
SEG_MIN_CHUNKS = 8
SEG_BYTES = 2**30


def segments(nb: int, n: int, block: int, elems: int, most: int = TARGET_PROGRAMS) -> int:
    """Segments per sequence (1: one program walks all chunks) for ``nb`` sequences of
    ``n`` tokens in chunks of ``block``, ``elems`` float32 buffer elements per segment,
    at most ``most`` segments."""
    if nb >= TARGET_PROGRAMS:
        return 1
    by_len = n // (block * SEG_MIN_CHUNKS)
    by_mem = SEG_BYTES // (4 * nb * max(elems, 1))
    return max(1, min(TARGET_PROGRAMS // nb, most, by_len, by_mem))
