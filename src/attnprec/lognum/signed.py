"""Number types for log space that carry signs: :class:`SignedLog` and :class:`ComplexLog`."""

from __future__ import annotations

import math
from typing import Any, TypeVar

import torch

from ._checks import COMPUTE, check_dim, check_float
from .elementwise import _log1pexp64, _shifted_log1mexp64
from .reductions import _cumsum_core, _matmul_terms, _sum_core

__all__ = ["ComplexLog", "SignedLog"]

S = TypeVar("S", bound="SignedLog")


def _log_dtype(dtype: torch.dtype) -> torch.dtype:
    # Logs of half-precision values are kept in float32 (fp16 logs would lose 3 digits).
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_sign(sign: object, log: torch.Tensor) -> torch.Tensor:
    if not isinstance(sign, torch.Tensor):
        raise TypeError(f"sign: expected a torch.Tensor, got {type(sign).__name__}")
    if sign.is_complex():
        raise TypeError(f"sign: expected a real tensor, got dtype {sign.dtype}")
    if sign.shape != log.shape:
        raise ValueError(
            f"sign: expected the shape of log {tuple(log.shape)}, got {tuple(sign.shape)}"
        )
    if not bool(((sign == 0) | (sign == 1) | (sign == -1)).all()):
        raise ValueError("sign: values must be -1, 0 or +1")
    zero = log == -math.inf
    if bool(((sign != 0) & zero).any()):
        raise ValueError("sign: must be 0 where log is -inf (the value is zero)")
    if bool(((sign == 0) & ~zero & ~torch.isnan(log)).any()):
        raise ValueError("sign: 0 is allowed only where log is -inf")
    return sign.to(torch.int8)


class SignedLog:
    """A tensor of real numbers stored as ``sign * exp(log)``.

    Parameters
    ----------
    log : torch.Tensor
        float32 or float64 logs of the magnitudes; ``-inf`` for zero. (float16 and
        bfloat16 are widened to float32.)
    sign : torch.Tensor, optional
        Signs in {-1, 0, +1} (any real dtype, stored as int8), of the shape of ``log``,
        0 exactly where ``log`` is ``-inf``. Default: +1, and 0 where ``log == -inf``.

    Raises
    ------
    TypeError
        ``log`` not a real floating tensor, ``sign`` not a real tensor.
    ValueError
        Shapes differ, a sign outside {-1, 0, +1}, a nonzero sign where ``log`` is
        ``-inf`` or a zero sign where it is not.

    Notes
    -----
    Every operation computes in float64 and rounds the resulting log once. ``*``,
    ``/``, ``pow`` and ``reciprocal`` are one rounding of the log (0.5 ulp). ``+`` and
    ``-`` use :func:`logaddexp`/:func:`logsubexp`: at most 2 ulps (float32) / 4 ulps
    (float64) of ``max(|exact log|, 1)``, and ``x + (-x)`` is exactly zero. Reductions
    (``sum``, ``cumsum``, ``@``) obey :func:`signed_sum_error_bound`, relative to
    ``|log|s||`` near 0 (the sum of ``[1, e^-40]`` has the log ``4.248e-18``); ``prod``
    and ``cumprod`` sum logs in float64 (error ``gamma_{n-1} sum|log x_i|``) and multiply
    signs exactly. Over an empty dim a sum is 0 (``-inf``, sign 0) and a product 1.
    Values far outside float range (``e^1000``) are represented without overflow.
    Autograd flows through ``log``; gradients are finite wherever the value is nonzero
    and finite (``x + x`` has the gradient 1/2 per operand).
    """

    __slots__ = ("_log", "_sign")
    _log: torch.Tensor
    _sign: torch.Tensor

    def __init__(self, log: torch.Tensor, sign: torch.Tensor | None = None) -> None:
        check_float("log", log)
        log = log.to(_log_dtype(log.dtype))
        if sign is None:
            sign = torch.where(log == -math.inf, 0, 1).to(torch.int8)
        self._log = log
        self._sign = _check_sign(sign, log)

    @classmethod
    def _make(cls: type[S], log: torch.Tensor, sign: torch.Tensor) -> S:
        """Build without validation (the result of an operation already holds the invariant)."""
        out = object.__new__(cls)
        out._log = log
        out._sign = sign if sign.dtype == torch.int8 else sign.to(torch.int8)
        return out

    @staticmethod
    def _log_dtype_of(dtype: torch.dtype) -> torch.dtype:
        return _log_dtype(dtype)

    @classmethod
    def _from64(cls: type[S], log: torch.Tensor, sign: torch.Tensor, dtype: torch.dtype) -> S:
        # Round the log once; a log that rounds to -inf (e^-1e39 in float32) is a zero.
        log = log.to(dtype)
        return cls._make(log, sign.to(torch.int8).masked_fill(log == -math.inf, 0))

    # --- conversions ----------------------------------------------------------------

    @classmethod
    def from_float(cls: type[S], x: torch.Tensor) -> S:
        """Represent the real tensor ``x``.

        Parameters
        ----------
        x : torch.Tensor
            Real floating-point tensor (NaN and infinities allowed).

        Returns
        -------
        SignedLog
            ``log = log|x|`` (correctly rounded from float64 to float32 or float64),
            ``sign = sign(x)`` (+1 for NaN, whose log is NaN).
        """
        check_float("x", x)
        x64 = x.to(COMPUTE)
        sign = torch.where(torch.isnan(x64), 1.0, torch.sign(x64))
        return cls._make(torch.log(torch.abs(x64)).to(_log_dtype(x.dtype)), sign)

    def to_float(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The values ``sign * exp(log)`` as a float tensor.

        Parameters
        ----------
        dtype : torch.dtype, optional
            Output dtype; default the dtype of ``log``.

        Returns
        -------
        torch.Tensor
            Computed in float64 and rounded once. Values beyond the range of ``dtype``
            overflow to ``+-inf`` and underflow to 0, as float arithmetic would.
        """
        dtype = self._log.dtype if dtype is None else dtype
        return (self._sign.to(COMPUTE) * torch.exp(self._log.to(COMPUTE))).to(dtype)

    def to_complex(self) -> torch.Tensor:
        """The complex logarithm ``log|x| + i pi [x < 0]`` (complex64 or complex128)."""
        return torch.complex(self._log, math.pi * (self._sign < 0).to(self._log.dtype))

    def to_mpmath(self) -> Any:
        """The values as (nested lists of) ``mpmath.mpf``, ``sign * exp(log)``.

        The logs are exact floats; ``exp`` is evaluated at mpmath's working precision.
        """
        import mpmath

        def conv(lv: Any, sv: Any) -> Any:
            if isinstance(lv, list):
                return [conv(a, b) for a, b in zip(lv, sv, strict=True)]
            if math.isnan(lv):
                return mpmath.mpf("nan")
            return sv * mpmath.exp(mpmath.mpf(lv)) if sv else mpmath.mpf(0)

        return conv(self._log.detach().cpu().tolist(), self._sign.cpu().tolist())

    # --- tensor-like ----------------------------------------------------------------

    @property
    def log(self) -> torch.Tensor:
        """Logs of the magnitudes (``-inf`` for zero)."""
        return self._log

    @property
    def sign(self) -> torch.Tensor:
        """Signs, int8 in {-1, 0, +1}."""
        return self._sign

    @property
    def shape(self) -> torch.Size:
        return self._log.shape

    @property
    def dtype(self) -> torch.dtype:
        """dtype of the logs."""
        return self._log.dtype

    @property
    def device(self) -> torch.device:
        return self._log.device

    @property
    def ndim(self) -> int:
        return self._log.ndim

    def __len__(self) -> int:
        return len(self._log)

    def numel(self) -> int:
        return self._log.numel()

    def __getitem__(self: S, idx: Any) -> S:
        return self._make(self._log[idx], self._sign[idx])

    def _apply(self: S, fn: str, *args: Any) -> S:
        return self._make(getattr(self._log, fn)(*args), getattr(self._sign, fn)(*args))

    def reshape(self: S, *shape: Any) -> S:
        return self._apply("reshape", *shape)

    def flatten(self: S, start_dim: int = 0, end_dim: int = -1) -> S:
        return self._apply("flatten", start_dim, end_dim)

    def unsqueeze(self: S, dim: int) -> S:
        return self._apply("unsqueeze", dim)

    def squeeze(self: S, *dim: int) -> S:
        return self._apply("squeeze", *dim)

    def transpose(self: S, dim0: int, dim1: int) -> S:
        return self._apply("transpose", dim0, dim1)

    def permute(self: S, *dims: Any) -> S:
        return self._apply("permute", *dims)

    def movedim(self: S, source: Any, destination: Any) -> S:
        return self._apply("movedim", source, destination)

    def broadcast_to(self: S, *shape: Any) -> S:
        return self._apply("broadcast_to", *shape)

    def expand(self: S, *shape: Any) -> S:
        return self._apply("expand", *shape)

    def detach(self: S) -> S:
        return self._make(self._log.detach(), self._sign)

    @property
    def mT(self: S) -> S:  # noqa: N802 (torch's name)
        return self._make(self._log.mT, self._sign.mT)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(log={self._log!r}, sign={self._sign!r})"

    # --- arithmetic -----------------------------------------------------------------

    def _coerce(self, other: object) -> SignedLog:
        if isinstance(other, SignedLog):
            return other
        if isinstance(other, (int, float)) and not isinstance(other, bool):
            return SignedLog.from_float(
                torch.tensor(float(other), dtype=self._log.dtype, device=self._log.device)
            )
        if isinstance(other, torch.Tensor):
            return SignedLog.from_float(other)
        raise TypeError(f"other: cannot combine SignedLog with {type(other).__name__}")

    def _pair(self, other: object) -> tuple[torch.Tensor, ...]:
        o = self._coerce(other)
        dt = torch.promote_types(self._log.dtype, o._log.dtype)
        try:
            la, sa, lb, sb = torch.broadcast_tensors(self._log, self._sign, o._log, o._sign)
        except RuntimeError:
            raise ValueError(
                f"other: shape {tuple(o.shape)} does not broadcast with {tuple(self.shape)}"
            ) from None
        return la.to(COMPUTE), sa.to(COMPUTE), lb.to(COMPUTE), sb.to(COMPUTE), dt  # type: ignore[return-value]

    def __mul__(self: S, other: object) -> S:
        la, sa, lb, sb, dt = self._pair(other)
        return self._from64(la + lb, sa * sb, dt)  # type: ignore[arg-type]

    __rmul__ = __mul__

    def __truediv__(self: S, other: object) -> S:
        la, sa, lb, sb, dt = self._pair(other)
        # x / 0 = +-inf with the sign of x, as x / +0.0 in floats; 0 / 0 is NaN.
        return self._from64(la - lb, sa * torch.where(sb == 0, 1.0, sb), dt)  # type: ignore[arg-type]

    def __rtruediv__(self: S, other: object) -> S:
        return self._coerce(other) / self  # type: ignore[return-value]

    def __neg__(self: S) -> S:
        return self._make(self._log, -self._sign)

    def __abs__(self: S) -> S:
        return self._make(self._log, torch.abs(self._sign))

    def __add__(self: S, other: object) -> S:
        la, sa, lb, sb, dt = self._pair(other)
        return self._add64(la, sa, lb, sb, dt)  # type: ignore[arg-type]

    __radd__ = __add__

    def __sub__(self: S, other: object) -> S:
        la, sa, lb, sb, dt = self._pair(other)
        return self._add64(la, sa, lb, -sb, dt)  # type: ignore[arg-type]

    def __rsub__(self: S, other: object) -> S:
        return -(self - other)

    def _add64(
        self: S,
        la: torch.Tensor,
        sa: torch.Tensor,
        lb: torch.Tensor,
        sb: torch.Tensor,
        dt: torch.dtype,
    ) -> S:
        big = la >= lb
        l1, s1 = torch.where(big, la, lb), torch.where(big, sa, sb)
        l2 = torch.where(big, lb, la)
        s2 = torch.where(big, sb, sa)
        # <= 0; equal infinities (only) would give NaN. Equal finite logs keep l2 - l1 = 0
        # with its derivative: x + x has the gradient 1/2 per operand, as log(e^a + e^b).
        d = torch.where((l1 == l2) & torch.isinf(l1), 0.0, l2 - l1)
        same = s1 * s2 >= 0
        log = torch.where(
            same,
            l1 + _log1pexp64(torch.where(same, d, 0.0)),
            _shifted_log1mexp64(l1, torch.where(same, -1.0, d)),
        )
        return self._from64(log, s1, dt)

    def __matmul__(self: S, other: object) -> S:
        o = self._coerce(other)
        dt = torch.promote_types(self._log.dtype, o._log.dtype)
        terms, lo, signs = _matmul_terms(
            self._log.to(COMPUTE),
            o._log.to(COMPUTE),
            self._sign.to(COMPUTE),
            o._sign.to(COMPUTE),
        )
        log, sgn = _sum_core(terms, signs, -2, False, True, dt == torch.float64, lo)
        return self._from64(log, sgn, dt)

    def pow(self: S, k: int) -> S:
        """``x ** k`` for an integer ``k`` (``0 ** 0 = 1``, ``0 ** -k = inf``); one rounding."""
        if isinstance(k, bool) or not isinstance(k, int):
            raise TypeError(f"k: expected an int, got {type(k).__name__}")
        if k == 0:
            return self._make(torch.zeros_like(self._log), torch.ones_like(self._sign))
        s = self._sign.to(COMPUTE)
        s = torch.abs(s) if k % 2 == 0 else s
        if k < 0:
            s = torch.where(s == 0, 1.0, s)
        return self._from64(self._log.to(COMPUTE) * k, s, self._log.dtype)

    __pow__ = pow

    def reciprocal(self: S) -> S:
        """``1 / x`` (``1 / 0 = +inf``); exact negation of the log."""
        return self.pow(-1)

    # --- reductions -----------------------------------------------------------------

    def _dim(self, dim: int | None) -> tuple[torch.Tensor, torch.Tensor, int]:
        # Stored dtypes: the float64 cores widen them on the fly.
        l64, s64 = self._log, self._sign
        if dim is None:
            return l64.reshape(-1), s64.reshape(-1), 0
        d = check_dim("dim", dim, self.ndim)
        if self.ndim == 0:
            return l64.reshape(1), s64.reshape(1), 0
        return l64, s64, d

    def _shape_out(
        self: S, log: torch.Tensor, sgn: torch.Tensor, dim: int | None, keepdim: bool
    ) -> S:
        if self.ndim == 0 or (dim is None and not keepdim):
            if log.ndim:
                log, sgn = log.reshape(()), sgn.reshape(())
        elif dim is None:
            log, sgn = log.reshape([1] * self.ndim), sgn.reshape([1] * self.ndim)
        return self._from64(log, sgn, self._log.dtype)

    def sum(self: S, dim: int | None = None, keepdim: bool = False) -> S:
        """Signed sum along ``dim`` (all elements if None); see :func:`signed_sum_error_bound`."""
        l64, s64, d = self._dim(dim)
        kd = keepdim and dim is not None and self.ndim > 0
        f64 = self._log.dtype == torch.float64
        log, sgn = _sum_core(l64, s64, d, kd, signs_only=True, accurate=f64)
        return self._shape_out(log, sgn, dim, keepdim)

    def cumsum(self: S, dim: int) -> S:
        """Signed prefix sums along ``dim``; see :func:`signed_sum_error_bound` (``n = t``)."""
        l64, s64, d = self._dim(dim)
        log, sgn = _cumsum_core(l64, s64, d, signs_only=True)
        return self._from64(log.reshape(self.shape), sgn.reshape(self.shape), self._log.dtype)

    def prod(self: S, dim: int | None = None, keepdim: bool = False) -> S:
        """Product along ``dim``: logs summed in float64, signs multiplied exactly."""
        l64, s64, d = self._dim(dim)
        kd = keepdim and dim is not None and self.ndim > 0
        log = l64.to(COMPUTE).sum(d, keepdim=kd)
        sgn = s64.to(COMPUTE).prod(d, keepdim=kd)
        return self._shape_out(log, sgn, dim, keepdim)

    def cumprod(self: S, dim: int) -> S:
        """Prefix products along ``dim``: cumulative float64 log sums, exact signs."""
        l64, s64, d = self._dim(dim)
        log, sgn = l64.to(COMPUTE).cumsum(d), s64.to(COMPUTE).cumprod(d)
        return self._from64(log.reshape(self.shape), sgn.reshape(self.shape), self._log.dtype)


class ComplexLog(SignedLog):
    """The complex-logarithm form of a signed number: ``z = log|x| + i pi [x < 0]``.

    This is the representation of generalized orders of magnitude (GOOMs). It wraps
    the same data as :class:`SignedLog` (and has its whole API and error guarantees):
    the phase is kept as an exact sign and renormalized to {0, pi} after every
    operation, so it never drifts, however many terms or factors. Zero is
    ``-inf + 0j``, never a finite floor.

    Parameters
    ----------
    z : torch.Tensor
        complex64 or complex128 logs; the imaginary part must be within pi/4 of a
        multiple of pi (its parity gives the sign).

    Raises
    ------
    TypeError
        ``z`` not a complex tensor.
    ValueError
        An imaginary part farther than pi/4 from every multiple of pi.
    """

    __slots__ = ()

    def __init__(self, z: torch.Tensor) -> None:  # noqa: D107
        if not isinstance(z, torch.Tensor) or not z.is_complex():
            got = z.dtype if isinstance(z, torch.Tensor) else type(z).__name__
            raise TypeError(f"z: expected a complex tensor, got {got}")
        re, im = z.real, z.imag
        k = torch.round(im / math.pi)
        if bool((torch.abs(im - k * math.pi) > math.pi / 4).any()):
            raise ValueError("z: imaginary parts must be multiples of pi (the sign)")
        log = torch.where(torch.isnan(im), math.nan, re)
        odd = torch.remainder(k, 2) == 1
        sign = torch.where(re == -math.inf, 0, torch.where(odd, -1, 1))
        self._log = log
        self._sign = sign.to(torch.int8)

    @property
    def log(self) -> torch.Tensor:  # type: ignore[override]
        """The complex logs ``log|x| + i pi [x < 0]``."""
        return self.to_complex()

    def to_signed(self) -> SignedLog:
        """The same values as a :class:`SignedLog` (no rounding)."""
        return SignedLog._make(self._log, self._sign)
