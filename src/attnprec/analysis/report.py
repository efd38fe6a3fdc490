"""What an audit found: element classes, checks, cases and the report (table, JSON, plot).

Every output element of an audited case falls in exactly one class, from least to most
severe (:data:`CLASSES`):

``within``
    certified inside the sound bound and not beyond the probabilistic one;
``atypical``
    certified inside the sound bound but certified beyond the probabilistic bound at its
    stated confidence: no proof of a defect, a finding worth a look (a correct kernel lands
    here with probability at most ``1 - confidence`` per case, when the model of the
    probabilistic bound holds; see docs/bounds.md);
``undecided``
    the reference was too coarse to tell on which side of the bound the error lies;
``unbounded``
    no finite bound (an intermediate may overflow, a normalizer may vanish): **not
    checked**, never a pass; the report names the intermediate responsible;
``violated``
    certified outside the sound bound, or inf/NaN where the exact value and the bound are
    finite, or a number where NaN inputs make the exact value NaN.

A case (and a report) passes when no element is in a failing class; ``unbounded`` and
``atypical`` can be accepted explicitly, but a case whose every element is unbounded checked
nothing and is ``UNBOUNDED`` even so, and so is one with an inf or NaN output on an
unbounded element (:attr:`AuditCase.unbounded_nonfinite`). :data:`EXIT_STATUS` gives the
``attnprec audit`` exit status of the most severe failing class. What was not judged never
passes: a run interrupted before every case ran (or a case whose row shards did not all run)
is ``PARTIAL`` when nothing worse was found, and a non-finite output on a row a sampled
audit did not judge makes its case ``UNDECIDED``. A case with no output element (``n_q``,
``d_v`` or a batch dimension 0) has nothing to judge: its verdict is ``ok`` (its shape was
checked) and the report says the case is empty.

The JSON is strict (RFC 8259): a non-finite number is written as the string ``"inf"``,
``"-inf"`` or ``"nan"`` (:func:`json_value`; ``float()`` reads them back).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "CLASSES",
    "EXIT_STATUS",
    "ACCEPTABLE",
    "Check",
    "AuditCase",
    "AuditReport",
    "VERDICTS",
    "verdict_of",
    "json_value",
]

#: Element classes, least to most severe.
CLASSES = ("within", "atypical", "undecided", "unbounded", "violated")
#: Classes a caller may accept (``allow_unbounded``, ``allow_atypical``).
ACCEPTABLE = ("atypical", "unbounded")
#: Verdicts, least to most severe: ``PARTIAL`` is a run (or case) that did not judge all it
#: was asked to, where what it judged passed.
VERDICTS = ("ok", "PARTIAL", "ATYPICAL", "UNDECIDED", "UNBOUNDED", "VIOLATED")
#: Exit status of ``attnprec audit`` by verdict (2 is a usage error; 1 also covers cases that
#: could not be audited; 130, Ctrl-C's, is also the status of any interrupted run).
EXIT_STATUS = {
    "ok": 0,
    "PARTIAL": 130,
    "VIOLATED": 1,
    "UNBOUNDED": 3,
    "UNDECIDED": 4,
    "ATYPICAL": 5,
}


def verdict_of(counts: dict[str, int], accepted: Iterable[str] = ()) -> str:
    """``"ok"`` or the most severe class present and not accepted, in capitals."""
    acc = set(accepted)
    for cls in reversed(CLASSES[1:]):
        if counts.get(cls, 0) and cls not in acc:
            return cls.upper()
    return "ok"


def json_value(obj: Any) -> Any:
    """``obj`` with every non-finite float as the string ``"inf"``, ``"-inf"`` or ``"nan"``
    (dicts, lists and tuples walked), for strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {key: json_value(val) for key, val in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_value(val) for val in obj]
    return obj


@dataclass
class Check:
    """One elementwise comparison of the output with a certified reference and a bound.

    Attributes
    ----------
    against : str
        What the output is compared with (the reference and which part of the bound).
    counts : dict
        Elements per class (:data:`CLASSES`).
    max_error : float
        Largest ``|out - reference|`` over the elements with a finite output and reference
        (NaN when none); ``inf`` where an output is inf or NaN and the exact value is
        certified finite, whether its element is checked or not.
    max_bound : float
        Largest finite sound bound (``inf`` when every element is unbounded).
    tightness : float
        Least ``bound / error`` over the checked elements (finite bound, nonzero error):
        at least 1 when nothing is violated, 1 would be a bound attained; ``inf`` if no
        element has an error; 0 when an inf/NaN output is a violation.
    typical_bound, typical_tightness : float or None
        The same for the probabilistic bound (None when the check has none).
    confidence : float or None
        The confidence of the probabilistic bound.
    max_radius : float
        Largest reference radius.
    unbounded_by : dict
        Unbounded elements per intermediate that makes the bound infinite.
    worst : dict
        The first violated element, else the first unbounded, undecided, atypical one (of
        the classes not accepted), else the one attaining ``tightness``: ``index`` (its
        row among the judged rows of a sampled case, :attr:`AuditCase.rows`),
        ``class``, ``error``, ``bound``,
        ``typical_bound``, the bound's parts ``quantization``, ``approximation``,
        ``rounding`` there, ``output`` and ``reference``.
    max_checked_error : float
        Largest ``|out - reference|`` over the elements with a finite bound (those the
        verdict judged against ``max_bound``'s bounds; NaN when none).
    accepted : tuple of str
        The classes the case accepts (:attr:`AuditCase.accepted`).
    """

    against: str
    counts: dict[str, int]
    max_error: float
    max_bound: float
    tightness: float
    typical_bound: float | None
    typical_tightness: float | None
    confidence: float | None
    max_radius: float
    unbounded_by: dict[str, int]
    worst: dict[str, Any]
    max_checked_error: float = math.nan
    accepted: tuple[str, ...] = ()

    @property
    def violations(self) -> int:
        """Violated elements."""
        return self.counts["violated"]

    @property
    def undecided(self) -> int:
        """Undecided elements."""
        return self.counts["undecided"]

    @property
    def verdict(self) -> str:
        """``"ok"`` or the most severe class present and not accepted."""
        return verdict_of(self.counts, self.accepted)

    def describe(self, rows: list[int] | None = None, layout: str | None = None) -> str:
        """Where the bound is tightest or violated, by how much, which part dominates there
        (``rows``: the sequence rows of a sampled case, which ``worst``'s row index is
        among; ``layout``: ``"bthd"`` for a kernel whose tensors are ``[B, T, H, D]``, whose
        index is given beside the ``[B, H, T, D]`` one)."""
        lines = [f"  {self.against}: {self.verdict}"]
        bad = {c: n for c, n in self.counts.items() if n and c != "within"}
        if bad:
            lines.append("    " + ", ".join(f"{n} {c}" for c, n in bad.items()))
        if self.unbounded_by:
            why = ", ".join(f"{name} ({n})" for name, n in self.unbounded_by.items())
            lines.append(f"    not checked (no finite bound), because of: {why}")
        if self.counts["undecided"]:
            lines.append(f"    reference radius up to {self.max_radius:.3g}")
        w = self.worst
        if w:
            ratio = w["error"] / w["bound"] if w["bound"] > 0 else math.inf
            typ = "" if w["typical_bound"] is None else f", typical {w['typical_bound']:.6g}"
            idx = list(w["index"])
            if rows is not None and len(idx) >= 2:  # (the row in the sequence)
                idx[-2] = rows[idx[-2]]
            at = str(tuple(idx))
            if layout == "bthd" and len(idx) == 4:
                at += f" (the kernel's [B, T, H, D] index {(idx[0], idx[2], idx[1], idx[3])})"
            lines.append(
                f"    at index {at} ({w['class']}): |out - ref| = "
                f"{w['error']:.6g}, bound = {w['bound']:.6g}{typ} (error/bound = {ratio:.3g}); "
                f"output {w['output']!r}, reference {w['reference']!r}"
            )
            lines.append(
                f"    bound parts there: quantization {w['quantization']:.3g}, "
                f"approximation {w['approximation']:.3g}, rounding {w['rounding']:.3g}"
            )
        typ = (
            ""
            if self.typical_tightness is None
            else f", min typical bound/error {self.typical_tightness:.3g} (p={self.confidence})"
        )
        checked = (
            "none bounded"
            if math.isnan(self.max_checked_error)
            else f"{self.max_checked_error:.3g} where bounded"
        )
        lines.append(
            f"    max error {self.max_error:.3g} ({checked}), "
            f"max bound {self.max_bound:.3g}, "
            f"min bound/error {self.tightness:.3g}{typ}"
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
        The declared precision, with the evaluation orders its bound covers.
    elements : int
        Output elements compared (those of the sampled rows, see ``rows``).
    counts : dict
        Elements per class over both checks (an element's class is its worse one).
    total : Check
        ``|out - target(q, k, v)|`` against the total bound.
    rounding : Check or None
        ``|out - method(stored q, k, v)|`` against the rounding part (None where the method
        has no reference of its own, e.g. a linearized semiring).
    backend : str
        The references' backend.
    accepted : tuple of str
        Classes accepted for this case (``allow_unbounded``, ``allow_atypical``).
    outside_hull : int or None
        For methods whose output is a convex combination of the values: finite outputs
        outside ``[min_j v_j, max_j v_j]`` (stored values, visible keys); None otherwise.
        A finding, not a verdict (rounding may leave the hull by an ulp).
    mutated : list of str
        Inputs the function wrote into (a violation of the whole case).
    rows : list of int or None
        The query rows the verdict covers when sampled (None: every row).
    unjudged_nonfinite : list of int
        Rows the audit did not judge (not sampled) where the output holds inf or NaN. The
        exact output may be NaN there too (NaN inputs, a vanishing normalizer), so they are
        not certified violations; but they are not checked either: the case is
        ``UNDECIDED`` (judge them with ``rows=`` these rows).
    unbounded_nonfinite : int
        Unbounded elements whose output is inf or NaN where the exact value is certified
        finite (the declaration admits an overflow or a vanishing normalizer there, so it
        is no proof of a defect), other than the correctly rounded inf of an exact value
        past the overflow threshold and what inputs rounded to storage leave undefined:
        the case is at least ``UNBOUNDED`` even where unbounded elements are accepted.
    hints : list of str
        The declarations that describe the usual kernels, where the case fails for a reason
        theirs explain: elements unbounded by a row shifted by a logit it does not see
        (``block=None``) or by log-space sums (``sums=None``); violations under a compute
        finer than storage, or under a default scale ``1/sqrt(d)`` that a kernel holds in
        storage. Narrowest first.
    partial : bool
        Only some of the case's row shards ran (an interrupted run): ``rows`` are the rows
        judged; the verdict is ``PARTIAL`` when they pass.
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
    counts: dict[str, int]
    total: Check
    rounding: Check | None
    backend: str
    accepted: tuple[str, ...] = ()
    outside_hull: int | None = None
    mutated: list[str] = field(default_factory=list)
    rows: list[int] | None = None
    unjudged_nonfinite: list[int] = field(default_factory=list)
    unbounded_nonfinite: int = 0
    hints: list[str] = field(default_factory=list)
    partial: bool = False
    arrays: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict, repr=False)

    @property
    def violations(self) -> int:
        """Violated elements (in either check)."""
        return self.counts["violated"]

    @property
    def undecided(self) -> int:
        """Undecided elements."""
        return self.counts["undecided"]

    @property
    def unbounded(self) -> int:
        """Elements with no finite bound (not checked)."""
        return self.counts["unbounded"]

    @property
    def atypical(self) -> int:
        """Elements beyond the probabilistic bound (within the sound one)."""
        return self.counts["atypical"]

    @property
    def verdict(self) -> str:
        """``"ok"``, ``"PARTIAL"``, ``"ATYPICAL"``, ``"UNDECIDED"``, ``"UNBOUNDED"`` or
        ``"VIOLATED"``: the most severe class present and not accepted (an input written
        into is VIOLATED, a non-finite output on a row not judged at least UNDECIDED, a
        case with shards missing at least PARTIAL, one whose every element is unbounded
        UNBOUNDED even where unbounded elements are accepted: it checked nothing; so is
        one with an inf or NaN output on an unbounded element, ``unbounded_nonfinite``)."""
        if self.mutated:
            return "VIOLATED"
        verdict = verdict_of(self.counts, self.accepted)
        if verdict == "ok" and self.elements and self.unbounded == self.elements:
            verdict = "UNBOUNDED"  # accepted or not: a case with no element checked never passes
        if self.unbounded_nonfinite and VERDICTS.index(verdict) < VERDICTS.index("UNBOUNDED"):
            verdict = "UNBOUNDED"  # accepted or not: an inf or NaN output never passes
        if self.unjudged_nonfinite and VERDICTS.index(verdict) < VERDICTS.index("UNDECIDED"):
            return "UNDECIDED"
        return "PARTIAL" if verdict == "ok" and self.partial else verdict

    @property
    def sampled(self) -> str:
        """``"all"`` (every row judged) or ``"R of N"`` (R of the N query rows)."""
        return "all" if self.rows is None else f"{len(self.rows)} of {self.shape[0]}"

    def to_dict(self) -> dict[str, Any]:
        """Every figure of the case (the elementwise arrays left out)."""
        d = asdict(self)
        del d["arrays"]
        d["verdict"] = self.verdict
        return d

    def describe(self, layout: str | None = None) -> str:
        """A readable account of both checks (``layout``: ``"bthd"`` for a kernel whose
        tensors are ``[B, T, H, D]``: the worst elements' indices in it too)."""
        rows = "" if self.rows is None else f", {self.sampled} rows judged"
        head = (
            f"{self.kernel} ({self.method}, {self.dtype}, {self.family}, "
            f"n_q={self.shape[0]}, n_k={self.shape[1]}, d_k={self.shape[2]}, "
            f"d_v={self.shape[3]}{rows}; {self.precision}): {self.verdict}, "
            f"{self.violations} of {self.elements} elements violated, "
            f"{self.unbounded} unbounded, {self.undecided} undecided, {self.atypical} atypical"
        )
        lines = [head]
        if not self.elements:
            lines.append("  no output element: nothing to judge (the shape was checked)")
        elif self.unbounded == self.elements:
            lines.append("  no element checked: every bound is infinite (accepted or not)")
        if self.partial:
            lines.append("  interrupted: only these rows' shards ran")
        if self.unjudged_nonfinite:
            few = ", ".join(map(str, self.unjudged_nonfinite[:8]))
            more = ", ..." if len(self.unjudged_nonfinite) > 8 else ""
            lines.append(
                f"  inf or NaN outputs on {len(self.unjudged_nonfinite)} rows not judged "
                f"(rows {few}{more}): not checked, judge them with rows="
            )
        if self.unbounded_nonfinite:
            lines.append(
                f"  inf or NaN outputs on {self.unbounded_nonfinite} unbounded elements where "
                "the exact value is finite: the declaration may overflow there (named below), "
                "so no proof of a defect; never accepted"
            )
        if self.mutated:
            lines.append(f"  the function wrote into its inputs: {', '.join(self.mutated)}")
        acc = [a for a in self.accepted if a != "unbounded" or not self.unbounded_nonfinite]
        if acc:
            lines.append(f"  accepted: {', '.join(acc)}")
        if self.outside_hull:
            lines.append(
                f"  {self.outside_hull} outputs outside [min v, max v] of the visible values"
            )
        checks = [self.total] + ([self.rounding] if self.rounding is not None else [])
        hints = [f"  hint: {h}" for h in self.hints]
        return "\n".join([*lines, *(c.describe(self.rows, layout) for c in checks), *hints])


@dataclass
class AuditReport:
    """The audits of one or more (function, inputs) cases.

    Add reports with ``+``. :attr:`verdict` is the most severe case verdict (``"ok"`` when
    every case passes, nothing failed to run and nothing was left unrun),
    :attr:`exit_status` its exit status. ``failures`` lists the audits that raised (as
    recorded by a caller such as the ``attnprec audit`` command: what, and the error);
    ``partial`` is set when the audit was interrupted before every case ran, and
    ``not_run`` lists what did not run (each ``kernel``, ``method``, ``dtype``, ``family``,
    and the ``missing_shards`` of its ``shards``). ``fingerprints`` holds precision
    fingerprints (each ``kernel``, ``method``, ``dtype``, ``family`` and its
    :class:`~attnprec.analysis.fingerprint.Fingerprint` as ``fingerprint``): one that meets
    no declaration tried makes the verdict ``"VIOLATED"``. ``retried`` lists the jobs of a
    process pool that were rerun alone after a worker process died while they ran (a crash,
    in a kernel or not, or the out-of-memory killer: the pool cannot tell which job of
    those in flight): their results are the reruns'; the verdict does not count the death,
    the report says it.
    """

    cases: list[AuditCase] = field(default_factory=list)
    failures: list[dict[str, str]] = field(default_factory=list)
    partial: bool = False
    not_run: list[dict[str, Any]] = field(default_factory=list)
    fingerprints: list[dict[str, Any]] = field(default_factory=list)
    retried: list[dict[str, Any]] = field(default_factory=list)

    def __add__(self, other: AuditReport) -> AuditReport:
        return AuditReport(
            self.cases + other.cases,
            self.failures + other.failures,
            self.partial or other.partial,
            self.not_run + other.not_run,
            self.fingerprints + other.fingerprints,
            self.retried + other.retried,
        )

    def count(self, cls: str) -> int:
        """Elements of class ``cls`` over all cases."""
        if cls not in CLASSES:
            raise ValueError(f"cls: expected one of {CLASSES}, got {cls!r}")
        return sum(c.counts[cls] for c in self.cases)

    @property
    def violations(self) -> int:
        """Violated elements over all cases."""
        return self.count("violated")

    @property
    def verdict(self) -> str:
        """The most severe case verdict; ``"VIOLATED"`` when an audit failed to run or a
        fingerprint meets no declaration; ``"PARTIAL"`` (never ``"ok"``) when the run was
        interrupted and nothing worse was found."""
        worst = max((VERDICTS.index(c.verdict) for c in self.cases), default=0)
        if self.failures or any(p["fingerprint"].best is None for p in self.fingerprints):
            worst = len(VERDICTS) - 1
        if self.partial or self.not_run:
            worst = max(worst, VERDICTS.index("PARTIAL"))
        return VERDICTS[worst]

    @property
    def ok(self) -> bool:
        """True when every case passes, nothing failed to run and the run was complete."""
        return self.verdict == "ok"

    @property
    def exit_status(self) -> int:
        """0 ok, 1 violated (or an audit failed to run), 3 unbounded, 4 undecided, 5 atypical;
        130 for an interrupted run, whatever it found (the verdict says what)."""
        if self.partial or self.not_run:
            return EXIT_STATUS["PARTIAL"]
        return EXIT_STATUS[self.verdict]

    def to_json(self, path: str | None = None) -> str:
        """Every figure as strict JSON (non-finite numbers as ``"inf"``, ``"-inf"``,
        ``"nan"``: :func:`json_value`), returned, and written to ``path`` when given.

        Raises
        ------
        ValueError
            If ``path`` cannot be written (the message names it).
        """
        content = {
            "ok": self.ok,
            "verdict": self.verdict,
            "partial": self.partial,
            # ok or not, these cases' verdicts cover their sampled rows only
            "sampled_cases": sum(c.rows is not None and not c.partial for c in self.cases),
            "counts": {cls: self.count(cls) for cls in CLASSES},
            "violations": self.violations,
            "cases": [c.to_dict() for c in self.cases],
            "failures": self.failures,
            "not_run": self.not_run,
            "retried": self.retried,
            "fingerprints": [
                {**p, "fingerprint": asdict(p["fingerprint"])} for p in self.fingerprints
            ],
        }
        text = json.dumps(json_value(content), indent=1, default=str, allow_nan=False)
        if path is not None:
            # whole or not at all: a copy beside it, then renamed over it (an interrupted
            # write left a truncated file, or an earlier run's that looked current)
            tmp = f"{path}.tmp{os.getpid()}"
            try:
                with open(tmp, "w", encoding="utf-8") as f:
                    f.write(text + "\n")
                os.replace(tmp, path)
            except OSError as e:
                with contextlib.suppress(OSError):
                    os.remove(tmp)
                raise ValueError(f"path: cannot write {path!r}: {e.strerror or e}") from None
        return text

    def table(self) -> str:
        """A plain-text table, one row per case: the rows judged (``all``, ``R of N`` sampled,
        ``empty`` without an output element), the total check's largest error and largest
        bound over the elements with a finite bound and least elementwise bound/error, the
        rounding check's least bound/error, the element counts per failing class and the
        verdict."""
        cols: tuple[str, ...] = ("method", "kernel", "dtype", "family", "n", "rows", "max err")
        cols += ("max bound", "min bound/err", "min round b/e")
        cols += ("viol", "unbd", "undec", "atyp", "verdict")
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
                    c.sampled if c.elements else "empty",
                    f"{c.total.max_checked_error:.3g}",
                    f"{c.total.max_bound:.3g}",
                    f"{c.total.tightness:.3g}",
                    rnd,
                    str(c.counts["violated"]),
                    str(c.counts["unbounded"]),
                    str(c.counts["undecided"]),
                    str(c.counts["atypical"]),
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

        Raises
        ------
        ImportError
            Without matplotlib (the message names the ``plot`` extra).
        """
        try:
            import matplotlib
        except ImportError:
            raise ImportError("plot: needs matplotlib (pip install 'attnprec[plot]')") from None

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
            try:
                fig.savefig(path, dpi=110)
            except OSError as e:
                plt.close(fig)
                raise ValueError(f"path: cannot write {path!r}: {e.strerror or e}") from None
        plt.close(fig)
        return fig
