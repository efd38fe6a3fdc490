"""Bounds of the state-space methods (``selective_scan``, ``ssd``, ``ssm``) through their
reduction to gated linear attention, and the a-priori drift of a state kept in a format.

Reduction (docs/methods/selective_scan.md, docs/bounds/ssm.md): per channel d (selective
scan) or per head (SSD), the output is ``sum_{s<=t} sum_n q_tn D_tsn k_sn v_s + skip_t``
with ``q = C``, ``k = B_bar`` (``dt B`` for SSD), ``v = u`` (``x``), decays ``D_tsn =
exp(sum_{r=s+1..t} log g_rn)``, log-gates ``log g = delta A`` (``A dt``) and the skip
``D u``. The bound has the parts of :class:`~attnprec.analysis.bounds.attention.ErrorBound`:

- **quantization**: ``|y(stored) - y(given)|`` with *every* operand rounded to the storage
  format (C, B, u and delta, A, D, dt): per term, four factors ``C``, ``B_bar``, the decay
  and ``u`` with perturbations ``dC, dB_bar, dD, du`` (``dD <= D expm1(sum |d log g|)``
  over the span), ``|prod (x_i + dx_i) - prod x_i|`` telescoped with no cancellation;
- **rounding**: :func:`attnprec.analysis.bounds.gated.gated_rounding` on the reduced
  problem of the stored inputs, with the computed keys' and log-gates' errors
  (:class:`~attnprec.analysis.bounds.gated.Computed`: loads, ``fl(delta A)``, ``fl(delta
  B)``, or zoh's ``expm1(delta A) / A B``) and the skip term; the sound level for every
  evaluation order the declared :class:`~attnprec.analysis.precision.Precision` allows,
  and the probabilistic level (``typical``);
- approximation: 0 (the methods are exact).

:func:`state_drift_bound` bounds a priori how far a recurrent state stored in a format
drifts from the exact state in T steps (docs/bounds/ssm.md, "State drift").
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch

from attnprec._device import here
from attnprec._validate import check_causal_only, check_finite, check_int
from attnprec.analysis.bounds import _state
from attnprec.analysis.bounds._rows import Block, stream
from attnprec.analysis.bounds.attention import (
    DEFAULT_CONFIDENCE,
    ErrorBound,
    empty_bound,
    named_unbounded,
)
from attnprec.analysis.bounds.gated import (
    Computed,
    gate_sums,
    gated_rounding,
    gated_rounding_state,
)
from attnprec.analysis.bounds.rounding import U64, excess, exp_up, gamma, tail_lambda, upper
from attnprec.analysis.precision import Format, Precision
from attnprec.methods import method as method_record

__all__ = [
    "selective_scan_bound",
    "ssd_bound",
    "ssm_bound",
    "state_drift_bound",
    "fft_conv_bound",
    "expm1_error",
    "EXPM1_POLY_ULPS",
]

#: Relative error, in units of the compute format's u, of ``expm1(x)`` for ``-1/2 < x <=
#: 0`` by the degree-10 Taylor polynomial in Horner form (``x (1 + x/2 + ... + x^9/10!)``):
#: ``gamma_17`` on a sum whose absolute terms are within ``e^{1/2}`` of its value, the
#: coefficients' roundings and the truncation (< 2^-30): at most 31 u; 32 is declared.
EXPM1_POLY_ULPS = 32.0


def expm1_error(precision: Precision, x_abs: Any = None) -> Any:
    """Relative error of ``expm1(x)``, ``x <= 0``, computed in ``precision.compute``.

    Covers a library ``expm1`` within ``exp`` ulps of the declared elementary model (CUDA's
    ``expm1f``: 1 ulp; torch's: 1 ulp) and the split evaluation the kernels use: the
    polynomial of :data:`EXPM1_POLY_ULPS` for ``x > -1/2``, ``exp(x) - 1`` below (there
    ``|expm1 x| >= 1 - e^{-1/2}``, so the exp's error ``k_e e^x`` plus its argument's
    ``a u |x| e^x <= a u / e`` and the subtraction's ``u`` give at most ``1.55 k_e + 0.94 a
    u + 2.6 u``). ``exp(x) - 1`` by subtraction for small ``|x|`` (relative error ``~ k_e /
    |x|``) is covered where the elementary model declares it (``Elementary(expm1=
    "exp_minus_one")``, the S4D reference code's ``(exp(dt A) - 1) / A``): ``fl(e^x (1 +
    d_e) - 1)``, ``|d_e| <= k_e`` plus the exp's argument roundings (``exp_arg u |x| e^x``,
    at most ``exp_arg u`` of ``|expm1 x|``), is within ``(1 + k_e / expm1(|x|) + exp_arg
    u)(1 + u) - 1`` relative (``e^x / |expm1 x| = 1 / expm1(|x|)``), a tensor for the
    lower bounds ``x_abs`` of ``|x|`` (inf where 0).
    """
    uc = precision.compute.u
    k_e = precision.op_error("exp")
    el = precision.elementary
    if el.expm1 == "exp_minus_one":
        e1 = torch.expm1(torch.as_tensor(x_abs, dtype=torch.float64)) * (1 - 4 * U64)
        rel = (k_e / e1 + el.exp_arg * uc) * (1 + uc) + uc
        return upper(torch.where(e1 > 0, rel, math.inf), 2)
    return max(EXPM1_POLY_ULPS * uc, 1.55 * k_e + (0.94 * el.exp_arg + 2.6) * uc)


# --- the reduced problem ------------------------------------------------------------------


@dataclass(frozen=True)
class _Reduced:
    """The gated problem of a state-space call, float64, batch ``B'`` = items x channels.

    ``q [B', T, N]``; ``k [B', T, N]`` the keys (``B_bar``) as float64 values within
    ``k_err`` relative of the exact ones; ``lg [B', T, N]`` the log-gates (<= 0) within
    ``lg_err`` relative; ``v [B', T, d_v]``; ``skip [B', T, d_v]`` (or None) within
    ``skip_err`` relative."""

    q: torch.Tensor
    k: torch.Tensor
    lg: torch.Tensor
    v: torch.Tensor
    skip: torch.Tensor | None
    k_err: float
    lg_err: float = U64
    skip_err: float = U64


def _decay_bounds(lg: torch.Tensor, lg_err: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefix sums and their errors for decays that bound the exact ones from above: the
    float64 log-gates moved toward 0 by their relative error (so ``exp`` of a span's sum
    plus its error is >= the exact decay)."""
    return gate_sums(lg * (1 - 2 * lg_err))


def _span(blk: Block, G: torch.Tensor, eG: torch.Tensor, sl: slice) -> tuple:
    """``(sum, error, visible)`` of the spans of the block's rows and keys ``sl``: ``[B, r,
    mc, N]`` (``-inf`` where hidden), as in :func:`.gated._decays`."""
    lo, hi, _ = sl.indices(blk.k.shape[-2])
    ab = slice(blk.k0 + lo, blk.k0 + hi)
    Gt, Gj = G[:, blk.idx].unsqueeze(-2), G[:, ab].unsqueeze(-3)
    s = Gt - Gj
    err = eG[:, blk.idx].unsqueeze(-2) + eG[:, ab].unsqueeze(-3) + U64 * s.abs()
    vis = blk.keymask(sl).unsqueeze(-1)
    return torch.where(vis, s, -math.inf), torch.where(vis, err, 0.0), vis


def _group_item(T: int, N: int, v: torch.Tensor) -> int:
    """Entries per batch item of a state evaluation (:func:`._state.in_groups`): its
    ``[T, N]`` arrays and its scan's chunk of at least 16 keys x ``N`` states x the value
    columns (three per value for the rounding's states)."""
    return N * (T + 16 * 3 * v.shape[-1])


def _quantization(
    given: _Reduced,
    stored: _Reduced,
    dk: torch.Tensor,
    dlg: torch.Tensor,
    rows: torch.Tensor | None,
    state: bool = False,
) -> torch.Tensor:
    """``|y(stored) - y(given)|`` per element ``[B', rows, d_v]``: the pairs
    (:func:`_quantization_pairs`) or, with ``state``, from key states
    (:func:`_quantization_states`); plus ``|skip~ - skip|`` (given as ``dskip`` inside
    ``stored.skip``'s slot by the caller). ``dk``, ``dlg``: ``[B', T, N]`` upper bounds of
    ``|B_bar~ - B_bar|`` and ``|log g~ - log g|``."""
    if state:
        B, T, N = dk.shape
        ops = (given, stored, dk, dlg)

        def part(sl: slice) -> torch.Tensor:
            g_, s_, dk_, dlg_ = _state.take(ops, sl, B)
            return _quantization_states(g_, s_, dk_, dlg_, rows)

        quant = _state.in_groups(B, _group_item(T, N, given.v), part)
    else:
        quant = _quantization_pairs(given, stored, dk, dlg, rows)
    if given.skip is not None:
        assert stored.skip is not None
        ds = stored.skip if rows is None else stored.skip[:, rows]
        quant = upper(quant + ds, 2)
    return quant


def _quantization_pairs(
    given: _Reduced,
    stored: _Reduced,
    dk: torch.Tensor,
    dlg: torch.Tensor,
    rows: torch.Tensor | None,
) -> torch.Tensor:
    """:func:`_quantization`'s sum over the pairs (row, key), without the skip.

    Per term ``x1 x2 x3 x4`` (``|C|``, ``|B_bar|``, the decay, ``|u|`` of the given inputs,
    upper bounds) with perturbations ``d1..d4`` (``d3 = D expm1(sum of |d log g|)``):
    ``d1 (x2+d2)(x3+d3)(x4+d4) + x1 d2 (x3+d3)(x4+d4) + x1 x2 d3 (x4+d4) + x1 x2 x3 d4``.
    """
    G, eG = _decay_bounds(given.lg, given.lg_err)
    E, eE = gate_sums(-dlg)  # minus the prefix sums of the log-gate perturbations
    kup = upper(given.k.abs() * (1 + given.k_err), 2)
    q = torch.stack([given.q.abs(), (stored.q - given.q).abs()])
    k = torch.stack([kup, dk])
    v = torch.stack([given.v.abs(), (stored.v - given.v).abs()])

    def block(blk: Block) -> dict[str, torch.Tensor]:
        (x1, d1), (x2, d2), (x4, d4) = blk.q, blk.k, blk.v
        B, r, n_st = x1.shape
        m = x2.shape[-2]
        out = torch.zeros(B, r, x4.shape[-1], dtype=torch.float64)
        step = max(1, (1 << 21) // max(B * r * n_st, 1))  # [B, r, step, N] temporaries
        for s0 in range(0, m, step):
            sl = slice(s0, s0 + step)
            logD, eD, vis = _span(blk, G, eG, sl)
            eps, e_eps, _ = _span(blk, E, eE, sl)
            x3 = exp_up(logD + eD)  # >= the exact decay (0 where hidden)
            eps_up = torch.where(vis, eps.abs() + e_eps, 0.0)
            d3 = x3 * torch.expm1(eps_up) * (1 + 4 * U64)
            if not bool(torch.isfinite(d3).all()):
                # x3 + d3 <= e^(logD + eD + eps): one exp, no 0 x inf where the decay
                # underflows against a large perturbation
                arg = logD + eD + eps_up
                alt = exp_up(arg + 2 * U64 * (arg.abs() + eD + eps_up))
                d3 = torch.fmin(d3, torch.where(vis, alt, 0.0))
            a1, a2 = x1.unsqueeze(-2), d1.unsqueeze(-2)
            b1, b2 = x2[:, sl].unsqueeze(-3), d2[:, sl].unsqueeze(-3)
            w1 = (a2 * (b1 + b2) * (x3 + d3) + a1 * b2 * (x3 + d3) + a1 * b1 * d3).sum(-1)
            w2 = (a1 * b1 * x3).sum(-1)
            out += w1 @ (x4[:, sl] + d4[:, sl]) + w2 @ d4[:, sl]
        return {"q": upper(out, 2 * m + 4 * n_st + 16)}

    return stream(block, q, k, v, True, rows, width=given.q.shape[-1])["q"]


def _quantization_states(
    given: _Reduced,
    stored: _Reduced,
    dk: torch.Tensor,
    dlg: torch.Tensor,
    rows: torch.Tensor | None,
) -> torch.Tensor:
    """:func:`_quantization_pairs` from per-channel decayed key states (``evaluation="state"``;
    :func:`._state.scan`, ``O((T + rows) N d_v)`` time per channel).

    The pair evaluation's sum of ``(x1 + d1)(x2 + d2)(x3 + d3)(x4 + d4) - x1 x2 x3 x4`` taken
    as four nonnegative parts: ``d1 (x2 + d2) X (x4 + d4) + x1 d2 X (x4 + d4) + x1 x2 (X -
    x3)(x4 + d4) + x1 x2 x3 d4`` with ``X = x3 e^eps >= x3 + d3`` (``eps`` the span's sum of
    the log-gates' perturbations). Every decay is bounded by ``X``, whose exponent (the
    prefix sums of ``log g + dlg``) separates into a row and a key part; ``X - x3 <= X
    eps`` with ``eps <= F_t - F_j + 2 eF_t`` (``F`` the prefix sums of ``dlg``, ``eF``
    their float64 error), a row part less a key part. So it is never below the pair
    evaluation beyond ``e^eps - 1 <= eps e^eps`` and ``x3 <= X`` in the last part (relative
    ``eps``). Log-gates whose perturbed values may be positive, and rows whose states
    cannot hold their terms (:data:`._state.GAP`), take the pair evaluation."""
    lg_up = given.lg * (1 - 2 * given.lg_err) + dlg  # >= log g + |d log g|, per step
    if bool((lg_up > 0).any()):
        return _quantization_pairs(given, stored, dk, dlg, rows)
    B, n, N = given.q.shape
    dv = given.v.shape[-1]
    Gx, _ = gate_sums(lg_up)
    F, eF = gate_sums(dlg)
    # the error bound of Gx's differences: the pairs' (the log-gates' and the perturbations'
    # prefix sums apart), at least Gx's own (|lg + dlg| <= |lg| + dlg)
    eGx = _decay_bounds(given.lg, given.lg_err)[1] + eF
    # exp((1 - 8 u64)(G_t - G_j) + (eG_t + eG_j)(1 + 4 u64)) >= X (G non-increasing): the
    # key part, and each row's exponential raised by its float64 formation
    Y0 = -(1 - 8 * U64) * Gx + eGx * (1 + 4 * U64)
    y_max = float(Y0.abs().max()) if Y0.numel() else 0.0
    x1, d1 = given.q.abs(), (stored.q - given.q).abs()
    x2 = upper(given.k.abs() * (1 + given.k_err), 2)
    x4, d4 = given.v.abs(), (stored.v - given.v).abs()
    facs = [x2 + dk, dk, x2, x2 * F]
    cols = torch.cat([x4 + d4, d4], -1)
    h_max = max((float(f.max()) for f in facs), default=0.0) * float(cols.max()) if n else 0.0
    g_c, d_c = slice(0, dv), slice(dv, 2 * dv)

    def rows_fn(s: _state.Scan) -> torch.Tensor:
        t = s.idx
        X0 = (1 - 8 * U64) * Gx[:, t] + eGx[:, t] * (1 + 4 * U64)
        e = exp_up(X0 + s.m) * torch.exp(U64 * (4 * X0.abs() + 2 * s.m.abs() + 4 * y_max))
        S12, S2, S1, SF = s.S
        a1, a2 = x1[:, t] * e, d1[:, t] * e
        rel = (1 + s.rho + gamma(N + 4, U64)) * (1 + 8 * U64)
        lo = 1 - s.rho - gamma(N + 4, U64)
        sum_ = lambda a, S, c: torch.einsum("brc,brck->brk", a, S[..., c])  # noqa: E731
        direct = sum_(a2, S12, g_c) + sum_(a1, S2, g_c) + sum_(a1, S1, d_c)
        Ft = upper((F[:, t] + 2 * eF[:, t]) * (1 + U64), 2)
        gate = sum_(a1 * Ft, S1, g_c) * rel - sum_(a1, SF, g_c) * lo * (1 - 2 * U64)
        # the states' exps that underflow: 2^-1074 each, times a factor and a column
        fl = n * 2.0**-1070 * (a1 * (1 + Ft) + a2).sum(-1, keepdim=True) * h_max
        return upper(direct * rel + gate.clamp_min(0.0) * (1 + U64) + 4 * fl, 8)

    dense = lambda sel: _quantization_pairs(given, stored, dk, dlg, sel)  # noqa: E731
    return _state.causal_sum(Y0, facs, cols, rows, rows_fn, dense)  # type: ignore[arg-type]


def _rounding(
    stored: _Reduced,
    computed: Computed,
    precision: Precision,
    rows: torch.Tensor | None,
    lam: float,
    state: bool = False,
) -> dict[str, torch.Tensor]:
    """:func:`gated_rounding` (``state``: :func:`gated_rounding_state`) of the stored
    reduced problem (keys inflated to upper bounds of the exact ones, log-gates moved toward
    0 so the decays are upper bounds, and those float64 errors added to the computed
    ones)."""
    k = stored.k * (1 + 2 * stored.k_err)
    lg = stored.lg * (1 - 2 * stored.lg_err)
    comp = dataclasses.replace(
        computed,
        gate_rel=computed.gate_rel + 4 * stored.lg_err,
        k_rel=computed.k_rel + 4 * stored.k_err,
        skip_rel=computed.skip_rel + 4 * stored.skip_err,
    )
    if not state:
        return gated_rounding(stored.q, k, stored.v, precision, 1.0, lg, lam, rows, computed=comp)
    B, T, N = k.shape
    ops = (stored.q, k, stored.v, lg, comp)

    def part(sl: slice) -> dict[str, torch.Tensor]:
        q_, k_, v_, lg_, comp_ = _state.take(ops, sl, B)
        return gated_rounding_state(q_, k_, v_, precision, 1.0, lg_, lam, rows, computed=comp_)

    return _state.in_groups(B, _group_item(T, N, stored.v), part)  # type: ignore[no-any-return]


def _loads(precision: Precision) -> tuple[float, float, float, float]:
    """(``ul``, ``hl``, ``up``, ``uf``): relative and absolute load error, the unit roundoff
    of a product, the absolute error of a result that underflows."""
    from attnprec.analysis.bounds.softmax import Loaded

    ld = Loaded(precision)
    fc, fa = precision.compute, precision.accumulate
    return ld.ul, ld.hl, precision.product_u(), max(fc.underflow, fa.underflow)


def _product_rel(n_loads: int, n_products: int, precision: Precision) -> float:
    """Relative error of a product of ``n_loads`` loaded operands in ``n_products``
    roundings: ``(1 + ul)^n_loads (1 + up)^n_products - 1``."""
    ul, _, up, _ = _loads(precision)
    return upper(math.expm1(n_loads * math.log1p(ul) + n_products * math.log1p(up)), 4)


def _dprod(x: torch.Tensor, dx: torch.Tensor, y: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """``|x~ y~ - x y| <= dx (|y| + dy) + |x| dy`` for perturbations ``|x~ - x| <= dx``,
    ``|y~ - y| <= dy`` (with a margin for its own float64 rounding)."""
    return upper(dx * (y.abs() + dy) + x.abs() * dy, 4)


def _load_abs(precision: Precision, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The absolute error terms of a product of two loaded operands ``x``, ``y`` (their
    loads' ``hl`` each, the product's underflow)."""
    _, hl, _, uf = _loads(precision)
    return upper(hl * (x.abs() + y.abs()) + uf, 2)


def _und_factor(precision: Precision, *xs: torch.Tensor) -> torch.Tensor:
    """``prod max(1, |x~|)`` over the loaded operands ``xs`` (stored magnitudes, broadcast;
    each within ``|x| (1 + u_l) + h_l``) of a computed key, with the roundings of the
    products that carry an underflow (``(1 + u)^5``): what an underflowing product of
    some of a term's factors is multiplied by afterwards, in any order
    (:attr:`.gated.Computed.k_und`)."""
    ul, hl, up, _ = _loads(precision)
    out = torch.ones((), dtype=torch.float64)
    for x in xs:
        out = out * (x.abs() * (1 + ul) + hl).clamp_min(1.0)
    return upper(out * math.exp(5 * math.log1p(up)), len(xs) + 4)


# --- the checks every bound shares ----------------------------------------------------------


def _check_common(
    method: str,
    causal: Any,
    scale: Any,
    target: Any,
    confidence: Any,
    typical_confidence: Any,
    how: dict[str, Any],
) -> None:
    if causal is not None:
        check_causal_only(f"method {method!r}", causal)
    if scale is not None:
        raise ValueError(f"scale: method {method!r} has no scale; pass scale=None")
    if target is not None and target != method:
        raise ValueError(
            f"target: method {method!r} is measured against {method!r}, got {target!r}"
        )
    if confidence is not None and (
        isinstance(confidence, bool) or not isinstance(confidence, int | float)
    ):
        raise TypeError(f"confidence: expected a probability, got {confidence!r}")
    for name, c in (("confidence", confidence), ("typical_confidence", typical_confidence)):
        if c is not None and not (0.0 < float(c) < 1.0):
            raise ValueError(f"{name}: expected a probability in (0, 1), got {c!r}")
    method_record(method).refuse_state(how)


def _signed(prec: Precision, held: torch.Tensor, name: str, positive: bool) -> torch.Tensor:
    """``held``, a step (> 0) or a decay rate ``A`` (< 0) as storage holds it: an error
    naming it where storage rounds a value to 0, which the method refuses (a review: an e4m3
    step of 1e-4 was bounded, while the audit's reference of the stored inputs refused it
    naming a value the user did not pass)."""
    if bool((held <= 0).any() if positive else (held >= 0).any()):
        raise ValueError(
            f"{name}: a value rounds to 0 in the storage format {prec.storage.name}, as a "
            f"kernel holds it; the method needs {name} {'> 0' if positive else '< 0'}"
        )
    return held


def _flat(x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    return x.detach().to(here(), torch.float64).expand(shape).reshape(-1, *shape[-2:])


def _columns(x: torch.Tensor) -> torch.Tensor:
    """The value columns (channels) moved into the batch: ``[B, T, C, N] -> [B C, T, N]``,
    ``[B, T, C] -> [B C, T, 1]``."""
    x = x.unsqueeze(-1) if x.dim() == 3 else x
    B, T, C, N = x.shape
    return x.permute(0, 2, 1, 3).reshape(B * C, T, N)


@dataclass(frozen=True)
class _Call:
    """What a state-space bound takes from its call: the declaration, the batch dims, the
    rows evaluated, the output's shape ``[..., rows, d_v]``, the confidences and q's
    device (:func:`_call`)."""

    prec: Precision
    batch: tuple[int, ...]
    idx: torch.Tensor | None
    shape: tuple[int, ...]
    conf: float
    confidence: float | None
    device: torch.device
    state: bool = False

    @property
    def rows_here(self) -> torch.Tensor | None:
        """The rows evaluated, on the device computing now (``idx`` stays on the CPU)."""
        return None if self.idx is None else self.idx.to(here())

    @property
    def lam(self) -> float:
        """The tail factor of the probabilistic level, over every output element."""
        return tail_lambda((1.0 - self.conf) / max(1, math.prod(self.shape)))

    def empty(self) -> ErrorBound | None:
        """The bound when the output has no element, else None."""
        if math.prod(self.shape) > 0:
            return None
        return empty_bound(self.shape, self.conf, self.confidence, self.prec, self.idx, self.device)

    def operand(
        self, name: str, x: torch.Tensor, tail: tuple[int, ...] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` broadcast to ``[..., *tail]`` (default its last two dims) and flattened
        over the batch, float64 as given and rounded to storage (an error naming ``name``
        where it overflows)."""
        given = _flat(x, (*self.batch, *(x.shape[-2:] if tail is None else tail)))
        return given, self.prec.stored(given, name)

    def assemble(
        self,
        quant: torch.Tensor,
        rnd: dict[str, torch.Tensor],
        to_out: Any = None,
        level_sound: bool = False,
    ) -> ErrorBound:
        """The parts (reduced shape; ``to_out`` maps them to the output's shape, default a
        reshape) -> an ErrorBound of the output's shape; ``level_sound``: the probabilistic
        level is the sound bound (an error shared by every token that the level's model
        takes as independent)."""
        if level_sound:
            rnd = {**rnd, "typical": rnd["sound"]}
        to_out = to_out or (lambda t: t.reshape(self.shape))
        unbounded = {
            key.removeprefix("unbounded:"): to_out(val).to(self.device)
            for key, val in rnd.items()
            if key.startswith("unbounded:") and bool(val.any())
        }
        if bool((quant < 0).any()) or bool((rnd["sound"] < 0).any()):
            raise AssertionError("a negative bound part (please report this)")

        def out(x: torch.Tensor) -> torch.Tensor:
            x = torch.where(torch.isnan(x), math.inf, x.to(torch.float64))
            return to_out(x).to(self.device)

        zero = out(torch.zeros_like(quant))
        rows_t = None if self.idx is None else self.idx.clone()
        total, total_t = out(upper(quant + rnd["sound"], 2)), out(upper(quant + rnd["typical"], 2))
        unbounded = named_unbounded(unbounded, total, total_t)
        typical = ErrorBound(
            total_t, out(quant), zero, out(rnd["typical"]),
            self.conf, None, unbounded, self.prec.describe(), rows_t,
        )  # fmt: skip
        if self.confidence is not None:
            return typical
        return ErrorBound(
            total, out(quant), zero, out(rnd["sound"]), None,
            typical, unbounded, self.prec.describe(), rows_t,
        )  # fmt: skip


def _call(
    method: str,
    how: dict[str, Any],
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    precision: Any,
    batch: tuple[int, ...],
    rows: Any,
    seed: int,
    confidence: float | None,
    typical_confidence: float,
    evaluation: str = "pairs",
) -> _Call:
    """The :class:`_Call` of a bound's arguments (after the method's checks): ``q, k, v``
    finite (an error naming them), the rows an audit of the call judges
    (:func:`.audit.judged_rows`: a count includes its chunks' and blocks' edges), the
    evaluation ``"pairs"`` or ``"state"``."""
    from attnprec.analysis.audit import judged_rows

    if evaluation not in ("pairs", "state"):
        raise ValueError(f"evaluation: expected 'pairs' or 'state', got {evaluation!r}")
    prec = Precision.of(precision, q.dtype)
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_finite(name, x)
    T = q.shape[-2]
    idx = judged_rows(T, rows, seed, method, {**how, "causal": True}, prec)
    n_rows = T if idx is None else int(idx.numel())
    conf = typical_confidence if confidence is None else float(confidence)
    shape = (*batch, n_rows, v.shape[-1])
    return _Call(prec, tuple(batch), idx, shape, conf, confidence, q.device, evaluation == "state")


# --- selective scan -----------------------------------------------------------------------


def _selective_reduced(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dl: torch.Tensor,
    A: torch.Tensor,
    D: torch.Tensor | None,
    disc: str,
) -> _Reduced:
    """``q, k [nb, T, N]``, ``v, dl [nb, T, Dv]``, ``A [Dv, N]``, ``D [Dv]`` (float64) ->
    the reduced problem over ``nb * Dv`` channels."""
    from attnprec.attention.ssm import phi1

    nb, T, N = q.shape
    Dv = v.shape[-1]
    L = dl.unsqueeze(-1) * A  # [nb, T, Dv, N], within 2^-53 relative
    if disc == "euler":
        Bb = dl.unsqueeze(-1) * k.unsqueeze(-2)
        k_err = 2 * U64
    else:
        # phi1: expm1 (1 ulp) and a division, or 1 + x/2 below 2^-30; the products
        Bb = phi1(L) * dl.unsqueeze(-1) * k.unsqueeze(-2)
        k_err = 12 * U64
    qg = _columns(q.unsqueeze(2).expand(nb, T, Dv, N))
    skip = None if D is None else _columns(D * v)
    return _Reduced(qg, _columns(Bb), _columns(L), _columns(v), skip, k_err)


def _to_channels(nb: int, Dv: int, shape: tuple[int, ...]) -> Any:
    """``[nb * Dv, rows, 1]`` -> the output's shape ``[..., rows, Dv]``."""

    def f(x: torch.Tensor) -> torch.Tensor:
        r = x.shape[1]
        return x.reshape(nb, Dv, r).permute(0, 2, 1).reshape(shape)

    return f


def selective_scan_bound(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    precision: Any = None,
    *,
    causal: bool | None = None,
    scale: float | None = None,
    confidence: float | None = None,
    target: str | None = None,
    rows: Any = None,
    seed: int = 0,
    typical_confidence: float = DEFAULT_CONFIDENCE,
    evaluation: str = "pairs",
    delta: torch.Tensor,
    A: torch.Tensor,
    D: torch.Tensor | None = None,
    discretization: str = "euler",
    **how: Any,
) -> ErrorBound:
    """Error bound of a selective scan (``attention_error_bound("selective_scan", ...)``).

    Parameters
    ----------
    q, k, v : torch.Tensor
        ``C [..., T, N]``, ``B [..., T, N]``, ``u [..., T, D]`` as the user holds them
        (taken as exact); the implementation is assumed to see every operand, ``delta``,
        ``A`` and ``D`` included, rounded to ``precision.storage``.
    precision : Precision or format-like
        The declaration (module :mod:`attnprec.analysis.precision`); ``block=None`` covers
        the recurrence and any parallel scan of the pairs ``(exp(delta A), B_bar u)``
        (at most ``t - s`` exps and products on a term's path), an integer block the
        chunked form with span sums inside chunks (docs/bounds/attention.md, gated).
    causal, scale, target
        None or the method's own (causal only; no scale; the target is the method).
    confidence : float, optional
        Return the probabilistic level itself at this confidence.
    rows, seed
        As in :func:`attnprec.analysis.bounds.attention_error_bound`.
    typical_confidence : float
        Confidence of ``.typical``.
    evaluation : {"pairs", "state"}
        ``"pairs"``: every row against every key it sees (``O(rows T N)`` per channel).
        ``"state"``: from per-channel decayed key states, ``O((T + rows) N)`` per channel,
        channels in groups of bounded memory (docs/bounds/ssm.md, "State evaluation"):
        the same models with separable factors, never below the pairs; quantization above
        them by at most the log-gates' perturbation over a span (relative).
    delta, A, D, discretization
        As in :func:`attnprec.attention.selective_scan_attention`.
    **how
        ``chunk_size``, ``return_state`` (ignored: the bound covers every schedule the
        precision allows); ``state`` must be None.

    Returns
    -------
    ErrorBound
        Guarantee: ``|y^ - y*| <= total`` elementwise, ``y*`` the exact output on the
        inputs as given and ``y^`` any implementation rounding as declared (the sound
        level); ``typical`` the probabilistic level. ``exp(x) - 1`` by subtraction for
        zoh is covered only where the elementary model declares it (:func:`expm1_error`).

    Raises
    ------
    ValueError, TypeError
        Bad shapes, signs, dtypes or keywords (naming them), non-finite inputs, an operand
        that overflows the storage format, zoh log-gates below compute's normal range, an
        ``A`` that storage rounds to 0 or compute flushes (zoh divides by it; naming ``A``).
    """
    from attnprec.attention.ssm import check_selective

    _check_common("selective_scan", causal, scale, target, confidence, typical_confidence, how)
    dl, a, d, disc, batch = check_selective(q, k, v, delta, A, D, discretization)
    c = _call(
        "selective_scan", how, q, k, v, precision, batch, rows, seed, confidence,
        typical_confidence, evaluation,
    )  # fmt: skip
    if (empty := c.empty()) is not None:
        return empty
    prec, idx = c.prec, c.rows_here
    T, N = q.shape[-2:]
    Dv = v.shape[-1]
    nb = math.prod(batch)
    ops = [c.operand(nm, x) for nm, x in (("q", q), ("k", k), ("v", v))]
    ops.append(c.operand("delta", dl, (T, Dv)))
    _signed(prec, ops[-1][1], "delta", True)
    g_all, s_all = [o[0] for o in ops], [o[1] for o in ops]
    A64_all = a.detach().to(here(), torch.float64).expand(Dv, N)
    D64_all = None if d is None else d.detach().to(here(), torch.float64).expand(Dv)
    As_all = _signed(prec, prec.stored(A64_all, "A"), "A", False)
    Ds_all = None if D64_all is None else prec.stored(D64_all, "D")

    def channels(ch: slice) -> dict[str, torch.Tensor]:
        """The channels ``ch``' parts, ``[channels, nb, rows, 1]``."""
        g = [g_all[0], g_all[1], g_all[2][..., ch], g_all[3][..., ch]]
        s = [s_all[0], s_all[1], s_all[2][..., ch], s_all[3][..., ch]]
        A64, As = A64_all[ch], As_all[ch]
        D64 = None if D64_all is None else D64_all[ch]
        Ds = None if Ds_all is None else Ds_all[ch]
        given = _selective_reduced(g[0], g[1], g[2], g[3], A64, D64, disc)
        stored = _selective_reduced(s[0], s[1], s[2], s[3], As, Ds, disc)
        # perturbations of the reduced operands, in exact arithmetic (evaluated with margins)
        ddl = (s[3] - g[3]).abs()
        dB = (s[1] - g[1]).abs()
        dA = (As - A64).abs()
        dlg = _dprod(g[3].unsqueeze(-1), ddl.unsqueeze(-1), A64, dA)
        if disc == "euler":
            dg = ddl.unsqueeze(-1).expand(*ddl.shape, N)  # |d delta|
            gmag = g[3].unsqueeze(-1).expand(*ddl.shape, N)
        else:
            # g(delta, A) = expm1(delta A)/A: |dg/d delta| <= 1, |dg/dA| <= delta^2/2 (x <= 0)
            dmax = torch.maximum(g[3], s[3]).unsqueeze(-1)
            dg = ddl.unsqueeze(-1) + dmax * dmax / 2 * dA
            gmag = g[3].unsqueeze(-1).expand(*ddl.shape, N)  # |g| <= delta
        kB = g[1].abs().unsqueeze(-2)
        dk = upper(dg * (kB + dB.unsqueeze(-2)) + gmag * dB.unsqueeze(-2), 6)
        dskip = None
        if D64 is not None:
            assert Ds is not None
            dskip = _columns(_dprod(D64, (Ds - D64).abs(), g[2], (s[2] - g[2]).abs()))
        quant = _quantization(
            given, _replace_skip(stored, dskip), _columns(dk), _columns(dlg), idx, c.state
        )
        computed = _selective_computed(s, As, Ds, stored, disc, prec)
        rnd = _rounding(stored, computed, prec, idx, c.lam, c.state)
        m = A64.shape[0]
        parts = {"quant": quant, **rnd}
        return {key: x.reshape(nb, m, *x.shape[1:]).transpose(0, 1) for key, x in parts.items()}

    # channels in groups (the reduced problem's arrays are [nb * channels, T, N])
    parts = _state.in_groups(Dv, nb * T * N, channels)
    parts = {key: x.transpose(0, 1).reshape(nb * Dv, *x.shape[2:]) for key, x in parts.items()}
    quant = parts.pop("quant")
    # zoh's B_bar by exp - 1: its error, up to k_e / |dt A| relative, is one per channel
    # and state (every token of an LTI model, of a constant step), not independent per
    # term as the level takes the keys' (a review: a correct fp32 S4D kernel 1.14x past
    # the level at T = 8192, growing with T): the level is the sound bound there
    shared = disc == "zoh" and prec.elementary.expm1 == "exp_minus_one"
    return c.assemble(quant, parts, _to_channels(nb, Dv, c.shape), level_sound=shared)


def _replace_skip(r: _Reduced, skip: torch.Tensor | None) -> _Reduced:
    return _Reduced(r.q, r.k, r.lg, r.v, skip, r.k_err, r.lg_err, r.skip_err)


def _selective_computed(
    s: list[torch.Tensor],
    As: torch.Tensor,
    Ds: torch.Tensor | None,
    stored: _Reduced,
    disc: str,
    prec: Precision,
) -> Computed:
    """The errors of what a selective-scan kernel computes from the loaded operands
    (docs/bounds/ssm.md): the log-gates ``fl(delta A)`` (two loads, a product), ``B_bar``
    (euler: two loads, a product; zoh: three loads, the product ``delta A`` through
    ``expm1``'s condition number (<= 1), ``expm1``, a division by ``A`` and two products),
    and the skip ``fl(D u)`` (two loads, a product)."""
    ul, hl, up, uf = _loads(prec)
    Ls = stored.lg
    if disc == "zoh" and bool((As.abs() < prec.compute.min_normal).any()):
        # an A flushed (in compute) or rounded to 0 (in storage; A < 0 as given) makes
        # expm1(delta A) / A a division by zero, the kernel's output NaN
        raise ValueError(
            f"A: |A| as stored in {prec.storage.name} is 0 or below the compute format's "
            f"normal range ({prec.compute.name}): zoh's expm1(delta A) / A divides by it"
        )
    gate_rel = _product_rel(2, 1, prec)
    gate_abs = float(_load_abs(prec, As.abs().max(), s[3].max()))
    gate_max = float(Ls.abs().max().item())
    if disc == "euler":
        k_rel: torch.Tensor | float = _product_rel(2, 1, prec)
    else:
        # expm1 of L^ = L (1 + e) + eta: relative change <= (e + eta/|L|) exp(e |L| + eta)
        # (condition number <= 1 for x <= 0); eta covers loads and an underflowing product
        La = Ls.abs()
        eta_rel = torch.where(La > 0, gate_abs / La.clamp_min(1e-300), 0.0)
        arg = upper((up + eta_rel) * torch.exp(up * La + gate_abs), 4)
        # (the computed argument's least modulus: expm1's error where it is exp - 1)
        e_x = expm1_error(prec, (La * (1 - up) - gate_abs).clamp_min(0.0))
        k_rel = upper(
            torch.expm1(
                3 * math.log1p(ul)
                + torch.log1p(arg)
                + torch.log1p(torch.as_tensor(e_x, dtype=torch.float64))
                + math.log1p(prec.op_error("div"))
                + 2 * math.log1p(up)
            ),
            8,
        )
    dl, Bs = s[3], s[1]
    kabs = hl * (dl.unsqueeze(-1) + Bs.abs().unsqueeze(-2) * (1 + dl.unsqueeze(-1) ** 2 / 2))
    kabs = _columns(upper(kabs + 3 * uf, 4))
    # an underflowing product of some of a term's factors (Mamba's delta u before B) is
    # carried by delta and B separately; zoh's key factor expm1(L) / A (or phi(L) delta)
    # is at most delta (1 + k_rel), and where expm1(L) B is formed first and divided by A
    # last, its underflow is carried by 1 / |A~| (|A~| >= |A| (1 - u_l) - h_l > 0: |A| is
    # at least compute's min_normal, checked above)
    und = _und_factor(prec, dl.unsqueeze(-1), Bs.unsqueeze(-2))
    if disc == "zoh":
        a_lo = As.abs() * (1 - ul) - hl
        inv_a = torch.where(a_lo > 0, (1 + prec.op_error("div")) / a_lo, math.inf)
        und = und * upper(inv_a, 3).clamp_min(1.0)
    k_und = _columns(und)
    if disc == "zoh":
        k_und = upper(k_und * (1 + torch.as_tensor(k_rel, dtype=torch.float64)), 2)
    skip = skip_abs = None
    skip_rel = 0.0
    if Ds is not None:
        assert stored.skip is not None
        skip = stored.skip
        skip_rel = _product_rel(2, 1, prec)
        skip_abs = _columns(_load_abs(prec, Ds, s[2]))
    k_rel_t = torch.as_tensor(k_rel, dtype=torch.float64).expand_as(stored.k)
    # the products forming B_bar u (delta B, B u, delta u, in any order) may overflow
    b_top = Bs.abs().amax(-1, keepdim=True)  # [B, T, 1]
    over = _products_over(prec, dl.abs(), b_top, s[2].abs())
    # and the raw scores C B, alone or times delta and u (an einsum's order)
    over = over | _scores_over(prec, s[0], Bs, dl.abs(), s[2].abs())
    return Computed(
        gate_rel,
        gate_abs,
        gate_max,
        k_rel_t,
        kabs,
        skip,
        skip_rel,
        skip_abs,
        _columns(over)[..., 0],
        k_und,
    )


def _products_over(prec: Precision, *xs: torch.Tensor) -> torch.Tensor:
    """Where a product of some of the magnitudes ``xs`` (stored operands, broadcast), in
    any order, may overflow: every partial product is at most the product of ``max(1,
    x)`` (a review: dt applied last, after C B x, overflowed fp16 under a finite bound when
    only pairs were checked); it rounds in compute or accumulate
    (:meth:`.Precision.products_overflow`), its operands loaded into compute (each within
    ``1 + u_l``, plus ``h_l``)."""
    top = _grow(prec, xs)
    return upper(top, len(xs) + 2) >= prec.products_overflow()[0]


def _grow(prec: Precision, xs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The product of ``max(1, x)`` over the loaded magnitudes ``xs`` (broadcast)."""
    ul, hl, _, _ = _loads(prec)
    out = torch.ones((), dtype=torch.float64)
    for x in xs:
        out = out * (x * (1 + ul) + hl).clamp_min(1.0)
    return out


def _scores_over(
    prec: Precision, c: torch.Tensor, b: torch.Tensor, *factors: torch.Tensor
) -> torch.Tensor:
    """``[..., T, 1]`` (broadcast with ``factors``): the keys whose raw scores ``C_t .
    B_j`` (summed over the ``N`` states before ``dt``; ``c [..., T, N]`` the rows' ``C``)
    may overflow, alone or times any of the term's other ``factors`` (``dt``, ``x``) and its
    decays (each at most 2 as computed): the sum's partial sums are at most ``sum_n |C_tn|
    |B_jn| <= min(max|C| |B_j|_1, max_t ||C_t||_2 ||B_j||_2)`` (Cauchy-Schwarz; loaded, its
    products and ``N - 1`` sums' growth; a review: the first alone flagged Mamba-like fp16
    inputs 5x inside the range), in the narrower of compute's and accumulate's ranges
    (reviews: each ``C_n B_n`` within fp16's range, their sum past it; ``einsum`` forming
    ``C B L x`` before ``dt``; NaN outputs under finite bounds)."""
    ul, hl, up, _ = _loads(prec)
    n = b.shape[-1]
    bl, cl = b.abs() * (1 + ul) + hl, c.abs() * (1 + ul) + hl
    c_top = cl.amax((-2, -1), keepdim=True)
    c_l2 = cl.square().sum(-1, keepdim=True).amax(-2, keepdim=True).sqrt()
    b_l1, b_l2 = bl.sum(-1, keepdim=True), bl.square().sum(-1, keepdim=True).sqrt()
    dot = torch.minimum(c_top * b_l1, upper(c_l2 * b_l2, 2 * n + 4))
    score = upper(dot * (1 + gamma(n, up)), n + 4)
    grown = upper(2 * score * _grow(prec, factors), len(factors) + 3) if factors else score
    return grown >= prec.products_overflow()[0]


def ssm_bound(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    precision: Any = None,
    *,
    causal: bool | None = None,
    scale: float | None = None,
    confidence: float | None = None,
    target: str | None = None,
    rows: Any = None,
    seed: int = 0,
    typical_confidence: float = DEFAULT_CONFIDENCE,
    evaluation: str = "pairs",
    A: torch.Tensor,
    dt: Any,
    D: torch.Tensor | None = None,
    discretization: str = "zoh",
    **how: Any,
) -> ErrorBound:
    """Error bound of the LTI SSM (``attention_error_bound("ssm", ...)``).

    The selective scan's bound (:func:`selective_scan_bound`) with ``delta_t = dt`` covers
    the recurrent form and the direct convolution (one ``exp(l dt A)`` per lag: an
    exponent error ``2 u |l dt A|`` and one exp, within the recurrence's ``l``; three
    products and sums over states and lags, within its depth; rows that see a lag whose
    ``l``, ``l dt`` or ``l |A|`` may overflow while its decay is at least T_e are
    unbounded, "lag exponents l dt A in <format>"). ``form="fft"`` (a how
    keyword, default ``"recurrent"``) adds :func:`fft_conv_bound` per channel (one ``C, B``:
    the kernel ``K`` against ``u``) or per channel and state (per-token ``C, B``), on the
    computed operands' magnitudes, in the 2-norm (so for every element); the rest of the
    FFT form's computation is the convolution's. Parameters, guarantee and errors as
    :func:`selective_scan_bound`; the probabilistic level takes the FFT term as it is.
    """
    from attnprec.attention.ssm import SSM_FORMS, check_ssm

    form = how.get("form", "recurrent")
    if form not in SSM_FORMS:
        raise ValueError(f"form: expected one of {SSM_FORMS}, got {form!r}")
    _check_common("ssm", causal, scale, target, confidence, typical_confidence, how)
    dl, a, d, disc, batch = check_ssm(q, k, v, A, dt, D, discretization)
    from attnprec.analysis.audit import judged_rows

    # (the rows of the LTI call: its chunks' edges)
    prec = Precision.of(precision, q.dtype)
    _signed(prec, prec.stored(dl.detach().to(here(), torch.float64), "dt"), "dt", True)
    rows = judged_rows(q.shape[-2], rows, seed, "ssm", {**how, "causal": True}, prec)
    eb = selective_scan_bound(
        q, k, v, precision, confidence=confidence, rows=rows, seed=seed,
        typical_confidence=typical_confidence, evaluation=evaluation, delta=dl, A=a, D=d,
        discretization=disc,
    )  # fmt: skip
    if eb.total.numel() == 0:
        return eb
    eb = _lags_over(eb, dl, a, prec)
    if form != "fft":
        return eb
    extra = _fft_extra(q, k, v, dl, a, disc, prec, batch).to(eb.total.device)
    if eb.rows is not None:
        extra = extra[..., eb.rows.to(extra.device), :]
    eb = _with_rounding(eb, extra)
    over = torch.isinf(extra)
    if bool(over.any()):
        from dataclasses import replace

        name = f"FFT transforms in {prec.products_overflow()[1]}"
        eb = replace(eb, unbounded={**eb.unbounded, name: over})
    return eb


def _lags_over(eb: ErrorBound, dl: torch.Tensor, a: torch.Tensor, prec: Precision) -> ErrorBound:
    """The direct convolution's lag exponent ``l dt A``, formed in any order: ``l``,
    ``l dt`` or ``l |A|`` may overflow (a product in compute or accumulate) where ``l dt
    A`` does not, and the decay becomes exactly 0 (a review: fp16, ``dt = 4096``, ``A =
    -2^-14``, ``l dt`` past 65504 at lag 16 where the decay is ``e^-4``: 21x outside the
    bound). A lag lost so, whose decay is below T_e, loses what a flushed exp does (charged
    per term); rows that see a lag lost above it are unbounded, named. ``dl [T, D or 1]``
    (one step per channel), ``a [D or 1, N]``."""
    fc = prec.compute
    lim = min(prec.products_overflow()[0], fc.overflow())
    dt_c = prec.stored(dl[..., :1, :].abs(), "delta").squeeze(-2)  # [..., D or 1]
    a_s = prec.stored(a.abs(), "A")  # [D or 1, N]
    big = torch.maximum(dt_c.unsqueeze(-1), a_s) * (1 + fc.u) ** 3  # loaded, then a product
    first = torch.ceil(lim / big).clamp_max(fc.overflow())  # the first such lag
    # (its decay e^{-l dt |A|} at least T_e: a lag past it may be lost while still large)
    large = first * upper(dt_c.unsqueeze(-1) * a_s, 2) * (1 - 4 * U64) < -prec.exp_exact_log()
    first = torch.where(large, first, math.inf).amin(-1)  # [..., D or 1]
    T = eb.total.shape[-2]
    t = torch.arange(T, dtype=torch.float64) if eb.rows is None else eb.rows.to(torch.float64)
    over = t.to(eb.total.device).unsqueeze(-1) >= first.to(eb.total.device)  # [rows, D]
    if not bool(over.any()):
        return eb
    over = over.expand_as(eb.total)
    typ = eb.typical
    if typ is not None:
        typ = dataclasses.replace(
            typ, rounding=typ.rounding.masked_fill(over, math.inf),
            total=typ.total.masked_fill(over, math.inf),
        )  # fmt: skip
    name = f"lag exponents l dt A in {prec.products_overflow()[1]}"
    return dataclasses.replace(
        eb, rounding=eb.rounding.masked_fill(over, math.inf),
        total=eb.total.masked_fill(over, math.inf), typical=typ,
        unbounded={**eb.unbounded, name: over},
    )  # fmt: skip


def _with_rounding(eb: ErrorBound, extra: torch.Tensor) -> ErrorBound:
    """``eb`` with ``extra`` (>= 0) added to the rounding part and the total, both levels."""
    from dataclasses import replace

    typ = eb.typical
    if typ is not None:
        typ = replace(
            typ, rounding=upper(typ.rounding + extra, 2), total=upper(typ.total + extra, 2)
        )
    return replace(
        eb, rounding=upper(eb.rounding + extra, 2), total=upper(eb.total + extra, 2), typical=typ
    )


def fft_conv_bound(
    a: torch.Tensor, b: torch.Tensor, n: int, u: float, dim: int = -1, limit: float = math.inf
) -> torch.Tensor:
    """Bound on ``max_t |c^_t - c_t|`` for the causal convolution ``c = a * b`` computed as
    ``irfft(rfft(a, n) rfft(b, n))`` in unit roundoff ``u``, from the operands' magnitudes
    ``a, b >= 0`` along ``dim`` (their ``1``- and ``2``-norms).

    Model (docs/methods/ssm.md): each transform of length ``n = 2^k`` is within
    ``eps_F = S eta / (1 - S eta)`` of the exact one in the 2-norm, ``S = log2 n + 2``
    stages (Cooley-Tukey, Higham 2002 Thm 24.2, ``eta = mu + gamma_4 (sqrt 2 + mu)`` with
    twiddles within ``mu = u``; two stages more for the real-input packing), and each
    complex product within ``sqrt(2) gamma_2`` (Higham Lemma 3.5). With ``||F x||_2 =
    sqrt(n) ||x||_2``, ``||F x||_inf <= ||x||_1``:

    ``||c^ - c||_2 <= Delta + eps_F (min(|a|_1 |b|_2, |a|_2 |b|_1) + Delta)``,
    ``Delta = eps_F (|a|_2 |b|_1 + |a|_1 |b|_2) + eps_F^2 sqrt(n) |a|_2 |b|_2
    + sqrt(2) gamma_2 (1 + eps_F) |a|_2 (|b|_1 + eps_F sqrt(n) |b|_2)``,

    a bound on every element. Returns it with ``dim`` reduced, ``inf`` where an
    intermediate may reach ``limit`` (the format's overflow): a transform's entries are at
    most ``(1 + eps_F) |x|_1``, their products ``|a|_1 |b|_1`` so, and the inverse's sums
    before its ``1/n`` at most ``n`` times that.
    """
    from attnprec.analysis.bounds.rounding import gamma

    S = math.log2(n) + 2
    mu = u
    eta = mu + gamma(4, u) * (math.sqrt(2) + mu)
    if S * eta >= 1:
        return torch.full_like(a.sum(dim), math.inf)
    eF = S * eta / (1 - S * eta)
    g2 = math.sqrt(2) * gamma(2, u)
    a1, a2 = a.sum(dim), a.square().sum(dim).sqrt()
    b1, b2 = b.sum(dim), b.square().sum(dim).sqrt()
    rn = math.sqrt(n)
    delta = (
        eF * (a2 * b1 + a1 * b2) + eF * eF * rn * a2 * b2 + g2 * (1 + eF) * a2 * (b1 + eF * rn * b2)
    )
    # the norms are float64 sums over the T entries (a term passes up to T roundings in
    # each of its two norms), then a few products and sums
    T = a.shape[dim]
    out = upper(delta + eF * (torch.minimum(a1 * b2, a2 * b1) + delta), 2 * T + 16)
    big = torch.maximum(torch.maximum(a1, b1) * (1 + eF), n * a1 * b1 * (1 + eF) ** 3 * (1 + g2))
    return torch.where(upper(big, 2 * T + 16) >= limit, math.inf, out)


def _fft_extra(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dl: torch.Tensor,
    A: torch.Tensor,
    disc: str,
    prec: Precision,
    batch: Any,
) -> torch.Tensor:
    """The FFT form's error beyond the direct convolution's, ``[*batch, T, D]``: the
    convolutions of the computed operands' magnitudes (decays ``exp(l dt A)`` within their
    exponent and exp errors; ``K`` or ``B_bar u`` within theirs), through the sum over
    states (per-token C, B) and the store. The transforms' butterflies are sums, which may
    round in accumulate, and their products in compute or accumulate: the coarser of the
    two (a review: an FFT adding in bf16 under fp32 compute was 5-12x outside a model in
    compute's unit alone)."""
    from attnprec.analysis.bounds.rounding import gamma

    T, N = q.shape[-2:]
    Dv = v.shape[-1]
    uc = prec.compute.u
    u_s = prec.output_format.rounding_units(prec.rounding)[0]  # the store (a review)
    up = prec.product_u()  # the transforms', products' and sums' roundings
    k_e = prec.op_error("exp")
    n = 1 << max(1, math.ceil(math.log2(2 * T)))
    shape_qk = (*batch, T, N)
    C = prec.stored(_flat(q, shape_qk), "q")
    B = prec.stored(_flat(k, shape_qk), "k")
    u = prec.stored(_flat(v, (*batch, T, Dv)), "v")
    step = prec.stored(dl[0].detach().to(here(), torch.float64).expand(Dv), "delta")  # [D]
    step = _signed(prec, step, "delta", True)
    As = _signed(
        prec, prec.stored(A.detach().to(here(), torch.float64).expand(Dv, N), "A"), "A", False
    )
    L1 = step.unsqueeze(-1) * As  # [D, N]
    ell = torch.arange(T, dtype=torch.float64).reshape(T, 1, 1)
    x = (ell * L1).abs()
    # the computed decays: exponent within (2 + exp_arg) u |x| (two products, exp's own
    # argument), the exp within k_e; moved toward 0 by the float64 rounding
    a_up = exp_up(-x * (1 - 4 * U64) + (2 + prec.elementary.exp_arg) * uc * x) * (1 + k_e)
    f = (
        step.unsqueeze(-1).expand(Dv, N)
        if disc == "euler"
        else (-torch.expm1(-(L1.abs())) / As.abs())
    )  # [D, N]: delta (euler) or expm1(delta A)/A
    big = 1 + 64 * up + 16 * k_e  # B_bar, products: a generous relative margin
    if disc != "euler" and prec.elementary.expm1 == "exp_minus_one":
        # exp(dt A) - 1 by subtraction: B_bar within expm1_error of its value (a review:
        # the fixed margin alone, 2.5x outside with an fp32 exp 2 ulps low at |dt A| 1e-12)
        La = L1.abs()
        big = big * (1 + expm1_error(prec, (La * (1 - 4 * up)).clamp_min(0.0)))  # [D, N]
    lim = prec.products_overflow()[0]  # (the transforms in compute or accumulate)
    bbar = f.abs() * B.abs().unsqueeze(-2) * big  # [nb, T, D, N]
    lti = bool((C == C[:, :1]).all()) and bool((B == B[:, :1]).all())
    if lti:
        # K[l, d] = sum_n C_n exp(l dt A) B_bar_n: a = |K^|, b = |u|
        Kabs = (C[:, :1].abs().unsqueeze(-2) * a_up * bbar[:, :1]).sum(-1)  # [nb, T, D]
        Kabs = upper(Kabs * (1 + gamma(N + 2, up)), N + 4)  # (and this sum's own roundings)
        e = fft_conv_bound(Kabs, u.abs(), n, up, -2, lim)  # [nb, D]
        out = e.unsqueeze(-2).expand(-1, T, Dv)
    else:
        w = bbar * u.abs().unsqueeze(-1) * (1 + 2 * up)  # |B_bar u| as computed
        e = fft_conv_bound(a_up.unsqueeze(0), w, n, up, -3, lim)  # [nb, D, N]
        out = upper(
            (C.abs().unsqueeze(-2) * e.unsqueeze(-3)).sum(-1) * (1 + gamma(N + 2, up)), N + 4
        )
    # the store rounds the FFT's error too
    out = upper(out * (1 + 2 * u_s), 4)
    return out.reshape(*batch, T, Dv)


# --- SSD ----------------------------------------------------------------------------------


def ssd_bound(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    precision: Any = None,
    *,
    causal: bool | None = None,
    scale: float | None = None,
    confidence: float | None = None,
    target: str | None = None,
    rows: Any = None,
    seed: int = 0,
    typical_confidence: float = DEFAULT_CONFIDENCE,
    evaluation: str = "pairs",
    dt: torch.Tensor,
    A: Any,
    D: Any = None,
    **how: Any,
) -> ErrorBound:
    """Error bound of SSD (``attention_error_bound("ssd", ...)``): gated attention with
    scalar log-gates ``fl(A dt_t)``, keys ``fl(dt_s B_s)`` and the skip ``fl(D x_t)``, every
    operand (``dt``, ``A``, ``D`` included) rounded to storage; ``precision.block`` the
    chunk of the chunked form (segment sums over each span inside a chunk, states
    between chunks), ``None`` the recurrence. Parameters, guarantee and errors as
    :func:`selective_scan_bound`.

    Decays formed as differences of prefix sums (``exp(cumsum_t - cumsum_s)``, within a
    chunk or over the sequence) are not covered: their exponent error grows with the
    prefix, not with the span.
    """
    from attnprec.attention.ssm import check_ssd

    _check_common("ssd", causal, scale, target, confidence, typical_confidence, how)
    d_t, a, d, batch = check_ssd(q, k, v, dt, A, D)
    c = _call(
        "ssd", how, q, k, v, precision, batch, rows, seed, confidence, typical_confidence,
        evaluation,
    )  # fmt: skip
    if (empty := c.empty()) is not None:
        return empty
    prec = c.prec
    T, N = q.shape[-2:]
    P = v.shape[-1]
    nb = math.prod(batch)
    (C, Cs), (Bm, Bs), (x, xs) = c.operand("q", q), c.operand("k", k), c.operand("v", v)
    dt64 = d_t.detach().to(here(), torch.float64).expand(*batch, T).reshape(nb, T)
    a64 = a.detach().to(here(), torch.float64).expand(batch).reshape(nb)
    d64 = None
    if d is not None:
        d64 = d.detach().to(here(), torch.float64).expand(*batch, P).reshape(nb, 1, P)
    dts = _signed(prec, prec.stored(dt64, "dt"), "dt", True)
    As = _signed(prec, prec.stored(a64, "A"), "A", False)
    Ds = None if d64 is None else prec.stored(d64, "D")

    def heads(sl: slice) -> dict[str, torch.Tensor]:
        """The batch items (heads) ``sl``' parts."""
        C, Cs, Bm, Bs, x, xs, dt64, dts, a64, As, d64, Ds = _state.take(ops, sl, nb)
        m = dt64.shape[0]

        def reduced(C_: Any, B_: Any, x_: Any, dt_: Any, a_: Any, D_: Any) -> _Reduced:
            kk = dt_.unsqueeze(-1) * B_
            lg = (a_.unsqueeze(-1) * dt_).unsqueeze(-1).expand(m, T, N)
            return _Reduced(C_, kk, lg, x_, None if D_ is None else D_ * x_, 2 * U64)

        given = reduced(C, Bm, x, dt64, a64, d64)
        stored = reduced(Cs, Bs, xs, dts, As, Ds)
        ddt, dA, dB = (dts - dt64).abs(), (As - a64).abs(), (Bs - Bm).abs()
        dlg = _dprod(dt64, ddt, a64.unsqueeze(-1), dA.unsqueeze(-1)).unsqueeze(-1)
        dlg = dlg.expand(m, T, N)
        dk = _dprod(dt64.unsqueeze(-1), ddt.unsqueeze(-1), Bm, dB)
        dskip = None
        if d64 is not None:
            assert Ds is not None
            dskip = _dprod(d64, (Ds - d64).abs(), x, (xs - x).abs())
        quant = _quantization(given, _replace_skip(stored, dskip), dk, dlg, c.rows_here, c.state)
        rel = _product_rel(2, 1, prec)
        # the products forming a key and its terms (dt B, B x, dt x) and Mamba-2's raw
        # scores C B (before dt: any row's largest |C| against each key's |B|)
        b_top = Bs.abs().amax(-1, keepdim=True)
        c_top = Cs.abs().amax((-2, -1), keepdim=True)
        x_top = xs.abs().amax(-1, keepdim=True)
        over = _products_over(prec, dts.abs().unsqueeze(-1), b_top, x_top)
        dt_x = (dts.abs().unsqueeze(-1), x_top)
        over = over | _products_over(prec, c_top, b_top) | _scores_over(prec, Cs, Bs, *dt_x)
        over = over[..., 0]
        comp = Computed(
            rel, float(_load_abs(prec, As.abs().max(), dts.max())),
            float(stored.lg.abs().max().item()), torch.full_like(stored.k, rel),
            _load_abs(prec, dts.unsqueeze(-1), Bs), stored.skip, rel if Ds is not None else 0.0,
            None if Ds is None else _load_abs(prec, Ds, xs), over,
            # x dt before B (ssd_minimal on X * dt): dt and B carry an underflow separately
            _und_factor(prec, dts.unsqueeze(-1), Bs),
        )  # fmt: skip
        return {"quant": quant, **_rounding(stored, comp, prec, c.rows_here, c.lam, c.state)}

    # heads in groups (the reduced problem's arrays are [nb, T, N])
    ops = (C, Cs, Bm, Bs, x, xs, dt64, dts, a64, As, d64, Ds)
    parts = _state.in_groups(nb, _group_item(T, N, x), heads)
    quant = parts.pop("quant")
    return c.assemble(quant, parts)


# --- state drift --------------------------------------------------------------------------


def state_drift_bound(
    fmt: Any,
    T: int,
    *,
    decay: float = 1.0,
    compute: Any = None,
    confidence: float | None = None,
) -> float:
    """A-priori bound on the drift of a recurrent state kept in ``fmt`` over ``T`` steps.

    The state ``h_t = a_t h_{t-1} + b_t`` is stored in ``fmt`` after every step; each step
    computes ``a_t h_{t-1}`` and the sum in ``compute`` (default: ``fmt`` itself) and
    rounds the result to ``fmt``. With ``|a_t| <= decay`` and ``H = max_{s<=t} |h^_s|``
    (the largest state the computation held), every ``t <= T`` satisfies

    .. math:: |\\hat h_t - h_t| \\le \\epsilon H \\sum_{i<t} \\lambda^i
              = \\epsilon H \\frac{1 - \\lambda^t}{1 - \\lambda}

    where ``xi_t = h^_t - (a_t h^_{t-1} + b_t)``, one step's error, is the product's
    rounding ``eps_1``, the sum's ``eps_2`` (in compute) and the store's ``eps_3`` (in
    ``fmt``; none when compute is ``fmt``): ``xi = a h^ eps_1 (1+eps_2)(1+eps_3) + (a h^ +
    b)((1+eps_2)(1+eps_3) - 1)`` with ``|a h^| <= lambda H`` and ``|a h^ + b| <= H / ((1 -
    u_c)(1 - u_3)) + lambda H u_c``, so ``|xi| <= epsilon H`` with ``epsilon = lambda u_c
    (1+u_c)(1+u_3) + (1/((1-u_c)(1-u_3)) + lambda u_c) ((1+u_c)(1+u_3) - 1)``; the errors
    propagate through ``e_t = a_t e_{t-1} + xi_t`` (an FMA rounds once: covered). With
    ``confidence`` (a probability) the probabilistic level instead: independent mean-zero
    step errors of variance ``<= (epsilon H)^2 / 3`` give ``tail_lambda(1 - confidence)
    epsilon H sqrt(sum_i lambda^(2i) / 3)``, at most the sound level (the failure modes of
    the other probabilistic bounds: stagnation, sorted data).

    Parameters
    ----------
    fmt : format-like
        The state's storage format.
    T : int
        Steps (>= 0).
    decay : float
        ``lambda >= max_t |a_t|``, in ``[0, 1]`` (1: no decay; long memory ``1 - 1e-4``).
    compute : format-like, optional
        Format of the step's product and sum (default ``fmt``: the state updated in place).
    confidence : float, optional
        Return the probabilistic level at this confidence.

    Returns
    -------
    float
        The bound relative to ``H`` (multiply by the largest state magnitude); subnormal
        results are not counted (states in the normal range).

    Raises
    ------
    ValueError, TypeError
        ``T < 0``, ``decay`` outside ``[0, 1]``, an unknown format, a confidence outside
        ``(0, 1)`` (naming the argument).
    """
    T = check_int("T", T, 0)
    f = Format.of(fmt)
    c = f if compute is None else Format.of(compute)
    if isinstance(decay, bool) or not isinstance(decay, int | float) or not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay: expected a number in [0, 1], got {decay!r}")
    if confidence is not None and not (0.0 < float(confidence) < 1.0):
        raise ValueError(f"confidence: expected a probability in (0, 1), got {confidence!r}")
    uc = c.u
    u3 = 0.0 if c == f else f.u  # the store, when the step runs in another format
    lam = float(decay)
    w = excess(math.log1p(uc) + math.log1p(u3))  # (1 + u_c)(1 + u_3) - 1: no cancellation
    eps = lam * uc * (1 + uc) * (1 + u3) + (1 / ((1 - uc) * (1 - u3)) + lam * uc) * w
    if T == 0:
        return 0.0
    sound = float(upper(eps * _geometric(lam, T), 8))
    if confidence is None:
        return sound
    lam_t = tail_lambda(1 - float(confidence))
    return min(sound, float(upper(lam_t * eps * math.sqrt(_geometric(lam * lam, T) / 3), 8)))


def _geometric(lam: float, T: int) -> float:
    """``sum_{i<T} lam^i`` (``T`` at ``lam = 1``), without cancellation."""
    if lam >= 1.0:
        return float(T)
    if lam == 0.0:
        return 1.0
    return -math.expm1(T * math.log(lam)) / (1 - lam)
