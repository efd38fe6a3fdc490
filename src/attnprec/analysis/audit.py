"""Audit an attention implementation: its observed error against the certified bound.

:func:`audit` runs a function on given inputs, computes certified references
(:func:`attnprec.analysis.reference.reference`) and the error bound for the declared
precision (:func:`attnprec.analysis.bounds.attention_error_bound`), and makes two checks,
element by element:

- **total**: ``|out - y*(q, k, v)| <= total``, with ``y*`` the exact *target* of the method
  (softmax for taylor, polynomial and favor; the exact semiring form for a linearized
  semiring; else the method itself) on the inputs as given: quantization + approximation +
  rounding;
- **rounding**: ``|out - y(q~, k~, v~)| <= rounding``, with ``y`` the method itself on the
  inputs rounded to the storage format: the kernel's arithmetic alone, which the total
  check can hide behind a large approximation term.

Each verdict is certified: with ``r`` the reference radius (``|exact - value| <= r``) and
``e = |out - value|``, an element is

- *within* when ``e + r <= bound`` (so ``|out - exact| <= bound`` is proved),
- *violated* when ``e - r > bound`` (so ``|out - exact| > bound`` is proved), or the output
  is NaN where the reference is not, or not NaN where it is (NaN inputs must propagate),
- *undecided* otherwise (the reference was not precise enough to tell; counted as a failure).

Reports from several audits add up (``report_a + report_b``); :class:`AuditReport` renders
a table, JSON and a plot.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch

from attnprec._validate import broadcast_shapes, check_qkv
from attnprec.analysis.precision import Format, Precision

__all__ = ["Check", "AuditCase", "AuditReport", "audit", "as_precision", "target_of"]

_BOUND_KEYWORDS = ("target", "confidence", "block")
#: Keywords that say how an implementation computes, not what: passed to ``fn`` and the
#: bound, never to a reference.
_HOW_KEYWORDS = ("chunk_size", "allow_nonpositive", "generator", "orthogonal", "linearize")


def target_of(method: str) -> str:
    """The exact method a method's error is measured against (see the module docstring).

    A linearized semiring is measured against the exact semiring form, i.e. ``"semiring"``
    with the ``linearize`` keyword dropped, so every method but the three below is its own
    target.
    """
    if method in ("taylor", "polynomial", "favor"):
        return "softmax"
    return method


def as_precision(precision: Any, dtype: torch.dtype | None = None) -> Precision:
    """A :class:`Precision` from a Precision, a format name/``Format``/torch dtype, or None.

    A format stands for ``Precision(storage=fmt)`` (fp32 compute and accumulate); ``None``
    takes the storage format from ``dtype``.

    Raises
    ------
    ValueError, TypeError
        If ``precision`` names no format (the message names ``precision``).
    """
    if isinstance(precision, Precision):
        return precision
    if precision is None:
        if dtype is None:
            raise ValueError("precision: expected a Precision or a format, got None")
        precision = dtype
    try:
        return Precision(Format.of(precision))
    except (TypeError, ValueError) as e:
        raise type(e)(f"precision: {e}") from None


def _describe(value: Any) -> Any:
    """A JSON-friendly summary of a method parameter (tensors by shape, objects by repr)."""
    if isinstance(value, torch.Tensor):
        return f"tensor{tuple(value.shape)}"
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(x, (int, float)) for x in value):
        return list(value)
    return repr(value)


@dataclass
class Check:
    """One elementwise comparison of the output with a certified reference and a bound.

    Attributes
    ----------
    against : str
        What the output is compared with (the reference and which part of the bound).
    max_error : float
        ``max |out - value|`` (NaN if an output was NaN).
    max_bound : float
        Largest bound over the elements.
    tightness : float
        ``min bound / error`` over the elements with a nonzero error (``inf`` if none,
        0 if an output is NaN where the reference is not, or the reverse): at least 1 when
        nothing is violated; 1 would be a bound attained.
    violations, undecided : int
        Element counts (module docstring).
    max_radius : float
        Largest reference radius.
    worst : dict
        The first violated element, else the one attaining ``tightness``: ``index``,
        ``error``, ``bound``, the bound's parts ``quantization``, ``approximation``,
        ``rounding`` there, ``output`` and ``reference``.
    """

    against: str
    max_error: float
    max_bound: float
    tightness: float
    violations: int
    undecided: int
    max_radius: float
    worst: dict[str, Any]

    @property
    def verdict(self) -> str:
        """``"ok"``, ``"VIOLATED"`` or ``"UNDECIDED"``."""
        if self.violations:
            return "VIOLATED"
        return "UNDECIDED" if self.undecided else "ok"

    def describe(self) -> str:
        """Where the bound is tightest or violated, by how much, which part dominates there."""
        lines = [f"  {self.against}: {self.verdict}"]
        if self.violations or self.undecided:
            lines.append(
                f"    {self.violations} elements exceed the bound, {self.undecided} undecided "
                f"(reference radius up to {self.max_radius:.3g})"
            )
        w = self.worst
        if w:
            ratio = w["error"] / w["bound"] if w["bound"] > 0 else math.inf
            lines.append(
                f"    at index {tuple(w['index'])}: |out - ref| = {w['error']:.6g}, "
                f"bound = {w['bound']:.6g} (error/bound = {ratio:.3g}); "
                f"output {w['output']!r}, reference {w['reference']!r}"
            )
            lines.append(
                f"    bound parts there: quantization {w['quantization']:.3g}, "
                f"approximation {w['approximation']:.3g}, rounding {w['rounding']:.3g}"
            )
        lines.append(
            f"    max error {self.max_error:.3g}, max bound {self.max_bound:.3g}, "
            f"min bound/error {self.tightness:.3g}"
        )
        return "\n".join(lines)


@dataclass
class AuditCase:
    """The audit of one function on one set of inputs.

    Attributes
    ----------
    method, kernel, dtype, family : str
        What was audited: the method, the function's label, the storage format, the input
        family (or ``"given"``).
    target : str
        The exact method of the total check.
    shape : tuple of int
        ``(n_q, n_k, d_k, d_v)``.
    params : dict
        The keywords the function was called with (tensors summarized by shape).
    precision : str
        The declared precision.
    elements : int
        Output elements compared.
    total : Check
        ``|out - target(q, k, v)|`` against the total bound.
    rounding : Check or None
        ``|out - method(stored q, k, v)|`` against the rounding part (None where the method
        has no reference of its own, e.g. a linearized semiring).
    violations, undecided : int
        Elements violated (or undecided) in either check.
    backend : str
        The references' backend.
    arrays : dict
        Per check (``"total"``, ``"rounding"``), the elementwise errors and bounds
        (flattened numpy arrays), for the plot; not in the JSON.
    """

    method: str
    kernel: str
    dtype: str
    family: str
    target: str
    shape: tuple[int, int, int, int]
    params: dict[str, Any]
    precision: str
    elements: int
    total: Check
    rounding: Check | None
    violations: int
    undecided: int
    backend: str
    arrays: dict[str, tuple[np.ndarray, np.ndarray]] = field(repr=False)

    @property
    def verdict(self) -> str:
        """``"ok"``, ``"VIOLATED"`` or ``"UNDECIDED"`` over both checks."""
        if self.violations:
            return "VIOLATED"
        return "UNDECIDED" if self.undecided else "ok"

    def to_dict(self) -> dict[str, Any]:
        """Every figure of the case (the elementwise arrays left out)."""
        d = asdict(self)
        del d["arrays"]
        d["verdict"] = self.verdict
        return d

    def describe(self) -> str:
        """A readable account of both checks."""
        head = (
            f"{self.kernel} ({self.method}, {self.dtype}, {self.family}, "
            f"n_q={self.shape[0]}, n_k={self.shape[1]}, d_k={self.shape[2]}, "
            f"d_v={self.shape[3]}; {self.precision}): {self.verdict}, "
            f"{self.violations} of {self.elements} elements violated"
        )
        checks = [self.total] + ([self.rounding] if self.rounding is not None else [])
        return "\n".join([head, *(c.describe() for c in checks)])


@dataclass
class AuditReport:
    """The audits of one or more (function, inputs) cases.

    Add reports with ``+``; :attr:`ok` is true when no element of any case is violated or
    undecided and no audit failed to run. ``failures`` lists the audits that raised (as
    recorded by a caller such as the ``attnprec audit`` command: what, and the error).
    """

    cases: list[AuditCase] = field(default_factory=list)
    failures: list[dict[str, str]] = field(default_factory=list)

    def __add__(self, other: AuditReport) -> AuditReport:
        return AuditReport(self.cases + other.cases, self.failures + other.failures)

    @property
    def violations(self) -> int:
        """Violated elements over all cases."""
        return sum(c.violations for c in self.cases)

    @property
    def ok(self) -> bool:
        """True when every case's verdict is ``"ok"`` and nothing failed to run."""
        return not self.failures and all(c.verdict == "ok" for c in self.cases)

    def to_json(self, path: str | None = None) -> str:
        """Every figure as JSON (returned, and written to ``path`` when given)."""
        text = json.dumps(
            {
                "ok": self.ok,
                "violations": self.violations,
                "cases": [c.to_dict() for c in self.cases],
                "failures": self.failures,
            },
            indent=1,
            default=str,
        )
        if path is not None:
            with open(path, "w", encoding="utf-8") as f:
                f.write(text + "\n")
        return text

    def table(self) -> str:
        """A plain-text table, one row per case: the total check (error, bound, their least
        elementwise ratio), the rounding check's least ratio, and the verdict."""
        cols: tuple[str, ...] = ("method", "kernel", "dtype", "family", "n", "max err")
        cols += ("bound", "bound/err", "round bound/err", "verdict")
        rows = []
        for c in self.cases:
            n = str(c.shape[0]) if c.shape[0] == c.shape[1] else f"{c.shape[0]}x{c.shape[1]}"
            rnd = f"{c.rounding.tightness:.3g}" if c.rounding is not None else "-"
            rows.append(
                (
                    c.method,
                    c.kernel,
                    c.dtype,
                    c.family,
                    n,
                    f"{c.total.max_error:.3g}",
                    f"{c.total.max_bound:.3g}",
                    f"{c.total.tightness:.3g}",
                    rnd,
                    c.verdict,
                )
            )
        widths = [max(len(r[i]) for r in [cols, *rows]) for i in range(len(cols))]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        lines = [fmt.format(*cols), fmt.format(*("-" * w for w in widths))]
        lines += [fmt.format(*r) for r in rows]
        return "\n".join(lines)

    def plot(self, path: str | None = None) -> Any:
        """Histograms of the elementwise ``error / bound``, per method and check, log scale.

        One row per method; the left panel is the total check, the right one the rounding
        check; one histogram per storage format. The line at 1 is the bound (every element
        must lie left of it). Elements with a zero or infinite error or bound are left out
        (counted in the legend). Uses matplotlib's Agg backend.

        Parameters
        ----------
        path : str, optional
            Where to write the PNG.

        Returns
        -------
        matplotlib.figure.Figure
        """
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        methods = list(dict.fromkeys(c.method for c in self.cases)) or ["(no cases)"]
        checks = ("total", "rounding")
        fig, axes = plt.subplots(len(methods), 2, figsize=(11, 2.6 * len(methods)), squeeze=False)
        for row, method in zip(axes, methods, strict=True):
            cases = [c for c in self.cases if c.method == method]
            for ax, check in zip(row, checks, strict=True):
                for dtype in dict.fromkeys(c.dtype for c in cases):
                    pairs = [
                        c.arrays[check] for c in cases if c.dtype == dtype and check in c.arrays
                    ]
                    if not pairs:
                        continue
                    err = np.concatenate([e for e, _ in pairs])
                    bnd = np.concatenate([b for _, b in pairs])
                    keep = (err > 0) & (bnd > 0) & np.isfinite(err) & np.isfinite(bnd)
                    label = f"{dtype}: {keep.sum()} elements ({(~keep).sum()} zero/inf left out)"
                    if keep.any():
                        ratio = np.log10(err[keep] / bnd[keep])
                        ax.hist(ratio, bins=60, histtype="step", label=label)
                ax.axvline(0.0, color="k", lw=1)
                ax.set_title(f"{method}: {check} check", fontsize=9)
                ax.set_xlabel("log10(|out - reference| / bound)", fontsize=8)
                ax.set_ylabel("elements", fontsize=8)
                if ax.get_legend_handles_labels()[0]:
                    ax.legend(fontsize=7)
        fig.tight_layout()
        if path is not None:
            fig.savefig(path, dpi=110)
        plt.close(fig)
        return fig


def audit(
    fn: Callable[..., torch.Tensor],
    method: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    precision: Any = None,
    family: str = "given",
    kernel: str | None = None,
    bound_options: Mapping[str, Any] | None = None,
    **params: Any,
) -> AuditReport:
    """Audit ``fn(q, k, v, **params)`` against the references and bound of ``method``.

    Parameters
    ----------
    fn : callable
        The implementation under audit, called as ``fn(q, k, v, **params)`` with exactly the
        keywords given here; returns ``[..., n_q, d_v]``.
    method : str
        The method whose references and bound apply (``"softmax"``, ``"log"``,
        ``"taylor"``, ...; see :mod:`attnprec.attention`).
    q, k, v : torch.Tensor
        The inputs, taken as exact (their stored values).
    precision : Precision or format-like, optional
        The precision ``fn`` declares (where it stores, computes, accumulates); a format
        stands for ``Precision(fmt)``; default: the storage format of ``q``.
    family : str
        Label of the input family, for the report.
    kernel : str, optional
        Label of the function (default: its ``__name__``).
    bound_options : mapping, optional
        Keywords for the bound only: ``target``, ``confidence`` (a probabilistic bound,
        required for random features), ``block``.
    **params
        The method's keywords (``causal``, ``scale``, ``degree``, ``projection``, ...),
        passed alike to ``fn``, the references and the bound (keywords that only say how to
        compute, such as ``chunk_size``, go to ``fn`` and the bound only).

    Returns
    -------
    AuditReport
        One case, with the total and the rounding checks (module docstring). Its verdict is
        certified; ``audit`` itself never raises on a violation.

    Raises
    ------
    ValueError, TypeError
        Bad inputs (naming the argument), or an output of the wrong shape or type (naming
        ``fn``).
    """
    from attnprec.analysis.precision import round_to

    n_q, n_k, d_k, d_v = check_qkv(q, k, v, bool(params.get("causal", False)))
    prec = as_precision(precision, q.dtype)
    opts = dict(bound_options or {})
    unknown = set(opts) - set(_BOUND_KEYWORDS)
    if unknown:
        raise ValueError(f"bound_options: unknown keys {sorted(unknown)}; known {_BOUND_KEYWORDS}")
    name = str(kernel or getattr(fn, "__name__", type(fn).__name__))
    target = str(opts.get("target") or target_of(method))

    out = fn(q, k, v, **params)
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"fn: expected {name} to return a torch.Tensor, got {type(out).__name__}")
    expected = (*broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2]), n_q, d_v)
    if tuple(out.shape) != expected:
        raise ValueError(f"fn: {name} returned shape {tuple(out.shape)}, expected {expected}")
    out64 = out.detach().to("cpu", torch.float64)
    bound = _bound(method, q, k, v, prec, **opts, **params)

    what = {key: val for key, val in params.items() if key not in _HOW_KEYWORDS}
    ref_total = _reference(target, q, k, v, **(what if target == method else _shared(params)))
    total, masks = _check(
        f"total vs exact {target} on the inputs as given", out64, ref_total, bound, bound.total
    )
    rounding = rnd_masks = None
    # A linearized semiring has no reference of its own (only its exact target).
    if not (method == "semiring" and params.get("linearize") is not None):
        stored = [round_to(x.double(), prec.storage) for x in (q, k, v)]
        same = all(torch.equal(s, x.double()) for s, x in zip(stored, (q, k, v), strict=True))
        ref_rnd = ref_total if same and target == method else _reference(method, *stored, **what)
        rounding, rnd_masks = _check(
            f"rounding vs exact {method} on the stored inputs",
            out64,
            ref_rnd,
            bound,
            bound.rounding,
        )
    violated, undecided = masks.violated, masks.undecided
    if rnd_masks is not None:
        violated = violated | rnd_masks.violated
        undecided = undecided | rnd_masks.undecided
    undecided = undecided & ~violated
    case = AuditCase(
        method=method,
        kernel=name,
        dtype=prec.storage.name,
        family=family,
        target=target,
        shape=(n_q, n_k, d_k, d_v),
        params={key: _describe(val) for key, val in params.items()},
        precision=_precision_name(prec),
        elements=out64.numel(),
        total=total,
        rounding=rounding,
        violations=int(violated.sum()),
        undecided=int(undecided.sum()),
        backend=str(ref_total.backend),
        arrays={
            name: (m.err.flatten().numpy(), m.bound.flatten().numpy())
            for name, m in (("total", masks), ("rounding", rnd_masks))
            if m is not None
        },
    )
    return AuditReport([case])


class _Masks(NamedTuple):
    """The elementwise side of a check: verdict masks, errors and bounds."""

    violated: torch.Tensor
    undecided: torch.Tensor
    err: torch.Tensor
    bound: torch.Tensor


def _check(
    against: str, out: torch.Tensor, ref: Any, parts: Any, bound: torch.Tensor
) -> tuple[Check, _Masks]:
    """Compare ``out`` with a reference under ``bound``; certified verdicts per element."""
    value = ref.value.to(torch.float64)
    radius = torch.as_tensor(ref.radius, dtype=torch.float64).expand_as(value)
    bnd = bound.to(torch.float64).expand_as(value)
    err = (out - value).abs()
    # NaN must propagate: NaN where the reference is NaN is right, anywhere else wrong.
    nan_ref, nan_out = torch.isnan(value), torch.isnan(out)
    violated = (err - radius > bnd) | (nan_ref != nan_out)
    within = (err + radius <= bnd) | (nan_ref & nan_out)
    undecided = ~violated & ~within

    worst: dict[str, Any] = {}
    if err.numel():
        if bool(violated.any()):
            flat = int(torch.nonzero(violated.flatten())[0])
        else:
            ratio = torch.where(err > 0, bnd / err, torch.full_like(err, math.inf))
            flat = int(torch.argmin(ratio.flatten()))
        idx = tuple(int(i) for i in np.unravel_index(flat, tuple(err.shape)))

        def at(x: torch.Tensor) -> float:
            return float(x.to(torch.float64).expand_as(value)[idx])

        worst = {
            "index": list(idx),
            "error": at(err),
            "bound": at(bnd),
            "quantization": at(parts.quantization),
            "approximation": at(parts.approximation),
            "rounding": at(parts.rounding),
            "output": at(out),
            "reference": at(value),
        }
    nonzero = err > 0
    tight = float((bnd[nonzero] / err[nonzero]).min()) if bool(nonzero.any()) else math.inf
    if bool((nan_ref != nan_out).any()):
        tight = 0.0  # a NaN where a number was due (or the reverse) is infinitely wrong
    check = Check(
        against=against,
        max_error=float(err.max()) if err.numel() else 0.0,
        max_bound=float(bnd.max()) if bnd.numel() else 0.0,
        tightness=tight,
        violations=int(violated.sum()),
        undecided=int(undecided.sum()),
        max_radius=float(radius.max()) if radius.numel() else 0.0,
        worst=worst,
    )
    return check, _Masks(violated, undecided, err, bnd)


def _reference(method: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw: Any) -> Any:
    from attnprec.analysis.reference import reference

    return reference(method, q, k, v, **kw)


def _bound(
    method: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *a: Any, **kw: Any
) -> Any:
    from attnprec.analysis.bounds import attention_error_bound

    return attention_error_bound(method, q, k, v, *a, **kw)


def _shared(params: Mapping[str, Any]) -> dict[str, Any]:
    """The keywords every method takes (for the reference of a target method)."""
    return {key: params[key] for key in ("causal", "scale") if key in params}


def _precision_name(p: Precision) -> str:
    return (
        f"storage={p.storage.name}, compute={p.compute.name}, "
        f"accumulate={p.accumulate.name}, rounding={p.rounding}"
    )
