"""The method table: one declarative record per attention method, read by every layer.

It is the only place that knows a method by name: its keywords and defaults, its exact
target, its default scale, whether it is causal only, which reference backends certify
it, the models its bounds use, its kernel, and where its default audit parameters and its
Hypothesis parameters come from. The layers (attention, analysis, kernels, testing, cli)
look a method up here and find its own modules through dotted paths, resolved lazily, so
this module imports nothing of attnprec and no torch (the command line reads it to build
its parser instantly). Adding a method is one record plus its own modules
(docs/internals.md, "Adding a method").
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Keyword", "Method", "METHODS", "NAMES", "FAMILIES", "SCALED_FAMILIES", "method"]

#: The mask keywords of the methods that take them (``Method.masks``).
MASKS: tuple[str, ...] = ("window", "key_mask")

#: The input families (:func:`attnprec.testing.make_inputs`), in the order the audit and
#: the tables list them; a method's record names those it is audited on.
FAMILIES: tuple[str, ...] = ("typical", "outliers", "sinks", "ties", "cancel", "real")
#: Families for scaled (FP8) storage only, never in a method's default list: ``"overrange"``
#: has values beyond FP8's max and below its smallest subnormal before scaling (q, v up to
#: about 2^12 and 2^19, k about 2^-10: beyond fp16's range too).
SCALED_FAMILIES: tuple[str, ...] = ("overrange",)


@dataclass(frozen=True)
class Keyword:
    """One keyword of a method: what it computes (not how a kernel computes it).

    Attributes
    ----------
    name : str
        The keyword.
    required : bool
        Whether every call must give it.
    default : Any
        Its value when absent (ignored when required).
    reference : bool
        Whether the exact method depends on it (passed to the references); False for a
        keyword that turns the method into an approximation of its target (e.g. the
        semiring's ``linearize``): the method then has no reference of its own.
    doc : str
        One line for the documentation and the command line.
    reference_required : bool
        Whether the references need it although a call may omit it (a random projection
        the method draws when absent: its exact output depends on the draw).
    stored : bool
        Whether a kernel holds it in the storage format, as q, k and v (the state-space
        models' steps, decays and skips): the bound's rounding part is measured on its
        stored value, and so is the audit's rounding check.
    """

    name: str
    required: bool = False
    default: Any = None
    reference: bool = True
    doc: str = ""
    reference_required: bool = False
    stored: bool = False


@dataclass(frozen=True)
class Method:
    """The record of one method (module docstring).

    Attributes
    ----------
    name : str
        The method's name everywhere (``reference("log", ...)``, ``--method log``).
    summary : str
        One line: the weights or the recurrence.
    function : str
        ``"module:attribute"`` of the reference implementation in :mod:`attnprec.attention`.
    target : str
        The exact method its output approximates (itself unless it approximates another).
    keywords : tuple of Keyword
        What it computes, besides ``causal`` and ``scale``.
    how : tuple of str
        Keywords that say how an implementation computes (``chunk_size``, ...): passed to
        the function under audit only.
    scale : {"rsqrt", "one", None}
        Default scale: ``1/sqrt(d_k)``, 1, or no scale at all (``scale`` must be None).
    causal : {"optional", "only"}
        Whether it also has a non-causal form.
    backends : tuple of str
        The reference backends that certify it (``"arb"``, ``"mpmath"``, ``"float64"``).
    convex : {"always", "even-degree", "never"}
        Whether its output is a convex combination of the values.
    quantization, rounding : str
        The input-quantization and rounding models of its bound
        (:mod:`attnprec.analysis.bounds`).
    approximation : str or None
        The approximation model (None for an exact method).
    coefficients : str or None
        ``"module:attribute"`` of ``f(keywords) -> (c_0..c_P, rel)``: the polynomial the
        method's weights are (``rel`` bounds the relative error of the floats against the
        exact method's coefficients), for the polynomial models.
    kernel : str or None
        ``"module:attribute"`` of its Triton kernel.
    reference_fn, bound_fn : str or None
        ``"module:attribute"`` of the method's own certified reference and bound, for a
        method whose computation the shared backends and models do not cover (e.g. one
        that reduces to another method after a change of variables): ``reference(...)``
        and ``attention_error_bound(...)`` check the method and its keywords, then call
        ``reference_fn(q, k, v, causal=, scale=, backend=, rows=, **keywords) ->
        Reference`` and ``bound_fn(q, k, v, precision, causal=, scale=, confidence=,
        target=, rows=, seed=, typical_confidence=, **keywords) -> ErrorBound`` with the
        same contracts. None: the shared ones, by the models named above.
    defaults : str
        ``"module:attribute"`` of ``f(d_k, n, generator) -> dict``: the keywords the
        command's default audit uses.
    strategy : str
        ``"module:attribute"`` of the Hypothesis parameter drawer
        ``f(draw, d_k, n, batch, generator, degrees) -> dict``.
    families : tuple of str
        The input families it is audited on (by default every one of :data:`FAMILIES`).
    masks : bool
        Whether it takes ``window`` (a causal sliding window) and ``key_mask`` (padding
        keys): its references and bounds then see only the keys each row attends.
    evaluations : tuple of str
        How its bound can be evaluated (``attention_error_bound(evaluation=)``):
        ``"pairs"`` (every row against every key it sees) and, where its per-term factors
        separate, ``"state"`` (from per-channel key states, linear in the keys).
    """

    name: str
    summary: str
    function: str
    target: str
    keywords: tuple[Keyword, ...] = ()
    how: tuple[str, ...] = ("chunk_size", "state", "return_state")
    scale: str | None = "rsqrt"
    causal: str = "optional"
    backends: tuple[str, ...] = ("arb", "mpmath")
    convex: str = "always"
    quantization: str = "softmax"
    rounding: str = "softmax"
    approximation: str | None = None
    coefficients: str | None = None
    kernel: str | None = None
    reference_fn: str | None = None
    bound_fn: str | None = None
    defaults: str = "attnprec.testing.params:no_params"
    strategy: str = "attnprec.testing.params:no_params"
    families: tuple[str, ...] = FAMILIES
    masks: bool = False
    evaluations: tuple[str, ...] = ("pairs",)
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def keyword_names(self) -> tuple[str, ...]:
        """Every keyword the method takes: its own, ``causal``, ``scale`` (if any),
        ``window`` and ``key_mask`` (if it takes masks) and the ``how`` keywords."""
        base = ("causal",) + (("scale",) if self.scale is not None else ())
        base += MASKS if self.masks else ()
        return base + tuple(k.name for k in self.keywords) + self.how

    def resolve(self, attr: str) -> Any:
        """The object at ``"module:attribute"`` path ``getattr(self, attr)``."""
        path = getattr(self, attr)
        if path is None:
            raise ValueError(f"method: {self.name!r} has no {attr}")
        module, _, name = path.partition(":")
        return getattr(importlib.import_module(module), name)

    def default_causal(self) -> bool:
        """The ``causal`` of a call that gives none."""
        return self.causal == "only"

    def is_convex(self, params: Mapping[str, Any]) -> bool:
        """Whether the output with these keywords is a convex combination of the values."""
        if self.convex == "even-degree":
            return int(params.get("degree", self.keyword("degree").default)) % 2 == 0
        return self.convex == "always"

    def keyword(self, name: str) -> Keyword:
        """The :class:`Keyword` ``name`` of this method."""
        for k in self.keywords:
            if k.name == name:
                return k
        raise ValueError(f"{name}: not a keyword of method {self.name!r}")

    def check(self, params: Mapping[str, Any], *, allow_how: bool = True) -> None:
        """Raise ``TypeError`` naming the first keyword that is not the method's, and
        ``ValueError`` naming a required one that is missing, or a ``state`` given: a call
        continued from a state computes the method over tokens the references and bounds
        never see (its bound from the zero state is no bound of it, a review: 1,383x under
        the error of a correct gated kernel), so every analysis refuses it."""
        self.refuse_state(params)
        known = set(self.keyword_names) if allow_how else set(self.keyword_names) - set(self.how)
        for key in params:
            if key not in known:
                raise TypeError(
                    f"{key}: not a keyword of method {self.name!r} "
                    f"(expected one of {', '.join(sorted(known))})"
                )
        for k in self.keywords:
            if k.required and params.get(k.name) is None:
                raise ValueError(f"{k.name}: required for method {self.name!r}")

    def refuse_state(self, params: Mapping[str, Any]) -> None:
        """Raise ``ValueError`` where ``params`` give a ``state`` (:meth:`check`)."""
        if params.get("state") is not None:
            raise ValueError(
                f"state: a call of method {self.name!r} continued from a state depends on "
                "the tokens before it, which no reference or bound sees; check the kernel "
                "over the whole sequence (rows= judges chosen rows, e.g. the last ones)"
            )

    def split(self, params: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """(what, how): the keywords that define the exact output, and the others."""
        what = {key: val for key, val in params.items() if key not in self.how}
        how = {key: val for key, val in params.items() if key in self.how}
        return what, how

    def for_reference(self, params: Mapping[str, Any]) -> dict[str, Any] | None:
        """The keywords of the method's own reference; None when a keyword turns the method
        into an approximation with no reference of its own (e.g. ``linearize``)."""
        what, _ = self.split(params)
        for k in self.keywords:
            if not k.reference and what.get(k.name) is not None:
                return None
        return {key: val for key, val in what.items() if self._to_reference(key)}

    @property
    def stored(self) -> tuple[str, ...]:
        """The keywords a kernel holds in the storage format (:attr:`Keyword.stored`)."""
        return tuple(k.name for k in self.keywords if k.stored)

    def for_target(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """The keywords of the target's reference (the shared ``causal`` and ``scale``,
        and the method's own when the target is the method itself)."""
        if self.target == self.name:
            what, _ = self.split(params)
            return {key: val for key, val in what.items() if self._to_reference(key)}
        return {key: params[key] for key in ("causal", "scale", *MASKS) if key in params}

    def _to_reference(self, key: str) -> bool:
        return all(k.reference for k in self.keywords if k.name == key)


_FEATURED_HOW = ("chunk_size", "state", "return_state", "allow_nonpositive")
#: taylor and polynomial also say how they form the weights: ``form="features"`` (default:
#: packed monomial features and a state) or ``"scores"`` (the polynomial of each score).
_POLYNOMIAL_HOW = (*_FEATURED_HOW, "form")

METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method(
            "softmax",
            "w_ij = exp(scale q_i . k_j), or exp(cap tanh(scale q_i . k_j / cap))",
            "attnprec.attention.softmax:softmax_attention",
            "softmax",
            (Keyword("softcap", doc="cap > 0: logits soft-capped to cap tanh(s / cap)"),),
            how=(),
            backends=("arb", "mpmath", "float64"),
            masks=True,
        ),
        Method(
            "log",
            "w_ij = sum_c exp(scale (q_ic + k_jc)) (Heinsen; values of any sign)",
            "attnprec.attention.log:log_attention",
            "log",
            scale="one",
            backends=("arb", "mpmath", "float64"),
            quantization="log",
            rounding="log",
            kernel="attnprec.kernels.log:log_attention",
            masks=True,
            evaluations=("pairs", "state"),
        ),
        Method(
            "taylor",
            "w_ij = sum_{p <= degree} s^p / p!, s = scale q_i . k_j",
            "attnprec.attention.taylor:taylor_attention",
            "softmax",
            (Keyword("degree", default=2, doc="the highest power P (P + 1 Taylor terms)"),),
            how=_POLYNOMIAL_HOW,
            backends=("arb", "mpmath", "float64"),
            convex="even-degree",
            rounding="featured",
            approximation="polynomial",
            coefficients="attnprec.attention.taylor:taylor_coefficients",
            kernel="attnprec.kernels.taylor:taylor_attention",
            defaults="attnprec.testing.params:taylor_defaults",
            strategy="attnprec.testing.params:taylor_draw",
            masks=True,
            evaluations=("pairs", "state"),
        ),
        Method(
            "polynomial",
            "w_ij = sum_p c_p s^p, s = scale q_i . k_j",
            "attnprec.attention.taylor:polynomial_attention",
            "softmax",
            (Keyword("coeffs", required=True, doc="c_0, ..., c_P"),),
            how=_POLYNOMIAL_HOW,
            backends=("arb", "mpmath", "float64"),
            convex="never",
            rounding="featured",
            approximation="polynomial",
            coefficients="attnprec.attention.taylor:polynomial_coefficients",
            kernel="attnprec.kernels.taylor:polynomial_attention",
            defaults="attnprec.testing.params:polynomial_defaults",
            strategy="attnprec.testing.params:polynomial_draw",
            masks=True,
            evaluations=("pairs", "state"),
        ),
        Method(
            "linear",
            "w_ij = phi(q_i) . phi(k_j) (no scale)",
            "attnprec.attention.linear:linear_attention",
            "linear",
            (Keyword("feature_map", default="elu1", doc="'elu1', None (q, k are features)"),),
            how=_FEATURED_HOW,
            scale=None,
            backends=("arb", "mpmath", "float64"),
            convex="never",
            quantization="linear",
            rounding="featured",
            kernel="attnprec.kernels.linear:linear_attention",
            defaults="attnprec.testing.params:linear_defaults",
            strategy="attnprec.testing.params:linear_draw",
            masks=True,
            evaluations=("pairs", "state"),
        ),
        Method(
            "favor",
            "w_ij = phi(q_i) . phi(k_j), FAVOR+ positive random features",
            "attnprec.attention.favor:favor_attention",
            "softmax",
            (
                Keyword(
                    "projection",
                    doc="W [m, d_k], the random projection",
                    reference_required=True,
                ),
                Keyword("num_features", doc="m (must match projection's rows)"),
            ),
            how=(*_FEATURED_HOW, "generator", "orthogonal"),
            rounding="favor",
            approximation="favor",
            backends=("arb", "mpmath", "float64"),
            defaults="attnprec.testing.params:favor_defaults",
            strategy="attnprec.testing.params:favor_draw",
            masks=True,
            evaluations=("pairs", "state"),
        ),
        Method(
            "semiring",
            "w_ij = rho(s_ij), rho a mixture of exponentials (or the tropical max)",
            "attnprec.attention.semiring:semiring_attention",
            "semiring",
            (
                Keyword("semiring", required=True, doc="LogExpMean, SoftMaxPlus, MixtureLSE, ..."),
                Keyword("linearize", reference=False, doc="None, ('taylor', P), ('favor', m)"),
                Keyword("projection", reference=False, doc="W of a FAVOR+ linearization"),
            ),
            how=(*_FEATURED_HOW, "generator", "orthogonal"),
            backends=("arb", "mpmath", "float64"),
            quantization="semiring",
            coefficients="attnprec.attention.semiring:linearized_coefficients",
            extra={"linearized": {"taylor": "featured", "favor": "favor"}},
            defaults="attnprec.testing.params:semiring_defaults",
            strategy="attnprec.testing.params:semiring_draw",
            masks=True,
        ),
        Method(
            "gated",
            "o_t = scale sum_{j <= t} (q_t . (prod_{l=j+1..t} g_l) k_j) v_j (unnormalized)",
            "attnprec.attention.gated:gated_linear_attention",
            "gated",
            (
                Keyword(
                    "log_g",
                    required=True,
                    doc="log-gates <= 0 (-inf: a reset), [..., n] or [..., n, d_k]",
                ),
            ),
            causal="only",
            convex="never",
            quantization="gated",
            rounding="gated",
            defaults="attnprec.testing.params:gated_defaults",
            strategy="attnprec.testing.params:gated_draw",
            evaluations=("pairs", "state"),
        ),
        Method(
            "selective_scan",
            "y_t[d] = sum_{s<=t} C_t . exp(sum delta[d] A[d]) B_bar_s[d] u_s[d] + D u_t (Mamba-1)",
            "attnprec.attention.ssm:selective_scan_attention",
            "selective_scan",
            (
                Keyword(
                    "delta",
                    required=True,
                    doc="steps > 0, [..., T, D] (or [..., T, 1])",
                    stored=True,
                ),
                Keyword("A", required=True, doc="[D, N] (or [1, N]), < 0", stored=True),
                Keyword("D", doc="skip [D] (or [1]): adds D u_t", stored=True),
                Keyword("discretization", default="euler", doc="'euler' (B_bar = delta B), 'zoh'"),
            ),
            scale=None,
            causal="only",
            convex="never",
            quantization="ssm",
            rounding="ssm",
            kernel="attnprec.kernels.ssm:selective_scan",
            reference_fn="attnprec.analysis._reference_ssm:selective_scan_reference",
            backends=("arb", "mpmath", "float64"),
            bound_fn="attnprec.analysis.bounds.ssm:selective_scan_bound",
            evaluations=("pairs", "state"),
            defaults="attnprec.testing.params:selective_scan_defaults",
            strategy="attnprec.testing.params:selective_scan_draw",
        ),
        Method(
            "ssd",
            "y_t = sum_{s<=t} (C_t . B_s) exp(A sum_{r=s+1..t} dt_r) dt_s x_s + D x_t (Mamba-2)",
            "attnprec.attention.ssm:ssd_attention",
            "ssd",
            (
                Keyword("dt", required=True, doc="steps > 0, [..., T]", stored=True),
                Keyword(
                    "A",
                    required=True,
                    doc="< 0, a scalar per head (broadcast to the batch)",
                    stored=True,
                ),
                Keyword("D", doc="skip, broadcastable to [..., P]", stored=True),
            ),
            how=("chunk_size", "form", "state", "return_state"),
            scale=None,
            causal="only",
            convex="never",
            quantization="ssm",
            rounding="ssm",
            kernel="attnprec.kernels.ssd:ssd",
            reference_fn="attnprec.analysis._reference_ssm:ssd_reference",
            backends=("arb", "mpmath", "float64"),
            bound_fn="attnprec.analysis.bounds.ssm:ssd_bound",
            evaluations=("pairs", "state"),
            defaults="attnprec.testing.params:ssd_defaults",
            strategy="attnprec.testing.params:ssd_draw",
        ),
        Method(
            "ssm",
            "LTI (S4D-real): the selective scan with delta_t = dt; q = C, k = B expanded over T",
            "attnprec.attention.ssm:ssm_attention",
            "ssm",
            (
                Keyword("A", required=True, doc="[D, N] or [N], < 0", stored=True),
                Keyword("dt", required=True, doc="step > 0: a number or [D]", stored=True),
                Keyword("D", doc="skip [D] (or [1])", stored=True),
                Keyword("discretization", default="zoh", doc="'zoh', 'euler'"),
            ),
            how=("form", "chunk_size", "state", "return_state"),
            scale=None,
            causal="only",
            convex="never",
            quantization="ssm",
            rounding="ssm",
            reference_fn="attnprec.analysis._reference_ssm:ssm_reference",
            backends=("arb", "mpmath", "float64"),
            bound_fn="attnprec.analysis.bounds.ssm:ssm_bound",
            evaluations=("pairs", "state"),
            defaults="attnprec.testing.params:ssm_defaults",
            strategy="attnprec.testing.params:ssm_draw",
        ),
        Method(
            "h3",
            "o_t = q_t S_t, S_t = exp(log_decay) o S_{t-1} + shift(k)_t v_t^T (H3)",
            "attnprec.attention.h3:h3_attention",
            "h3",
            (
                Keyword(
                    "shift",
                    required=True,
                    doc="shift SSM kernel, [m] or [..., d_k, m]",
                    stored=True,
                ),
                Keyword(
                    "log_decay",
                    required=True,
                    doc="<= 0, [d_k] or [..., d_k, d_v or 1]",
                    stored=True,
                ),
            ),
            scale=None,
            causal="only",
            convex="never",
            quantization="h3",
            rounding="h3",
            kernel="attnprec.kernels.h3:h3_attention",
            reference_fn="attnprec.analysis._reference_h3:h3_reference",
            backends=("arb", "mpmath", "float64"),
            bound_fn="attnprec.analysis.bounds.h3:h3_bound",
            evaluations=("pairs", "state"),
            defaults="attnprec.testing.params:h3_defaults",
            strategy="attnprec.testing.params:h3_draw",
        ),
    )
}

#: Every method's name, in the order of the table.
NAMES: tuple[str, ...] = tuple(METHODS)


def method(name: object) -> Method:
    """The record of method ``name``.

    Raises
    ------
    ValueError
        Naming ``method`` if there is no such method.
    """
    if not isinstance(name, str) or name not in METHODS:
        raise ValueError(f"method: expected one of {NAMES}, got {name!r}")
    return METHODS[name]
