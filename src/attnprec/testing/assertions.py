"""Assertions for users' test suites: is an attention implementation within its bound?

A failing assertion saves its inputs, keywords and declaration to a ``.pt`` file (under
``$ATTNPREC_FAILURES`` or ``.attnprec/failures`` in the working directory) and names it
in the message; :func:`replay` (or ``attnprec replay FILE``) audits them again.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from attnprec.analysis.audit import AuditReport, audit

__all__ = ["BoundViolation", "assert_within_bound", "replay"]


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
    flags = {"allow_unbounded": allow_unbounded, "allow_atypical": allow_atypical}
    report = audit(
        fn, method, q, k, v, precision=precision, bound_options=bound_options,
        allow_unbounded=allow_unbounded, allow_atypical=allow_atypical, **params,
    )  # fmt: skip
    bad = [c for c in report.cases if c.verdict != "ok"]
    if bad:
        case = {"method": method, "q": q, "k": k, "v": v, "params": params,
                "precision": precision, "bound_options": dict(bound_options or {}),
                "flags": flags, "kernel": _path_of(fn)}  # fmt: skip
        where = _save(case)
        how = f"attnprec replay {where}" + ("" if case["kernel"] else " --kernel MODULE:FUNCTION")
        text = "\n".join(c.describe() for c in bad)
        raise BoundViolation(f"{text}\n  inputs saved to {where}; replay: {how}", report)
    return report


def _path_of(fn: Any) -> str | None:
    """``"module:qualname"`` of ``fn`` when it can be imported back, else None."""
    module, name = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    if not module or "<" in name or module == "__main__":
        return None
    return f"{module}:{name}"


def _save(case: dict[str, Any]) -> Path:
    folder = Path(os.environ.get("ATTNPREC_FAILURES", ".attnprec/failures"))
    folder.mkdir(parents=True, exist_ok=True)
    payload = {key: val for key, val in case.items() if key != "kernel"}
    digest = hashlib.sha1(repr(sorted(payload, key=str)).encode())
    for x in (case["q"], case["k"], case["v"]):
        digest.update(x.detach().cpu().contiguous().numpy().tobytes())
    path = folder / f"{case['method']}-{digest.hexdigest()[:12]}.pt"
    torch.save(case, path)
    return path


def replay(path: str | os.PathLike[str], kernel: Any = None) -> AuditReport:
    """Audit again the case a failing :func:`assert_within_bound` saved at ``path``.

    Parameters
    ----------
    path : str or path-like
        The ``.pt`` file named in the failure's message.
    kernel : callable or str, optional
        The implementation to audit (a callable, or ``"module:function"``); default the
        one that failed, when it could be imported back.

    Returns
    -------
    AuditReport
        The audit (certified verdicts, as :func:`attnprec.analysis.audit.audit`).

    Raises
    ------
    ValueError
        The file holds no saved case, or no kernel is known (naming ``kernel``).
    """
    from attnprec.runner import load_function

    case = torch.load(path, weights_only=False)
    if not isinstance(case, dict) or "method" not in case:
        raise ValueError(f"path: {path} holds no case saved by assert_within_bound")
    fn = kernel if kernel is not None else case.get("kernel")
    if fn is None:
        raise ValueError("kernel: the failing function cannot be imported back; pass kernel=")
    if isinstance(fn, str):
        fn = load_function(fn)
    return audit(
        fn, case["method"], case["q"], case["k"], case["v"], precision=case["precision"],
        bound_options=case["bound_options"], **case["flags"], **case["params"],
    )  # fmt: skip
