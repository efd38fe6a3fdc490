"""Input families for attention: typical Gaussians and the adversarial cases kernels get wrong.

Every family returns exact float64 tensors (or the requested dtype, rounded once), so a
reference computed from them is the reference of what the kernel saw.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from attnprec._validate import MAX_SIZE, check_int
from attnprec.methods import FAMILIES, SCALED_FAMILIES

__all__ = ["FAMILIES", "SCALED_FAMILIES", "make_inputs"]


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
    """
    if family not in FAMILIES + SCALED_FAMILIES:
        raise ValueError(f"family: expected one of {FAMILIES + SCALED_FAMILIES}, got {family!r}")
    n_q = check_int("n_q", n_q, 1, MAX_SIZE)
    n_k = n_q if n_k is None else check_int("n_k", n_k, 1, MAX_SIZE)
    d_k = check_int("d_k", d_k, 1, MAX_SIZE)
    d_v = d_k if d_v is None else check_int("d_v", d_v, 1, MAX_SIZE)
    b = tuple(check_int("batch", x, 0, MAX_SIZE) for x in batch)
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
    return q.to(dtype), k.to(dtype), v.to(dtype)
