"""attnprec.kernels: Triton kernels with the signatures of :mod:`attnprec.attention`.

Inputs float16, bfloat16 or float32 (CUDA tensors, or CPU tensors under
``TRITON_INTERPRET=1``); every sum and exp in float32; one rounding at the output store, to
nearest even (bfloat16 rounded explicitly, see :func:`precision_for`). Each module declares
``precision_for(dtype, interpreted)`` and its block sizes for
``attnprec.analysis.bounds.attention_error_bound``; the graphs are in docs/kernels.md.
:func:`decode_step` advances every row of a :class:`KernelState` by one token in one launch
(optionally replayed from a CUDA graph).
"""

from attnprec.kernels._common import KernelState, interpreted, precision_for
from attnprec.kernels.decode import DECODE_KINDS, DecodeGraph, decode_graph, decode_step
from attnprec.kernels.linear import linear_attention
from attnprec.kernels.log import log_attention
from attnprec.kernels.recurrence import linear_recurrence

# The method table's module attnprec.kernels.ssd, loaded here first: its first import sets
# the package's attribute ``ssd`` to the module, which then shadowed the function.
import attnprec.kernels.ssd  # noqa: F401, E402  (isort: skip)
from attnprec.kernels.ssm import selective_scan, ssd  # (after it)
from attnprec.kernels.taylor import polynomial_attention, taylor_attention

__all__ = [
    "KernelState",
    "DECODE_KINDS",
    "DecodeGraph",
    "decode_graph",
    "decode_step",
    "interpreted",
    "precision_for",
    "linear_attention",
    "log_attention",
    "linear_recurrence",
    "selective_scan",
    "ssd",
    "polynomial_attention",
    "taylor_attention",
]
