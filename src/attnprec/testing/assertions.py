"""Assertions for users' test suites: is an attention implementation within its bound?"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from attnprec.analysis.audit import AuditReport, audit

__all__ = ["BoundViolation", "assert_within_bound"]


class BoundViolation(AssertionError):
    """Raised by :func:`assert_within_bound`; ``.report`` holds the full audit."""

    def __init__(self, message: str, report: AuditReport) -> None:
        super().__init__(message)
        self.report = report


def assert_within_bound(
    fn: Callable[..., torch.Tensor],
    method: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    precision: Any = None,
    bound_options: Mapping[str, Any] | None = None,
    allow_unbounded: bool = False,
    allow_atypical: bool = False,
    **params: Any,
) -> AuditReport:
    """Assert that ``fn(q, k, v, **params)`` is within the certified error bound of ``method``.

    Runs ``fn``, computes the certified reference and the bound for the declared
    ``precision`` (see :func:`attnprec.analysis.audit.audit`), and fails when any output
    element is provably outside the sound bound (or inf/NaN where the exact value is
    finite), cannot be proved inside it, has no finite bound (was not checked), or is
    provably beyond the probabilistic bound; the last two can be accepted.

    Parameters
    ----------
    fn : callable
        The implementation under test, called as ``fn(q, k, v, **params)``.
    method : str
        The method whose reference and bound apply.
    q, k, v : torch.Tensor
        Inputs (taken as exact).
    precision : Precision or format-like, optional
        Where ``fn`` stores, computes and accumulates (default: storage in ``q``'s dtype,
        fp32 compute and accumulate). Declaring wider formats than ``fn`` really uses gives
        a bound too small for it, and the assertion may fail.
    bound_options : mapping, optional
        ``target``, ``confidence`` (of the probabilistic bound), ``block`` for the bound
        only (see :func:`attnprec.analysis.audit.audit`).
    allow_unbounded, allow_atypical : bool
        Accept elements whose bound is infinite (not checked), or that lie beyond the
        probabilistic bound but within the sound one.
    **params
        The method's keywords, passed to ``fn``, the reference and the bound alike.

    Returns
    -------
    AuditReport
        The audit, when the assertion holds (for tightness checks).

    Raises
    ------
    BoundViolation
        An ``AssertionError`` whose message says where, by how much, and which part of the
        bound (quantization, approximation, rounding) dominates there.
    """
    report = audit(
        fn,
        method,
        q,
        k,
        v,
        precision=precision,
        bound_options=bound_options,
        allow_unbounded=allow_unbounded,
        allow_atypical=allow_atypical,
        **params,
    )
    bad = [c for c in report.cases if c.verdict != "ok"]
    if bad:
        raise BoundViolation("\n".join(c.describe() for c in bad), report)
    return report
