"""Certified references: the exact attention output as a float64 value and a radius.

``reference(method, q, k, v, **params)`` returns ``Reference(value, radius, backend)`` with
``|exact - value| <= radius`` elementwise, where *exact* is the method's output (weights and
output formula of docs/internals.md) in exact real arithmetic on the inputs as given: q, k,
v and every float parameter are taken as the exact numbers they hold (the reference of the
rounded inputs a kernel actually saw). The scale is the float64 number ``resolve_scale``
returns (so the default 1/sqrt(d_k) is that float, not the irrational number).

Backends (see docs/reference.md):

``"arb"``
    python-flint ball arithmetic (``arb``, products with ``arb_mat``). Rigorous: each
    ball contains its exact value.
``"mpmath"``
    ``mpmath.iv`` interval arithmetic with outward rounding. Rigorous, slower.
``"float64"``
    softmax (soft-capped too), log, favor, taylor, polynomial, semiring (its terms' ``c_r``
    within [2^-60, 2^60]; not the tropical limit) and linear (``feature_map`` ``"elu1"``,
    its features computed with their errors, None or a callable): the output computed in
    float64 with a rigorous a-posteriori bound of
    its rounding errors (assumptions stated in :mod:`._reference_float64`); rows it leaves
    looser than 2^-30 max_j |v_jc| are recomputed by arb within a work budget.
``"auto"``
    float64 for large problems of those methods, else arb when python-flint is installed,
    else mpmath.

``gated`` runs in the ball backends as its recurrence over chunks of ``GATED_CHUNK`` tokens
(:func:`._reference_ball.gated`): linear time in n, memory O(n d) floats and O(C^2 + d_k
d_v) balls; with ``rows=`` up to the last row asked.

The ball backends work at 128 bits and double the precision (up to 1024, then as many
bits as hold every score exactly where the products span more binades:
:func:`._reference_ball.exact_score_bits`) until every output's radius is <= 2^-60
max(|value|, max_j |v_jc|) (or, for ``gated``, 2^-60 |value|); past that the radius is
still certified, only wider. ``value`` is the float64 nearest the
midpoint of the output ball and ``radius`` covers that conversion (rounded upward).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from attnprec._device import CPU, computing_on, work_device
from attnprec._validate import (
    broadcast_shapes,
    check_bool,
    check_finite,
    check_float,
    check_gradual_underflow,
    check_int,
    check_qkv,
    check_softcap,
    resolve_scale,
    widened,
)
from attnprec.analysis import _reference_ball as ball
from attnprec.analysis._reference_float64 import semiring_certified, weighted_average_float64
from attnprec.methods import NAMES as METHODS
from attnprec.methods import method as method_record

if TYPE_CHECKING:  # (imported where used: the bounds import this module)
    from attnprec.analysis.bounds._rows import Visible

__all__ = ["Reference", "reference", "METHODS", "BACKENDS"]

BACKENDS = ("auto", "arb", "mpmath", "float64")
#: Methods the float64 backend certifies (from the table).
_FLOAT64 = tuple(name for name in METHODS if "float64" in method_record(name).backends)
#: Tokens per chunk of the gated reference's recurrence (:func:`._reference_ball.gated`).
GATED_CHUNK = 16
#: ``"auto"`` uses the float64 backend when batch * n_q * n_k * (d_k + d_v) exceeds this.
AUTO_FLOAT64_WORK = 2**24
#: float64 backend: rows with a radius above this times max_j |v_jc| (or infinite) are
#: recomputed by a ball backend ...
FLOAT64_REPAIR_REL = 2.0**-30
#: ... while their work (visible keys times (d_k + d_v + 2), summed) stays within this.
FLOAT64_REPAIR_WORK = 2**22


@dataclass(frozen=True)
class Reference:
    """A certified reference: ``|exact - value| <= radius`` elementwise.

    Attributes
    ----------
    value : torch.Tensor
        float64 ``[..., n_q, d_v]``.
    radius : torch.Tensor
        float64, same shape; ``inf`` where no finite bound exists (a normalizer whose
        ball contains 0), NaN where an input was NaN.
    backend : str
        ``"arb"``, ``"mpmath"`` or ``"float64"``.
    rows : torch.Tensor or None
        The query rows held (``rows=``), None for every row.
    """

    value: torch.Tensor
    radius: torch.Tensor
    backend: str
    rows: torch.Tensor | None = None

    def contains(self, y: torch.Tensor, slack: torch.Tensor | float = 0.0) -> torch.Tensor:
        """Elementwise: whether ``|y - value| <= radius + slack``, decided exactly.

        ``y`` is compared as float64. Both sides are held as exact sums of two floats
        (TwoSum: ``y - value = s + e``, ``radius + slack = r + f``, each rounded to nearest
        with its exact error), and two such sums compare by their leading parts, then
        their errors (rounding is monotone), so a point outside the ball is never
        reported inside, nor one inside outside (a review: rounding ``radius + slack``
        upward took points one ulp outside). An infinite radius or slack contains every
        non-NaN ``y``.
        """

        def two_sum(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            t = a + b
            bp = t - a
            return t, (a - (t - bp)) + (b - bp)

        y = check_float("y", y).to(torch.float64)
        s, e = two_sum(y, -self.value)
        r, f = two_sum(self.radius, torch.as_tensor(slack, dtype=torch.float64))
        e = torch.where(s < 0, -e, e)  # |s + e| = |s| + e' (|e| <= half an ulp of s)
        inside = (s.abs() < r) | ((s.abs() == r) & (e <= f))
        return inside | (torch.isinf(r) & ~torch.isnan(y))

    def rel_radius(self) -> torch.Tensor:
        """``radius / |value|`` (0 where both are 0, inf where only value is 0)."""
        r = self.radius / self.value.abs()
        return torch.where(self.radius == 0, torch.zeros_like(r), r)


def _real_list(name: str, xs: Any) -> list[float]:
    if isinstance(xs, torch.Tensor):
        check_float(name, xs)
        if xs.dim() != 1:
            raise ValueError(f"{name}: expected a 1-d sequence, got shape {tuple(xs.shape)}")
        out = [float(c) for c in xs.double()]
    elif isinstance(xs, Sequence) and not isinstance(xs, str):
        if not all(isinstance(c, numbers.Real) and not isinstance(c, bool) for c in xs):
            raise TypeError(f"{name}: expected real numbers")
        out = [float(c) for c in xs]
    else:
        raise TypeError(f"{name}: expected a sequence of real numbers, got {type(xs).__name__}")
    if not out:
        raise ValueError(f"{name}: expected at least one coefficient")
    if not all(math.isfinite(c) for c in out):
        raise ValueError(f"{name}: expected finite values")
    return out


def _semiring_terms(semiring: Any) -> list[tuple[float, float]]:
    terms = getattr(semiring, "terms", None)
    if terms is None:
        raise TypeError(f"semiring: expected an object with .terms, got {type(semiring).__name__}")
    out = []
    for t in terms:
        pair = _real_list("semiring", list(t))
        if len(pair) != 2:
            raise ValueError(f"semiring: expected .terms of (c, lam) pairs, got {t!r}")
        out.append((pair[0], pair[1]))
    return out


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _features(
    fmap: Callable[[torch.Tensor], torch.Tensor], q: torch.Tensor, k: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """A callable feature map's outputs on q and k [B, n, d], checked, as float64."""
    out = []
    for name, x in (("q", q), ("k", k)):
        f = check_float(f"feature_map({name})", fmap(x))
        if f.dim() != x.dim() or f.shape[:-1] != x.shape[:-1]:
            raise ValueError(
                f"feature_map: expected shape {tuple(x.shape[:-1])} + (m,) for {name}, "
                f"got {tuple(f.shape)}"
            )
        out.append(check_finite(f"feature_map({name})", f.to(torch.float64)))
    if out[0].shape[-1] != out[1].shape[-1]:
        raise ValueError(
            f"feature_map: q and k features differ in size, "
            f"{out[0].shape[-1]} != {out[1].shape[-1]}"
        )
    return out[0], out[1]


def _nan_to_zero(x: torch.Tensor) -> torch.Tensor:
    """float64 copy with NaN -> 0 (the outputs they reach are set to NaN afterwards)."""
    x = x.to(torch.float64)
    return torch.where(torch.isnan(x), torch.zeros_like(x), x)


def _nan_mask(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    vis: Any,
    extra: Sequence[torch.Tensor],
    key_extra: torch.Tensor | None,
) -> torch.Tensor:
    """Outputs that a NaN input reaches: row i through q_i, (i, c) through the k_j, v_jc it
    sees. ``vis``: ``causal`` (bool) or a :class:`~attnprec.analysis.bounds._rows.Visible`
    (its key mask ``[B, n_k]`` over the flattened batch): a masked key, or one outside a
    row's window, reaches no row (a review: a NaN padding key made every row NaN, value
    and radius, so the audit called a correct masked kernel violated)."""
    knan = torch.isnan(k).any(-1)
    if key_extra is not None:
        knan = knan | key_extra
    vnan = torch.isnan(v)
    causal = vis if isinstance(vis, bool) else vis.causal
    window = None if isinstance(vis, bool) else vis.window
    if not isinstance(vis, bool) and vis.key_mask is not None:
        km = vis.key_mask.to(knan.device).reshape(knan.shape)
        knan, vnan = knan & km, vnan & km.unsqueeze(-1)

    def seen(x: torch.Tensor, dim: int) -> torch.Tensor:  # NaN keys each row sees
        if not causal:  # (n_q rows see every key)
            shape = list(x.shape)
            shape[dim] = q.shape[-2]
            return x.any(dim, keepdim=True).expand(shape)
        c = torch.cumsum(x.to(torch.int64), dim=dim)  # n_q == n_k: key j is visible to i >= j
        if window is not None and window < c.shape[dim]:  # keys i - window + 1 .. i
            c = c - torch.cat([torch.zeros_like(c.narrow(dim, 0, window)),
                               c.narrow(dim, 0, c.shape[dim] - window)], dim)  # fmt: skip
        return c > 0

    m = (torch.isnan(q).any(-1) | seen(knan, -1)).unsqueeze(-1) | seen(vnan, -2)
    if any(bool(torch.isnan(t).any()) for t in extra):
        m = torch.ones_like(m)
    return m


@torch.no_grad()
def reference(
    method: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool | None = None,
    scale: float | None = None,
    backend: str = "auto",
    rows: Any = None,
    seed: int = 0,
    auto_rows: int | None = None,
    **params: Any,
) -> Reference:
    """Certified reference of an attention method.

    Parameters
    ----------
    method : str
        One of ``"softmax" "log" "taylor" "polynomial" "linear" "favor" "semiring"
        "gated"`` (weights and output formulas in docs/internals.md).
    q, k, v : torch.Tensor
        ``[..., n_q, d_k]``, ``[..., n_k, d_k]``, ``[..., n_k, d_v]``, one float dtype, batch
        dims broadcast. Taken as exact.
    causal : bool, optional
        Key j visible to query i only when j <= i. Default: False, except for ``gated``,
        which is causal by definition (``causal=False`` raises for it).
    scale : float, optional
        Score scale; default 1/sqrt(d_k) (1 for ``log``). ``linear`` has none (must be None).
    backend : {"auto", "arb", "mpmath", "float64"}
        ``"auto"``: float64 where it certifies the method and batch x rows x n_k x (d_k +
        d_v) exceeds :data:`AUTO_FLOAT64_WORK`, else arb (mpmath without python-flint).
    auto_rows : int, optional
        The rows ``"auto"`` counts (default: the rows certified): a part of a larger
        computation (a shard of an audit's rows, :mod:`attnprec.runner`) passes the whole's
        count, so it chooses the backend of the whole.
    rows : sequence of int or torch.Tensor or int, optional
        Certify only these query rows (indices; the result holds them sorted and unique,
        listed in ``.rows``): each row with the keys it sees, so the work is that of the
        rows alone (a causal row i sees keys 0..i; gated computes its recurrence up to the
        last row asked). A count draws rows as
        :func:`attnprec.analysis.bounds.attention.sample_rows` with ``seed`` (the first and
        last rows always; not a kernel's chunk or key-block edges, which the bound and the
        audit add from the declaration: give the bound's ``.rows`` to certify its rows).
    seed : int
        The draw of a count of ``rows`` (default 0).
    **params
        ``degree`` (taylor, int >= 0), ``coeffs`` (polynomial: c_0..c_P, real),
        ``feature_map`` (linear: ``"elu1"``, the default, computed exactly; ``None``: q and k
        are the features themselves, as the linear kernel takes them; or a callable
        applied to the float64 q and k whose float64 outputs are taken as exact features),
        ``projection`` (favor: W ``[m, d_k]``, required; ``num_features`` optional, must equal
        m), ``semiring`` (an object with ``.terms``; ``.terms == ()`` is the tropical
        max-plus semiring, ties averaged), ``log_g`` (gated: ``[..., n]`` or
        ``[..., n, d_k]``, all <= 0).

    Returns
    -------
    Reference
        ``value`` and ``radius`` float64 ``[..., n_q, d_v]``: ``|exact - value| <= radius``
        elementwise (the error guarantee; ``radius`` inf where a normalizer's enclosure
        contains 0, e.g. odd-degree Taylor or negative polynomial weights; NaN inputs give
        NaN in the outputs they reach). The float64 backend computes on ``q``'s device
        when it is a CUDA device (the same radius rules: their assumptions hold there),
        the ball backends and the gated recurrence on the CPU; returned on ``q``'s device.

    Raises
    ------
    ValueError
        Unknown method or backend, mismatched shapes, a missing or out-of-range parameter,
        infinite inputs, ``causal`` with n_q != n_k, ``gated`` with ``causal=False``,
        ``backend="arb"`` without python-flint, ``backend="float64"`` for a method whose
        record lists no float64 backend (:mod:`attnprec.methods`) or with parameters it
        does not certify.
    TypeError
        Non-float tensors, parameters of the wrong type or not belonging to the method.
    """
    check_gradual_underflow(fresh=True)
    # (NumPy's and torch's bools taken as check_bool takes them: they reached the masks)
    causal = None if causal is None else check_bool("causal", causal)
    rec = method_record(method)
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    rec.check(params, allow_how=False)
    q, k, v = widened(q), widened(k), widened(v)
    params = {key: widened(val) for key, val in params.items()}
    if rec.reference_fn is not None:
        from attnprec.analysis.bounds.attention import sample_rows

        if isinstance(q, torch.Tensor) and q.dim() >= 2 and rows is not None:
            rows = sample_rows(q.shape[-2], rows, seed)  # (None: every row)
        return rec.resolve("reference_fn")(  # type: ignore[no-any-return]
            q, k, v, causal=causal, scale=scale, backend=backend, rows=rows, **params
        )
    for kw in rec.keywords:
        if kw.reference_required and params.get(kw.name) is None:
            raise ValueError(
                f"{kw.name}: required for the reference of method {method!r} (its exact "
                "output depends on it)"
            )
        if not kw.reference and params.get(kw.name) is not None:
            raise ValueError(
                f"{kw.name}: makes {method!r} an approximation of {rec.target!r} with no "
                f"reference of its own; take reference({rec.target!r}, ...)"
            )
    if causal is None:
        causal = rec.default_causal()
    n_q, n_k, d_k, d_v = check_qkv(q, k, v, causal)
    if rec.causal == "only" and not causal:
        raise ValueError(f"causal: method {method!r} is causal only (causal=False given)")
    if rec.scale is None and scale is not None:
        raise ValueError(f"scale: method {method!r} has no scale; pass scale=None")
    from attnprec.analysis.bounds._rows import Visible
    from attnprec.analysis.bounds.attention import sample_rows, visibility

    idx = sample_rows(n_q, rows, seed)
    window, key_mask = params.pop("window", None), params.pop("key_mask", None)
    defaults = {kw.name: kw.default for kw in rec.keywords if kw.reference and not kw.required}
    qkv_batch = broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    p, log_g = _method_params({**defaults, **params}, d_k, n_k, qkv_batch)
    if rec.scale is not None:
        p["scale"] = resolve_scale(scale, d_k, default=1.0 if rec.scale == "one" else None)
    if "projection" in p and p["scale"] < 0:
        raise ValueError(f"scale: favor needs scale >= 0 (sqrt(scale) x), got {p['scale']}")
    device = q.device
    batch_parts = [q.shape[:-2], k.shape[:-2], v.shape[:-2]]
    if log_g is not None:
        batch_parts.append(log_g.shape[:-2])
    try:
        batch = broadcast_shapes(*batch_parts)
    except RuntimeError as e:
        shape = tuple(batch_parts[-1])
        raise ValueError(f"log_g: batch dims {shape} do not broadcast with q, k, v") from e
    nb = math.prod(batch)
    vis = visibility(causal, window, key_mask, batch, n_q, n_k, idx)
    if isinstance(vis, Visible) and idx is None:
        idx = torch.arange(n_q)  # masks: each row with the keys it sees
    f64 = "float64" in rec.backends and (method != "semiring" or semiring_certified(p["terms"]))
    n_rows = n_q if idx is None else int(idx.numel())
    counted = n_rows if auto_rows is None else auto_rows
    if isinstance(counted, bool) or not isinstance(counted, int) or counted < 0:
        raise ValueError(f"auto_rows: expected a row count >= 0, got {auto_rows!r}")
    backend = _choose_backend(backend, method, f64, nb * counted * n_k * (d_k + d_v))
    # float64 on q's CUDA device (the same radius rules: _device); the balls and the gated
    # recurrence on the CPU. Value and radius go back to q's device.
    work = work_device(q) if backend == "float64" and log_g is None else CPU
    vis = vis if isinstance(vis, bool) else vis.to(work)
    with computing_on(work):
        val, rad = _compute(
            method, backend, q.to(work), k.to(work), v.to(work),
            None if log_g is None else log_g.to(work), causal, p, batch, nb, vis,
            None if idx is None else idx.to(work), n_rows,
        )  # fmt: skip
    if isinstance(vis, Visible) and rows is None:
        idx = None  # every row was asked for
    return Reference(val.to(device), rad.to(device), backend, idx)


def _compute(
    method: str,
    backend: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_g: torch.Tensor | None,
    causal: bool,
    p: dict,
    batch: tuple[int, ...],
    nb: int,
    vis: Any,
    idx: torch.Tensor | None,
    n_rows: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`reference`'s value and radius ``[*batch, n_rows, d_v]`` of the rows ``idx``
    (None: every row) on the device computing now, where the inputs and ``idx`` are (NaN
    where NaN inputs reach)."""

    n_q, d_v = q.shape[-2], v.shape[-1]

    def prep(name: str, x: torch.Tensor) -> torch.Tensor:  # (a model's activations: detached)
        x = x.detach().to(torch.float64).expand(*batch, *x.shape[-2:])
        return check_finite(name, _nan_to_zero(x)).reshape(nb, *x.shape[-2:])

    def full(x: torch.Tensor) -> torch.Tensor:
        return x.expand(*batch, *x.shape[-2:])

    gate_nan = None
    if log_g is not None:  # gate l enters rows t >= l through keys j < l: never gate 0
        gate_nan = full(torch.isnan(log_g)).any(-1)
        gate_nan[..., :1] = False
    nan = _nan_mask(full(q), full(k), full(v), vis, p.pop("nan_all"), gate_nan)
    q2, k2, v2 = prep("q", q), prep("k", k), prep("v", v)
    if callable(p.get("feature_map")):
        p["phi_q"], p["phi_k"] = _features(p["feature_map"], q2, k2)
    lg = None  # (checked: <= 0; -inf, a reset, kept; NaN masked as for q, k, v)
    if log_g is not None:
        lg = _nan_to_zero(log_g.detach().to(torch.float64).expand(*batch, *log_g.shape[-2:]))
        lg = lg.reshape(nb, *log_g.shape[-2:])

    def compute(q2: torch.Tensor, k2: torch.Tensor, v2: torch.Tensor, causal: bool, p: dict):
        if backend == "float64":
            return _float64_reference(method, q2, k2, v2, causal, p)
        return _ball_reference(backend, method, q2, k2, v2, causal, p)

    if n_rows == 0 or d_v == 0 or nb == 0:  # empty (queries without keys: check_qkv raised)
        val = torch.zeros(nb, n_rows, d_v, dtype=torch.float64)
        rad = torch.zeros_like(val)
    elif lg is not None:  # gated: its chunked recurrence up to the last row asked
        want = np.zeros(n_q, dtype=bool)
        want[slice(None) if idx is None else idx.numpy()] = True
        setup = ball.gated(q2.numpy(), k2.numpy(), v2.numpy(), lg.numpy(), p["scale"])
        got = ball.recurrence(ball.BACKENDS[backend], want, setup, GATED_CHUNK)
        val, rad = torch.from_numpy(got[0]), torch.from_numpy(got[1])
    elif idx is None:
        val, rad = compute(q2, k2, v2, causal, p)
    elif isinstance(vis, bool) or backend == "float64":
        # the rows asked share the key-side work (a causal row i sees keys 0..i); the float64
        # backend's row blocks hide keys outside a window or masked, as the causal mask does
        pr = dict(p)
        if "phi_q" in p:
            pr["phi_q"] = p["phi_q"][:, idx]
        if backend == "float64":
            masks = None if isinstance(vis, bool) else vis
            val, rad = _float64_reference(method, q2[:, idx], k2, v2, causal, pr, idx, masks)
        else:
            val, rad = _ball_reference(backend, method, q2[:, idx], k2, v2, causal, pr, idx)
    else:
        val, rad = _rows(compute, q2, k2, v2, vis, p, idx)
    if idx is not None:
        nan = nan[..., idx, :]
    shape = (*batch, n_rows, d_v)
    val = val.reshape(shape).masked_fill(nan, math.nan)
    rad = rad.reshape(shape).masked_fill(nan, math.nan)
    return val, rad


def _rows(
    compute: Callable[..., tuple[torch.Tensor, torch.Tensor]],
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    vis: Any,
    p: dict[str, Any],
    idx: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows ``idx`` of a normalized method, each as a one-query problem over the keys
    it sees (0..i when causal; within the window; not masked): the work of those rows
    alone. ``vis``: ``causal`` (bool) or a :class:`~attnprec.analysis.bounds._rows.Visible`
    (then per batch item when its key mask differs)."""
    val = torch.empty(q.shape[0], idx.numel(), v.shape[-1], dtype=torch.float64)
    rad = torch.empty_like(val)
    per_item = not isinstance(vis, bool) and vis.key_mask is not None
    items = [slice(b, b + 1) for b in range(q.shape[0])] if per_item else [slice(None)]
    for r, i in enumerate(idx.tolist()):
        for b in items:
            keys = _seen(vis, b.start or 0, i, k.shape[-2])
            pr = dict(p)
            if "phi_q" in p:
                pr["phi_q"], pr["phi_k"] = p["phi_q"][b, i : i + 1], p["phi_k"][b][:, keys]
            vr, rr = compute(q[b, i : i + 1], k[b][:, keys], v[b][:, keys], False, pr)
            val[b, r], rad[b, r] = vr[:, 0], rr[:, 0]
    return val, rad


def _seen(vis: bool | Visible, b: int, i: int, n_k: int) -> torch.Tensor:
    """The keys that row ``i`` of batch item ``b`` sees: ``0 .. i`` when causal, within
    the window, not masked."""
    causal = vis if isinstance(vis, bool) else vis.causal
    hi = i + 1 if causal else n_k
    lo = 0 if isinstance(vis, bool) or vis.window is None else max(0, i - vis.window + 1)
    keys = torch.arange(lo, hi)
    if not isinstance(vis, bool) and vis.key_mask is not None:
        keys = keys[vis.key_mask[b, lo:hi]]
    return keys


def _method_params(
    params: dict[str, Any], d_k: int, n_k: int, batch: Sequence[int]
) -> tuple[dict[str, Any], torch.Tensor | None]:
    """The method's keywords (checked against its record by the caller) validated and
    converted for the backends, by keyword; the gates ``log_g`` ([..., n, d_k]) if given
    (read against the inputs' batch dims ``batch``).

    ``p["nan_all"]`` lists the parameters whose NaNs reach every output.
    """
    p: dict[str, Any] = {"nan_all": []}
    log_g = None
    if "feature_map" in params:
        fmap = params["feature_map"]
        if not (fmap is None or fmap == "elu1" or callable(fmap)):
            raise ValueError(f"feature_map: expected 'elu1', None or a callable, got {fmap!r}")
        # None: q and k are the features themselves (the linear kernel's convention)
        p["feature_map"] = _identity if fmap is None else fmap
    if params.get("degree") is not None:
        p["degree"] = check_int("degree", params["degree"], minimum=0)
    if params.get("coeffs") is not None:
        p["coeffs"] = _real_list("coeffs", params["coeffs"])
    if params.get("projection") is not None:
        w = check_float("projection", params["projection"])
        if w.dim() != 2 or w.shape[1] != d_k or w.shape[0] < 1:
            raise ValueError(
                f"projection: expected shape [m, {d_k}] with m >= 1, got {tuple(w.shape)}"
            )
        nf = params.get("num_features")
        if nf is not None and check_int("num_features", nf, minimum=1) != w.shape[0]:
            raise ValueError(f"num_features: {nf} does not match projection rows {w.shape[0]}")
        p["nan_all"].append(w)
        p["projection"] = check_finite("projection", _nan_to_zero(w)).detach().cpu().numpy()
    if params.get("semiring") is not None:
        p["terms"] = _semiring_terms(params["semiring"])
    if params.get("softcap") is not None:
        p["softcap"] = check_softcap(params["softcap"])
    if params.get("log_g") is not None:
        from attnprec.attention.gated import per_channel_gates

        log_g = check_float("log_g", params["log_g"])
        per_channel = per_channel_gates(log_g, n_k, d_k, batch)
        if bool((log_g > 0).any()):  # (-inf: a reset; NaN reaches the outputs it touches)
            raise ValueError("log_g: expected all <= 0 (gates in [0, 1]; -inf a reset)")
        if not per_channel:
            log_g = log_g.unsqueeze(-1).expand(*log_g.shape, d_k)
    return p, log_g


def _choose_backend(backend: str, method: str, f64: bool, work: int) -> str:
    """``f64``: the float64 backend certifies this method with these parameters."""
    if backend == "auto":
        if f64 and work > AUTO_FLOAT64_WORK:
            return "float64"
        return "arb" if ball.HAVE_FLINT else "mpmath"
    if backend == "arb" and not ball.HAVE_FLINT:
        raise ValueError("backend: 'arb' needs python-flint (pip install python-flint)")
    if backend == "float64" and not f64:
        raise ValueError(
            f"backend: 'float64' certifies {_FLOAT64}, not {method!r} with these parameters"
        )
    return backend


def _float64_reference(
    method: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    p: dict,
    pos: torch.Tensor | None = None,
    vis: Visible | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The float64 backend on validated inputs [B, n, d] (taylor: coefficients 1/p!, each
    rounded to float64 within relative 2^-53, or 2^-1075 below the normal range; polynomial:
    its float coefficients, exact), then :func:`_repair_rows`. ``pos``: the positions of
    the rows of ``q`` (and ``p["phi_q"]``) in the sequence, sorted (default 0 .. n_q - 1);
    ``vis``: a sliding window and a key mask."""
    window, key_mask = (None, None) if vis is None else (vis.window, vis.key_mask)
    if key_mask is not None:
        # A masked key reaches no output: neutral contents (a kept key of its batch item,
        # zero values and given features) keep the bounds' shifts, norms, scalings and
        # value sums to the keys that count, and the exact outputs as they are
        # (check_masks: every item keeps a key)
        drop = ~key_mask[..., None]
        kept = k[torch.arange(k.shape[0]), key_mask.to(torch.int8).argmax(-1)]
        k, v = torch.where(drop, kept[:, None, :], k), v.masked_fill(drop, 0.0)
        if "phi_k" in p:
            p = {**p, "phi_k": p["phi_k"].masked_fill(drop, 0.0)}
    kw: dict[str, Any] = {"pos": pos, "window": window, "key_mask": key_mask}
    if method == "linear" and p.get("feature_map") == "elu1":
        val, rad = weighted_average_float64("elu1", q, k, v, causal, 1.0, **kw)
    elif method == "linear":
        val, rad = weighted_average_float64("linear", p["phi_q"], p["phi_k"], v, causal, 1.0, **kw)
    elif method == "softmax":
        val, rad = weighted_average_float64(
            method, q, k, v, causal, p["scale"], softcap=p.get("softcap"), **kw
        )
    elif method == "log":
        val, rad = weighted_average_float64(method, q, k, v, causal, p["scale"], **kw)
    elif method == "semiring":
        terms = tuple(p["terms"])
        val, rad = weighted_average_float64(method, q, k, v, causal, p["scale"], terms=terms, **kw)
    elif method == "favor":
        proj = torch.as_tensor(p["projection"], dtype=torch.float64)
        val, rad = weighted_average_float64(
            "favor", q, k, v, causal, p["scale"], projection=proj, **kw
        )
    else:
        if method == "taylor":
            coeffs = tuple(1 / math.factorial(i) for i in range(p["degree"] + 1))
            rel = 2.0**-53
        else:
            coeffs, rel = tuple(p["coeffs"]), 0.0
        val, rad = weighted_average_float64(
            "polynomial", q, k, v, causal, p["scale"], coeffs, rel, **kw
        )
    return _repair_rows(method, q, k, v, causal, p, val, rad, pos, vis)


def _repair_rows(
    method: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    p: dict,
    val: torch.Tensor,
    rad: torch.Tensor,
    pos: torch.Tensor | None = None,
    vis: bool | Visible | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Recompute with a ball backend the rows the float64 bound leaves loose (``pos``: the
    rows' positions in the sequence, as for :func:`_float64_reference`; ``vis``: the keys
    each sees, default ``causal``).

    A row is loose when some radius exceeds ``FLOAT64_REPAIR_REL max_j |v_jc|`` or is not
    finite: scores or features past the float64 range (overflow), weights that only
    subnormal numbers hold, a normalizer whose float64 enclosure contains 0, an underflowed
    Taylor coefficient (degree >= 171) with large scores. Rows are taken in order while
    their work (visible keys times (d_k + d_v + 2)) fits ``FLOAT64_REPAIR_WORK`` (arb; a
    64th of it for mpmath); the ball result replaces the float64 one where its radius is
    smaller or the float64 radius is infinite. Other rows keep their float64 result, its
    non-finite values as :func:`uncertified`.
    """
    vmax = v.abs().amax(dim=-2, keepdim=True)
    loose = ~(rad <= FLOAT64_REPAIR_REL * vmax).all(dim=-1)  # [B, n_q]
    if not bool(loose.any()):
        return val, rad
    be = ball.BACKENDS["arb" if ball.HAVE_FLINT else "mpmath"]
    budget = FLOAT64_REPAIR_WORK // (1 if ball.HAVE_FLINT else 64)
    given = "phi_q" in p  # linear over given features (elu1 is computed from q and k)
    d = (p["phi_q"].shape[-1] if given else q.shape[-1]) + v.shape[-1] + 2
    n_k = k.shape[-2]
    val, rad = val.clone(), rad.clone()
    for b, i in torch.nonzero(loose).tolist():
        keys = _seen(causal if vis is None else vis, b, i if pos is None else int(pos[i]), n_k)
        budget -= keys.numel() * d
        if budget < 0:
            break
        loose[b, i] = False  # (the ball backend's result stands, an undefined one too)
        pb = dict(p)
        if given:
            pb["phi_q"] = p["phi_q"][b, i : i + 1].numpy()
            pb["phi_k"] = p["phi_k"][b, keys].numpy()
        qb, kb, vb = q[b, i : i + 1].numpy(), k[b, keys].numpy(), v[b, keys].numpy()
        got = ball.normalized(be, method, qb, kb, vb, False, pb)
        yb, rb = torch.from_numpy(got[0][0]), torch.from_numpy(got[1][0])
        take = (rb < rad[b, i]) | torch.isinf(rad[b, i])
        val[b, i] = torch.where(take, yb, val[b, i])
        rad[b, i] = torch.where(take, rb, rad[b, i])
    return uncertified(val, rad, loose[..., None])


def uncertified(
    val: torch.Tensor, rad: torch.Tensor, left: torch.Tensor | bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """A float64 result's values left non-finite where ``left`` (what its repair's budget
    did not reach) as 0 with an infinite radius: uncertified, not NaN, which marks a NaN
    input or an undefined exact output (a normalizer exactly 0); a review: outputs of 1e280
    from finite inputs came back as NaN values."""
    lost = ~torch.isfinite(val) & left
    return val.masked_fill(lost, 0.0), rad.masked_fill(lost, math.inf)


def _ball_reference(
    backend: str,
    method: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    p: dict[str, Any],
    pos: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ball backends, one batch item at a time: inputs [B, n, d] float64, finite;
    ``pos``: the positions of ``q``'s rows in the sequence, increasing (default 0 ..
    n_q - 1)."""
    be = ball.BACKENDS[backend]
    at = None if pos is None else pos.numpy()
    val = torch.empty(q.shape[0], q.shape[1], v.shape[2], dtype=torch.float64)
    rad = torch.empty_like(val)
    for b in range(q.shape[0]):
        qb, kb, vb = q[b].numpy(), k[b].numpy(), v[b].numpy()
        if method == "semiring" and not p["terms"]:
            o = ball.tropical(qb, kb, vb, causal, p["scale"], at)
        else:
            pb = dict(p)
            if "phi_q" in p:
                pb["phi_q"], pb["phi_k"] = p["phi_q"][b].numpy(), p["phi_k"][b].numpy()
            o = ball.normalized(be, method, qb, kb, vb, causal, pb, at)
        val[b], rad[b] = torch.from_numpy(o[0]), torch.from_numpy(o[1])
    return val, rad
