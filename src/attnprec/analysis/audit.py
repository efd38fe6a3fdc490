"""Audit an attention implementation: its observed error against the certified bounds.

:func:`audit` runs a function on given inputs, computes certified references
(:func:`attnprec.analysis.reference.reference`) and the error bounds for the declared
precision (:func:`attnprec.analysis.bounds.attention_error_bound`: the sound worst-case
bound and the probabilistic one), and makes two checks, element by element:

- **total**: ``|out - y*(q, k, v)| <= total``, with ``y*`` the exact *target* of the method
  (softmax for taylor, polynomial and favor; the exact semiring form for a linearized
  semiring; else the method itself) on the inputs as given: quantization + approximation +
  rounding;
- **rounding**: ``|out - y(q~, k~, v~)| <= rounding``, with ``y`` the method itself on the
  inputs rounded to the storage format (and the parameters a kernel holds there: a
  state-space model's steps, decays and skips): the kernel's arithmetic alone, which the
  total check can hide behind a large approximation term.

Each element gets a certified class (:data:`attnprec.analysis.report.CLASSES`): with ``r``
the reference radius (``|exact - value| <= r``) and ``e = |out - value|`` (bounded from
both sides with directed rounding), it is

- *violated* when ``e - r > bound`` (``|out - exact| > bound`` is proved), or the output is
  inf or NaN where the exact value is certified finite and the bound finite, or a number
  where NaN inputs make the exact value NaN (NaN must propagate);
- *unbounded* when the bound is infinite (an intermediate may overflow, a normalizer may
  vanish): not checked, and never a pass unless accepted (``allow_unbounded``). An inf or
  NaN output there is no proof of a defect (the declaration admits it: a correct kernel's
  fp32 sums may overflow), but ``allow_unbounded`` never accepts it
  (``AuditCase.unbounded_nonfinite``), except an infinite output of the exact value's sign
  where the certified exact value reaches the declaration's overflow threshold (the lesser
  of compute's and the output format's: the correctly rounded result) and what inputs
  rounded to storage leave undefined;
- *undecided* when neither of the above nor ``e + r <= bound`` holds (the reference was not
  precise enough to tell);
- *atypical* when ``e + r <= bound`` but ``e - r`` exceeds the probabilistic bound;
- *within* otherwise.

Reports from several audits add up (``report_a + report_b``); :class:`AuditReport` renders
a table, JSON and a plot.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import numpy as np
import torch

from attnprec import _progress as progress
from attnprec._validate import broadcast_shapes, check_bool, check_qkv
from attnprec.analysis.precision import Precision, round_to
from attnprec.analysis.report import CLASSES, AuditCase, AuditReport, Check
from attnprec.methods import method as method_record

__all__ = [
    "Check",
    "AuditCase",
    "AuditReport",
    "DEFAULT_CONFIDENCE",
    "audit",
    "audit_output",
    "as_precision",
    "classify",
    "judged_rows",
    "row_boundaries",
    "target_of",
]

#: Confidence of the probabilistic bound per audited case (its failure probability is
#: spread over every output element), unless ``bound_options`` names one.
DEFAULT_CONFIDENCE = 1 - 1e-6

_BOUND_KEYWORDS = ("target", "confidence", "block", "evaluation", "stabilizer")
#: The reason :attr:`Check.unbounded_by` gives for unbounded elements no intermediate
#: of the bound names (listed last).
NO_FINITE_BOUND = "the bound (no finite value)"


def _hints(
    reasons: Iterable[str],
    prec: Precision,
    method: str,
    params: Mapping[str, Any],
    d_k: int,
    violated: bool,
) -> list[str]:
    """The declarations that describe the usual kernels, where a case fails for a reason
    those kernels' declarations explain: unbounded elements of a row shifted by a logit it
    does not see (``block=None``) or of partial sums held as logs in compute
    (``sums=None``); violations under a compute finer than storage (a kernel computing or
    casting its weights in storage) or under the default scale ``1/sqrt(d)`` a kernel
    holds in storage. The narrowest first: a wider declaration lets small defects pass."""
    why = set(reasons)
    hints = []
    if prec.block is None and any("normalizer" in r and "log-space" not in r for r in why):
        # (a review: a correct causal kernel was sent to allow_unbounded, which also stops
        # checking the elements that are unbounded for a reason)
        hints.append(
            "under block=None (any schedule) a kernel may shift a row by a logit it does not "
            "see (a future key, padding), losing its weights: a kernel that shifts by the "
            "keys it has seen declares its block (block=BLOCK_N, ONE_PASS; the CLI's --block)"
        )
    if any("log-space sums" in r for r in why):
        # (sums=None covers partial sums held as logs in compute, which a 16-bit compute
        # format cannot bound past a few dozen log-adds)
        hints.append(
            "sums=None covers partial sums held as logs rounded to compute: a kernel that "
            "sums values declares sums='linear' (the CLI's --sums linear), one whose log-sums "
            "are rounded once elementary=Elementary(logsum=1)"
        )
    rec = method_record(method)
    if violated and rec.rounding == "softmax" and prec.passes == 1 and prec.compute.u > 2.0**-24:
        # (with 16-bit exps a two-pass kernel's errors scale |y|: a stair of logits, 1.30x
        # outside the one-pass bound, 0.013 of its own; with fp32 exps the two agree)
        hints.append(
            "a kernel that forms its normalizer in a first pass over the keys and recomputes "
            "the exps against it in a second declares passes=2 (the CLI's --passes 2)"
        )
    if violated and prec.compute.u < prec.storage.u:
        s = prec.storage.name
        if prec.weights is None and rec.rounding == "softmax":
            hints.append(
                f"a kernel that casts the weights to {s} before weights @ v (FlashAttention 2 "
                f"and 3, Triton's fused attention) declares precision=Precision({s!r}, "
                f"weights={s!r})"
            )
        what = "also computes its scores and weights" if method == "softmax" else "computes"
        hints.append(
            f"one that {what} in {s} (plain PyTorch on {s} tensors) declares "
            f"precision=Precision({s!r}, compute={s!r}, accumulate='fp32'; the CLI's "
            f"--compute {s}), a much larger bound; declare only what the kernel does: an "
            "output outside the bound of a declaration that fits is a bug"
        )
    if violated and rec.scale == "rsqrt" and params.get("scale") is None and d_k:
        # (a review: a kernel holding 1/sqrt(d) in fp16 fails a declaration whose scale is
        # exact, rightly; only compute='fp16' passed it, 195-1,350x looser than its error)
        sc = 1.0 / math.sqrt(d_k)
        held = float(round_to(torch.tensor(sc, dtype=torch.float64), prec.storage))
        if held != sc:
            hints.append(
                f"a kernel that holds the default scale 1/sqrt({d_k}) in {prec.storage.name} "
                f"computes with {held!r}: pass scale={held!r} (the references and bounds take "
                "the scale as given)"
            )
    return hints


def target_of(method: str) -> str:
    """The exact method a method's error is measured against (its record's ``target``,
    :mod:`attnprec.methods`): softmax for taylor, polynomial and favor; a linearized
    semiring is measured against the exact semiring form (``"semiring"`` with the
    ``linearize`` keyword dropped); every other method against itself.

    Parameters
    ----------
    method : str
        A method name of :mod:`attnprec.methods`.

    Returns
    -------
    str
        The target method's name.

    Raises
    ------
    ValueError
        Naming ``method`` if there is no such method.
    """
    return method_record(method).target


def as_precision(precision: Any, dtype: torch.dtype | None = None) -> Precision:
    """A :class:`Precision` from a Precision, a format name/``Format``/torch dtype, or None
    (:meth:`Precision.of`: a format stands for ``Precision(fmt)``, fp32 compute and
    accumulate; ``None`` takes the storage format from ``dtype``).

    Parameters
    ----------
    precision : Precision, str, Format, torch.dtype or None
        The declaration, or a format that stands for one.
    dtype : torch.dtype, optional
        The storage format when ``precision`` is None.

    Returns
    -------
    Precision
        The declaration (a constructor: it computes no numbers).

    Raises
    ------
    ValueError, TypeError
        If ``precision`` names no format (the message names ``precision``).
    """
    return Precision.of(precision, dtype)


def _describe(value: Any) -> Any:
    """A JSON-friendly summary of a method parameter (tensors by shape, objects by repr)."""
    if isinstance(value, torch.Tensor):
        return f"tensor{tuple(value.shape)}"
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(x, (int, float)) for x in value):
        return list(value)
    return repr(value)


def audit(
    fn: Callable[..., Any],
    method: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    precision: Any = None,
    family: str = "given",
    kernel: str | None = None,
    bound_options: Mapping[str, Any] | None = None,
    allow_unbounded: bool = False,
    allow_atypical: bool = False,
    rows: Any = None,
    seed: int = 0,
    whole_rows: int | None = None,
    **params: Any,
) -> AuditReport:
    """Audit ``fn(q, k, v, **params)`` against the references and bounds of ``method``.

    Parameters
    ----------
    fn : callable
        The implementation under audit, called as ``fn(q, k, v, **params)`` with exactly the
        keywords given here, on copies of the inputs; returns ``[..., n_q, d_v]`` (a torch
        tensor or a NumPy array).
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
        Keywords for the bound only: ``target``, ``confidence`` (of the probabilistic
        level, default :data:`DEFAULT_CONFIDENCE`), ``block``, ``evaluation``
        (:func:`~attnprec.analysis.bounds.attention_error_bound`).
    allow_unbounded, allow_atypical : bool
        Accept elements with no finite bound (not checked) or beyond the probabilistic bound:
        they are still counted and reported, but do not fail the case.
    rows, seed : optional
        Judge only these query rows: indices, or a count drawn with ``seed`` (always the
        first and last rows, and the first and last of each segment a ``chunk_size``, the
        declaration's ``block`` or FP8 row scales make, all of them while they number at
        most half the count, else half the count of them drawn: :func:`judged_rows`; pass
        indices to judge every boundary of a long chunked sequence). ``fn`` still
        runs on the whole sequence; the references and bounds cover the sampled rows, and
        the case says so. An inf or NaN output on a row not judged makes the case
        ``UNDECIDED`` (``AuditCase.unjudged_nonfinite``): never ok unseen. The
        probabilistic bound takes the judged rows' share (judged / ``n_q``) of ``1 -
        confidence``, spread over their elements, so each element is judged as in the
        audit of every row.
    whole_rows : int, optional
        This audit judges a shard of the rows of a larger one, of ``whole_rows`` rows (the
        same inputs; :mod:`attnprec.runner`): the references choose their backend by the
        whole's rows (``auto_rows`` of :func:`~attnprec.analysis.reference.reference`), and
        the probabilistic bound is as for sampled ``rows``.
    **params
        The method's keywords (``causal``, ``scale``, ``degree``, ``projection``, ...),
        passed alike to ``fn``, the references and the bound (keywords that only say how to
        compute, such as ``chunk_size``, go to ``fn`` and the bound only).

    Returns
    -------
    AuditReport
        One case, with the total and the rounding checks and every element's class
        (:mod:`attnprec.analysis.report`). Each class is certified: the comparisons are
        made with the reference radius and directed rounding, so ``within`` proves
        ``|out - exact| <= bound`` and ``violated`` proves the contrary. ``audit`` itself
        never raises on a violation; an ``fn`` that writes into its inputs is a violation
        of the whole case.

    Raises
    ------
    ValueError, TypeError
        Bad inputs (naming the argument), or an output of the wrong shape or type (naming
        ``fn``). Whatever ``fn`` raises propagates.
    """
    return _pending(
        method, q, k, v, precision, family, bound_options, allow_unbounded, allow_atypical,
        rows, seed, params, whole_rows,
    ).finish(fn, None, kernel)  # fmt: skip


def audit_output(
    out: Any,
    method: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    precision: Any = None,
    family: str = "given",
    kernel: str | None = None,
    bound_options: Mapping[str, Any] | None = None,
    allow_unbounded: bool = False,
    allow_atypical: bool = False,
    rows: Any = None,
    seed: int = 0,
    whole_rows: int | None = None,
    **params: Any,
) -> AuditReport:
    """Audit a given output ``out`` against the references and bounds of ``method``.

    The same audit as :func:`audit` (the same references, bounds and element classes), of
    an output computed elsewhere: ``out`` is what the implementation returned for
    ``q, k, v`` and ``params``; nothing is run, so writes into the inputs cannot be seen.

    Parameters
    ----------
    out : torch.Tensor or numpy.ndarray
        The output to judge, ``[..., n_q, d_v]`` (the batch dims of ``q, k, v`` broadcast),
        on any device; compared in float64 on the CPU.
    method, q, k, v, precision, family, bound_options, rows, seed, whole_rows, **params
        As :func:`audit`. ``params`` are the keywords the output was computed with.
    allow_unbounded, allow_atypical : bool
        As :func:`audit`.
    kernel : str, optional
        Label of the output in the report (default ``"out"``).

    Returns
    -------
    AuditReport
        One case, certified as in :func:`audit`: ``within`` proves ``|out - exact| <=
        bound`` for the declared precision, ``violated`` proves the contrary.

    Raises
    ------
    ValueError, TypeError
        Bad inputs (naming the argument), or an ``out`` of the wrong shape or type (naming
        ``out``).
    """
    return _pending(
        method, q, k, v, precision, family, bound_options, allow_unbounded, allow_atypical,
        rows, seed, params, whole_rows,
    ).finish(None, out, kernel)  # fmt: skip


@dataclasses.dataclass
class _Pending:
    """An audit whose arguments are checked and whose references are computed, waiting for
    the output: every keyword's value is checked before a kernel runs (a wrong ``log_g``
    shape is reported naming ``log_g``, not by the kernel, or after it ran for minutes)."""

    run: _Prepared
    prec: Precision
    confidence: float
    opts: dict[str, Any]
    params: Mapping[str, Any]
    family: str
    accepted: tuple[str, ...]
    whole_rows: int | None

    def finish(self, fn: Callable[..., Any] | None, out: Any, kernel: str | None) -> AuditReport:
        """The audit of ``fn`` (run now, on copies of the inputs) or of ``out``."""
        run = _take_output(self.run, fn, out, kernel, self.params)
        return AuditReport([
            _judge(
                run, self.prec, self.confidence, self.opts, self.params, self.family,
                self.accepted, self.whole_rows,
            )
        ])  # fmt: skip


def _pending(
    method: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    precision: Any,
    family: str,
    bound_options: Mapping[str, Any] | None,
    allow_unbounded: bool,
    allow_atypical: bool,
    rows: Any,
    seed: int,
    params: Mapping[str, Any],
    whole_rows: int | None = None,
) -> _Pending:
    """Check the arguments of :func:`audit` other than ``fn`` and compute its references
    (:meth:`_Pending.finish` then runs ``fn``, or takes an output, and judges it)."""
    prec = as_precision(precision, q.dtype)
    opts = dict(bound_options or {})
    unknown = set(opts) - set(_BOUND_KEYWORDS)
    if unknown:
        raise ValueError(f"bound_options: unknown keys {sorted(unknown)}; known {_BOUND_KEYWORDS}")
    if opts.get("block") is not None:
        # (the bound's deprecated keyword) the declaration's block, so that the rows drawn
        # include its edges as the bound's own do
        prec = dataclasses.replace(prec, block=opts["block"])
    opts.pop("block", None)
    confidence = opts.pop("confidence", None)
    confidence = DEFAULT_CONFIDENCE if confidence is None else confidence
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)):
        raise TypeError(f"bound_options: confidence: expected a number, got {confidence!r}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(
            f"bound_options: confidence: expected a probability in (0, 1), got {confidence!r}"
        )
    if whole_rows is not None and (
        isinstance(whole_rows, bool) or not isinstance(whole_rows, int) or whole_rows < 1
    ):
        raise ValueError(f"whole_rows: expected a positive int, got {whole_rows!r}")
    # (a string "False" is truthy: it must not accept elements that were not checked)
    flags = (
        ("atypical", check_bool("allow_atypical", allow_atypical)),
        ("unbounded", check_bool("allow_unbounded", allow_unbounded)),
    )
    accepted = tuple(c for c, ok in flags if ok)
    run = _references(method, q, k, v, prec, opts, params, rows, seed, whole_rows)
    return _Pending(run, prec, confidence, opts, params, family, accepted, whole_rows)


def _held(name: str, x: Any, prec: Precision) -> Any:
    """A keyword's value as a kernel holds it in ``prec.storage`` (a float64 tensor, or a
    float for a number; an error naming it where it overflows there)."""
    held = prec.stored(torch.as_tensor(x, dtype=torch.float64), name)
    return held if isinstance(x, torch.Tensor) else float(held) if held.dim() == 0 else held


class _Prepared(NamedTuple):
    """What an audit needs besides the bound: the output (of the judged rows), the
    references, the labels."""

    method: str
    name: str
    target: str
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    out: torch.Tensor
    mutated: list[str]
    ref_total: Any
    ref_rounding: Any
    rows: torch.Tensor | None
    unjudged_nonfinite: list[int]


def row_boundaries(n_q: int, method: str, params: Mapping[str, Any], prec: Precision) -> list[int]:
    """The first and last rows of each segment a chunked or blocked kernel processes, which a
    sample of rows always includes (an off-by-one at a segment boundary is a classic bug).

    Segments of ``chunk_size`` rows (a keyword of the call), of the declaration's ``block``
    keys when the call is causal (row ``i`` sees the keys up to ``i``, so a key block ends
    at a row), and of the rows sharing one FP8 scale (``prec.scaling`` an int).

    Parameters
    ----------
    n_q : int
        Number of query rows.
    method : str
        The method name (for its default ``causal``).
    params : Mapping[str, Any]
        The call's keywords (``causal``, ``chunk_size``).
    prec : Precision
        The kernel's declaration (``scaling``, ``block``).

    Returns
    -------
    list of int
        Sorted row indices in ``[0, n_q)``; empty when no segment is shorter than ``n_q``.

    Raises
    ------
    ValueError
        Naming ``method`` if there is no such method.
    """
    causal = bool(params.get("causal", method_record(method).default_causal()))
    sizes = (params.get("chunk_size"), prec.scaling, prec.block if causal else None)
    out: set[int] = set()
    for size in sizes:
        if isinstance(size, int) and not isinstance(size, bool) and 0 < size < n_q:
            for start in range(size, n_q, size):
                out.update((start - 1, start))
    return sorted(out)


def judged_rows(
    n_q: int, rows: Any, seed: int, method: str, params: Mapping[str, Any], prec: Precision
) -> torch.Tensor | None:
    """The query rows an audit judges (None: every row): the indices ``rows``, or a count
    drawn with ``seed`` that always includes the first and last rows and the segment
    boundaries of :func:`row_boundaries` while they number at most half the count, else
    half the count of them, drawn (:func:`attnprec.analysis.bounds.attention.sample_rows`:
    2^20 rows in chunks of 64 have 32,768 boundary rows).

    Parameters
    ----------
    n_q : int
        Number of query rows.
    rows : None, int or sequence of int
        Every row (None), a count to draw, or the indices.
    seed : int
        Seed of the draw, in ``[0, 2^63)``.
    method, params, prec
        As in :func:`row_boundaries`.

    Returns
    -------
    torch.Tensor or None
        Sorted unique row indices (int64), or None for every row. The draw depends only on
        the arguments.

    Raises
    ------
    ValueError, TypeError
        Naming ``rows``: a count < 1, no index, indices out of range or not integers;
        naming ``seed``: not an integer in ``[0, 2^63)``.
    """
    from attnprec.analysis.bounds.attention import sample_rows

    boundaries = tuple(row_boundaries(n_q, method, params, prec)) if rows is not None else ()
    return sample_rows(n_q, rows, seed, boundaries)


def _references(
    method: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prec: Precision,
    opts: Mapping[str, Any],
    params: Mapping[str, Any],
    rows: Any = None,
    seed: int = 0,
    auto_rows: int | None = None,
) -> _Prepared:
    """The references of an audit (they depend on the declaration only through its storage
    format) for the judged rows, with no output yet (:func:`_take_output`): they check
    every keyword's value, before a kernel runs."""
    from attnprec._validate import check_int

    rec = method_record(method)
    rec.check(params)
    causal = params.get("causal")
    n_q, _, _, _ = check_qkv(q, k, v, rec.default_causal() if causal is None else causal)
    if params.get("num_features") is not None:  # else the references name only `projection`
        check_int("num_features", params["num_features"], 1)
    if rec.approximation == "polynomial":  # its degree or coefficients, checked by the bound
        rec.resolve("coefficients")(dict(params))
    target = str(opts.get("target") or rec.target)
    idx = judged_rows(n_q, rows, seed, method, params, prec)
    rk: dict[str, Any] = {} if idx is None else {"rows": idx}
    if auto_rows is not None:
        rk["auto_rows"] = auto_rows
    # what the kernel holds
    stored = [prec.stored(x, n) for n, x in zip("qkv", (q, k, v), strict=True)]
    with progress.stage("reference"):
        ref_total = _reference(target, q, k, v, **rk, **rec.for_target(params))
    ref_rnd = None
    own = rec.for_reference(params)  # None: no reference of its own (a linearized semiring)
    if own is not None:
        # the keywords a kernel holds in storage too (a state-space model's steps, decays
        # and skips: a review's correct SSD, selective scan and H3 kernels were VIOLATED
        # against the method on their float32 dt, which they, and the bound, round)
        held = {key: _held(key, own[key], prec) for key in rec.stored if own.get(key) is not None}
        same = all(torch.equal(s, x.double()) for s, x in zip(stored, (q, k, v), strict=True))
        same = same and all(
            torch.equal(torch.as_tensor(x), torch.as_tensor(own[key], dtype=torch.float64))
            for key, x in held.items()
        )
        ref_rnd = ref_total
        if not (same and target == method):
            with progress.stage("reference of the stored inputs"):
                own = {**own, **held}
                try:
                    ref_rnd = _reference(method, stored[0], stored[1], stored[2], **rk, **own)
                except ValueError as e:  # a keyword valid as given, not as stored
                    key = str(e).split(":", 1)[0]
                    if key not in held:
                        raise
                    raise ValueError(
                        f"{e} once rounded to the storage format {prec.storage.name}, as a "
                        f"kernel holds {key}"
                    ) from None
    empty = torch.empty(0, dtype=torch.float64)
    return _Prepared(method, "", target, q, k, v, empty, [], ref_total, ref_rnd, idx, [])


def _take_output(
    run: _Prepared,
    fn: Callable[..., Any] | None,
    output: Any,
    kernel: str | None,
    params: Mapping[str, Any],
) -> _Prepared:
    """``run`` (:func:`_references`) with the output of ``fn``, run now on copies of the
    inputs, or the given ``output`` when ``fn`` is None."""
    q, k, v, idx = run.q, run.k, run.v, run.rows
    if fn is not None:
        name = str(kernel or getattr(fn, "__name__", type(fn).__name__))
        with progress.stage("kernel"):
            out, mutated = _run(fn, name, q, k, v, params)
        who = f"fn: {name} returned"
    else:
        name, out, mutated, who = (
            str(kernel or "out"),
            _as_output(output, "out: expected"),
            [],
            "out: got",
        )
    n_q, d_v = q.shape[-2], v.shape[-1]
    expected = (*broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2]), n_q, d_v)
    if tuple(out.shape) != expected:
        raise ValueError(f"{who} shape {tuple(out.shape)}, expected {expected}")
    out64 = out.detach().to("cpu", torch.float64)
    unjudged: list[int] = []
    if idx is not None:
        out64 = out64[..., idx, :]
        # The kernel ran on every row: inf or NaN on a row not judged must not go unseen.
        bad = (~torch.isfinite(out.detach())).any(-1)  # (no -1 in the reshape: d_v may be 0)
        bad = bad.reshape(bad.shape[:-1].numel(), n_q).any(0).cpu()
        bad[idx] = False
        unjudged = torch.nonzero(bad).flatten().tolist()
    return run._replace(name=name, out=out64, mutated=mutated, unjudged_nonfinite=unjudged)


def _judge(
    run: _Prepared,
    prec: Precision,
    confidence: float,
    opts: Mapping[str, Any],
    params: Mapping[str, Any],
    family: str,
    accepted: tuple[str, ...],
    whole_rows: int | None = None,
) -> AuditCase:
    """The bounds for the declaration ``prec``, and every element's class (``whole_rows``:
    judged as a shard of that many rows, :func:`audit`)."""
    q, k, v, method = run.q, run.k, run.v, run.method
    extra = {} if run.rows is None else {"rows": run.rows}
    judged = q.shape[-2] if run.rows is None else int(run.rows.numel())
    if whole_rows is not None and judged > whole_rows:
        raise ValueError(f"whole_rows: {whole_rows} is fewer than the {judged} rows judged")
    # The judged rows' share of 1 - confidence, spread over the sequence's every element,
    # whether they are a shard or a sample: each element is judged as in the audit of
    # every row (a review: sampled rows took all of it, and an element within the whole
    # audit's level was ATYPICAL in a sampled one)
    level = 1.0 - (1.0 - confidence) * max(judged, 1) / max(q.shape[-2], 1)
    with progress.stage("bound"):
        bound, typical = _bounds(method, q, k, v, prec, level, {**opts, **extra}, params)
    overflow = min(prec.compute.overflow(), prec.output_format.overflow())
    held = run.ref_rounding
    undefined_held = None
    if held is not None:
        r_val = held.value.to("cpu", torch.float64)
        r_rad = torch.as_tensor(held.radius).to("cpu", torch.float64).expand_as(r_val)
        undefined_held = torch.isnan(r_val) & ~torch.isnan(r_rad)
    checks = {
        "total": _check(
            f"total vs exact {run.target} on the inputs as given",
            run.out,
            run.ref_total,
            bound,
            bound.total,
            None if typical is None else typical.total,
            confidence,
            accepted,
            overflow,
            undefined_held,
        )
    }
    if run.ref_rounding is not None:
        checks["rounding"] = _check(
            f"rounding vs exact {method} on the stored inputs",
            run.out,
            run.ref_rounding,
            bound,
            bound.rounding,
            None if typical is None else typical.rounding,
            confidence,
            accepted,
            overflow,
        )
    cls = torch.stack([c.classes for c in checks.values()]).amax(0)
    # (an element is unexcused by its total check, the one that knows the stored inputs)
    unexcused = checks["total"].unexcused & (cls == CLASSES.index("unbounded"))
    causal = bool(params.get("causal", False))
    return AuditCase(
        method=method,
        kernel=run.name,
        dtype=prec.storage.name,
        family=family,
        target=run.target,
        shape=(q.shape[-2], k.shape[-2], q.shape[-1], v.shape[-1]),
        params={key: _describe(val) for key, val in params.items()},
        precision=prec.describe(),
        elements=run.out.numel(),
        counts={c: int((cls == i).sum()) for i, c in enumerate(CLASSES)},
        total=checks["total"].check,
        rounding=checks["rounding"].check if "rounding" in checks else None,
        backend=str(run.ref_total.backend),
        accepted=accepted,
        # (v as stored: formed here, not held from the references: a packed batch's pieces
        # wait for the kernel together, a review's decode case held 16x the caller's v)
        outside_hull=_outside_hull(
            method, params, run.out, prec.stored(v, "v").cpu(), causal, run.rows
        ),  # fmt: skip
        rows=None if run.rows is None else run.rows.tolist(),
        unjudged_nonfinite=run.unjudged_nonfinite,
        unbounded_nonfinite=int(unexcused.sum()),
        hints=_hints(
            (r for c in checks.values() for r in c.check.unbounded_by),
            prec,
            method,
            params,
            q.shape[-1],
            bool((cls == CLASSES.index("violated")).any()),
        ),
        mutated=run.mutated,
        arrays={
            key: (c.err.flatten().numpy(), c.bound.flatten().numpy()) for key, c in checks.items()
        },
    )


def _bit_view(x: torch.Tensor) -> torch.Tensor:
    """The bits of ``x`` (NaN payloads and signed zeros compare exactly)."""
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    return x.contiguous().view(ints[x.element_size()]) if x.is_floating_point() else x


def _run(
    fn: Callable[..., Any],
    name: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    params: Mapping[str, Any],
) -> tuple[torch.Tensor, list[str]]:
    """``fn`` on copies of its tensor arguments: its output as a tensor, and the names of
    the arguments it wrote into (compared bit for bit)."""
    given = {"q": q, "k": k, "v": v} | {
        key: val for key, val in params.items() if isinstance(val, torch.Tensor)
    }
    copies = {key: val.clone() for key, val in given.items()}
    kw = {key: copies.get(key, val) for key, val in params.items()}
    out = _as_output(
        fn(copies["q"], copies["k"], copies["v"], **kw), f"fn: expected {name} to return"
    )
    mutated = [
        key
        for key, val in given.items()
        if not torch.equal(_bit_view(val.detach().cpu()), _bit_view(copies[key].detach().cpu()))
    ]
    return out, mutated


def _as_output(out: Any, expected: str) -> torch.Tensor:
    """``out`` as a real floating-point torch tensor (a float NumPy array is converted);
    else ``TypeError`` with ``expected`` (what the message says was expected) and the type
    found (a complex or integer output is not an attention output: its imaginary part or
    its truncation would go unjudged)."""
    if isinstance(out, np.ndarray) and out.dtype.kind == "f":
        out = torch.from_numpy(np.ascontiguousarray(out))
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{expected} a torch.Tensor, got {type(out).__name__}")
    if not out.is_floating_point():
        raise TypeError(f"{expected} a real floating-point tensor, got dtype {out.dtype}")
    if out.is_meta:
        raise ValueError(f"{expected} a tensor with values, got one on device meta")
    return out


class _Checked(NamedTuple):
    """One check: its summary, and per element the class, the error and the sound bound."""

    check: Check
    classes: torch.Tensor
    err: torch.Tensor
    bound: torch.Tensor
    unexcused: torch.Tensor


def _up(x: torch.Tensor, steps: int = 1) -> torch.Tensor:
    for _ in range(steps):
        x = torch.nextafter(x, torch.full_like(x, math.inf))
    return x


def _down(x: torch.Tensor, steps: int = 1) -> torch.Tensor:
    for _ in range(steps):
        x = torch.nextafter(x, torch.full_like(x, -math.inf))
    return x


def classify(
    out: torch.Tensor,
    value: torch.Tensor,
    radius: torch.Tensor,
    bound: torch.Tensor,
    typical: torch.Tensor | None = None,
    overflow: float = math.inf,
    undefined_held: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per element the class index into :data:`CLASSES`, ``|out - value|`` (float64), and
    where an unbounded element's output is inf or NaN unexcused.

    ``value`` and ``radius`` certify the exact output (``|exact - value| <= radius``; both
    NaN where NaN inputs make it NaN; value NaN and radius ``inf`` where it is undefined or
    unresolved, radius ``inf`` where it is unknown); ``bound`` is the
    sound bound, ``typical`` the probabilistic one. The error is bounded from both sides
    with directed rounding (``|fl(a - b)| = |a - b| (1 + d)``, ``|d| <= 2^-53``; sums
    rounded outward), so ``within`` and ``violated`` are proofs. An inf or NaN output where
    the exact value is certified finite is violated under a finite bound; under an
    infinite one (the declaration admits an overflow or a vanishing normalizer there) it
    is ``unbounded``, not a proof, and *unexcused* unless it is what the declaration gives
    exactly: ``overflow``, where the declared kernel's last operation and store round to
    inf (the lesser threshold of compute and the output format): an infinite output of
    the exact value's sign where the certified exact value reaches it is that rounding;
    ``undefined_held``, where the exact value on the inputs as the kernel holds them
    (rounded to storage) is undefined: an inf or NaN there is what those inputs give.
    ``allow_unbounded`` never accepts an unexcused element (:attr:`.AuditCase.verdict`).

    Parameters
    ----------
    out : torch.Tensor
        The output under test.
    value, radius : torch.Tensor
        The certified reference, broadcastable to ``out``'s shape.
    bound : torch.Tensor
        The sound error bound, broadcastable to ``value``.
    typical : torch.Tensor, optional
        The probabilistic bound (None: no ``atypical`` class).
    overflow : float, optional
        The overflow threshold of the declared kernel (default ``inf``).
    undefined_held : torch.Tensor of bool, optional
        Where the exact value on the stored inputs is undefined.

    Returns
    -------
    classes : torch.Tensor
        int8 indices into :data:`CLASSES`, ``value``'s shape.
    error : torch.Tensor
        float64 ``|out - value|``.
    unexcused : torch.Tensor
        bool, ``value``'s shape: unbounded elements whose output is inf or NaN where the
        exact value is certified finite, other than the two cases above.

    Notes
    -----
    Error: ``within`` and ``violated`` are certified (directed rounding, above); no input
    validation beyond broadcasting.
    """
    out = out.to(torch.float64)
    value = value.to(torch.float64)
    radius = radius.to(torch.float64).expand_as(value)
    bound = bound.to(torch.float64).expand_as(value)
    diff = (out - value).abs()
    # A difference of floats is exact when it is subnormal (or zero); else within 2^-53.
    exact = diff < 2.0**-1022
    e_hi = torch.where(exact, diff, _up(diff, 2))
    e_lo = torch.where(exact, diff, _down(diff, 2))
    hi = torch.where(radius == 0, e_hi, _up(e_hi + radius))  # >= |out - exact|
    lo = torch.where(radius == 0, e_lo, _down(e_lo - radius))  # <= |out - exact|
    inside, outside = hi <= bound, lo > bound
    cls = torch.full(value.shape, CLASSES.index("undecided"), dtype=torch.int8)
    cls[inside] = CLASSES.index("within")
    if typical is not None:
        tb = typical.to(torch.float64).expand_as(value)
        cls[inside & (lo > tb)] = CLASSES.index("atypical")
    cls[outside] = CLASSES.index("violated")
    unb = ~torch.isfinite(bound)
    cls[unb] = CLASSES.index("unbounded")
    fin_out = torch.isfinite(out)
    # A number (inf or NaN) where the exact output is certified finite is infinitely wrong:
    # past a finite bound, a proof. Under an infinite one the declaration admits an
    # overflow or a vanishing normalizer there, so nothing is proved (a review: correct
    # kernels whose fp32 sums or fp16 logits overflow were VIOLATED): unbounded, and
    # ``unexcused`` unless it is what the declaration gives exactly
    known = torch.isfinite(radius) & torch.isfinite(value)
    cls[~fin_out & known & ~unb] = CLASSES.index("violated")
    unexcused = ~fin_out & known & unb
    # the correctly rounded inf of an exact value past the overflow threshold (a review:
    # fp16 linear attention whose exact output is 1.024e6)
    rounded = torch.isinf(out) & (torch.sign(out) == torch.sign(value))
    unexcused &= ~(rounded & (_down(value.abs() - radius) >= overflow))
    # what the stored inputs give where they leave the exact output undefined (a review:
    # fp16 linear attention whose features round to 0, an exact kernel's 0/0)
    if undefined_held is not None:
        unexcused &= ~undefined_held.expand_as(value)
    # An undefined or unresolved exact value (value NaN, radius inf; e.g. a normalizer
    # that vanishes): nothing can be certified either way.
    unknown = torch.isnan(value) & ~torch.isnan(radius)
    cls[unknown] = CLASSES.index("undecided")
    cls[unknown & ~torch.isfinite(bound)] = CLASSES.index("unbounded")
    # NaN inputs (value and radius NaN): NaN must reach exactly the outputs they reach.
    nan_ref = torch.isnan(value) & torch.isnan(radius)
    cls[nan_ref] = torch.where(torch.isnan(out[nan_ref]), 0, CLASSES.index("violated")).to(
        torch.int8
    )
    return cls, diff, unexcused


def _check(
    against: str,
    out: torch.Tensor,
    ref: Any,
    parts: Any,
    bound: torch.Tensor,
    typical: torch.Tensor | None,
    confidence: float,
    accepted: tuple[str, ...] = (),
    overflow: float = math.inf,
    undefined_held: torch.Tensor | None = None,
) -> _Checked:
    """Compare ``out`` with a reference under the sound and the probabilistic bound
    (``accepted``: the classes the case accepts, never shown as its worst element;
    ``overflow``, ``undefined_held``: :func:`classify`'s)."""
    # on the CPU, where the output is (references and bounds may come from a GPU)
    value = ref.value.to("cpu", torch.float64)
    radius = torch.as_tensor(ref.radius).to("cpu", torch.float64).expand_as(value)
    bnd = bound.to("cpu", torch.float64).expand_as(value)
    tb = (
        None
        if typical is None
        else torch.fmin(typical.to("cpu", torch.float64).expand_as(value), bnd)  # NaN: bnd
    )
    cls, err, unexcused = classify(out, value, radius, bnd, tb, overflow, undefined_held)
    if bool(unexcused.any()):  # an inf or NaN output on an unbounded element: never accepted
        accepted = tuple(c for c in accepted if c != "unbounded")
    counts = {c: int((cls == i).sum()) for i, c in enumerate(CLASSES)}
    fin = torch.isfinite(out) & torch.isfinite(value)
    checked = fin & torch.isfinite(bnd)
    nonfinite_wrong = bool(((cls == CLASSES.index("violated")) & ~fin).any())
    # an inf or NaN output where the exact value is certified finite: an infinite error,
    # checked (violated) or not
    o64 = out.to("cpu", torch.float64)
    nonfinite_any = bool((~torch.isfinite(o64) & torch.isfinite(value + radius)).any())

    def least(b: torch.Tensor | None) -> float | None:
        if b is None:
            return None
        keep = checked & (err > 0)
        return float((b[keep] / err[keep]).min()) if bool(keep.any()) else math.inf

    tightness = least(bnd)
    assert tightness is not None
    typ_tight = least(tb)
    if nonfinite_wrong:
        tightness, typ_tight = 0.0, (None if tb is None else 0.0)
    worst: dict[str, Any] = {}
    if err.numel():
        flat = None
        for c in ("violated", "unbounded", "undecided", "atypical"):
            if c in accepted:
                continue
            hit = (cls == CLASSES.index(c)).flatten()
            if c == "unbounded" and bool(unexcused.any()):
                hit = unexcused.flatten()  # the inf or NaN, not a correct unbounded element
            if bool(hit.any()):
                flat = int(torch.nonzero(hit)[0])
                break
        if flat is None:
            ratio = torch.where(checked & (err > 0), bnd / err, torch.full_like(err, math.inf))
            flat = int(torch.argmin(ratio.flatten()))
        idx = tuple(int(i) for i in np.unravel_index(flat, tuple(err.shape)))

        def at(x: torch.Tensor) -> float:
            return float(x.to(torch.float64).expand_as(value)[idx])

        worst = {
            "index": list(idx),
            "class": CLASSES[int(cls[idx])],
            "error": at(err),
            "bound": at(bnd),
            "typical_bound": None if tb is None else at(tb),
            "quantization": at(parts.quantization),
            "approximation": at(parts.approximation),
            "rounding": at(parts.rounding),
            "output": at(out),
            "reference": at(value),
        }
    unb = cls == CLASSES.index("unbounded")
    reasons: dict[str, int] = {}
    for key, mask in (getattr(parts, "unbounded", None) or {}).items():
        n_hit = int((mask.cpu().expand_as(value) & unb).sum())
        if n_hit:
            reasons[key] = n_hit
    if int(unb.sum()) > sum(reasons.values()):
        reasons.setdefault(NO_FINITE_BOUND, int(unb.sum()) - sum(reasons.values()))
    finite_b = bnd[torch.isfinite(bnd)]
    checked = fin & torch.isfinite(bnd)
    finite_t = None if tb is None else tb[torch.isfinite(tb)]
    check = Check(
        against=against,
        counts=counts,
        max_error=math.inf
        if nonfinite_any
        else (float(err[fin].max()) if bool(fin.any()) else math.nan),
        max_bound=float(finite_b.max()) if finite_b.numel() else math.inf,
        tightness=tightness,
        typical_bound=None
        if finite_t is None
        else (float(finite_t.max()) if finite_t.numel() else math.inf),
        typical_tightness=typ_tight,
        confidence=None if tb is None else confidence,
        max_radius=float(radius.max()) if radius.numel() else 0.0,
        unbounded_by=reasons,
        worst=worst,
        accepted=accepted,
        max_checked_error=math.inf
        if nonfinite_wrong
        else (float(err[checked].max()) if bool(checked.any()) else math.nan),
    )
    return _Checked(check, cls, err, bnd, unexcused)


def _outside_hull(
    method: str,
    params: Mapping[str, Any],
    out: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    rows: torch.Tensor | None = None,
) -> int | None:
    """Finite outputs outside [min_j v_j, max_j v_j] over the visible keys, for methods whose
    output is a convex combination of the values; None for the others."""
    if not method_record(method).is_convex(params) or v.shape[-2] == 0:
        return None
    vv = v.to(torch.float64).expand(*out.shape[:-2], *v.shape[-2:])
    if causal:
        lo, hi = torch.cummin(vv, dim=-2).values, torch.cummax(vv, dim=-2).values
        if rows is not None:
            lo, hi = lo[..., rows, :], hi[..., rows, :]
    else:
        lo, hi = vv.amin(-2, keepdim=True), vv.amax(-2, keepdim=True)
    bad = torch.isfinite(out) & ((out < lo) | (out > hi))
    return int(bad.sum())


def _reference(method: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw: Any) -> Any:
    from attnprec.analysis.reference import reference

    return reference(method, q, k, v, **kw)


def _bounds(
    method: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prec: Precision,
    confidence: float,
    opts: Mapping[str, Any],
    params: Mapping[str, Any],
) -> tuple[Any, Any]:
    """The sound bound and the probabilistic one at ``confidence`` (None where the method
    has none: then no element is classed atypical)."""
    sound = _bound(method, q, k, v, prec, typical_confidence=confidence, **opts, **params)
    typical = getattr(sound, "typical", None)
    if typical is None:
        try:
            typical = _bound(method, q, k, v, prec, confidence=confidence, **opts, **params)
        except ValueError:
            typical = None
    return sound, typical


def _bound(
    method: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *a: Any, **kw: Any
) -> Any:
    from attnprec.analysis.bounds import attention_error_bound

    return attention_error_bound(method, q, k, v, *a, **kw)
