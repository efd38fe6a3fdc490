"""Precision fingerprint: the tightest declaration an implementation meets.

:func:`infer_precision` runs the implementation once, computes its references once, and
audits the output against a ladder of candidate declarations (the storage format fixed;
compute and accumulate from fp64 down to fp16/bf16; optionally several schedules). A
candidate is *met* when no element is violated, atypical (beyond the probabilistic
bound) or unbounded; the fingerprint is the met candidate with the smallest bounds — "the
kernel behaves as (is consistent with) fp32 compute and fp32 accumulate" — or, when none
is met, "exceeds even <the loosest candidate>". Where the output store dominates (fp16 or
bf16 storage) several candidates are indistinguishable and the tightest of them is named.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from attnprec.analysis.audit import (
    DEFAULT_CONFIDENCE,
    _judge,
    _prepare,
)
from attnprec.analysis.precision import ONE_PASS, Format, Precision

__all__ = ["CANDIDATES", "Fingerprint", "infer_precision"]

#: (compute, accumulate) candidates, from the most to the least accurate.
CANDIDATES: tuple[tuple[str, str], ...] = (
    ("fp64", "fp64"),
    ("fp32", "fp32"),
    ("tf32", "fp32"),
    ("bf16", "fp32"),
    ("fp16", "fp32"),
    ("fp32", "bf16"),
    ("fp32", "fp16"),
    ("bf16", "bf16"),
    ("fp16", "fp16"),
)


@dataclass
class Fingerprint:
    """The result of :func:`infer_precision`.

    Attributes
    ----------
    storage : str
        The storage format (fixed).
    best : str or None
        The tightest candidate met (its :meth:`Precision.describe`), None if none.
    summary : str
        One sentence: "behaves as ...", or "exceeds even ...".
    rows : list of dict
        Per candidate: ``precision``, ``compute``, ``accumulate``, ``block``, ``counts``
        (element classes), ``bound`` (median over the elements of the sound total bound),
        ``max_error`` and ``met``; sorted from the tightest bounds to the loosest.
    """

    storage: str
    best: str | None
    summary: str
    rows: list[dict[str, Any]] = field(default_factory=list)

    def table(self) -> str:
        """One line per candidate, the tightest first."""
        head = f"{'compute':<8} {'accum':<6} {'block':<9} {'median bound':>13} " + (
            f"{'viol':>5} {'atyp':>5} {'unbd':>5}  met"
        )
        lines = [head, "-" * len(head)]
        names = {None: "any", ONE_PASS: "one-pass"}
        for r in self.rows:
            c = r["counts"]
            block = names.get(r["block"], str(r["block"]))
            lines.append(
                f"{r['compute']:<8} {r['accumulate']:<6} {block:<9} "
                f"{r['bound']:>13.4g} {c['violated']:>5} {c['atypical']:>5} "
                f"{c['unbounded']:>5}  {'yes' if r['met'] else 'no'}"
            )
        return "\n".join([*lines, self.summary])


def infer_precision(
    fn: Callable[..., Any],
    method: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    storage: Any = None,
    candidates: Sequence[tuple[str, str]] = CANDIDATES,
    blocks: Sequence[int | None] = (None,),
    sums: Sequence[str | None] = (None,),
    confidence: float = DEFAULT_CONFIDENCE,
    kernel: str | None = None,
    **params: Any,
) -> Fingerprint:
    """The tightest declaration ``fn(q, k, v, **params)`` meets (module docstring).

    Parameters
    ----------
    fn, method, q, k, v, **params
        As in :func:`attnprec.analysis.audit.audit`.
    storage : format-like, optional
        The storage format (default: q's dtype).
    candidates : sequence of (compute, accumulate)
        Format names to try (default :data:`CANDIDATES`).
    blocks : sequence of int or None
        Schedules to try for each pair (``Precision.block``; None: any schedule).
    sums : sequence of {None, "linear", "log"}
        Forms of the partial sums to try for each pair and schedule (``Precision.sums``;
        None: either form the method's model covers).
    confidence : float
        Of the probabilistic bound.
    kernel : str, optional
        Label of the function.

    Returns
    -------
    Fingerprint
        Every candidate's counts and median bound, and the tightest met. The
        classification of each candidate is that of the audit (certified).

    Raises
    ------
    ValueError, TypeError
        As :func:`~attnprec.analysis.audit.audit` (naming the argument); a candidate
        naming no format raises naming ``candidates``.
    """
    fs = Format.of(q.dtype if storage is None else storage)
    for form in sums:
        if form not in (None, "linear", "log"):
            raise ValueError(f"sums: expected None, 'linear' or 'log' each, got {form!r}")
    precs = []
    for pair in candidates:
        try:
            compute, accumulate = pair
            for blk in blocks:
                for form in sums:
                    precs.append(
                        Precision(
                            fs, Format.of(compute), Format.of(accumulate), block=blk, sums=form
                        )
                    )
        except (TypeError, ValueError) as e:
            msg = f"candidates: {pair!r} is not a (compute, accumulate) pair: {e}"
            raise ValueError(msg) from None
    if not precs:
        raise ValueError("candidates: expected at least one (compute, accumulate) pair")
    run = _prepare(fn, method, q, k, v, precs[0], {}, params, kernel)
    rows: list[dict[str, Any]] = []
    for prec in precs:
        case = _judge(run, prec, confidence, {}, params, "given", ())
        c = case.counts
        # (a function that writes into its inputs meets nothing: the audit's VIOLATED)
        met = not run.mutated and c["violated"] == c["atypical"] == c["unbounded"] == 0
        met = met and c["undecided"] == 0
        rows.append(
            {
                "precision": prec.describe(),
                "compute": prec.compute.name,
                "accumulate": prec.accumulate.name,
                "block": prec.block,
                "sums": prec.sums,
                "counts": c,
                "bound": _median_bound(case),
                "max_error": case.total.max_error,
                "met": met,
            }
        )
    rows.sort(key=lambda r: r["bound"])
    met_rows = [r for r in rows if r["met"]]
    if met_rows:
        b = met_rows[0]
        best = b["precision"]
        summary = (
            f"behaves as {b['compute']} compute, {b['accumulate']} accumulate "
            f"(storage {fs.name}; the tightest of {len(rows)} declarations it meets)"
        )
    elif run.mutated:
        best = None
        summary = f"writes into its inputs ({', '.join(run.mutated)}): no declaration is met"
    else:
        b = rows[-1]
        best = None
        summary = (
            f"exceeds even {b['compute']} compute, {b['accumulate']} accumulate "
            f"(storage {fs.name}): no declaration tried is met"
        )
    return Fingerprint(fs.name, best, summary, rows)


def _median_bound(case: Any) -> float:
    """Median over the elements of the sound total bound (inf where unbounded)."""
    import numpy as np

    bound = case.arrays["total"][1]
    return float(np.median(bound)) if bound.size else float("inf")
