"""Rounding-error primitives: the building blocks of every composed rounding bound.

All bounds are worst-case (deterministic) unless the name says ``probabilistic``. A bound
is returned as a float (constants) or a float64 tensor (elementwise bounds on
``|computed - exact|``); ``inf`` means the bound is vacuous (e.g. ``n u >= 1``).

Stable signatures (the kernels' graph bounds in :mod:`.graphs` build on them):

``gamma(n, u) -> float``
    gamma_n = n u / (1 - n u), ``inf`` when n u >= 1 (Higham 2002, Lemma 3.1): for products
    of up to n factors ``(1 + delta)^{+-1}``.
``theta(n, u) -> float`` and ``theta_lo(n, u) -> float``
    (1 + u)^n - 1 and 1 - (1 - u)^n: the exact range of a product of n factors
    ``1 + delta`` (no divisions), finite for every n. Sums, dot products and chains of
    products carry only such factors, so these replace gamma there and keep bounds finite
    when n u >= 1; for positive terms the lower side 1 - theta_lo stays above 0.
``summation_depth(n, order="recursive", block=None) -> int``
    The most additions any one term passes through: n - 1 for any order (``"recursive"``,
    the safe choice when the order is unknown), ceil(log2 n) for ``"pairwise"``,
    (min(n, block) - 1) + (ceil(n / block) - 1) for ``"blocked"``.
``sum_gamma(n, u, order="recursive", block=None) -> float``
    gamma of that depth: |fl(sum x) - sum x| <= sum_gamma * sum |x|.
``pairwise_gamma(n, u)``, ``blocked_gamma(n, block, u)``
    Shorthands for the two orders.
``dot_gamma(n, u, order="recursive", block=None) -> float``
    |fl(a.b) - a.b| <= dot_gamma * |a|.|b|: the depth plus one product rounding, FMA or not.
``matmul_bound(a, b, u, order="recursive", block=None) -> Tensor``
    dot_gamma(n) |a| @ |b| for ``a [..., m, n]``, ``b [..., n, p]``.
``block_fma_gamma(n, u_acc, block, u_in=0.0, exact_products=True) -> float``
    Mixed-precision block FMA (tensor cores; Blanchard, Higham, Lopez, Mary, Pranesh 2020):
    operands rounded to a low precision (``u_in``, 0 when already stored there), products
    exact in the accumulator, sums in ``u_acc`` blocked by ``block``.
``exp_up(x) -> Tensor``
    An upper bound of e^x for a float64 exponent formed with one rounding.
``tail_lambda(delta) -> float`` and ``order_sq(s, q, n) -> Tensor``
    The probabilistic level of every composed bound: an error that is a sum of independent
    mean-zero terms c_r delta_r, each sub-Gaussian with variance proxy u_r^2 / 3 (a rounding
    error uniform within its rounding interval), exceeds ``tail_lambda(delta) *
    sqrt(sum c_r^2 u_r^2 / 3)`` with probability at most delta; ``order_sq`` is the sum
    over the additions of a sum of the squared partial sums (the coefficients of their
    roundings), averaged over the orders of the terms (docs/bounds.md, "Two levels").
``probabilistic_gamma(n, u, lam) -> float`` and ``hm_failure_probability(n, u, lam)``
    Higham and Mary (2019), Theorems 2.4 and 3.1: under the model of independent mean-zero
    rounding errors, |fl(a.b) - a.b| <= gamma~_n(lam) |a|.|b| with
    gamma~_n(lam) = exp(lam sqrt(n) u + n u^2 / (1 - u)) - 1, failing with probability at
    most ``hm_failure_probability = min(1, 2 n exp(-lam^2 (1 - u)^2 / 2))``.
``hm_lambda(n, u, delta) -> float``
    The least lam whose failure probability is <= delta.
``exp_rel(x_abs, u, elementary)`` and ``log_abs(y_abs, u, elementary)``
    Relative / absolute error bounds of a computed exp / log under an
    :class:`~attnprec.analysis.precision.Elementary` accuracy model (the declaration's).
``store_error(abs_x, fmt, rounding="rne") -> Tensor``
    |fl(x) - x| for one rounding to ``fmt`` of x with |x| <= abs_x (u_r times the binade of
    abs_x plus absolute eta_r, inf
    from the overflow threshold on: max + ulp(max)/2 for "rne"; "rtz" saturates).
``lse_bound(x, u, ...)``, ``softmax_bound(x, u, ...)``
    Shifted log-sum-exp and softmax (the algorithm of Blanchard, Higham and Higham 2021,
    with the bounds re-derived in docs/bounds/rounding.md for our exp/log models).
``lognum_sum_bound(n, log_abs_sum, log_abs_value, dtype=float64, term_log_error=0.0)``
    The log-domain error of a signed lognum reduction (logsumexp with signs,
    log_matmul_exp, SignedLog sums), as proved in :func:`attnprec.lognum.signed_sum_error_bound`;
    ``lognum_sum_rel`` turns it into the relative error expm1(bound) of the value.
``upper(x, n_ops)``
    Inflate a bound evaluated in float64 with at most ``n_ops`` roundings so that it stays
    an upper bound of the exact expression: x (1 + gamma_{n_ops+1}(2^-53)).

References
----------
N. J. Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed., SIAM, 2002.
N. J. Higham and T. Mary, A new approach to probabilistic rounding error analysis,
SIAM J. Sci. Comput. 41 (2019).
P. Blanchard, N. J. Higham, F. Lopez, T. Mary and S. Pranesh, Mixed precision block fused
multiply-add, SIAM J. Sci. Comput. 42 (2020).
P. Blanchard, D. J. Higham and N. J. Higham, Accurately computing the log-sum-exp and
softmax functions, IMA J. Numer. Anal. 41 (2021).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from attnprec._validate import broadcast_shapes, check_bool, check_finite, check_float, check_real
from attnprec.lognum._checks import check_dim

__all__ = [
    "U64",
    "gamma",
    "summation_depth",
    "sum_gamma",
    "pairwise_gamma",
    "blocked_gamma",
    "dot_gamma",
    "matmul_bound",
    "block_fma_gamma",
    "probabilistic_gamma",
    "hm_failure_probability",
    "hm_lambda",
    "theta",
    "theta_lo",
    "excess",
    "deficit",
    "tail_lambda",
    "order_sq",
    "sequence_sq",
    "cumsum_before",
    "exp_rel",
    "log_abs",
    "store_error",
    "lse_bound",
    "softmax_bound",
    "upper",
    "TINY",
    "lognum_sum_bound",
    "lognum_sum_rel",
]

#: Unit roundoff of float64, in which every bound here is evaluated.
U64 = 2.0**-53
#: Absolute error of a float64 product-sum below the normal range: each product that
#: underflows may lose 2^-1075, so fewer than 2^53 of them lose less than this, the smallest
#: normal number (a subnormal constant would cost ~10x on large tensors). The relative
#: terms (``gamma``, :func:`upper`) do not cover an underflow.
TINY = 2.0**-1022

_ORDERS = ("recursive", "pairwise", "blocked")


def _check_n(name: str, n: int) -> int:
    if isinstance(n, bool) or not isinstance(n, int | float) or n != int(n) or n < 0:
        raise ValueError(f"{name}: expected a non-negative integer, got {n!r}")
    return int(n)


def _check_lam(lam: float) -> float:
    x = check_real("lam", lam)
    if not (0 < x < math.inf):
        raise ValueError(f"lam: expected a positive finite number, got {lam!r}")
    return x


def _check_u(u: float, name: str = "u") -> float:
    u = float(u)
    if not (0.0 <= u < 1.0):
        raise ValueError(f"{name}: expected a unit roundoff in [0, 1), got {u!r}")
    return u


def _check_rows(x: object, dim: object) -> tuple[torch.Tensor, int]:
    """``x`` (a real floating tensor with at least one entry along ``dim``) and ``dim``,
    normalized, else an error naming ``x`` or ``dim``."""
    x = check_float("x", x)
    if x.dim() < 1:
        raise ValueError("x: expected a tensor with at least one dimension, got a scalar")
    d = check_dim("dim", dim, x.dim())
    if x.shape[d] == 0:
        raise ValueError(f"x: expected at least one entry along dim {dim}, got {tuple(x.shape)}")
    return x, d


def gamma(n: Any, u: float) -> Any:
    """gamma_n = n u / (1 - n u), the constant of n successive roundings.

    ``prod_{i<=n} (1 + delta_i)^{+-1} = 1 + theta_n`` with ``|theta_n| <= gamma_n`` when every
    ``|delta_i| <= u`` (Higham 2002, Lemma 3.1).

    Parameters
    ----------
    n : int or Tensor
        Number of roundings, ``n >= 0`` (a tensor of counts: elementwise, e.g. per row).
    u : float
        Unit roundoff, in ``[0, 1)``.

    Returns
    -------
    float or Tensor
        ``inf`` when ``n u >= 1`` (the bound is vacuous), else gamma_n.

    Raises
    ------
    ValueError
        If ``n`` is not a non-negative integer or ``u`` is not in ``[0, 1)``.

    Notes
    -----
    Error: the sound constant of the lemma, evaluated in float64 without upward rounding
    (callers that need a strict upper bound inflate it with :func:`upper`).
    """
    u = _check_u(u)
    if isinstance(n, torch.Tensor):
        if n.is_complex() or not bool((n >= 0).all() and (n == n.round()).all()):
            raise ValueError("n: expected non-negative integer counts")
        nu = n.to(torch.float64) * u
        return torch.where(nu >= 1.0, math.inf, nu / (1.0 - nu))
    n = _check_n("n", n)
    nu = n * u
    return math.inf if nu >= 1.0 else nu / (1.0 - nu)


def excess(log_hi: Any, n_ops: int = 4) -> Any:
    """``e^x - 1`` rounded up, for ``x = log_hi >= 0`` (float or tensor): the relative excess
    over 1 of a product of factors ``>= 1`` given as the sum of their logs.

    A product such as ``(1 + u)^2 s - 1`` formed in float64 cancels: at ``u = 2^-53``
    (float64 compute) ``1 + u`` rounds to 1 and the term is lost, and at any ``u`` the
    result carries an absolute error of an ulp of 1. Every such factor is formed here, from
    the sum of the factors' logs (``log1p(u)`` each: accurate), through ``expm1``. ``log_hi``
    may be off by ``n_ops`` roundings of nonnegative terms (it is raised by that first).
    """
    if isinstance(log_hi, torch.Tensor):
        return upper(torch.expm1(upper(log_hi, n_ops)), 2)
    return upper(math.expm1(x) if (x := upper(log_hi, n_ops)) < 709 else math.inf, 2)


def exp_float(x: float) -> float:
    """``math.exp(x)``, ``inf`` past float64's range (where ``math.exp`` raises): a bound
    that meets it is infinite, not an error."""
    return math.exp(x) if x < 709 else math.inf


def deficit(log_lo: Any, n_ops: int = 4) -> Any:
    """``1 - e^x`` rounded up, for ``x = log_lo <= 0`` (float or tensor): the relative
    shortfall below 1 of a product of factors ``<= 1`` given as the sum of their logs
    (``log1p(-u)`` each), without cancellation (:func:`excess`)."""
    if isinstance(log_lo, torch.Tensor):
        return upper(-torch.expm1(upper(log_lo, n_ops)), 2)
    return upper(-math.expm1(upper(log_lo, n_ops)), 2)


def theta(n: int, u: float) -> float:
    """(1 + u)^n - 1 rounded up: |prod_{i<=n} (1 + delta_i) - 1| for |delta_i| <= u.

    Finite for every n (unlike gamma_n), and exact: the bound is attained. Use it for
    products of factors ``1 + delta`` only (sums, dot products, chains of products).
    """
    n = _check_n("n", n)
    u = _check_u(u)
    return float(excess(n * math.log1p(u), 1))


def theta_lo(n: int, u: float) -> float:
    """1 - (1 - u)^n rounded up (< 1): the largest relative decrease of a product of n
    factors ``1 + delta``, |delta| <= u; a sum of positive terms stays above
    ``(1 - theta_lo(depth)) sum x``."""
    n = _check_n("n", n)
    u = _check_u(u)
    return min(float(deficit(n * math.log1p(-u), 1)), 1.0)


def tail_lambda(delta: float) -> float:
    """sqrt(2 ln(2 / delta)): P(|X| >= lambda sqrt(V)) <= delta for X sub-Gaussian with
    variance proxy V (a sum of independent mean-zero rounding errors, see the module
    docstring)."""
    if not (0.0 < delta < 1.0):
        raise ValueError(f"delta: expected a probability in (0, 1), got {delta!r}")
    return math.sqrt(2.0 * math.log(2.0 / delta))


def order_sq(s: torch.Tensor, q: torch.Tensor, n: torch.Tensor | int) -> torch.Tensor:
    """Sum over k = 2..n of E[S_k^2], S_k a partial sum of k of the n terms in random order.

    ``s`` = sum x_i, ``q`` = sum x_i^2 (tensors of one shape), ``n`` the number of terms
    (tensor or int). With sigma^2 = q / n - (s / n)^2, E[S_k^2] = (k s / n)^2 +
    k (n - k) sigma^2 / (n - 1); summed: s^2 (n (n + 1)(2n + 1) / 6 - 1) / n^2 +
    sigma^2 (n (n + 1) / 6 - 1). These are the squared coefficients of the roundings of a
    recursive sum in an order unrelated to the data; tree and blocked orders have smaller
    ones. Evaluated in float64 (a model, not a bound: no upward rounding).
    """
    nn = torch.as_tensor(n, dtype=torch.float64)
    safe = nn.clamp_min(1.0)
    var = (q / safe - (s / safe) ** 2).clamp_min(0.0)
    first = s * s * ((nn * (nn + 1) * (2 * nn + 1) / 6 - 1) / (safe * safe)).clamp_min(0.0)
    second = var * (nn * (nn + 1) / 6 - 1).clamp_min(0.0)
    return torch.where(nn >= 2, first + second, torch.zeros_like(first + second))


#: Keys per block of :func:`sequence_sq` (a one-pass kernel's tile of keys is 16-128).
SEQUENCE_BLOCK = 32


def cumsum_before(T: torch.Tensor) -> torch.Tensor:
    """The sums of ``T``'s entries before each one along dim 1 (exclusive prefix sums),
    formed without subtracting each entry from the inclusive sum: a later block much larger
    than the earlier ones would cancel them."""
    out = torch.zeros_like(T)
    out[:, 1:] = T[:, :-1].cumsum(1)
    return out


def sequence_sq(
    p: torch.Tensor,
    v: torch.Tensor,
    vis: torch.Tensor | None,
    first: torch.Tensor | None = None,
    block: int = SEQUENCE_BLOCK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`order_sq`'s sums of squared partial sums for the terms added in sequence
    order over each row's visible keys: of ``p_j v_j`` (``p [B, r, m]``, ``v [B, m, d_v]``)
    ``[B, r, d_v]``, and of ``p_j`` ``[B, r, 1]``. ``vis [1 or B, r, m]`` (None: every key
    visible; a hidden key's ``p`` is 0); ``first [r]``: each row sees its first ``first``
    keys (a plain causal mask), counted from it rather than from ``vis``.

    :func:`order_sq` averages the partial sums over the orders; a kernel that adds the
    keys in sequence order sees the data's own: values sorted or trending along the
    sequence, or an attention sink at its start, keep them large (a review measured correct
    fp32 softmax 7.9x outside the level on sorted values). Exact at the boundaries of
    blocks of ``block`` keys (a tiled kernel's partial sums), linear within a block: with
    ``S_b`` the sum before block ``b`` and ``T_b`` its own, its ``n_b`` visible keys
    contribute ``sum_{i <= n_b} (S_b + i T_b / n_b)^2``; the first visible term, no
    addition, is left out (exact for ``block = 1``). A model term (float64, no upward
    rounding), for the level to take the larger of it and :func:`order_sq`'s."""
    B, r, m = p.shape
    d = v.shape[-1]
    if m == 0:
        return p.new_zeros(B, r, d), p.new_zeros(B, r, 1)
    nb = -(-m // block)
    pad = (0, nb * block - m)

    def blocks(x: torch.Tensor) -> torch.Tensor:  # [., r, m] -> [., nb, r, block]
        x = torch.nn.functional.pad(x, pad) if pad[1] else x
        return x.reshape(*x.shape[:2], nb, block).transpose(1, 2)

    # (laid out [B, nb, r, .], the product's own layout)
    if first is not None:
        start = torch.arange(0, nb * block, block, dtype=p.dtype).reshape(1, nb, 1, 1)
        n_b = (first.to(p.dtype).reshape(1, 1, -1, 1) - start).clamp_(0.0, float(block))
    elif vis is None:
        n_b = torch.full((nb,), float(block), dtype=p.dtype)
        n_b[-1] = m - (nb - 1) * block
        n_b = n_b.reshape(1, nb, 1, 1)
    else:
        n_b = blocks(vis).sum(-1, keepdim=True, dtype=p.dtype)
    vv = torch.cat([v, torch.ones_like(v[..., :1])], -1)
    vv = torch.nn.functional.pad(vv, (0, 0, *pad)) if pad[1] else vv
    T = blocks(p) @ vv.reshape(B, nb, block, d + 1)  # each block's sum [B, nb, r, d + 1]
    # sum_{i=1..n} (S + i T / n)^2 = n S^2 + (n + 1) S T + (n + 1)(2n + 1) / (6n) T^2
    S = cumsum_before(T)
    c = (n_b + 1) * (2 * n_b + 1) / (6 * n_b.clamp_min(1.0)) * (n_b > 0)
    out = (S * (n_b * S + (n_b + 1) * T) + c * T * T).sum(1)
    # less the first visible term's square: no addition (order_sq leaves it out too)
    j0 = torch.zeros(B, r, 1, dtype=torch.long)
    if first is None and vis is not None:
        j0 = j0 + vis.to(torch.uint8).argmax(-1, keepdim=True)
    a0 = p.gather(-1, j0) * vv.gather(1, j0.expand(B, r, d + 1))
    out = out.sub_(a0 * a0).clamp_min_(0.0)
    return out[..., :d], out[..., d:]


def order_sq_sum(s2: torch.Tensor, q: torch.Tensor, n: torch.Tensor | int) -> torch.Tensor:
    """At least ``sum_f order_sq(s_f, q_f, n)`` over several sums of ``n`` terms each, from
    ``s2 >= sum_f s_f^2`` and ``q = sum_f q_f`` alone (the variance term taken as ``q_f /
    n``): for models whose per-sum aggregates would cost too much to form."""
    nn = torch.as_tensor(n, dtype=torch.float64)
    safe = nn.clamp_min(1.0)
    first = s2 * ((nn * (nn + 1) * (2 * nn + 1) / 6 - 1) / (safe * safe)).clamp_min(0.0)
    second = q * ((nn * (nn + 1) / 6 - 1) / safe).clamp_min(0.0)
    return torch.where(nn >= 2, first + second, torch.zeros_like(first + second))


def summation_depth(n: int, order: str = "recursive", block: int | None = None) -> int:
    """The most additions any one of ``n`` summands passes through.

    ``"recursive"``: n - 1, valid for *every* order (use it when the order is unknown, as
    for BLAS); ``"pairwise"``: ceil(log2 n); ``"blocked"``: each block of ``block`` terms
    summed in any order, then the ceil(n / block) block sums summed in any order.
    """
    n = _check_n("n", n)
    if order not in _ORDERS:
        raise ValueError(f"order: expected one of {_ORDERS}, got {order!r}")
    if n <= 1:
        return 0
    if order == "recursive":
        return n - 1
    if order == "pairwise":
        return math.ceil(math.log2(n))
    if block is None or isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"block: expected a positive integer for blocked order, got {block!r}")
    b = min(n, block)
    return (b - 1) + (math.ceil(n / b) - 1)


def sum_gamma(n: int, u: float, order: str = "recursive", block: int | None = None) -> float:
    """Constant of a floating-point sum: ``|fl(sum x) - sum x| <= sum_gamma * sum |x|``.

    Equal to gamma_d for d = :func:`summation_depth` (Higham 2002, eq. (4.4) and Sec. 4.2).

    Parameters
    ----------
    n : int
        Number of summands, ``n >= 0``.
    u : float
        Unit roundoff of the additions, in ``[0, 1)``.
    order : {"recursive", "pairwise", "blocked"}, optional
        Summation order; ``"recursive"`` (default) holds for every order.
    block : int, optional
        Block size, a positive integer; required for ``"blocked"``.

    Returns
    -------
    float
        gamma_d, ``inf`` when ``d u >= 1``; 0 for ``n <= 1``.

    Raises
    ------
    ValueError
        If ``n``, ``u``, ``order`` or ``block`` is out of range (the message names it).

    Notes
    -----
    Error: a sound worst-case constant for any order the named ``order`` allows, as
    :func:`gamma`.
    """
    return gamma(summation_depth(n, order, block), u)


def pairwise_gamma(n: int, u: float) -> float:
    """gamma_{ceil(log2 n)}: the constant of pairwise (cascade) summation of n terms.

    Parameters
    ----------
    n : int
        Number of summands, ``n >= 0``.
    u : float
        Unit roundoff, in ``[0, 1)``.

    Returns
    -------
    float
        ``sum_gamma(n, u, "pairwise")``; ``inf`` when vacuous.

    Raises
    ------
    ValueError
        As :func:`sum_gamma`.

    Notes
    -----
    Error: a sound worst-case constant, as :func:`sum_gamma`.
    """
    return sum_gamma(n, u, "pairwise")


def blocked_gamma(n: int, block: int, u: float) -> float:
    """gamma_{(b-1) + (ceil(n/b)-1)}, b = min(n, block): blocked summation of n terms.

    Parameters
    ----------
    n : int
        Number of summands, ``n >= 0``.
    block : int
        Block size, a positive integer.
    u : float
        Unit roundoff, in ``[0, 1)``.

    Returns
    -------
    float
        ``sum_gamma(n, u, "blocked", block)``; ``inf`` when vacuous.

    Raises
    ------
    ValueError
        As :func:`sum_gamma`.

    Notes
    -----
    Error: a sound worst-case constant, as :func:`sum_gamma`.
    """
    return sum_gamma(n, u, "blocked", block)


def dot_gamma(n: int, u: float, order: str = "recursive", block: int | None = None) -> float:
    """Constant of an inner product of length n: ``|fl(a.b) - a.b| <= dot_gamma * |a|.|b|``.

    gamma_{d+1} with d the summation depth: one rounding per product, FMA or not (a fused
    chain starts with ``fma(a_1, b_1, 0) = fl(a_1 b_1)``, so its first term passes d + 1
    roundings as well: the constant gamma_d it was given was exceeded 2.0x at n = 2, and
    infinitely at n = 1; ``test_dot_gamma_covers_a_fused_chain``). n = 0 is exact.

    Parameters
    ----------
    n : int
        Length of the inner product, ``n >= 0``.
    u : float
        Unit roundoff of products and sums, in ``[0, 1)``.
    order : {"recursive", "pairwise", "blocked"}, optional
        Summation order, as :func:`sum_gamma`.
    block : int, optional
        Block size for ``"blocked"``.

    Returns
    -------
    float
        gamma_{d+1} (0 for ``n = 0``, ``inf`` when vacuous).

    Raises
    ------
    ValueError
        As :func:`sum_gamma`.

    Notes
    -----
    Error: a sound worst-case constant for every evaluation order ``order`` allows.
    """
    d = summation_depth(n, order, block)
    if n == 0:
        return 0.0
    return gamma(d + 1, u)


@torch.no_grad()
def matmul_bound(
    a: torch.Tensor,
    b: torch.Tensor,
    u: float,
    order: str = "recursive",
    block: int | None = None,
) -> torch.Tensor:
    """Elementwise bound ``dot_gamma(n) * (|a| @ |b|)`` on ``|fl(a @ b) - a @ b|``.

    Parameters
    ----------
    a : torch.Tensor
        ``[..., m, n]``, finite real floating.
    b : torch.Tensor
        ``[..., n, p]``, finite real floating; batch dims broadcast with ``a``'s.
    u : float
        Unit roundoff of the product, in ``[0, 1)``.
    order : {"recursive", "pairwise", "blocked"}, optional
        Summation order of each inner product, as :func:`dot_gamma`.
    block : int, optional
        Block size for ``"blocked"``.

    Returns
    -------
    torch.Tensor
        float64 ``[..., m, p]``, inflated by :func:`upper` for its own float64 evaluation.

    Notes
    -----
    Error: a sound elementwise bound on ``|fl(a @ b) - a @ b|`` (underflow not covered).

    Raises
    ------
    TypeError, ValueError
        Naming ``a`` or ``b``: not a real floating tensor, fewer than 2 dims, NaN or inf,
        inner dims that differ, or batch dims that do not broadcast; ``ValueError`` for
        ``u``, ``order`` or ``block`` out of range.
    """
    for name, x in (("a", a), ("b", b)):
        check_float(name, x)
        if x.dim() < 2:
            raise ValueError(f"{name}: expected shape [..., rows, cols], got {tuple(x.shape)}")
        check_finite(name, x)
    if b.shape[-2] != a.shape[-1]:
        raise ValueError(f"b: expected {a.shape[-1]} rows (the columns of a), got {b.shape[-2]}")
    try:
        broadcast_shapes(a.shape[:-2], b.shape[:-2])
    except RuntimeError:
        raise ValueError(
            f"b: batch dims {tuple(b.shape[:-2])} do not broadcast with a's {tuple(a.shape[:-2])}"
        ) from None
    n = a.shape[-1]
    g = dot_gamma(n, u, order, block)
    return upper(g * (a.abs().double() @ b.abs().double()), n + 1)


def block_fma_gamma(
    n: int, u_acc: float, block: int, u_in: float = 0.0, exact_products: bool = True
) -> float:
    """Constant of a mixed-precision block-FMA inner product of length n.

    Operands are rounded to the low precision (relative ``u_in``; pass 0 when they are already
    stored there), products are exact in the accumulator (``exact_products``, true when
    2 p_low <= p_acc, e.g. fp16/bf16 into fp32) or rounded once in ``u_acc``, and the sum is
    blocked in ``u_acc``. Bound: ``(1 + u_in)^2 (1 + gamma_d(u_acc)) - 1`` with d the blocked
    depth (+1 when products round); Blanchard et al. (2020), Theorem 3.2 with the block FMA
    summation order.

    Parameters
    ----------
    n : int
        Length of the inner product, ``n >= 0``.
    u_acc : float
        Unit roundoff of the accumulator, in ``[0, 1)``.
    block : int
        Block size of the FMA, a positive integer.
    u_in : float, optional
        Unit roundoff of the operand rounding, in ``[0, 1)``; 0 (default) when the operands
        are already stored in the low precision.
    exact_products : bool, optional
        Whether products are exact in the accumulator (default True).

    Returns
    -------
    float
        The constant; ``inf`` when gamma_d(u_acc) is vacuous.

    Raises
    ------
    TypeError
        If ``exact_products`` is not a bool.
    ValueError
        If ``n``, ``u_acc``, ``u_in`` or ``block`` is out of range.

    Notes
    -----
    Error: a sound worst-case relative constant (``|fl(a.b) - a.b| <= c |a|.|b|``).
    """
    u_acc = _check_u(u_acc, "u_acc")
    u_in = _check_u(u_in, "u_in")
    d = summation_depth(n, "blocked", block) + (
        0 if check_bool("exact_products", exact_products) else 1
    )
    g = gamma(d, u_acc)
    return g + u_in * (2.0 + u_in) * (1.0 + g)  # = (1 + u_in)^2 (1 + g) - 1, no cancellation


def probabilistic_gamma(n: int, u: float, lam: float) -> float:
    """gamma~_n(lam) = exp(lam sqrt(n) u + n u^2 / (1 - u)) - 1 (Higham and Mary 2019, Thm 2.4).

    Bounds |theta_n| for n roundings with independent, mean-zero errors of modulus <= u, with
    probability at least 1 - 2 exp(-lam^2 (1 - u)^2 / 2); for an inner product of length n the
    failure probability is :func:`hm_failure_probability` (their Theorem 3.1).

    Parameters
    ----------
    n : int
        Number of roundings, ``n >= 0``.
    u : float
        Unit roundoff, in ``[0, 1)``.
    lam : float
        Confidence parameter, positive and finite.

    Returns
    -------
    float
        gamma~_n(lam); ``inf`` past float64's range.

    Raises
    ------
    ValueError
        If ``n``, ``u`` or ``lam`` is out of range.

    Notes
    -----
    Error: a probabilistic bound, not a worst-case one: it holds under the model of
    independent mean-zero errors with the stated probability. Evaluated in float64, not
    rounded up.
    """
    n = _check_n("n", n)
    u = _check_u(u)
    lam = _check_lam(lam)
    x = lam * math.sqrt(n) * u + n * u * u / (1.0 - u)
    return math.expm1(x) if x < 709 else math.inf  # no OverflowError past float64


def hm_failure_probability(n: int, u: float, lam: float) -> float:
    """Failure probability of the Higham-Mary bound of a length-n dot: 2 n e^(-l^2 (1-u)^2 / 2).

    Parameters
    ----------
    n : int
        Length of the inner product, ``n >= 0`` (0 is counted as 1).
    u : float
        Unit roundoff, in ``[0, 1)``.
    lam : float
        Confidence parameter of :func:`probabilistic_gamma`, positive and finite.

    Returns
    -------
    float
        The probability, capped at 1 (0 where the exponential underflows).

    Raises
    ------
    ValueError
        If ``n``, ``u`` or ``lam`` is out of range.

    Notes
    -----
    Error: the formula evaluated in float64 (a few ulps), not rounded up.
    """
    n = _check_n("n", n)
    u = _check_u(u)
    lam = _check_lam(lam)
    # exp underflows to 0 for a large lam (a probability of 0, not an OverflowError).
    return min(1.0, 2.0 * max(n, 1) * math.exp(-(min(lam * (1.0 - u), 1e154) ** 2) / 2.0))


def hm_lambda(n: int, u: float, delta: float) -> float:
    """Least lam with :func:`hm_failure_probability` (n, u, lam) <= delta, 0 < delta < 1.

    Parameters
    ----------
    n : int
        Length of the inner product, ``n >= 0`` (0 is counted as 1).
    u : float
        Unit roundoff, in ``[0, 1)``.
    delta : float
        Allowed failure probability, in ``(0, 1)``.

    Returns
    -------
    float
        ``sqrt(2 ln(2 n / delta)) / (1 - u)``.

    Raises
    ------
    ValueError
        If ``delta``, ``n`` or ``u`` is out of range.

    Notes
    -----
    Error: the closed form evaluated in float64 (a few ulps), not rounded up.
    """
    if not (0.0 < delta < 1.0):
        raise ValueError(f"delta: expected a probability in (0, 1), got {delta!r}")
    n = _check_n("n", n)
    u = _check_u(u)
    return math.sqrt(2.0 * math.log(2.0 * max(n, 1) / delta)) / (1.0 - u)


def _elementary(elementary: Any) -> Any:
    from attnprec.analysis.precision import ELEMENTARY, Elementary

    if isinstance(elementary, Elementary):
        return elementary
    if elementary not in ELEMENTARY:
        raise ValueError(f"elementary: expected one of {tuple(ELEMENTARY)}, got {elementary!r}")
    return ELEMENTARY[elementary]


def exp_rel(x_abs: torch.Tensor | float, u: float, elementary: Any = "libm") -> Any:
    """Relative error bound of a computed exp(x): ``(1 + 2 k u) exp(a u |x|) - 1``.

    k = ``elementary.exp`` ulps, a = ``elementary.exp_arg``. Valid while exp(x) is a normal
    number; an absolute term ``min_normal`` covers underflow (flush to zero included) and is
    added by the callers that sum exponentials.
    """
    m = _elementary(elementary)
    u = _check_u(u)
    base = 2.0 * m.exp * u
    if m.exp_arg == 0.0:
        return base if not isinstance(x_abs, torch.Tensor) else torch.full_like(x_abs, base)
    return excess(math.log1p(base) + m.exp_arg * u * x_abs)


def log_abs(y_abs: torch.Tensor | float, u: float, elementary: Any = "libm") -> Any:
    """Absolute error bound of a computed log whose result has modulus y_abs:
    ``2 k u |y| + floor u`` (k = ``elementary.log``, floor = ``elementary.log_abs``)."""
    m = _elementary(elementary)
    u = _check_u(u)
    return 2.0 * m.log * u * y_abs + m.log_abs * u


def store_error(abs_x: torch.Tensor, fmt: Any, rounding: str = "rne") -> torch.Tensor:
    """Bound on ``|fl(x) - x|`` for one rounding to ``fmt`` of any x with ``|x| <= abs_x``:
    ``u_r 2^floor(log2 abs_x) + eta_r``, half an ulp of the binade.

    u_r = u, eta_r = min_subnormal / 2 for ``"rne"``; u_r = 2u, eta_r = min_subnormal for
    ``"rtz"`` (Format.rounding_error). ``inf`` where |x| reaches the overflow threshold
    (max + ulp(max)/2 for rne, where the rounded value would be inf).
    """
    from attnprec.analysis.precision import Format

    f = Format.of(fmt)
    a = abs_x.double()
    err = torch.as_tensor(f.rounding_error(a, rounding), dtype=torch.float64)
    return torch.where(a >= f.overflow(rounding), torch.full_like(err, math.inf), err)


def upper(x: Any, n_ops: Any) -> Any:
    """x (1 + gamma_{n_ops + 1}(2^-53)): an upper bound of the exact value of a nonnegative
    expression whose float64 evaluation took at most ``n_ops`` roundings (plus this one)."""
    return x * (1.0 + gamma(n_ops + 1, U64))


def exp_up(x: torch.Tensor) -> torch.Tensor:
    """An upper bound of ``e^x`` for an exponent ``x`` computed in float64 with one rounding
    (relative ``2^-53``; ``e^-inf`` stays 0): the exponent moved up by twice that, a float64
    exp within 1 ulp, raised by two more, plus ``2^-1074``: below the normal range the exp
    is a multiple of that within half of one (a review: up to 1.5x below ``e^x`` on
    ``[-745.1, -708]``, and 0 past -745.13)."""
    y = torch.exp(torch.where(x < 0, x * (1 - 2 * U64), x * (1 + 2 * U64))) * (1 + 4 * U64)
    return torch.where(x > -math.inf, y + 2.0**-1074, y)


def exp_down(x: torch.Tensor) -> torch.Tensor:
    """A lower bound of ``e^x`` (>= 0) for an exponent ``x`` computed in float64 with one
    rounding: :func:`exp_up`'s mirror, the exponent moved down by twice that, the exp
    lowered by two more ulps and ``2^-1074`` (below the normal range a float64 exp may
    round up by half of that; a review found its upper twin's undercount there)."""
    y = torch.exp(torch.where(x < 0, x * (1 + 2 * U64), x * (1 - 2 * U64))) * (1 - 4 * U64)
    return (y - 2.0**-1074).clamp_min(0.0)


@torch.no_grad()
def lse_bound(
    x: torch.Tensor,
    u: float,
    dim: int = -1,
    *,
    u_acc: float | None = None,
    model: Any = "libm",
    order: str = "recursive",
    block: int | None = None,
    min_normal: float = 2.0**-126,
) -> torch.Tensor:
    """Absolute error bound of the shifted log-sum-exp y = m + log sum_i exp(x_i - m), m = max x.

    Computed in precision ``u`` (subtraction, exp, log, final add; sum in ``u_acc``, default
    ``u``). With d_i = x_i - m <= 0, e_i = exp(d_i) and s = sum e_i >= 1:

    - fl(x_i - m) = d_i (1 + delta), so exp sees a relative error exp(u |d_i|) - 1, and exp
      itself adds ``exp_rel`` (relative) and ``min_normal`` (absolute, for underflow);
    - the sum adds ``sum_gamma * sum ê_i``; so |ŝ - s| <= E with
      E = sum_i e_i ((1 + r_i) exp(u |d_i|) - 1) + n min_normal + sum_gamma * (s + that);
    - log: |log ŝ - log s| <= -log(1 - E / s) (inf if E >= s), plus ``log_abs`` of the result;
    - the final add rounds once: u |ŷ|.

    This is the algorithm of Blanchard, Higham and Higham (2021, Alg. 2.1) with bounds
    re-derived for our ulp models (docs/bounds/rounding.md).

    Parameters
    ----------
    x : torch.Tensor
        Real floating tensor, at least 1-D with an entry along ``dim``; ``-inf`` entries
        are masked out (exact zeros).
    u : float
        Unit roundoff of the computation.
    dim : int, optional
        The reduced dimension (default -1).
    u_acc : float, optional
        Unit roundoff of the sum, in ``[0, 1)``; defaults to ``u``.
    model : str or Elementary, optional
        Accuracy model of exp and log (a key of ``ELEMENTARY``, default ``"libm"``).
    order : {"recursive", "pairwise", "blocked"}, optional
        Summation order, as :func:`sum_gamma`.
    block : int, optional
        Block size for ``"blocked"``.
    min_normal : float, optional
        Absolute underflow term per exp (default fp32's smallest normal, 2**-126).

    Returns
    -------
    torch.Tensor
        float64, ``x``'s shape without ``dim``: the bound on ``|computed y - y|``, rounded up
        with :func:`upper`; ``inf`` where the sum's error may reach the sum.

    Raises
    ------
    TypeError, ValueError
        Naming ``x``: not a real floating tensor, a scalar, or no entry along ``dim``;
        also for ``dim``, ``u``, ``u_acc``, ``order`` or ``block`` out of range, or an
        unknown ``model``.

    Notes
    -----
    Error: a sound worst-case bound under the declared exp/log model.
    """
    x, dim = _check_rows(x, dim)
    ua = u if u_acc is None else _check_u(u_acc, "u_acc")
    x = x.double()
    n = x.shape[dim]
    m = x.amax(dim=dim, keepdim=True)
    d = x - m
    e = torch.exp(d)
    r = exp_rel(d.abs(), u, model)
    # Entries at -inf are masked out: their weight is an exact zero.
    pert = torch.where(torch.isinf(d), 0.0, e * excess(torch.log1p(r) + u * d.abs()))
    s = e.sum(dim=dim)
    g = sum_gamma(n, ua, order, block)
    err_s = pert.sum(dim=dim) + (~torch.isinf(d)).sum(dim=dim) * min_normal
    err_s = err_s + g * (s + err_s)
    ratio = upper(err_s / s, n + 8)
    ok = ratio < 1.0
    dlog = torch.where(ok, -torch.log1p(-torch.where(ok, ratio, 0.0)), torch.inf)
    logs = torch.log(s)
    log_err = log_abs(logs.abs() + dlog, u, model)
    y_abs = (m.squeeze(dim) + logs).abs() + dlog + log_err
    total = dlog + log_err + u * y_abs
    return upper(total, n + 16)


def _live_count(d: torch.Tensor, dim: int) -> torch.Tensor:
    """Number of entries along ``dim`` that are not masked out (-inf)."""
    return (~torch.isinf(d)).sum(dim=dim, keepdim=True)


@torch.no_grad()
def softmax_bound(
    x: torch.Tensor,
    u: float,
    dim: int = -1,
    *,
    u_acc: float | None = None,
    model: Any = "libm",
    order: str = "recursive",
    block: int | None = None,
    min_normal: float = 2.0**-126,
) -> torch.Tensor:
    """Elementwise absolute error bound of the shifted softmax p_i = exp(x_i - m) / sum exp(x - m).

    Computed as ê_i = fl(exp(fl(x_i - m))), ŝ = fl(sum ê), p̂_i = fl(ê_i / ŝ) in precision ``u``
    (sum in ``u_acc``). With a_i = (1 + exp_rel) exp(u |d_i|) - 1 the relative error of ê_i and
    E the error of ŝ as in :func:`lse_bound`,
    |p̂_i - p_i| <= p_i [(1 + a_i)(1 + u) / (1 - E/s) - 1] + (min_normal (1 + u)) / (s - E).
    Blanchard, Higham and Higham (2021), Sec. 3, re-derived for our ulp models.

    Parameters
    ----------
    x, u, dim, u_acc, model, order, block, min_normal
        As in :func:`lse_bound`.

    Returns
    -------
    torch.Tensor
        float64, ``x``'s shape: the elementwise bound on ``|p̂_i - p_i|``, rounded up with
        :func:`upper`; ``inf`` in rows where the sum's error may reach the sum.

    Raises
    ------
    TypeError, ValueError
        As :func:`lse_bound`.

    Notes
    -----
    Error: a sound worst-case bound under the declared exp/log model.
    """
    x, dim = _check_rows(x, dim)
    ua = u if u_acc is None else _check_u(u_acc, "u_acc")
    x = x.double()
    n = x.shape[dim]
    m = x.amax(dim=dim, keepdim=True)
    d = x - m
    e = torch.exp(d)
    a = excess(torch.log1p(exp_rel(d.abs(), u, model)) + u * d.abs())
    a = torch.where(torch.isinf(d), 0.0, a)  # masked (-inf) entries are exact zeros
    s = e.sum(dim=dim, keepdim=True)
    g = sum_gamma(n, ua, order, block)
    err_s = (e * a).sum(dim=dim, keepdim=True) + _live_count(d, dim) * min_normal
    err_s = err_s + g * (s + err_s)
    rel_s = err_s / s
    p = e / s
    ok = rel_s < 1.0
    denom = torch.where(ok, 1.0 - rel_s, torch.ones_like(rel_s))
    live = ~torch.isinf(d)
    rel = excess(torch.log1p(a) + math.log1p(u) - torch.log1p(torch.where(ok, -rel_s, 0.0)))
    bound = p * rel + live * min_normal * (1.0 + u) / (s * denom)
    bound = torch.where(ok, bound, torch.full_like(bound, math.inf))
    # p (its sum: n), times rel, which carries rel_s's sums over n (err_s and s: 2n)
    return upper(bound, 3 * n + 16)


def lognum_sum_bound(
    n: Any,
    log_abs_sum: Any,
    log_abs_value: Any,
    dtype: torch.dtype = torch.float64,
    term_log_error: Any = 0.0,
) -> torch.Tensor:
    """|computed log|s| - log|s|| of a signed lognum reduction of n terms.

    -log(1 - r) + e_ulp with r = 4 (n + 2) u64 kappa + (e^eps - 1) kappa, kappa =
    sum |x_i| / |sum x_i| (the lognum layer's proved bound,
    :func:`attnprec.lognum.signed_sum_error_bound`, which this delegates to); inf when
    r >= 1 (the sign may then be wrong).
    """
    from attnprec.lognum import signed_sum_error_bound

    return signed_sum_error_bound(n, log_abs_sum, log_abs_value, dtype, term_log_error)


def lognum_sum_rel(
    n: Any,
    log_abs_sum: Any,
    log_abs_value: Any,
    dtype: torch.dtype = torch.float64,
    term_log_error: Any = 0.0,
) -> torch.Tensor:
    """Relative error bound expm1(:func:`lognum_sum_bound`) of the value of the reduction."""
    return torch.expm1(lognum_sum_bound(n, log_abs_sum, log_abs_value, dtype, term_log_error))
