"""Precision fingerprint: the least declarations an implementation meets.

:func:`infer_precision` runs the implementation twice on the same inputs, computes its
references once, and audits the outputs against a ladder of candidate declarations (the
storage format fixed; compute and accumulate from fp64 down to fp16/bf16; optionally
several schedules). A candidate is *met* when no element is violated, atypical (beyond
the probabilistic bound) or unbounded, in both outputs where they differ; the fingerprint
names the met candidates that no other met one is finer than (each format at least as
precise and as wide) — "consistent with fp32 compute, fp32 accumulate" — or, when none is
met, "exceeds even <the loosest candidate>". It rests on one input: a kernel whose
precision changes with the input or the length meets it there only, and a defect of a few
ulps may be consistent with a coarse declaration (a 5% scale error with fp16 compute on
fp32 storage). Where the output store dominates (fp16 or bf16 storage) several candidates
are indistinguishable.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from attnprec.analysis.audit import (
    DEFAULT_CONFIDENCE,
    _judge,
    _references,
    _run,
    _take_output,
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
        One sentence: "consistent with ...", or "exceeds even ...".
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
    refs = _references(method, q, k, v, precs[0], {}, params)
    run = _take_output(refs, fn, None, kernel, params)
    # A second call on the same inputs: a kernel whose outputs differ between calls meets a
    # candidate only where both do (a review: one that cast its weights to bf16 on every
    # second call was named fp64 compute after one call, and violated it on the next)
    again, mutated = _run(fn, run.name, q, k, v, params)
    again64 = again.detach().to("cpu", torch.float64).reshape(run.out.shape)
    runs = [run]
    if not torch.equal(again64.nan_to_num(7.0), run.out.nan_to_num(7.0)) or (
        not torch.equal(torch.isnan(again64), torch.isnan(run.out))
    ):
        runs.append(run._replace(out=again64, mutated=run.mutated or mutated))
    rows: list[dict[str, Any]] = []
    for prec in precs:
        cases = [_judge(r, prec, confidence, {}, params, "given", ()) for r in runs]
        case = max(cases, key=lambda x: sum(x.counts[k] for k in x.counts if k != "within"))
        c = case.counts
        # (a function that writes into its inputs meets nothing: the audit's VIOLATED)
        met = not any(r.mutated for r in runs) and all(
            x.counts["violated"] == x.counts["atypical"] == x.counts["unbounded"] == 0
            and x.counts["undecided"] == 0
            for x in cases
        )
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
        # The met declarations that no other met one is finer than: the bounds' medians
        # do not order declarations (a review: a kernel accumulating in bf16 was named
        # tf32 compute, fp32 accumulate, the least median, and violated it on the next
        # input; fp32 compute, bf16 accumulate, met too, held there)
        least = [r for r in met_rows if not any(_finer(o, r) for o in met_rows)]
        b = least[0]
        best = b["precision"]
        names = " or ".join(
            dict.fromkeys(f"{r['compute']} compute, {r['accumulate']} accumulate" for r in least)
        )
        calls = "two calls" if len(runs) == 1 else "two calls, whose outputs differ,"
        summary = (
            f"consistent with {names} (storage {fs.name}; the least of the {len(met_rows)} "
            f"of {len(rows)} declarations tried that {calls} on this input meet: a "
            "fingerprint, not an audit of a declaration)"
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


def _finer(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether candidate ``a`` is strictly finer than ``b``: the same schedule and sums,
    compute and accumulate each at least as precise and as wide, one of them more."""
    if (a["block"], a["sums"]) != (b["block"], b["sums"]):
        return False
    fa = [Format.of(a[k]) for k in ("compute", "accumulate")]
    fb = [Format.of(b[k]) for k in ("compute", "accumulate")]
    if not all(x.u <= y.u and x.max >= y.max for x, y in zip(fa, fb, strict=True)):
        return False
    return any(x.u < y.u or x.max > y.max for x, y in zip(fa, fb, strict=True))


def _median_bound(case: Any) -> float:
    """Median over the elements of the sound total bound (inf where unbounded)."""
    import numpy as np

    bound = case.arrays["total"][1]
    return float(np.median(bound)) if bound.size else float("inf")
