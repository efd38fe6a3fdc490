"""Where the float64 references and the bounds compute: on the CUDA device that holds the
inputs, else on the CPU.

Their radius and bound rules assume of float64 only what CUDA's arithmetic also gives:
correctly rounded + - * / sqrt with gradual underflow; products, sums and prefix sums in
any order (cuBLAS, CUDA's reductions and scans form each result as some tree of its terms,
and where a rule counts a depth, the code fixes the order itself); exp, expm1, log, log1p
within 1 ulp (CUDA C++ Programming Guide, "Mathematical Functions"; the rules assume 2 ulps
of exp). tests/test_devices.py measures the functions there and tests/test_device_path.py
compares the results with the CPU's.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any

import torch

#: Row and key blocks are this many times larger on a GPU: a block's ~100 elementwise
#: passes are launches there, and a few hundred MB per temporary is little on such a device.
GPU_BLOCKS = 64
_SCALE = contextvars.ContextVar("attnprec_block_scale", default=1)
CPU = torch.device("cpu")


def work_device(x: Any) -> torch.device:
    """The device the references and bounds of inputs like ``x`` compute on: ``x``'s when
    it is a CUDA tensor, else the CPU."""
    if isinstance(x, torch.Tensor) and x.device.type == "cuda":
        return x.device
    return CPU


@contextlib.contextmanager
def computing_on(device: torch.device) -> Iterator[torch.device]:
    """On a CUDA device, new tensors default to ``device`` (``torch.device`` as a context)
    and the blocks of :func:`scaled` grow; on the CPU nothing changes (the CPU is torch's
    default, and the context's function mode would cost every small operation a Python
    call) unless it is nested in a CUDA computation. Nested calls take the innermost
    device."""
    cuda = device.type == "cuda"
    token = _SCALE.set(GPU_BLOCKS if cuda else 1)
    # (the CPU inside a CUDA computation takes the context back)
    ctx = cuda or torch.get_default_device().type != "cpu"
    try:
        with torch.device(device) if ctx else contextlib.nullcontext():
            yield device
    finally:
        _SCALE.reset(token)


def here() -> torch.device:
    """The device computing now: a CUDA device inside :func:`computing_on` one, else the
    CPU (torch's default device)."""
    return torch.get_default_device()


def scaled(elements: int) -> int:
    """A block budget of ``elements`` (tuned for the CPU) for the device computing now."""
    return elements * _SCALE.get()
