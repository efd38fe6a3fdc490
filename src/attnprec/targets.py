"""PyTorch's own attention kernels as audit targets.

Each *target* is a name (``"torch:sdpa"``, ``"torch:sdpa-math"``, ...) for one of
PyTorch's attention implementations, wrapped as a function with the audit signature
``fn(q, k, v, *, causal=False, scale=None)`` of method ``"softmax"``, together with the
:class:`~attnprec.analysis.precision.Precision` it declares (:func:`precision_for`). The
audit checks the declaration; it does not trust it: a declaration tighter than what the
backend does is caught as *violated* elements (tests/test_targets.py shows one).

The table (:data:`TARGETS`, :func:`table`) is torch-free, so the command's ``--help`` can
list it without importing torch; torch is imported on first use.

Where the declarations come from (docs/pytorch_kernels.md has the numbers): on the CPU,
:func:`attnprec.analysis.fingerprint.infer_precision` over the six input families, fp32,
fp16 and bf16 storage, sizes n = 16 to 1024, plain and causal, with the schedules one pass,
the kernel's block and any; each CPU declaration is the tightest one met on every case,
read against the kernel's source for what the fingerprint cannot see (the accuracy of
``exp``, the block size). The CUDA declarations (flash, memory-efficient, cuDNN, the Triton
FlexAttention kernel) are *unmeasured* (no GPU was lent): they are read from the kernels'
sources and chosen loose where the source leaves room (any schedule, ``block=None``);
``benchmarks/pytorch_kernels.py --device cuda`` measures them.
"""

from __future__ import annotations

import contextlib
import functools
import shutil
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from attnprec.analysis.precision import Format, Precision

__all__ = [
    "Target",
    "TARGETS",
    "NAMES",
    "target",
    "precision_for",
    "available",
    "table",
    "CPU_FLASH_BLOCK",
    "CPU_FLEX_BLOCK",
    "CPU_FLASH_EXP_ULP",
]

#: Keys per block of PyTorch's CPU flash-attention kernel (``kv_split_size`` in
#: aten/src/ATen/native/cpu/FlashAttentionKernel.cpp, the same for every query split):
#: the running maximum and the accumulators are rescaled once per 512 keys.
CPU_FLASH_BLOCK = 512

#: Keys per block of Inductor's CPU FlexAttention kernel with the default options: the block
#: mask's KV block (``create_block_mask``'s ``BLOCK_SIZE`` = 128; one block of all keys
#: without a mask) and, on its decoding path, ``PARTITION_SIZE`` = 128
#: (torch/_inductor/codegen/cpp_flex_attention_template.py).
CPU_FLEX_BLOCK = 128

#: ``exp`` of the CPU flash and flex kernels, in ulps of float32 (``|err| <= 2 k u |f|``):
#: ``Vectorized<float>::exp_u20``, a degree-5 polynomial after a reduction by a float32
#: ln 2. Measured through the flash kernel (``benchmarks/pytorch_kernels.py``, AVX-512): at
#: most 3.8 ulp over 379 154 arguments in [-86.98, -17.5], 1.7 ulp where the reduction adds
#: < 0.5 (it adds ``|n| |ln 2 - fl(ln 2)| / (2u) <= 2.0`` ulp at ``|n| <= 126``). Declared
#: 5: the default model's 4 would leave 5 % of margin. Below -86.99 it returns 0 (results
#: up to 1.41 times the smallest normal, where the model allows one smallest normal per
#: ``exp``): an excess below ``2^-127`` per weight, not covered by the model.
CPU_FLASH_EXP_ULP = 5.0


@dataclass(frozen=True)
class Target:
    """One PyTorch attention implementation under a name.

    Attributes
    ----------
    name : str
        ``"torch:..."``, as given to :func:`target` and ``attnprec audit --kernel``.
    backend : str
        ``"default"`` (PyTorch chooses), ``"math"``, ``"flash"``, ``"efficient"``,
        ``"cudnn"``, ``"flex"`` (compiled) or ``"flex-eager"``.
    devices : tuple of str
        Where PyTorch has a kernel for it (``"cpu"``, ``"cuda"``).
    summary : str
        One line for ``--help`` and the docs.
    """

    name: str
    backend: str
    devices: tuple[str, ...]
    summary: str


#: The targets by name (torch-free: the command lists them in ``--help``).
TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target(
            "torch:sdpa",
            "default",
            ("cpu", "cuda"),
            "F.scaled_dot_product_attention, backend chosen by PyTorch",
        ),
        Target("torch:sdpa-math", "math", ("cpu", "cuda"), "SDPA math backend (composite ops)"),
        Target(
            "torch:sdpa-flash",
            "flash",
            ("cpu", "cuda"),
            "SDPA flash backend (FlashAttention-2 on CUDA, PyTorch's flash kernel on the CPU)",
        ),
        Target(
            "torch:sdpa-efficient",
            "efficient",
            ("cuda",),
            "SDPA memory-efficient backend (CUTLASS, CUDA only)",
        ),
        Target("torch:sdpa-cudnn", "cudnn", ("cuda",), "SDPA cuDNN backend (CUDA only)"),
        Target(
            "torch:flex",
            "flex",
            ("cpu", "cuda"),
            "FlexAttention compiled by torch.compile (Inductor's fused kernel)",
        ),
        Target(
            "torch:flex-eager",
            "flex-eager",
            ("cpu", "cuda"),
            "FlexAttention without torch.compile (its unfused reference path)",
        ),
    )
}

#: The target names, in table order.
NAMES: tuple[str, ...] = tuple(TARGETS)


def table() -> str:
    """The targets, one per line: ``name  devices  summary`` (for ``--help`` and the docs)."""
    width = max(len(n) for n in NAMES)
    return "\n".join(
        f"{t.name:<{width}}  {'+'.join(t.devices):<8}  {t.summary}" for t in TARGETS.values()
    )


def _record(name: object) -> Target:
    if not isinstance(name, str) or name not in TARGETS:
        raise ValueError(f"name: unknown PyTorch target {name!r}; expected one of {NAMES}")
    return TARGETS[name]


def _default_device() -> str:
    """The device the command runs kernels on (:mod:`attnprec.runner`): CUDA when present."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _device_type(device: Any) -> str:
    import torch

    if device is None:
        return _default_device()
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError):
        raise ValueError(f"device: expected a torch device, got {device!r}") from None
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"device: targets run on 'cpu' or 'cuda', got {device!r}")
    return kind


# --------------------------------------------------------------------------------------------
# Availability


def available(name: str, device: Any = None) -> tuple[bool, str]:
    """Whether target ``name`` can run on ``device`` here, and why not.

    Parameters
    ----------
    name : str
        A target name (:data:`NAMES`).
    device : torch.device or str, optional
        Default: CUDA when present, else the CPU (where ``attnprec audit`` runs kernels).

    Returns
    -------
    (bool, str)
        ``(True, "")``, or ``(False, reason)`` naming the backend and what is missing. For
        the SDPA backends the answer comes from a one-element call of the backend itself
        (cached), so it reflects this build of torch and this machine.

    Raises
    ------
    ValueError
        Naming ``name`` (with the valid names) or ``device``.
    """
    rec = _record(name)
    dev = _device_type(device)
    return _available(rec.name, dev)


@functools.cache
def _available(name: str, dev: str) -> tuple[bool, str]:
    import torch

    rec = TARGETS[name]
    if dev == "cuda" and not torch.cuda.is_available():
        return False, (
            f"{name}: the {rec.backend} backend needs CUDA, and torch.cuda.is_available() is "
            f"False (torch {torch.__version__}): no GPU here"
        )
    if dev not in rec.devices:
        where = "CUDA only" if rec.devices == ("cuda",) else "/".join(rec.devices)
        extra = "" if torch.cuda.is_available() else "; no GPU here"
        return False, (
            f"{name}: the {rec.backend} backend has no {dev.upper()} kernel in torch "
            f"{torch.__version__} ({where}{extra})"
        )
    if rec.backend == "flex":
        if dev == "cpu" and not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
            return False, f"{name}: torch.compile on the CPU needs a C++ compiler (none on PATH)"
        return True, ""
    if rec.backend in ("default", "math", "flex-eager"):
        return True, ""
    # Probe the backend itself, on a shape every fused kernel takes (16 tokens, head size
    # 64, fp16 on CUDA): torch's own checks then say why it cannot run.
    x = torch.zeros(1, 1, 16, 64, device=dev, dtype=torch.float16 if dev == "cuda" else None)
    try:
        _sdpa_call(name, rec.backend, x, x, x, causal=False, scale=None)
    except RuntimeError as e:
        return False, str(e)
    return True, ""


# --------------------------------------------------------------------------------------------
# The functions


def target(name: str) -> Callable[..., Any]:
    """The function of target ``name``, with the audit signature of method ``"softmax"``.

    Parameters
    ----------
    name : str
        One of :data:`NAMES` (``attnprec audit --help`` lists them).

    Returns
    -------
    callable
        ``fn(q, k, v, *, causal=False, scale=None)``: softmax attention of ``q [..., n_q,
        d_k]``, ``k [..., n_k, d_k]``, ``v [..., n_k, d_v]`` (one dtype, broadcastable batch
        dimensions) computed by the target's PyTorch kernel on the inputs' device, returned
        as ``[..., n_q, d_v]`` in the inputs' dtype. Its error is bounded by
        :func:`attnprec.analysis.bounds.attention_error_bound` under the declaration
        ``precision_for(name, q.dtype, q.device)``: the contract that
        :func:`attnprec.analysis.audit.audit` checks, element by element. ``causal`` masks
        keys after the query (``n_q == n_k``); ``scale`` defaults to ``1/sqrt(d_k)``. Inputs
        are laid out as ``[batch, heads, n, d]`` for PyTorch (a 2-D input is one head, a 3-D
        input's leading dimension is the heads), as models call it, so PyTorch's backend
        choice and blocking are those a model gets.

    Raises
    ------
    ValueError
        Naming ``name`` when it is not a target (the message lists the valid names).
    RuntimeError
        When the target cannot run on the device the command uses here (CUDA when present,
        else the CPU), naming the backend and why (:func:`available`). The function itself
        raises ``RuntimeError`` naming the backend when given inputs it cannot run (another
        device, a dtype or head size the kernel does not take), with PyTorch's reasons; and
        ``TypeError``/``ValueError`` naming ``q``, ``k``, ``v``, ``causal`` or ``scale`` for
        bad operands.
    """
    rec = _record(name)
    ok, why = _available(rec.name, _default_device())
    if not ok:
        raise RuntimeError(why)
    return _FUNCTIONS[rec.name]


def _make(name: str) -> Callable[..., Any]:
    backend = TARGETS[name].backend

    def fn(q: Any, k: Any, v: Any, *, causal: bool = False, scale: Any = None) -> Any:
        return _run(name, backend, q, k, v, causal=causal, scale=scale)

    fn.__name__ = fn.__qualname__ = name
    fn.__doc__ = f"{TARGETS[name].summary} (target {name!r}; see attnprec.targets.target)."
    return fn


_FUNCTIONS: dict[str, Callable[..., Any]] = {n: _make(n) for n in NAMES}


def _run(name: str, backend: str, q: Any, k: Any, v: Any, *, causal: Any, scale: Any) -> Any:
    from attnprec._validate import broadcast_shapes, check_qkv, resolve_scale

    n_q, n_k, d_k, d_v = check_qkv(q, k, v, causal)
    s = resolve_scale(scale, d_k)  # checked here; None stays None for torch (same default)
    batch = tuple(broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2]))
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v: expected one device, got {q.device}, {k.device}, {v.device}")
    dev = q.device.type
    if dev not in TARGETS[name].devices:
        raise RuntimeError(_available(name, dev)[1] or f"{name}: cannot run on {q.device}")
    out_shape = (*batch, n_q, d_v)
    if n_q == 0 or d_v == 0 or any(b == 0 for b in batch):
        return q.new_empty(out_shape)
    # PyTorch's kernels take [batch, heads, n, d]: a model's layout picks their fast paths.
    heads = batch[-1] if batch else 1
    q4, k4, v4 = (
        x.expand(*batch, *x.shape[-2:]).reshape(-1, heads, *x.shape[-2:]) for x in (q, k, v)
    )
    scale_arg = None if scale is None else s
    if backend in ("flex", "flex-eager"):
        out = _flex_call(name, backend, q4, k4, v4, causal=causal, scale=scale_arg)
    else:
        out = _sdpa_call(name, backend, q4, k4, v4, causal=causal, scale=scale_arg)
    return out.reshape(out_shape)


_SDPA_BACKENDS = {
    "math": "MATH",
    "flash": "FLASH_ATTENTION",
    "efficient": "EFFICIENT_ATTENTION",
    "cudnn": "CUDNN_ATTENTION",
}


@contextlib.contextmanager
def _explained(name: str, backend: str, q: Any) -> Iterator[None]:
    """Turn torch's "No available kernel" into a RuntimeError naming the backend, with the
    reasons torch gives as warnings; other warnings are passed on."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        except RuntimeError as e:
            reasons = [str(w.message).strip() for w in caught]
            detail = "; ".join([str(e).strip(), *reasons])
            raise RuntimeError(
                f"{name}: the {backend} backend cannot run these inputs ({q.device.type}, "
                f"{q.dtype}, [batch, heads, n, d] = {list(q.shape)}): {detail}"
            ) from None
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def _sdpa_call(name: str, backend: str, q: Any, k: Any, v: Any, *, causal: bool, scale: Any) -> Any:
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    ctx: Any = contextlib.nullcontext()
    if backend != "default":
        ctx = sdpa_kernel([getattr(SDPBackend, _SDPA_BACKENDS[backend])])
    with _explained(name, backend, q), ctx:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)


def _causal_mod(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
    return q_idx >= kv_idx


@functools.cache
def _compiled_flex() -> Any:
    import torch
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


def _flex_call(name: str, backend: str, q: Any, k: Any, v: Any, *, causal: bool, scale: Any) -> Any:
    import torch
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    mask = None
    if causal:
        n_q, n_k = q.shape[-2], k.shape[-2]
        mask = create_block_mask(_causal_mod, None, None, n_q, n_k, device=q.device)
    if backend == "flex-eager":
        with warnings.catch_warnings():
            # the eager path is the point of this target: its "use torch.compile" advice
            warnings.filterwarnings("ignore", message=".*without torch.compile.*")
            with _explained(name, backend, q):
                return flex_attention(q, k, v, block_mask=mask, scale=scale)
    # Each new shape, dtype or mask may recompile. Never let Dynamo fall back to eager past
    # its recompile limit (8): the audit would check the unfused path under this name.
    with (
        torch._dynamo.config.patch(recompile_limit=1024, fail_on_recompile_limit_hit=True),
        _explained(name, backend, q),
    ):
        return _compiled_flex()(q, k, v, block_mask=mask, scale=scale)


# --------------------------------------------------------------------------------------------
# Declarations


def precision_for(name: str, dtype: Any, device: Any = None) -> Precision:
    """The :class:`~attnprec.analysis.precision.Precision` target ``name`` declares.

    Parameters
    ----------
    name : str
        A target name (:data:`NAMES`).
    dtype : torch.dtype or str
        The storage dtype of the inputs: float16, bfloat16 or float32 (or ``"fp16"``,
        ``"bf16"``, ``"fp32"``).
    device : torch.device or str, optional
        Where the kernel runs (default: CUDA when present, else the CPU, as ``attnprec
        audit`` does). The CPU and CUDA kernels of one backend differ.

    Returns
    -------
    Precision
        Storage ``dtype``; compute, accumulate, block and elementary model as the backend
        does them under the current global settings (``torch.get_float32_matmul_precision``,
        ``torch.backends.cuda.matmul.allow_tf32``, the reduced-precision reduction flags and
        ``torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp``). Every output element
        of ``target(name)`` is within :func:`~attnprec.analysis.bounds.attention_error_bound`
        for this declaration: the contract the audit checks. CPU declarations are the
        tightest met by the fingerprints of docs/pytorch_kernels.md (n up to 1024); CUDA
        declarations are read from the kernels' sources and *unmeasured*.

        CPU, by backend (fp16/bf16 storage; fp32 storage computes in fp32):

        - ``math``: q, k, v converted to fp32 first (PyTorch keeps fp16/bf16 only under
          ``allow_fp16_bf16_reduction_math_sdp``), ``torch.softmax`` takes the row maximum
          first: ``compute=fp32, accumulate=fp32, block=ONE_PASS``; the output rounds once.
        - ``flash``: scores and sums in fp32, the weights rounded to the storage format
          before the weights @ v product, one rescaling per :data:`CPU_FLASH_BLOCK` keys, a
          fast ``exp`` (:data:`CPU_FLASH_EXP_ULP`): ``compute=storage, accumulate=fp32,
          block=512, exp 5 ulp`` (``block_sums="any"``: each block's weights @ v is a
          GEMM that adds into the running output, ``beta = 1``).
        - ``flex-eager``: fp32 scores and softmax (row maximum first), the weights rounded to
          the storage format and multiplied by v in that format with fp32 sums (CPU matmul):
          ``compute=storage, accumulate=fp32, block=ONE_PASS``.
        - ``flex``: Inductor's CPU kernel, built like the flash kernel (fp32 scores and sums,
          weights in the storage format, the same fast ``exp``) with one rescaling per
          block-mask block: ``compute=storage, accumulate=fp32, block=128, exp 5 ulp``
          (:data:`CPU_FLEX_BLOCK`).
        - ``default``: the looser of flash and math, either of which PyTorch may pick.
        - every CPU kernel divides once by its normalizer: ``sums="linear"``.
        - every backend keeps ``constants="any"``: the math backend multiplies q and k by
          ``sqrt(scale)`` each (its outputs match that form exactly), the others are not
          read for where they apply the scale.

        CUDA (unmeasured): ``flash``, ``efficient``, ``cudnn`` and ``flex`` accumulate in fp32
        and round the weights to the storage format before the weights @ v product, with
        online rescaling per key tile: ``compute=storage, accumulate=fp32, block=None`` (any
        tile size) and ``sums=None`` (FlashAttention's split-KV kernel normalizes each split
        and combines the splits at once through their log-sum-exps); fp32 storage (efficient, flex)
        declares ``compute=tf32`` (tensor-core products); ``math`` as on the CPU with cuBLAS;
        ``default`` the loosest of those that take the dtype.

    Raises
    ------
    ValueError
        Naming ``name`` (with the valid names), ``dtype`` (a dtype the targets are not
        declared for, or that the backend does not take on that device, e.g. fp32 for CUDA
        flash) or ``device``.
    """
    from attnprec.analysis.precision import Format

    rec = _record(name)
    dev = _device_type(device)
    try:
        fmt = Format.of(dtype)
    except (TypeError, ValueError):
        fmt = None
    if fmt is None or fmt.name not in ("fp16", "bf16", "fp32"):
        raise ValueError(f"dtype: targets declare float16, bfloat16 or float32, got {dtype!r}")
    if dev not in rec.devices:
        raise ValueError(f"device: {name} has no {dev} kernel (runs on {', '.join(rec.devices)})")
    if rec.backend == "default":
        choices = ("flash", "math") if dev == "cpu" else ("flash", "efficient", "cudnn", "math")
        precs = [_declare(b, fmt, dev) for b in choices if _takes(b, fmt, dev)]
        return functools.reduce(_looser, precs)
    if not _takes(rec.backend, fmt, dev):
        raise ValueError(f"dtype: the {rec.backend} backend on {dev} does not take {fmt.name}")
    return _declare(rec.backend, fmt, dev)


def _takes(backend: str, fmt: Format, dev: str) -> bool:
    """Whether the backend's kernel takes this storage format on this device."""
    return not (dev == "cuda" and backend in ("flash", "cudnn") and fmt.name == "fp32")


def _f32_matmul(dev: str) -> str:
    """The format fp32 matrix products really use under torch's global settings."""
    import torch

    level = torch.get_float32_matmul_precision()
    if level == "medium":
        return "bf16"  # CPU: oneDNN's bf16 path (bf32); CUDA: tf32 or bf16 (the looser)
    if level == "high" or (dev == "cuda" and torch.backends.cuda.matmul.allow_tf32):
        return "tf32"
    return "fp32"


def _reduced_reduction(fmt: Format, dev: str) -> bool:
    """Whether cuBLAS may reduce fp16/bf16 products in that format (split-K)."""
    import torch

    if dev != "cuda" or fmt.name == "fp32":
        return False
    m = torch.backends.cuda.matmul
    flag = f"allow_{fmt.name}_reduced_precision_reduction"
    return bool(getattr(m, flag, True))  # unknown to this torch: assume it may


def _declare(backend: str, fmt: Format, dev: str) -> Precision:
    import torch

    from attnprec.analysis.precision import ELEMENTARY, ONE_PASS, Elementary, Format, Precision

    reduced = fmt.name in ("fp16", "bf16")
    f32 = _f32_matmul(dev)
    # the format weights (and, for fp32 storage, every product) are computed in
    storage_or_f32 = fmt.name if reduced else f32
    if backend == "math":
        if reduced and torch.backends.cuda.fp16_bf16_reduction_math_sdp_allowed():
            # plain PyTorch ops on fp16/bf16 tensors: opmath (fp32) sums inside each op
            acc = fmt.name if _reduced_reduction(fmt, dev) else "fp32"
            return Precision(fmt, fmt, Format.of(acc), block=ONE_PASS, sums="linear")
        return Precision(fmt, Format.of(f32), Format.of("fp32"), block=ONE_PASS, sums="linear")
    if backend == "flex-eager":
        acc = fmt.name if _reduced_reduction(fmt, dev) else "fp32"
        return Precision(
            fmt, Format.of(storage_or_f32), Format.of(acc), block=ONE_PASS, sums="linear"
        )
    if dev == "cpu" and backend == "flash":
        fast_exp = Elementary(exp=CPU_FLASH_EXP_ULP)
        compute = Format.of(storage_or_f32)
        return Precision(
            fmt,
            compute,
            Format.of("fp32"),
            block=CPU_FLASH_BLOCK,
            elementary=fast_exp,
            sums="linear",
        )
    if backend == "flex" and dev == "cpu":
        fast_exp = Elementary(exp=CPU_FLASH_EXP_ULP)  # the same exp_u20 as the flash kernel
        compute = Format.of(storage_or_f32)
        return Precision(
            fmt,
            compute,
            Format.of("fp32"),
            block=CPU_FLEX_BLOCK,
            elementary=fast_exp,
            sums="linear",
        )
    # CUDA fused kernels (unmeasured): fp32 accumulators, weights in the storage format,
    # online rescaling per key tile of a size that depends on the head size and the GPU;
    # FlashAttention may split the keys and combine the splits through their log-sum-exps
    # (split-KV), so the sums' form stays open (sums=None covers both).
    tiles = fmt.name if reduced else ("tf32" if f32 == "fp32" else f32)
    return Precision(fmt, Format.of(tiles), Format.of("fp32"), block=None,
                     elementary=ELEMENTARY["default"])  # fmt: skip


def _looser(a: Precision, b: Precision) -> Precision:
    """A declaration that covers both: the coarser format and schedule of each part."""
    from dataclasses import replace

    from attnprec.analysis.precision import Elementary

    def coarse(x: Format, y: Format) -> Format:
        return x if x.u >= y.u else y

    def blk(x: int | None, y: int | None) -> int | None:
        return None if x is None or y is None else min(x, y)

    ea, eb = a.elementary, b.elementary
    el = Elementary(**{f: max(getattr(ea, f), getattr(eb, f)) for f in (
        "exp", "log", "div", "exp_arg", "log_abs", "narrow")})  # fmt: skip
    return replace(
        a,
        compute=coarse(a.compute, b.compute),
        accumulate=coarse(a.accumulate, b.accumulate),
        block=blk(a.block, b.block),
        block_sums="separate"
        if a.block_sums == b.block_sums == "separate" and blk(a.block, b.block) is not None
        else "any",
        elementary=el,
        sums=a.sums if a.sums == b.sums else None,  # either form: both
        merges=None if a.merges is b.merges is None else max(a.merges or 0, b.merges or 0),
        merge_format=None
        if a.merge_format is None or b.merge_format is None
        else coarse(a.merge_format, b.merge_format),
        constants="folded" if a.constants == b.constants == "folded" else "any",
    )
