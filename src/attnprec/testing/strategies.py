"""Hypothesis strategies for attention inputs, the adversarial families included.

Hypothesis draws the family, the sizes, a seed and the method's parameters; the tensors
come from :func:`attnprec.testing.inputs.make_inputs` (or the captured real activations),
seeded, so a failing example shrinks and replays exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from hypothesis import strategies as st

from attnprec._validate import check_bool, check_int
from attnprec.methods import NAMES
from attnprec.methods import method as method_record
from attnprec.testing.inputs import FAMILIES, SCALED_FAMILIES, as_features, make_inputs
from attnprec.testing.params import draw_params

__all__ = ["METHODS", "AttentionCase", "attention_inputs"]

#: The methods :func:`attention_inputs` draws parameters for (every method of the library).
METHODS: tuple[str, ...] = NAMES


@dataclass(frozen=True)
class AttentionCase:
    """One drawn example: the operands and the keywords of the method.

    Attributes
    ----------
    method : str
        The method the parameters are for.
    family : str
        The input family (see :data:`attnprec.testing.inputs.FAMILIES`).
    q, k, v : torch.Tensor
        The operands, exactly representable in the requested dtype.
    params : dict
        The method's keywords (``degree``, ``coeffs``, ``projection``, ``semiring``,
        ``log_g``, and ``causal=True`` when causal); pass them on as ``**case.params``.
    seed : int
        The seed of the draw (to rebuild the tensors by hand).
    """

    method: str
    family: str
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    params: dict[str, Any] = field(default_factory=dict)
    seed: int = 0

    def __repr__(self) -> str:
        params = {k: _short(v) for k, v in self.params.items()}
        return (
            f"AttentionCase(method={self.method!r}, family={self.family!r}, "
            f"q={tuple(self.q.shape)}, k={tuple(self.k.shape)}, v={tuple(self.v.shape)}, "
            f"dtype={self.q.dtype}, params={params}, seed={self.seed})"
        )


def _short(x: Any) -> Any:
    return f"tensor{tuple(x.shape)}" if isinstance(x, torch.Tensor) else x


def _real_limits() -> tuple[int, int, int]:
    """(tokens, channels, heads) of the captured activations."""
    from attnprec.testing.real import real_metadata

    meta = real_metadata()
    return int(meta["tokens"]), int(meta["d_head"]), int(meta["layers"]) * int(meta["heads"])


@st.composite
def _cases(
    draw: st.DrawFn,
    method: str,
    dtype: torch.dtype,
    max_n: int,
    max_d: int,
    families: tuple[str, ...],
    causal: bool | None,
    batches: tuple[tuple[int, ...], ...],
    degrees: tuple[int, ...],
) -> AttentionCase:
    family = draw(st.sampled_from(families))
    seed = draw(st.integers(0, 2**32 - 1))
    g = torch.Generator().manual_seed(seed)
    batch = draw(st.sampled_from(batches))
    rec = method_record(method)
    is_causal = rec.default_causal() or (draw(st.booleans()) if causal is None else causal)
    top_n, top_d = max_n, max_d
    if family == "real":
        tokens, channels, _ = _real_limits()
        top_n, top_d = min(max_n, tokens), min(max_d, channels)
    n_q = draw(st.integers(1, top_n))
    n_k = n_q if is_causal else draw(st.integers(1, top_n))
    d_k = draw(st.integers(1, top_d))
    d_v = draw(st.integers(1, top_d))
    if family == "real":
        from attnprec.testing.real import real_inputs

        _, _, heads = _real_limits()
        offset = draw(st.integers(0, heads - math.prod(batch)))
        q, k, v = (x.to(dtype) for x in real_inputs(n_q, n_k, d_k, d_v, batch, offset=offset))
    else:
        q, k, v = make_inputs(
            family, n_q=n_q, n_k=n_k, d_k=d_k, d_v=d_v, batch=batch, dtype=dtype, generator=g
        )
    params = draw_params(draw, method, d_k, n_q, batch, g, degrees)
    q, k = as_features(method, params, q, k)
    if is_causal:
        params["causal"] = True
    params = {key: val.to(dtype) if key == "log_g" else val for key, val in params.items()}
    return AttentionCase(method, family, q, k, v, params, seed)


def attention_inputs(
    method: str = "softmax",
    *,
    dtype: torch.dtype = torch.float32,
    max_n: int = 16,
    max_d: int = 8,
    families: Sequence[str] = FAMILIES,
    causal: bool | None = False,
    batches: Sequence[Sequence[int]] = ((),),
    degrees: Sequence[int] = (2, 4),
) -> st.SearchStrategy[AttentionCase]:
    """A strategy for attention examples: operands and method parameters.

    Parameters
    ----------
    method : str
        One of :data:`METHODS`; decides the drawn parameters: ``taylor`` a ``degree`` from
        ``degrees``; ``polynomial`` positive-definite quadratic ``coeffs``; ``linear``
        ``feature_map=None`` with features ``elu(x) + 1`` of the drawn inputs as ``q``, ``k``
        (the bound takes given features); ``favor`` a seeded ``projection`` with 8 or 32 features;
        ``semiring`` one of LogExpMean, SoftMaxPlus, MixtureLSE (not Tropical,
        which has no rounding bound); ``gated`` log-gates
        in ``(-2, 0]`` (and ``causal=True``).
    dtype : torch.dtype
        Dtype of the operands (values exactly representable in it).
    max_n, max_d : int
        Largest sequence length and head dimension (the real family caps them at what was
        captured: 128 and 32).
    families : sequence of str
        Families to draw from, default all of :data:`~attnprec.testing.inputs.FAMILIES`;
        :data:`~attnprec.testing.inputs.SCALED_FAMILIES` (``"overrange"``) may be named
        for scaled FP8 storage (its values overflow fp16; draw ``dtype=torch.float32``).
    causal : bool or None
        Causal examples (then ``n_q == n_k``), non-causal, or ``None`` to draw both. The
        methods that are causal only (gated and the state-space models: ``causal="only"``
        in :mod:`attnprec.methods`) are always drawn causal.
    batches : sequence of shapes
        Leading batch shapes to draw from.
    degrees : sequence of int
        Taylor degrees to draw from (even degrees keep the normalizer positive).

    Returns
    -------
    hypothesis.strategies.SearchStrategy
        Of :class:`AttentionCase`.

    Raises
    ------
    ValueError
        If an argument is out of range (naming it).
    """
    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype: expected a floating torch.dtype, got {dtype!r}")
    for name, val in (("max_n", max_n), ("max_d", max_d)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise ValueError(f"{name}: expected a positive integer, got {val!r}")
    fams = tuple(families)
    bad = [f for f in fams if f not in FAMILIES + SCALED_FAMILIES]
    if not fams or bad:
        raise ValueError(
            f"families: expected a non-empty subset of {FAMILIES + SCALED_FAMILIES}, got {fams!r}"
        )
    if causal is not None:
        check_bool("causal", causal)
    shapes = tuple(tuple(check_int("batches", x, 1) for x in b) for b in batches)
    if not shapes:
        raise ValueError(f"batches: expected shapes of positive sizes, got {batches!r}")
    degs = tuple(degrees)
    if not degs or any(isinstance(p, bool) or not isinstance(p, int) or p < 0 for p in degs):
        raise ValueError(f"degrees: expected non-negative integers, got {degrees!r}")
    if "real" in fams:
        _, _, heads = _real_limits()
        big = [b for b in shapes if math.prod(b) > heads]
        if big:
            raise ValueError(f"batches: the real family holds {heads} heads, got {big}")
    return _cases(method, dtype, max_n, max_d, fams, causal, shapes, degs)
