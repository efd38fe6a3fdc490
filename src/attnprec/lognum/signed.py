"""Number types for log space that carry signs: :class:`SignedLog` and :class:`ComplexLog`."""

from __future__ import annotations

import math
from typing import Any, TypeVar

import torch

from ._checks import COMPUTE, check_bool, check_dim, check_float, check_gradual_underflow
from ._dd import two_prod, two_sum
from .elementwise import _diff_lo, _log1pexp_neg, _shifted_log1mexp64
from .reductions import _cumsum_core, _matmul_terms, _sum_core

__all__ = ["ComplexLog", "SignedLog"]

S = TypeVar("S", bound="SignedLog")


def _log_dtype(dtype: torch.dtype) -> torch.dtype:
    # Logs of half-precision values are kept in float32 (fp16 logs would lose 3 digits).
    return torch.float64 if dtype == torch.float64 else torch.float32


def _round_dd(hi: torch.Tensor, lo: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``hi + lo`` (``hi = fl(hi + lo)``, float64) rounded once to ``dtype``: for a narrower
    dtype through round-to-odd (``hi`` moved one ulp toward ``lo`` where its last bit is
    even and ``lo != 0``), after which rounding to nearest is the single rounding of the
    exact value (53 >= 24 + 2 bits). Not differentiable (see :func:`_with_grad`)."""
    if dtype == torch.float64:
        return hi
    even = (hi.view(torch.int64) & 1) == 0
    toward = torch.nextafter(hi, torch.where(lo > 0, math.inf, -math.inf))
    return torch.where((lo != 0) & even & torch.isfinite(hi), toward, hi).to(dtype)


def _with_grad(value: torch.Tensor, linear: torch.Tensor) -> torch.Tensor:
    """``value`` (computed without autograd) carrying the gradient of ``linear``, a
    differentiable expression with the same derivative."""
    if not (torch.is_grad_enabled() and linear.requires_grad):
        return value
    d = linear - linear.detach()
    return value + torch.where(torch.isfinite(linear), d, 0.0).to(value.dtype)


def _times_int(l: torch.Tensor, k: int, dtype: torch.dtype) -> torch.Tensor:
    """``l k`` (``l`` float64, ``k`` any Python int) rounded once to ``dtype``.

    ``k = k1 + k2 + k3`` with ``k1 = fl(k)``, ``k2 = fl(k - k1)``: ``l k1`` exact as
    ``p + e`` (TwoProd), ``l k2`` rounded (an error of ``2^-106`` relative), ``k3``
    (``< 2^-105 k``) dropped; the pair then rounded once (:func:`_round_dd`), so the log
    is correctly rounded up to a ``2^-100`` relative error (a tie that close). Beyond
    ``2^900`` the low bits of ``k`` are dropped and the product scaled by powers of two
    (exact); products beyond the float range are ``+-inf``, as ``l * k`` would be."""
    kk, sh = abs(k), 0
    if kk.bit_length() > 900:
        sh = kk.bit_length() - 900
        kk >>= sh
    kk = kk if k > 0 else -kk
    k1 = float(kk)
    k2 = float(kk - int(k1))
    with torch.no_grad():
        ld = l.detach()
        safe = torch.abs(ld) <= 2.0**900  # TwoProd's split cannot overflow
        ls = torch.where(safe, ld, 0.0)
        p, e = two_prod(ls, torch.full_like(ls, k1))
        p = torch.where(safe, p, ld * k1)  # +-inf, NaN, or beyond any float with k1 >= 2
        lo = torch.where(safe, e + ls * k2, 0.0)
        while sh > 0:
            step = min(sh, 1000)
            p, lo = p * 2.0**step, lo * 2.0**step
            sh -= step
        hi, lo = two_sum(p, lo)
        hi = torch.where(torch.isnan(hi), p, hi)  # inf + x: keep the infinity
        value = _round_dd(hi, torch.where(torch.isfinite(hi), lo, 0.0), dtype)
    return _with_grad(value, l * float(k) if abs(k) < 2**1000 else l * k1)


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
    if bool(((sign == 0) & ~zero).any()):
        raise ValueError("sign: 0 is allowed only where log is -inf")
    # a NaN's sign is +1, as every operation gives (a review: SignedLog(nan, -1) kept -1)
    return sign.to(torch.int8).masked_fill(torch.isnan(log), 1)


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
    and ``cumprod`` sum logs in float64 and round the sum once (error ``gamma_{n-1}
    sum|log x_i| + u_log |L|``, ``u_log`` the log dtype's unit roundoff and ``L`` the
    result's log) and multiply signs exactly. Over an empty dim a sum is 0 (``-inf``,
    sign 0) and a product 1.
    Values far outside float range (``e^1000``) are represented without overflow.
    Exactly cancelling sums are exact zeros (decided exactly where the float64 result
    is not certified away from 0). Autograd flows through ``log``; gradients are finite
    wherever the value is nonzero and finite and the derivative is a float (``x + x`` has
    the gradient 1/2 per operand; reductions differentiate ``log|s|`` explicitly, see
    docs/lognum.md). Where a result is exactly zero the derivative of its log is
    infinite: ``x + (-x)`` and a used zero sum give ``+-inf``, an unused one nothing.
    ``==`` and ``!=`` compare values elementwise (bool tensors, as for tensors).
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
        """Build without validation (the result of an operation already holds the invariant);
        refused where subnormals were flushed (the operation's guarantee did not hold)."""
        check_gradual_underflow()
        out = object.__new__(cls)
        out._log = log
        out._sign = sign if sign.dtype == torch.int8 else sign.to(torch.int8)
        return out

    @staticmethod
    def _log_dtype_of(dtype: torch.dtype) -> torch.dtype:
        return _log_dtype(dtype)

    @classmethod
    def _from64(cls: type[S], log: torch.Tensor, sign: torch.Tensor, dtype: torch.dtype) -> S:
        # Round the log once; a log that rounds to -inf (e^-1e39 in float32) is a zero, and
        # NaN has the sign +1 (operators left the operand's: nan * 0 had 0, read as a zero)
        log = log.to(dtype)
        sign = sign.to(torch.int8).masked_fill(log == -math.inf, 0)
        return cls._make(log, sign.masked_fill(torch.isnan(log), 1))

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
            ``log = log|x|`` (float32: correctly rounded from float64; float64: within 1
            ulp, torch's float64 log being faithful), ``sign = sign(x)`` (+1 for NaN,
            whose log is NaN).
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

        Raises
        ------
        TypeError
            Naming ``dtype`` when it is not a floating dtype (an integer one wrapped
            ``e^100`` to a negative number).
        """
        dtype = self._log.dtype if dtype is None else dtype
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype: expected a floating torch.dtype, got {dtype!r}")
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
            # its log taken in float64 (of any int: math.log takes them past float64), not
            # of the number rounded to this dtype first (float32 lost 1e-300 to a zero and
            # took 1e300 as inf); _pair keeps this dtype, as a Python number does
            dev = self._log.device
            if isinstance(other, int) and other != 0:
                log = torch.tensor(math.log(abs(other)), dtype=torch.float64, device=dev)
                return SignedLog(log, torch.tensor(1 if other > 0 else -1, device=dev))
            return SignedLog.from_float(torch.tensor(float(other), dtype=torch.float64, device=dev))
        if isinstance(other, torch.Tensor):
            return SignedLog.from_float(check_float("other", other))
        raise TypeError(f"other: cannot combine SignedLog with {type(other).__name__}")

    def _pair(self, other: object) -> tuple[torch.Tensor, ...]:
        o = self._coerce(other)
        scalar = isinstance(other, (int, float))  # (does not promote, as in torch)
        dt = self._log.dtype if scalar else torch.promote_types(self._log.dtype, o._log.dtype)
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
        la, sa, lb, sb, dt = self._pair(other)
        return self._from64(lb - la, sb * torch.where(sa == 0, 1.0, sa), dt)  # type: ignore[arg-type]

    def __eq__(self, other: object) -> torch.Tensor:  # type: ignore[override]
        """Elementwise equality of the values, as for tensors (a bool tensor, broadcast):
        equal logs and signs, after promotion to the wider log dtype (the representation
        is unique: sign 0 exactly where the log is ``-inf``); NaN equals nothing. Numbers
        and real tensors are converted with :meth:`from_float`."""
        if not isinstance(other, (SignedLog, torch.Tensor, int, float)):
            return NotImplemented
        la, sa, lb, sb, dt = self._pair(other)
        # in the pair's dtype: a Python number's float64 log rounded to this one's, as a
        # tensor compares with a number (exact for two tensors: dt is the wider)
        return (la.to(dt) == lb.to(dt)) & (sa == sb)

    def __ne__(self, other: object) -> torch.Tensor:  # type: ignore[override]
        """Elementwise ``not ==`` (True where either value is NaN)."""
        eq = self.__eq__(other)
        return eq if eq is NotImplemented else ~eq

    # Hashed by identity, as tensors are (== compares values elementwise).
    __hash__ = object.__hash__

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
        diff = l2 - l1
        d = torch.where((l1 == l2) & torch.isinf(l1), 0.0, diff)
        d_lo = _diff_lo(l2, l1, diff)  # l2 - l1 = d + d_lo exactly (see logaddexp)
        same = s1 * s2 >= 0
        log = torch.where(
            same,
            l1 + _log1pexp_neg(torch.where(same, d, 0.0), d_lo),
            _shifted_log1mexp64(l1, torch.where(same, -1.0, d), d_lo),
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
            ("self", "other"),
        )
        log, sgn = _sum_core(terms, signs, -2, False, True, dt == torch.float64, lo)
        return self._from64(log, sgn, dt)

    def pow(self: S, k: int) -> S:
        """``x ** k`` for an integer ``k`` (``0 ** 0 = 1``, ``0 ** -k = inf``); one rounding
        of the exact ``k log|x|`` (any size of ``k``, see :func:`_times_int`)."""
        if isinstance(k, bool) or not isinstance(k, int):
            raise TypeError(f"k: expected an int, got {type(k).__name__}")
        if k == 0:
            return self._make(torch.zeros_like(self._log), torch.ones_like(self._sign))
        s = self._sign.to(COMPUTE)
        s = torch.abs(s) if k % 2 == 0 else s
        if k < 0:
            s = torch.where(s == 0, 1.0, s)
        return self._from64(
            _times_int(self._log.to(COMPUTE), k, self._log.dtype), s, self._log.dtype
        )

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
        kd = check_bool("keepdim", keepdim) and dim is not None and self.ndim > 0
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
        kd = check_bool("keepdim", keepdim) and dim is not None and self.ndim > 0
        log = l64.to(COMPUTE).sum(d, keepdim=kd)
        sgn = s64.to(COMPUTE).prod(d, keepdim=kd)
        return self._shape_out(log, sgn, dim, keepdim)

    def cumprod(self: S, dim: int) -> S:
        """Prefix products along ``dim``: cumulative float64 log sums, exact signs."""
        l64, s64, d = self._dim(dim)
        log, sgn = l64.to(COMPUTE).cumsum(d), s64.to(COMPUTE).cumprod(d)
        return self._from64(log.reshape(self.shape), sgn.reshape(self.shape), self._log.dtype)


# pi in three float64 parts (pi - _PI1 - _PI2 - _PI3 ~ 1.1e-49).
_PI1 = 3.141592653589793
_PI2 = 1.2246467991473532e-16
_PI3 = -2.9947698097183397e-33
# Below this distance from pi/4 (the double-double residual is good to ~2^-100) the
# decision is rechecked with mpmath.
_PHASE_TIE = 2.0**-90


def _phase_limit(dtype: torch.dtype) -> float:
    """``2^p`` for a real dtype of ``p`` significant bits: below it floats are at most 1
    apart, so a rounded ``k pi`` stays within ``1/2 < pi/4`` of ``k pi``; from it on they
    are 2 or more apart, wider than the tolerance band, and the phase cannot carry a sign."""
    return 2.0 / torch.finfo(dtype).eps  # eps = 2^(1 - p)


def _pi_residual(x: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x - k pi`` as a double-double (``|k| < 2^52``, integer-valued): ``k pi`` from the
    exact products ``k _PI1`` and ``k _PI2`` (TwoProd) and ``k _PI3``; the difference and
    the small parts added with TwoSum. Error about ``2^-100`` where the residual is below 4."""
    p1, e1 = two_prod(k, torch.full_like(k, _PI1))
    p2, e2 = two_prod(k, torch.full_like(k, _PI2))
    s, t = two_sum(x, -p1)
    for part in (-e1, -p2, -e2, -k * _PI3):
        s, err = two_sum(s, part)
        t = t + err
    return two_sum(s, t)


def _phase_signs(name: str, im: torch.Tensor, zdtype: torch.dtype) -> torch.Tensor:
    """Signs (``-1`` for an odd multiple of pi, else ``+1``; ``+1`` for NaN) of imaginary
    parts that lie within pi/4 of a multiple of pi, decided exactly; ``ValueError`` naming
    ``name`` otherwise, for infinities, and for ``|im| >= 2^p`` (see :func:`_phase_limit`)."""
    x = im.to(COMPUTE)
    nan = torch.isnan(x)
    if bool(torch.isinf(x).any()):
        raise ValueError(f"{name}: an infinite imaginary part has no sign (not a multiple of pi)")
    lim = _phase_limit(im.dtype)
    if bool((torch.abs(x) >= lim).any()):
        big = float(torch.abs(torch.where(nan, 0.0, x)).max())
        raise ValueError(
            f"{name}: imaginary part {big:g} is too large to carry a sign in {zdtype}: "
            f"from 2^{int(math.log2(lim))} = {lim:g} on its floats are 2 or more apart, "
            "wider than the band |im - k pi| <= pi/4, so a rounded k pi may leave it"
        )
    x = torch.where(nan, 0.0, x)
    k = torch.round(x / _PI1)
    r, r_lo = _pi_residual(x, k)
    # round(x / pi) in float64 may be off by one (|x / pi| < 2^51.4): step to the nearest
    step = torch.where(r > _PI1 / 2, 1.0, torch.where(r < -_PI1 / 2, -1.0, 0.0))
    if bool((step != 0).any()):
        k = k + step
        r, r_lo = _pi_residual(x, k)
    flip = torch.where(r < 0, -1.0, 1.0)
    m, m_err = two_sum(r * flip, torch.full_like(r, -_PI1 / 4))
    margin = m + (m_err + (r_lo * flip - (_PI2 / 4 + _PI3 / 4)))  # |x - k pi| - pi/4
    tie = torch.abs(margin) < _PHASE_TIE
    if bool(tie.any()):  # mpmath at 300 bits for the (practically never seen) near-ties
        import mpmath

        with mpmath.workprec(300):
            for i in tie.nonzero()[:, 0].tolist():
                xi, ki = x.reshape(-1)[i].item(), k.reshape(-1)[i].item()
                exact = abs(mpmath.mpf(xi) - ki * mpmath.pi) - mpmath.pi / 4
                margin.view(-1)[i] = 1.0 if exact > 0 else -1.0
    if bool((margin > 0).any()):
        i = int((margin > 0).flatten().nonzero()[0, 0])
        xi, ki = x.reshape(-1)[i].item(), int(k.reshape(-1)[i].item())
        raise ValueError(
            f"{name}: imaginary parts must lie within pi/4 of a multiple of pi (the sign); "
            f"{xi!r} is {abs(xi - ki * math.pi):.3g} from {ki} pi"
        )
    odd = torch.remainder(k, 2) == 1
    return torch.where(odd & ~nan, -1, 1).to(torch.int8)


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
        complex32, complex64 or complex128 logs; the imaginary part must be within pi/4
        of a multiple ``k pi`` of pi, and the parity of ``k`` gives the sign (NaN gives a
        NaN log). The real parts are kept as the logs (complex32's float16 ones widened
        to float32, as :class:`SignedLog` does).

    Raises
    ------
    TypeError
        ``z`` not a complex tensor.
    ValueError
        An imaginary part farther than pi/4 from every multiple of pi, infinite, or too
        large for its dtype to carry a sign: ``|im| >= 2^11`` (complex32), ``2^24``
        (complex64, about 1.7e7) or ``2^53`` (complex128). From there on adjacent floats
        are 2 or more apart, wider than the band of width pi/2, so a product's phase
        ``k pi`` rounded to the dtype may fall outside it (or, further out, next to another
        multiple). Below the limit a rounded ``k pi`` is always read as ``k``.

    Notes
    -----
    The check is exact: ``im`` is widened to float64, ``k = round(im / pi)`` (corrected
    by one where needed) and ``|im - k pi|`` formed as a double-double with pi in three
    parts (error about ``2^-100``), compared with pi/4 (mpmath decides the near-ties).
    """

    __slots__ = ()

    def __init__(self, z: torch.Tensor) -> None:  # noqa: D107
        if not isinstance(z, torch.Tensor) or not z.is_complex():
            got = z.dtype if isinstance(z, torch.Tensor) else type(z).__name__
            raise TypeError(f"z: expected a complex tensor, got {got}")
        re, im = z.real, z.imag
        sign = _phase_signs("z", im, z.dtype)
        log = torch.where(torch.isnan(im), math.nan, re).to(_log_dtype(re.dtype))
        self._log = log
        sign = torch.where(log == -math.inf, 0, sign).to(torch.int8)
        self._sign = sign.masked_fill(torch.isnan(log), 1)  # (nan + i pi had -1)

    @property
    def log(self) -> torch.Tensor:  # type: ignore[override]
        """The complex logs ``log|x| + i pi [x < 0]``."""
        return self.to_complex()

    def to_signed(self) -> SignedLog:
        """The same values as a :class:`SignedLog` (no rounding)."""
        return SignedLog._make(self._log, self._sign)
