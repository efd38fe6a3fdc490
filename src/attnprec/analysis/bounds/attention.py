"""``attention_error_bound``: input quantization + approximation + rounding, per element.

For a kernel that stores q, k, v in ``precision.storage`` and computes ``method``, the
computed output ŷ and the exact target y* (the method itself, or ``target``: softmax for
taylor / polynomial / favor, the exact semiring form for linearized semirings) satisfy

    |ŷ - y*(q, k, v)| <= |y*(q̃, k̃, ṽ) - y*(q, k, v)|      quantization (q̃ = q in storage)
                      + |y_method(q̃..) - y*(q̃..)|          approximation
                      + |ŷ - y_method(q̃..)|                rounding

(docs/bounds/attention.md). Each part is computed at two levels: the *sound* bound, which
holds for every evaluation order the declared precision allows
(:meth:`attnprec.analysis.precision.Precision.describe`), and the *probabilistic* one
(:mod:`.quotient`), which holds with the stated confidence under the model of independent
mean-zero rounding errors. The parts stream over blocks of query rows (:mod:`._rows`), so
memory stays bounded at any sequence length, and ``rows=`` evaluates a sample of the rows.
Where a part has no finite value, the element is *unbounded* and :attr:`ErrorBound.unbounded`
names the intermediate responsible.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np
import torch

from attnprec._device import computing_on, work_device
from attnprec._validate import (
    broadcast_shapes,
    check_bool,
    check_finite,
    check_float,
    check_gradual_underflow,
    check_masks,
    check_qkv,
    check_seen,
    check_softcap,
    resolve_scale,
    widened,
)
from attnprec.analysis.bounds import _state
from attnprec.analysis.bounds._rows import Visible, key_repeats, logit_ties
from attnprec.analysis.bounds.rounding import tail_lambda, upper
from attnprec.methods import NAMES, Method
from attnprec.methods import method as method_record

__all__ = ["ErrorBound", "attention_error_bound", "METHODS", "DEFAULT_CONFIDENCE", "sample_rows"]

METHODS = NAMES
#: Confidence of the probabilistic bound computed along the sound one (``typical``), for
#: every element of one call together.
DEFAULT_CONFIDENCE = 1 - 1e-6


@dataclass(frozen=True)
class ErrorBound:
    """Per-element error bound and its parts (float64 tensors ``[..., rows, d_v]``).

    Attributes
    ----------
    total, quantization, approximation, rounding : torch.Tensor
        ``total = quantization + approximation + rounding`` (rounded upward); every part
        is >= 0, ``inf`` where unbounded.
    confidence : float or None
        None for the sound (worst-case) bound, else the probability with which this level
        holds for every element together.
    typical : ErrorBound or None
        On the sound level: the probabilistic level computed along (same quantization and
        approximation, the probabilistic rounding part), at ``typical.confidence``.
    unbounded : dict
        Name of an intermediate -> boolean mask of the elements whose bound is infinite
        because it may overflow (or vanish, for a normalizer). Every infinite element is
        named: one no model names, a bound whose own float64 evaluation overflowed, as
        ``"bound past float64's range"``.
    covers : str
        The evaluation orders and models the sound bound holds for.
    rows : torch.Tensor or None
        The query rows the bound covers (None: every row).
    """

    total: torch.Tensor
    quantization: torch.Tensor
    approximation: torch.Tensor
    rounding: torch.Tensor
    confidence: float | None = None
    typical: ErrorBound | None = None
    unbounded: dict[str, torch.Tensor] = field(default_factory=dict)
    covers: str = ""
    rows: torch.Tensor | None = None


def sample_rows(
    n: int, rows: Any, seed: int = 0, boundaries: tuple[int, ...] = ()
) -> torch.Tensor | None:
    """Query rows to evaluate: None (every row), indices, or a count drawn with ``seed``.
    A count of at least ``n`` is every row (None: the verdict says "all"), so that one
    count serves sequences of any length.

    A count always includes the first and last rows and the rows of ``boundaries`` (e.g.
    the first and last rows of each segment or chunk of a causal kernel): all of them
    where they number at most half the count, else half the count of them drawn with
    ``seed`` (so that a sample stays its size at any length: 2^20 tokens in chunks of 64
    have 32,768 such rows); then rows drawn uniformly without replacement. The result is
    sorted and unique. The draw depends only on ``(n, rows, seed, boundaries)``.

    Raises
    ------
    ValueError, TypeError
        A count < 1, indices out of range or not integers (naming ``rows``); a ``seed``
        that is not an integer in [0, 2^63) (naming ``seed``).
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed: expected an integer, got {seed!r}")  # (1.5 drew as 1)
    if not 0 <= seed < 2**63:
        raise ValueError(f"seed: expected an integer in [0, 2^63), got {seed}")
    if rows is None:
        return None
    if isinstance(rows, np.integer):
        rows = int(rows)
    if isinstance(rows, np.ndarray) and rows.ndim == 0:
        rows = torch.as_tensor(rows)
    scalar = isinstance(rows, torch.Tensor) and rows.dim() == 0
    if isinstance(rows, bool) or (scalar and rows.dtype == torch.bool):
        raise TypeError("rows: expected None, a count or indices, got a bool")
    if scalar and rows.dtype.is_floating_point:  # (5.7 was taken as the count 5)
        raise TypeError(f"rows: expected an integer count, got {rows.item()!r}")
    if isinstance(rows, int) or scalar:
        count = int(rows)
        if count < 1:
            raise ValueError(f"rows: expected a count >= 1, got {count}")
        if count >= n:
            return None
        g = torch.Generator().manual_seed(int(seed))  # (CPU: indices, any device computing)
        edges = sorted({b for b in boundaries if 0 <= b < n} - {0, n - 1})
        if len(edges) > count // 2:
            perm = torch.randperm(len(edges), generator=g, device="cpu")
            edges = [edges[i] for i in perm[: count // 2]]
        must = sorted({0, n - 1, *edges})
        rest = torch.randperm(n, generator=g, device="cpu")
        keep = set(must)
        for i in rest.tolist():
            if len(keep) >= max(count, len(must)):
                break
            keep.add(i)
        return torch.tensor(sorted(keep), dtype=torch.int64, device="cpu")
    if not isinstance(rows, (list, tuple, range, np.ndarray, torch.Tensor)):
        raise TypeError(f"rows: expected None, a count or indices, got {type(rows).__name__}")
    if isinstance(rows, (list, tuple)) and any(
        isinstance(i, (bool, np.bool_)) or (isinstance(i, torch.Tensor) and i.dtype == torch.bool)
        for i in rows
    ):
        raise TypeError("rows: expected integer indices, got a bool")  # (True read as 1)
    try:
        idx = torch.as_tensor(rows, device="cpu")
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"rows: expected integer indices, got {rows!r:.80}") from None
    if idx.dim() == 1 and idx.numel() == 0:
        raise ValueError("rows: expected at least one row index, got none")
    # (uint8 is PyTorch's legacy mask type: a mask read as indices judges other rows)
    if idx.dtype in (torch.bool, torch.uint8):
        raise TypeError(f"rows: expected integer indices, not a mask ({idx.dtype})")
    if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dim() != 1:
        raise TypeError("rows: expected a 1-d sequence of integer indices")
    idx = torch.unique(idx.to(torch.int64))
    if int(idx.min()) < 0 or int(idx.max()) >= n:
        raise ValueError(f"rows: expected indices in [0, {n}), got {rows!r:.80}")
    return idx


def _terms(semiring: Any) -> tuple[tuple[float, float], ...]:
    terms = getattr(semiring, "terms", None)
    if terms is None:
        raise TypeError(f"semiring: expected a Semiring, got {type(semiring).__name__}")
    return tuple((float(c), float(lam)) for c, lam in terms)


def named_unbounded(
    unbounded: dict[str, torch.Tensor], *totals: torch.Tensor
) -> dict[str, torch.Tensor]:
    """``unbounded`` with every infinite element of ``totals`` (the levels' totals, of the
    output's shape) named: one no reason covers, an intermediate of the bound itself past
    float64's range, as ``"bound past float64's range"`` (a review found gated elements
    inf with no reason: an underflow allowance of 1e459)."""
    named = torch.zeros_like(totals[0], dtype=torch.bool)
    for mask in unbounded.values():
        named = named | mask
    rest = torch.zeros_like(named)
    for t in totals:
        rest = rest | ~torch.isfinite(t)
    rest = rest & ~named
    return {**unbounded, "bound past float64's range": rest} if bool(rest.any()) else unbounded


def empty_bound(
    shape: tuple[int, ...],
    conf: float,
    confidence: float | None,
    prec: Any,
    idx: torch.Tensor | None,
    device: Any,
) -> ErrorBound:
    """The bound of an output with no element: empty parts of ``shape`` and no unbounded
    element (the probabilistic level at ``conf``; itself when ``confidence`` is given)."""
    z = torch.zeros(shape, dtype=torch.float64, device=device)
    rows_e = None if idx is None else idx.clone()
    typ = ErrorBound(z, z, z, z, conf, None, {}, prec.describe(), rows_e)
    if confidence is not None:
        return typ
    return ErrorBound(z, z, z, z, None, typ, {}, prec.describe(), rows_e)


def _flat(x: torch.Tensor, batch: torch.Size) -> torch.Tensor:
    return x.expand(*batch, *x.shape[-2:]).reshape(math.prod(batch), *x.shape[-2:])


@dataclass(frozen=True)
class _Model:
    """What the bound of one call needs, resolved from the method's record and keywords:
    the models of its parts and the parameters they take."""

    target: str
    quantization: str
    rounding: str
    approximation: str | None
    terms: tuple[tuple[float, float], ...]
    coeffs: tuple[float, ...] | None
    coeff_rel: float
    projection: torch.Tensor | None
    softcap: float | None = None
    lifted: bool = False  # FAVOR+: Performer's shift by amax(data_dash) (``stabilizer``)


def _model(m: Method, p: dict[str, Any], d_k: int, sc: float, n_k: int, form: Any = None) -> _Model:
    """Resolve the record ``m``, the keywords ``p`` and the how-keyword ``form`` (taylor,
    polynomial: ``"scores"`` selects the score form's rounding model) into the bound's
    models."""
    terms: tuple[tuple[float, float], ...] = ((1.0, 1.0),)
    if p.get("semiring") is not None:
        terms = _terms(p["semiring"])
    rounding, approx = m.rounding, m.approximation
    lin = p.get("linearize")
    if lin is not None:
        from attnprec.attention.semiring import _check_linearize

        lin = _check_linearize(lin)
        assert lin is not None
        rounding = m.extra["linearized"][lin[0]]
        approx = "polynomial" if lin[0] == "taylor" else "favor"
    elif "semiring" in p and not terms:
        raise ValueError("semiring: Tropical has no rounding bound here (ties can flip)")
    if form is not None:
        from attnprec.attention.taylor import check_form

        if check_form(form) == "scores":
            rounding = "scores"
    coeffs, rel = None, 0.0
    if m.coefficients is not None and (rounding in ("featured", "scores") and approx is not None):
        coeffs, rel = m.resolve("coefficients")(p)
    projection = None
    if rounding == "favor" or approx == "favor":
        from attnprec.attention.favor import resolve_projection

        if sc < 0:
            raise ValueError(f"scale: FAVOR+ features need scale >= 0, got {sc}")
        if p.get("projection") is not None:
            nf = p.get("num_features", lin[1] if lin is not None else None)
            projection = resolve_projection(
                None if nf is None else int(nf), p["projection"], d_k, True, None, torch.float64
            )
        elif lin is None:
            raise ValueError(
                "projection: FAVOR+ needs the projection W [m, d_k] the kernel uses "
                "(attention.favor_projection) to bound its approximation and its features"
            )
    # (absent, the method's default applies, as in the references and the method itself)
    if (
        "feature_map" in m.keyword_names
        and p.get("feature_map", m.keyword("feature_map").default) is not None
    ):
        raise ValueError(
            "feature_map: the bound takes given features; pass phi(q), phi(k) as q, k with "
            "feature_map=None (absent, it is the method's default "
            f"{m.keyword('feature_map').default!r})"
        )
    del n_k
    target = m.name if lin is not None else m.target
    cap = None if p.get("softcap") is None else check_softcap(p["softcap"])
    return _Model(target, m.quantization, rounding, approx, terms, coeffs, rel, projection, cap)


@torch.no_grad()  # never differentiated (`out=` passes refuse tensors needing grad)
def attention_error_bound(
    method: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    precision: Any = None,
    *,
    causal: bool | None = None,
    scale: float | None = None,
    confidence: float | None = None,
    block: int | None = None,
    target: str | None = None,
    rows: Any = None,
    seed: int = 0,
    typical_confidence: float = DEFAULT_CONFIDENCE,
    evaluation: str = "pairs",
    stabilizer: str = "exponent",
    **params: Any,
) -> ErrorBound:
    """Bound |kernel output - exact target output| per element, split into its sources.

    Parameters
    ----------
    method : str
        One of ``"softmax" "log" "taylor" "polynomial" "linear" "favor" "semiring"
        "gated"``.
    q, k, v : torch.Tensor
        The inputs as the user holds them (any float dtype, taken as exact values); the
        kernel is assumed to see them rounded to ``precision.storage``, or quantized with
        scale factors (:meth:`~attnprec.analysis.precision.Precision.stored`) when
        ``precision.scaling`` is set.
    precision : Precision or format-like, optional
        The declaration (storage, compute, accumulate, store rounding, schedule block,
        exp/log/division accuracy); a format name or dtype stands for ``Precision(fmt)``;
        default: q's dtype.
    causal : bool, optional
        As in the methods; default False (True for ``gated``, which is causal only).
    scale : float, optional
        As in the methods (default 1/sqrt(d_k); 1 for log; linear has none).
    confidence : float, optional
        None: the sound (worst-case) bound, with the probabilistic one in ``.typical``.
        A probability in (0, 1): return the probabilistic level itself, holding for every
        element together with at least this probability under its model (independent
        mean-zero rounding errors, docs/bounds.md).
    block : int, optional
        Deprecated: declare ``Precision(..., block=)`` instead (the same meaning).
    target : str, optional
        The exact method the approximation is measured against (softmax for taylor,
        polynomial and favor; "semiring" for linearized semirings); must match if given.
    rows : int or sequence of int, optional
        Evaluate only these query rows (indices), or a count of rows drawn with ``seed``
        (:func:`sample_rows`); the outputs then have one row per distinct index, in
        increasing order (``.rows`` lists them). A row's sound bound is the same (to
        float64 rounding) whichever rows are evaluated with it; ``.typical`` holds at its
        confidence for the elements evaluated together, so fewer rows take a smaller tail
        factor (a sampled row's level may lie a few percent below the full call's).
    typical_confidence : float
        Confidence of ``.typical`` on the sound level.
    evaluation : {"pairs", "state"}
        ``"pairs"``: each row against every key it sees (``O(rows n_k d)`` time; the
        tightest). ``"state"`` (methods whose record lists it: log, taylor, polynomial,
        linear, favor, gated and the state-space methods, whose own bounds document it):
        from prefix states over the keys, as a linear-time kernel
        holds them (log, FAVOR+ and gated: per channel or feature, ``O((n_k + rows) C
        d_v)`` time; the polynomial methods: per packed monomial, ``O((n_k + rows) F
        d_v)``), the same
        model with each per-term factor bounded by one that separates into a row and a key
        part: sound for the same declarations, and never below the pair evaluation with
        its factors and deviations evaluated exactly (docs/bounds/attention.md, "State
        evaluation"; up to several times it on sharp attention). Below the pair
        evaluation itself where that relaxes its deviations (reviews: 0.81x for taylor
        of degree 3 on values of +-50 that cancel, 0.93x for log). The quantization and
        approximation parts of taylor, polynomial and favor (against softmax) stay
        pair-evaluated. The probabilistic level is evaluated from
        the same states (as the sound level, it can sit a little below the pair
        evaluation's where that is capped by its own relaxations: a review measured
        0.96x for linear attention in bf16 compute; a few times it on sharp rows), the
        keys' sums in sequence order included for linear, log and FAVOR+ (from
        prefix Gram states of the features, ``O((n_k / 32 + rows) F^2 d_v)``); taylor's
        and polynomial's bound each key's weight by magnitudes and average the orders
        (docs/bounds/attention.md, "Sums in sequence order"). Plain causal or full visibility
        only; partial sums declared as values (``sums="linear"``); the feature form (not
        ``form="scores"``).
    stabilizer : {"exponent", "data_dash"}
        FAVOR+ (and FAVOR+-linearized semirings): the shift of the features' exps.
        ``"exponent"`` (default): by the largest exponent ``sqrt(scale) w.x - scale
        |x|^2 / 2 - log(m) / 2`` (of the row's features; of the keys', as the declaration
        allows), as attnprec's kernels. ``"data_dash"``: by the largest linear part
        ``sqrt(scale) w.x``, as Performer's code (``amax(data_dash)``: a query over its
        features, the keys over the sequence), up to ``scale |x|^2 / 2 + log(m) / 2``
        above it; such a kernel was 1.97x outside the default's rounding part with exps
        correctly rounded (``test_witness_favor_performer_shift``).
    **params
        The method's own keywords (degree, coeffs, semiring, linearize, log_g, projection,
        num_features). ``log_g`` is taken as the kernel reads it, not rounded to ``storage``
        (gated kernels often keep their gates in float32 beside bf16 q, k, v): pass it in
        the format the kernel holds it (the state-space methods' parameters, by contrast,
        are inputs held in ``storage``). Keywords that say how a kernel computes
        (chunk_size, allow_nonpositive, ...) are accepted and ignored: the bound covers
        every schedule the precision allows; except ``form`` (taylor, polynomial), which
        names the algorithm: ``"features"`` (default: any feature-map or state algorithm) or
        ``"scores"`` (the polynomial of each score ``scale q.k``, then the sums over keys in
        any order and one division; a far smaller error in fp16/bf16). ``"linear"`` is the
        kernel over given features: pass phi(q), phi(k) as q, k (``feature_map`` absent or
        None). ``"favor"`` needs ``projection=W`` (the W given to ``favor_attention``).

    Returns
    -------
    ErrorBound
        Guarantee: ``|ŷ - y*| <= total`` elementwise for every evaluation order
        ``precision`` allows, under its elementary-function model (or, with
        ``confidence``, with that probability under the probabilistic model);
        ``unbounded`` names what makes an infinite element infinite. Evaluated on ``q``'s
        device when it is a CUDA device (the same guarantee: ``attnprec._device``), else
        on the CPU; the parts are returned on ``q``'s
        device.

    Raises
    ------
    ValueError, TypeError
        Unknown method or parameters, bad shapes, non-finite inputs, inputs that overflow
        the storage format, positive log-gates (each naming the argument).
    """
    check_gradual_underflow(fresh=True)
    # (NumPy's and torch's bools taken as check_bool takes them: they reached the masks)
    causal = None if causal is None else check_bool("causal", causal)
    # (one-byte float parameters read widened; q, k, v keep their dtype, the default
    # declaration's storage)
    params = {key: widened(val) for key, val in params.items()}
    return _error_bound(
        method, q, k, v, precision, causal=causal, scale=scale, confidence=confidence,
        block=block, target=target, rows=rows, seed=seed,
        typical_confidence=typical_confidence, evaluation=evaluation, stabilizer=stabilizer,
        **params,
    )  # fmt: skip


def _error_bound(
    method: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    precision: Any = None,
    *,
    causal: bool | None = None,
    scale: float | None = None,
    confidence: float | None = None,
    block: int | None = None,
    target: str | None = None,
    rows: Any = None,
    seed: int = 0,
    typical_confidence: float = DEFAULT_CONFIDENCE,
    evaluation: str = "pairs",
    rounding_only: bool = False,
    stabilizer: str = "exponent",
    **params: Any,
) -> ErrorBound:
    """:func:`attention_error_bound`; ``rounding_only``: the quantization and approximation
    parts left zero, not evaluated (:func:`.graphs.rounding_bound`)."""
    from attnprec.analysis.precision import Precision

    m = method_record(method)
    m.check(params)
    prec = Precision.of(precision, q.dtype if isinstance(q, torch.Tensor) else None)
    if block is not None:
        warnings.warn(
            "block: pass Precision(..., block=) instead", DeprecationWarning, stacklevel=2
        )
        prec = replace(prec, block=block)
    if evaluation not in m.evaluations:
        raise ValueError(
            f"evaluation: method {method!r} is evaluated as one of {m.evaluations}, "
            f"got {evaluation!r}"
        )
    with computing_on(work_device(q)):  # float64 on q's CUDA device (attnprec._device)
        if m.bound_fn is not None:  # (the state-space methods)
            _modelled(prec, m.rounding, method)
            return m.resolve("bound_fn")(  # type: ignore[no-any-return]
                q, k, v, prec, causal=causal, scale=scale, confidence=confidence,
                target=target, rows=rows, seed=seed, typical_confidence=typical_confidence,
                evaluation=evaluation, **params,
            )  # fmt: skip
        return _evaluate(
            m, method, q, k, v, prec, causal=causal, scale=scale, confidence=confidence,
            target=target, rows=rows, seed=seed, typical_confidence=typical_confidence,
            evaluation=evaluation, rounding_only=rounding_only, stabilizer=stabilizer,
            **params,
        )  # fmt: skip


def _modelled(prec: Any, rounding: str, method: str) -> None:
    """Refuse a declaration field that the bound of ``method`` (rounding model
    ``rounding``) does not model: read by no one, it would be silently ignored (a review:
    the state-space models took FP8 scale factors, weight casts and merges so)."""
    if prec.sums == "log" and rounding not in ("log", "softmax"):
        raise ValueError(
            f"precision: partial sums held as logs (sums='log') are modelled for log "
            f"attention and softmax (split-KV), not {method!r}"
        )
    if prec.passes == 2 and rounding != "softmax":
        raise ValueError(
            f"precision: two-pass normalization (passes=2) is modelled for softmax and the "
            f"exact semirings, not {method!r}"
        )
    if prec.merges is not None and rounding != "softmax":
        raise ValueError(
            f"precision: merges of split states (merges=) are modelled for softmax and the "
            f"exact semirings (split-KV), not {method!r}"
        )
    if (prec.scaling is not None or prec.weights is not None) and rounding != "softmax":
        raise ValueError(
            f"precision: scale factors and weight casts (FP8) are modelled for softmax and "
            f"the exact semirings, not {method!r}"
        )


def _evaluate(
    m: Method,
    method: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prec: Any,
    *,
    causal: bool | None,
    scale: float | None,
    confidence: float | None,
    target: str | None,
    rows: Any,
    seed: int,
    typical_confidence: float,
    evaluation: str,
    rounding_only: bool,
    stabilizer: str,
    **params: Any,
) -> ErrorBound:
    """:func:`_error_bound` of a method without a bound function of its own, on the device
    computing now (where ``q`` is)."""
    work = work_device(q)
    if causal is None:
        causal = m.default_causal()
    n_q, n_k, d_k, d_v = check_qkv(q, k, v, causal)
    if m.causal == "only" and not causal:
        raise ValueError(f"causal: method {method!r} is causal only; pass causal=True")
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_finite(name, t)
    batch = broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    vis = visibility(
        causal, params.pop("window", None), params.pop("key_mask", None), batch, n_q, n_k, False
    )
    vis = vis if isinstance(vis, bool) else vis.to(work)
    state = evaluation == "state"
    if state and not isinstance(vis, bool):
        raise ValueError("evaluation: 'state' takes plain causal or full visibility (no masks)")
    # log's sums=None covers sums held as logs too; the other methods hold values only
    if state and prec.sums != "linear" and (m.rounding == "log" or prec.sums is not None):
        raise ValueError(
            "precision: evaluation='state' models partial sums held as values; declare "
            "Precision(..., sums='linear')"
        )
    if confidence is not None and not (
        isinstance(confidence, float | int) and not isinstance(confidence, bool)
    ):
        raise TypeError(f"confidence: expected a probability, got {confidence!r}")
    for name, c in (("confidence", confidence), ("typical_confidence", typical_confidence)):
        if c is not None and not (0.0 < float(c) < 1.0):
            raise ValueError(f"{name}: expected a probability in (0, 1), got {c!r}")
    if m.scale is None and scale is not None:
        raise ValueError(f"scale: method {method!r} has no scale; pass scale=None")
    sc = resolve_scale(scale, d_k, 1.0 if m.scale in ("one", None) else None)
    p = {
        key: (val.to(work) if isinstance(val, torch.Tensor) else val) for key, val in params.items()
    }
    what, how = m.split(p)
    mod = _model(m, what, d_k, sc, n_k, how.get("form"))
    if stabilizer not in ("exponent", "data_dash"):
        raise ValueError(f"stabilizer: expected 'exponent' or 'data_dash', got {stabilizer!r}")
    if stabilizer == "data_dash":
        if mod.rounding != "favor":
            raise ValueError(
                f"stabilizer: 'data_dash' is a shift of FAVOR+'s random features; method "
                f"{method!r} has none here"
            )
        mod = replace(mod, lifted=True)
    if state and mod.rounding not in ("log", "featured", "favor", "gated"):
        raise ValueError(
            "evaluation: 'state' evaluates feature-map and log-space kernels (form='scores' "
            "forms each score's polynomial); use evaluation='pairs'"
        )
    if target is not None and target != mod.target:
        raise ValueError(
            f"target: method {method!r} is measured against {mod.target!r}, got {target!r}"
        )
    device = q.device
    q64, k64, v64 = (_flat(x.to(work, torch.float64), batch) for x in (q, k, v))
    given = (q64, k64, v64)
    _modelled(prec, mod.rounding, method)
    # the values the kernel holds: rounded to storage, or dequantized with scale factors
    # (from the inputs' own dtype: those held in storage already are not rounded again)
    q_s, k_s, v_s = (
        prec.stored(_flat(x.to(work), batch), n) for n, x in zip("qkv", (q, k, v), strict=True)
    )
    stored = (q_s, k_s, v_s)
    from attnprec.analysis.audit import row_boundaries

    # a count draws the rows an audit of this call judges (its chunks' and key blocks' edges)
    edges = () if rows is None else row_boundaries(n_q, method, {**p, "causal": causal}, prec)
    idx = sample_rows(n_q, rows, seed, tuple(edges))
    if isinstance(vis, Visible) and vis.key_mask is not None:  # (the rows computed see a key)
        check_seen(vis.key_mask.cpu(), causal, vis.window, n_q, n_k, idx)
    n_rows = n_q if idx is None else int(idx.numel())
    rows_w = None if idx is None else idx.to(work)  # (the rows computed, where they are)
    conf = typical_confidence if confidence is None else float(confidence)
    elems = max(1, math.prod(batch) * n_rows * d_v)
    lam = tail_lambda((1.0 - conf) / elems)
    log_g = _gates(what.get("log_g"), n_k, d_k, batch) if mod.rounding == "gated" else None
    if math.prod(batch) * n_rows * d_v == 0:
        return empty_bound((*batch, n_rows, d_v), conf, confidence, prec, idx, device)

    # a state evaluation's per-sequence arrays: n_k x (its channels or features, values);
    # its rows named (the states' scans take positions, and there are n_k keys, not n_q)
    B_flat = v64.shape[0]
    s_idx = torch.arange(n_q) if rows_w is None else rows_w
    feats = d_k if mod.projection is None else mod.projection.shape[0] * len(mod.terms)
    state_item = n_k * (feats + d_v)
    # quantization: none where the kernel holds the given values (the gates are not stored)
    if rounding_only or all(torch.equal(a, b) for a, b in zip(given, stored, strict=True)):
        quant = torch.zeros(v64.shape[0], n_rows, d_v, dtype=torch.float64)
    elif mod.quantization == "gated" and not state:
        from attnprec.analysis.bounds.gated import gated_quantization

        assert log_g is not None
        quant = gated_quantization(given, stored, sc, log_g, rows_w)
    elif state and mod.quantization in ("gated", "log", "linear"):
        from attnprec.analysis.bounds.gated import gated_quantization_state
        from attnprec.analysis.bounds.quantization import (
            linear_quantization_state,
            log_quantization_state,
        )

        assert isinstance(vis, bool)

        def quant_part(sl: slice) -> torch.Tensor:
            g_, s_, lg_ = _state.take((given, stored, log_g), sl, B_flat)
            if mod.quantization == "gated":
                return gated_quantization_state(g_, s_, sc, lg_, s_idx)
            if mod.quantization == "log":
                return log_quantization_state(g_, s_, sc, vis, s_idx)
            return linear_quantization_state(g_, s_, vis, s_idx)

        quant = _state.in_groups(B_flat, state_item, quant_part)
    else:
        from attnprec.analysis.bounds.quantization import quantization

        qkind = mod.quantization if mod.target == method else "softmax"
        if "semiring" in what:
            qkind = "semiring"
        qp = {"terms": mod.terms, "softcap": mod.softcap}
        quant = quantization(qkind, given, stored, sc, vis, rows_w, qp)
    no_approx = replace(mod, approximation=None) if rounding_only else mod
    # (the kernels draw orthogonal features unless told otherwise)
    orth = how.get("orthogonal", True)
    if not isinstance(orth, bool):
        raise TypeError(f"orthogonal: expected a bool, got {orth!r}")
    block = d_k if orth else 1
    approx, approx_t, approx_why = _approximation(
        no_approx, what, stored, sc, vis, rows_w, conf, block
    )
    if state:
        assert isinstance(vis, bool)

        def rnd_part(sl: slice) -> dict[str, torch.Tensor]:
            s_, lg_ = _state.take((stored, log_g), sl, B_flat)
            return _rounding_state(mod, s_, prec, sc, vis, s_idx, lam, lg_)

        rnd = _state.in_groups(B_flat, state_item, rnd_part)
    else:
        rnd = _rounding(mod, stored, prec, sc, vis, rows_w, lam, log_g)
    if not rounding_only:  # (its callers take the sound part)
        rnd["typical"] = _repeated(rnd, mod, prec, stored, vis, n_q, rows_w)
    unbounded = {
        key.removeprefix("unbounded:"): val
        for key, val in rnd.items()
        if key.startswith("unbounded:")
    }
    unbounded = {key: val for key, val in unbounded.items() if bool(val.any())}
    if approx_why is not None and not bool(torch.isfinite(approx).all()):
        unbounded[approx_why] = ~torch.isfinite(approx)
    inf_q = ~torch.isfinite(quant)
    if bool(inf_q.any()):
        unbounded["quantization (the normalizer may vanish on the rounded inputs)"] = inf_q
    for name, part in (
        ("quantization", quant),
        ("approximation", approx),
        ("rounding", rnd["sound"]),
    ):
        # every part is a bound: >= 0, NaN only where it cannot be evaluated (then inf)
        if bool((part < 0).any()):
            raise AssertionError(f"{name}: a negative bound part (please report this)")
    shape = (*batch, n_rows, d_v)

    def out(x: torch.Tensor) -> torch.Tensor:
        x = torch.where(torch.isnan(x), math.inf, x.to(torch.float64))
        return x.reshape(shape).to(device)

    described = prec.describe()
    if state:  # a softmax target's parts are pair-evaluated (no state holds softmax)
        linear_time = mod.approximation is None and mod.quantization in ("log", "linear")
        described += "; " + ("" if linear_time else "rounding ") + "evaluated from key states"

    total, total_t = (
        out(upper(quant + approx + rnd["sound"], 2)),
        out(upper(quant + approx_t + rnd["typical"], 2)),
    )
    rows_t = None if idx is None else idx.clone()
    named = {key: val.reshape(shape).to(device) for key, val in unbounded.items()}
    typical = ErrorBound(
        total_t, out(quant), out(approx_t), out(rnd["typical"]), conf, None,
        named_unbounded(named, total, total_t), described, rows_t,
    )  # fmt: skip
    if confidence is not None:
        return typical
    return ErrorBound(
        total, out(quant), out(approx), out(rnd["sound"]), None, typical,
        typical.unbounded, described, rows_t,
    )  # fmt: skip


def _repeated(
    rnd: dict[str, torch.Tensor],
    mod: _Model,
    prec: Any,
    stored: tuple[torch.Tensor, ...],
    vis: bool | Visible,
    n_q: int,
    rows: torch.Tensor | None,
) -> torch.Tensor:
    """The level's rounding part where roundings repeat: times the square root of the most
    keys (log attention: key entries; softmax-like weights: logits) with one value a row
    sees, at most the sound part (:func:`._rows.key_repeats`)."""
    q, k, v = stored
    if not prec.loads_exactly():  # values that storage tells apart may load as one
        from attnprec.analysis.precision import round_to

        q, k = round_to(q, prec.compute), round_to(k, prec.compute)
    rep = key_repeats(k, vis, n_q, rows, entries=mod.rounding == "log")
    if mod.rounding in ("softmax", "scores"):  # weights that are functions of the logits
        ties = logit_ties(q, k, v, vis, rows)
        rep = rep if ties is None else torch.maximum(rep, ties)
    typical = rnd["typical"]
    rep = rep.to(typical.device)
    if not bool((rep > 1).any()):
        return typical
    return torch.minimum(rnd["sound"], typical * rep.sqrt())


def visibility(
    causal: bool,
    window: Any,
    key_mask: Any,
    batch: torch.Size,
    n_q: int,
    n_k: int,
    rows: torch.Tensor | Literal[False] | None = None,
) -> bool | Visible:
    """``causal``, or a :class:`Visible` with the sliding window and key mask (checked by
    :func:`attnprec._validate.check_masks`; ``rows`` as there: only the rows computed
    need a key)."""
    if window is None and key_mask is None:
        return causal
    w, km = check_masks(causal, window, key_mask, batch, n_q, n_k, rows)
    return Visible(causal, w, km)


def _gates(log_g: Any, n: int, d_k: int, batch: torch.Size) -> torch.Tensor:
    """The log-gates as ``[B, n, d_k]`` float64, checked (<= 0, finite or -inf)."""
    if log_g is None:
        raise ValueError("log_g: required for gated attention")
    from attnprec.attention.gated import per_channel_gates

    lg = check_float("log_g", log_g).to(torch.float64)
    if not per_channel_gates(lg, n, d_k, batch):
        lg = lg.unsqueeze(-1).expand(*lg.shape, d_k)
    if bool(torch.isnan(lg).any()) or bool((lg > 0).any()):
        found = "NaN" if bool(torch.isnan(lg).any()) else repr(float(lg.max()))
        raise ValueError(
            f"log_g: expected log-gates <= 0 (gates in [0, 1]; -inf a reset), found {found}"
        )
    # A gate whose exp is 0 in every format (below float64's least subnormal, e^-745, by
    # far) is a reset: its decays are what -inf gives, up to less than float64 resolves (a
    # review: -1e16 every third step crashed the state evaluation, and the pairs' float64
    # prefix sums charged its magnitude to every decay: inf with false reasons).
    lg = torch.where(lg < -1100.0, -math.inf, lg)
    try:
        full = lg.expand(*batch, n, d_k)
    except RuntimeError:
        raise ValueError(f"log_g: batch dims {tuple(lg.shape[:-2])} do not broadcast") from None
    return full.reshape(math.prod(batch), n, d_k)


def _approximation(
    mod: _Model,
    what: dict[str, Any],
    stored: tuple[torch.Tensor, ...],
    sc: float,
    causal: bool | Visible,
    idx: torch.Tensor | None,
    conf: float,
    block: int,
) -> tuple[torch.Tensor, torch.Tensor, str | None]:
    """(sound, probabilistic, name of the reason when infinite) approximation parts;
    ``block``: a kernel's random features are independent in blocks of that many."""
    from attnprec.analysis.bounds.approximation import approximation_bound
    from attnprec.analysis.bounds.favor import mixture_error_bound

    q, k, v = stored
    if mod.approximation is None:
        z = torch.zeros(q.shape[0], q.shape[1] if idx is None else idx.numel(), v.shape[-1])
        return z.double(), z.double(), None
    why = "approximation (the method's normalizer may vanish)"
    if mod.approximation == "favor" and mod.projection is None:
        # random features drawn by the kernel: only probabilistic, over the draw
        if isinstance(causal, Visible):
            raise ValueError("window, key_mask: need projection= with random features")
        m_feat = int(what["linearize"][1])
        # half the failure budget: the probabilistic total adds the rounding's level, a
        # second event
        fail = (1 - conf) / 2
        t = mixture_error_bound(
            q, k, v, mod.terms, m_feat, fail, causal=causal, scale=sc, block=block
        )
        t = t if idx is None else t[..., idx, :]
        why = "approximation (random features without projection=: no sound bound)"
        return torch.full_like(t, math.inf), t, why
    a = approximation_bound(
        q, k, v, sc, causal, coeffs=mod.coeffs, coeff_rel=mod.coeff_rel,
        projection=mod.projection, terms=mod.terms, rows=idx,
    )  # fmt: skip
    return a, a, why


def _rounding_state(
    mod: _Model,
    stored: tuple[torch.Tensor, ...],
    prec: Any,
    sc: float,
    causal: bool,
    idx: torch.Tensor | None,
    lam: float,
    log_g: torch.Tensor | None,
) -> dict[str, torch.Tensor]:
    """The rounding part evaluated from key states (``evaluation="state"``)."""
    q, k, v = stored
    if mod.rounding == "gated":
        from attnprec.analysis.bounds.gated import gated_rounding_state

        assert log_g is not None
        return gated_rounding_state(q, k, v, prec, sc, log_g, lam, idx)
    if mod.rounding == "log":
        from attnprec.analysis.bounds.log import log_rounding_state

        return log_rounding_state(q, k, v, prec, sc, causal, lam, idx)
    if mod.rounding == "favor":
        from attnprec.analysis.bounds.favor import favor_rounding_state

        if mod.projection is None:
            return _rounding(mod, stored, prec, sc, causal, idx, lam, None)  # infinite
        return favor_rounding_state(
            q, k, v, prec, sc, causal, lam, mod.projection, mod.terms, idx, mod.lifted
        )
    from attnprec.analysis.bounds._featured import featured_rounding_state

    given = mod.coeffs is None  # the features themselves (no scale)
    return featured_rounding_state(
        q, k, v, prec, None if given else sc, causal, lam, mod.coeffs, idx, mod.coeff_rel
    )


def _rounding(
    mod: _Model,
    stored: tuple[torch.Tensor, ...],
    prec: Any,
    sc: float,
    causal: bool | Visible,
    idx: torch.Tensor | None,
    lam: float,
    log_g: torch.Tensor | None,
) -> dict[str, torch.Tensor]:
    """The rounding part of the method's rounding model: ``"sound"``, ``"typical"`` and
    the masks of the intermediates that may overflow (``"unbounded:<name>"``)."""
    q, k, v = stored
    if mod.rounding == "softmax":
        from attnprec.analysis.bounds.softmax import softmax_rounding

        return softmax_rounding(q, k, v, prec, sc, causal, mod.terms, lam, idx, mod.softcap)
    if mod.rounding == "log":
        from attnprec.analysis.bounds.log import log_rounding

        return log_rounding(q, k, v, prec, sc, causal, lam, idx)
    if mod.rounding == "gated":
        from attnprec.analysis.bounds.gated import gated_rounding

        assert log_g is not None
        return gated_rounding(q, k, v, prec, sc, log_g, lam, idx)
    if mod.rounding == "favor":
        from attnprec.analysis.bounds.favor import favor_rounding

        if mod.projection is None:
            rows = q.shape[1] if idx is None else idx.numel()
            inf = torch.full((q.shape[0], rows, v.shape[-1]), math.inf, dtype=torch.float64)
            why = "rounding (random features without projection=)"
            return {"sound": inf, "typical": inf, f"unbounded:{why}": torch.isinf(inf)}
        return favor_rounding(
            q, k, v, prec, sc, causal, lam, mod.projection, mod.terms, idx, mod.lifted
        )
    if mod.rounding == "scores":
        from attnprec.analysis.bounds._scores import scores_rounding

        assert mod.coeffs is not None
        return scores_rounding(q, k, v, prec, sc, causal, lam, mod.coeffs, idx, mod.coeff_rel)
    from attnprec.analysis.bounds._featured import featured_rounding

    given = mod.coeffs is None  # the features themselves (no scale)
    return featured_rounding(
        q, k, v, prec, None if given else sc, causal, lam, mod.coeffs, idx, mod.coeff_rel
    )
