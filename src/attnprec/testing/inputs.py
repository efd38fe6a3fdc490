"""Input families for attention: typical Gaussians and the adversarial cases kernels get wrong.

Every family returns exact float64 tensors (or the requested dtype, rounded once), so a
reference computed from them is the reference of what the kernel saw.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from attnprec._validate import MAX_SIZE, check_int
from attnprec.methods import FAMILIES, SCALED_FAMILIES

__all__ = ["FAMILIES", "SCALED_FAMILIES", "as_features", "make_inputs"]


def make_inputs(
    family: str,
    *,
    n_q: int,
    n_k: int | None = None,
    d_k: int = 16,
    d_v: int | None = None,
    batch: Sequence[int] = (),
    dtype: torch.dtype = torch.float64,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw ``q [*batch, n_q, d_k]``, ``k [*batch, n_k, d_k]``, ``v [*batch, n_k, d_v]``.

    Parameters
    ----------
    family : str
        One of :data:`FAMILIES`:

        - ``"typical"``: i.i.d. N(0, 1) entries.
        - ``"outliers"``: N(0, 1) with rare (1 %) entries drawn from N(0, 100) (sd 10),
          as in activations with outlier channels.
        - ``"sinks"``: typical, but key 0 has a large dot product with every query
          (an attention sink absorbing most of the weight).
        - ``"ties"``: integer-valued q and k in {-1, 0, 1}, so many logits tie exactly,
          including the maxima.
        - ``"cancel"``: values whose rows nearly cancel (v_j and -v_j + tiny), so outputs
          are small against sum |v| and relative errors are ill-conditioned.
        - ``"real"``: q, k, v captured from a real transformer (see
          :mod:`attnprec.testing.real`), cropped to the requested sizes.

        And, of :data:`SCALED_FAMILIES` (for scaled FP8 storage; fp16 cannot hold them):

        - ``"overrange"``: typical logits from values beyond FP8's range before scaling:
          q = 2^10 N(0, 1), k = 2^-10 N(0, 1) (below e4m3's smallest subnormal 2^-9),
          v = 2^17 N(0, 1) (beyond e5m2's max 57344).
    n_q, n_k, d_k, d_v : int
        Sizes in ``[1, 2**31 - 1]`` (memory may allow fewer); ``n_k`` defaults to ``n_q``
        and ``d_v`` to ``d_k``.
    batch : sequence of int
        Leading batch/head dimensions (each in ``[0, 2**31 - 1]``).
    dtype : torch.dtype
        Returned dtype; the float64 draw is rounded to it once (round to nearest even).
    generator : torch.Generator, optional
        Seeded generator for reproducible draws.

    Returns
    -------
    q, k, v : torch.Tensor
        Exactly representable in ``dtype``.

    Raises
    ------
    TypeError
        Naming ``batch``, ``dtype`` or ``generator`` when it is not of its kind.
    ValueError
        Naming the argument out of range, or ``dtype`` when the family's values overflow it
        (``"overrange"`` in fp16 or FP8).
    """
    if family not in FAMILIES + SCALED_FAMILIES:
        raise ValueError(f"family: expected one of {FAMILIES + SCALED_FAMILIES}, got {family!r}")
    n_q = check_int("n_q", n_q, 1, MAX_SIZE)
    n_k = n_q if n_k is None else check_int("n_k", n_k, 1, MAX_SIZE)
    d_k = check_int("d_k", d_k, 1, MAX_SIZE)
    d_v = d_k if d_v is None else check_int("d_v", d_v, 1, MAX_SIZE)
    if isinstance(batch, (str, bytes)) or not isinstance(batch, Sequence):
        raise TypeError(f"batch: expected a sequence of sizes, e.g. (2, 4), got {batch!r}")
    b = tuple(check_int("batch", x, 0, MAX_SIZE) for x in batch)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype: expected a floating-point torch.dtype, got {dtype!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator or None, got {generator!r}")
    g = generator

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*b, *shape, generator=g, dtype=torch.float64)

    if family == "real":
        from attnprec.testing.real import real_inputs

        q, k, v = real_inputs(n_q=n_q, n_k=n_k, d_k=d_k, d_v=d_v, batch=b)
    elif family == "typical":
        q, k, v = randn(n_q, d_k), randn(n_k, d_k), randn(n_k, d_v)
    elif family == "outliers":
        q, k, v = randn(n_q, d_k), randn(n_k, d_k), randn(n_k, d_v)
        for x in (q, k, v):
            mask = torch.rand(x.shape, generator=g, dtype=torch.float64) < 0.01
            x[mask] = 10.0 * torch.randn(int(mask.sum()), generator=g, dtype=torch.float64)
    elif family == "sinks":
        q, k, v = randn(n_q, d_k), randn(n_k, d_k), randn(n_k, d_v)
        # Key 0 aligned with the mean query direction, so every query favours it.
        direction = q.mean(dim=-2, keepdim=True)
        direction = direction / direction.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        k[..., :1, :] = 4.0 * direction * d_k**0.5
        q = q + direction
    elif family == "overrange":
        q, k, v = 2.0**10 * randn(n_q, d_k), 2.0**-10 * randn(n_k, d_k), 2.0**17 * randn(n_k, d_v)
    elif family == "ties":
        q = torch.randint(-1, 2, (*b, n_q, d_k), generator=g).to(torch.float64)
        k = torch.randint(-1, 2, (*b, n_k, d_k), generator=g).to(torch.float64)
        v = randn(n_k, d_v)
    else:  # cancel
        q, k = randn(n_q, d_k), randn(n_k, d_k)
        half = randn((n_k + 1) // 2, d_v)
        v = torch.cat([half, -half + 1e-3 * randn((n_k + 1) // 2, d_v)], dim=-2)[..., :n_k, :]
    out = q.to(dtype), k.to(dtype), v.to(dtype)
    if not all(bool(torch.isfinite(x.float() if x.element_size() == 1 else x).all()) for x in out):
        # (overrange's values lie past fp16's and FP8's range: they are drawn for scaled
        # storage, whose kernel takes float32 and quantizes with its scale factors)
        raise ValueError(
            f"dtype: {family!r} inputs overflow {dtype} (draw them in float32 or float64)"
        )
    return out


def as_features(
    method: str, params: Mapping[str, Any], q: torch.Tensor, k: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``q, k`` as a method takes them: ``elu(x) + 1`` of the drawn ones where the method
    takes them as nonnegative features (linear attention with ``feature_map=None`` and not
    ``allow_nonpositive``: its normalizer sums them), else unchanged (the state-space
    models' C and B, gated attention's q and k, and every scaled method take them signed).
    elu(x) + 1 in float64, at least the dtype's smallest normal (``exp(-100)`` is 0 in
    fp16: a query of such features has no normalizer), rounded once to the inputs' dtype.

    Parameters
    ----------
    method : str
        A method name of :mod:`attnprec.methods`.
    params : mapping
        The method's keywords for the call.
    q, k : torch.Tensor
        The drawn queries and keys.

    Returns
    -------
    q, k : torch.Tensor
        In the inputs' dtype.
    """
    from attnprec.attention.linear import elu1
    from attnprec.methods import method as method_record

    named = {key.name for key in method_record(method).keywords}
    given = "feature_map" in named and params.get("feature_map", "elu1") is None
    if not given or params.get("allow_nonpositive", False):
        return q, k
    fq, fk = (elu1(x.double()).clamp_min(torch.finfo(x.dtype).tiny).to(x.dtype) for x in (q, k))
    return fq, fk
