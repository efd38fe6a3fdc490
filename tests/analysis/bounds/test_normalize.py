"""The certified float64 softmax every normalized bound starts from (``_rows.normalize``).

Its radius must contain the softmax of every exact log-weight vector within ``sigma`` of
the float64 one: checked against mpmath at 60 digits on the vectors that push one weight
to its extremes (``logw_j +- sigma_j``, the others the opposite way), over logit spreads
that underflow float64, large offsets, masks and wide ``sigma``.
"""

from __future__ import annotations

import math

import mpmath
import pytest
import torch

from attnprec.analysis.bounds._rows import blocks, normalize

mpmath.mp.dps = 60


def _exact(logw: list[float], shift: list[float]) -> list[mpmath.mpf]:
    x = [mpmath.mpf(a) + mpmath.mpf(s) for a, s in zip(logw, shift, strict=True)]
    top = max(x)
    e = [mpmath.exp(a - top) for a in x]
    tot = mpmath.fsum(e)
    return [a / tot for a in e]


CASES = {
    "plain": (0.0, 1.0, 1e-14),
    "offset": (900.0, 3.0, 1e-12),  # logits far from 0: the radius follows the spread only
    "underflow": (0.0, 400.0, 1e-13),  # weights below float64's range
    "wide_sigma": (0.0, 2.0, 0.3),
    "tiny_sigma": (-5.0, 0.5, 0.0),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("causal", [False, True])
def test_radius_contains_every_exact_softmax(case: str, causal: bool) -> None:
    mu, spread, sig = CASES[case]
    g = torch.Generator().manual_seed(len(case))
    n = 7
    q = torch.zeros(1, n, 1, dtype=torch.float64)
    v = torch.randn(1, n, 2, generator=g, dtype=torch.float64)
    blk = next(iter(blocks(q, q, v, causal)))
    logw = mu + spread * torch.randn(1, n, n, generator=g, dtype=torch.float64)
    sigma = sig * torch.rand(1, n, n, generator=g, dtype=torch.float64)
    nz = normalize(logw, sigma, v, blk)
    assert torch.isfinite(nz.pi).all()
    for i in range(n):
        m = i + 1 if causal else n
        lw, sg = logw[0, i, :m].tolist(), sigma[0, i, :m].tolist()
        for j in range(m):
            for sign in (1, -1):
                shift = [-sign * s for s in sg]
                shift[j] = sign * sg[j]
                p = _exact(lw, shift)
                err = abs(p[j] - mpmath.mpf(float(nz.p[0, i, j])))
                assert err <= float(nz.pi[0, i, j]), (case, i, j, float(err))
        if causal:
            assert (nz.p[0, i, m:] == 0).all() and (nz.pi[0, i, m:] == 0).all()


def test_radius_is_first_order() -> None:
    """The radius is sigma plus a few float64 roundings per unit of distance to the row
    maximum, relative to each weight: not inflated by the logits' offset."""
    g = torch.Generator().manual_seed(1)
    n = 64
    q = torch.zeros(1, n, 1, dtype=torch.float64)
    v = torch.randn(1, n, 1, generator=g, dtype=torch.float64)
    blk = next(iter(blocks(q, q, v, False)))
    base = torch.randn(1, n, n, generator=g, dtype=torch.float64)
    sigma = torch.full_like(base, 1e-12)
    for offset in (0.0, 1e4):
        nz = normalize(base + offset, sigma, v, blk)
        rel = nz.pi / nz.p
        dist = (base.amax(-1, keepdim=True) - base).amax()
        # 2 sigma: the weight's own and the normalizer's share; the rest float64 roundings
        assert float(rel.amax()) <= 2e-12 + 16 * 2.0**-53 * (float(dist) + 8)


def test_row_without_keys_is_zero() -> None:
    q = torch.zeros(1, 2, 1, dtype=torch.float64)
    v = torch.ones(1, 2, 1, dtype=torch.float64)
    km = torch.tensor([[False, False]])
    blk = next(iter(blocks(q, q, v, False, key_mask=km)))
    nz = normalize(
        torch.zeros(1, 2, 2, dtype=torch.float64), torch.zeros(1, 2, 2, dtype=torch.float64), v, blk
    )
    assert (nz.p == 0).all() and (nz.pi == 0).all() and not math.isnan(float(nz.y.sum()))


@pytest.mark.parametrize("peaked", [False, True])
def test_deviation_contains_the_exact_sum(peaked: bool) -> None:
    """``Normalized.deviation`` bounds ``sum_j w_j |v_j - y|`` for every ``y`` within
    ``eps_y`` of the float64 one (60-digit sums); on rows whose every key is among the
    heaviest (the first 16 of a causal block) it is that sum up to the radius's share; and
    it is inf (never NaN) where a weight is."""
    g = torch.Generator().manual_seed(7 + peaked)
    n, dv = 40, 3
    q = torch.zeros(1, n, 1, dtype=torch.float64)
    v = 3 * torch.randn(1, n, dv, generator=g, dtype=torch.float64) + 1
    blk = next(iter(blocks(q, q, v, True)))
    logw = (20.0 if peaked else 0.5) * torch.randn(1, n, n, generator=g, dtype=torch.float64)
    nz = normalize(logw, torch.full_like(logw, 1e-9), v, blk)
    w = blk.masked(nz.p * torch.rand(1, n, n, generator=g, dtype=torch.float64), 0.0)
    (dev,) = nz.deviation([w])
    for i in range(n):
        wi = [mpmath.mpf(float(w[0, i, j])) for j in range(i + 1)]
        for c in range(dv):
            y, e = mpmath.mpf(float(nz.y[0, i, c])), mpmath.mpf(float(nz.eps_y[0, i, c]))
            exact = max(
                mpmath.fsum(
                    wj * abs(mpmath.mpf(float(v[0, j, c])) - y - s) for j, wj in enumerate(wi)
                )
                for s in (e, -e)
            )
            bound = float(dev[0, i, c])
            assert bound >= exact, (i, c)
            if i < 16:
                assert bound <= float(exact + 2 * e * mpmath.fsum(wi)) * (1 + 1e-12), (i, c)
    w[0, -1, 0] = math.inf
    (dev_inf,) = nz.deviation([w])
    assert torch.isinf(dev_inf[0, -1]).all() and not torch.isnan(dev_inf).any()


def test_causal_blocks_take_more_early_rows() -> None:
    """Causal row blocks hold rows x visible keys within the budget (at least the floor of
    rows), so early blocks, seeing few keys, take more rows; every row once, in order."""
    from attnprec.analysis.bounds._rows import LONG_BUDGET, MIN_ROWS

    n, budget = 600, 4096
    x = torch.zeros(1, n, 1, dtype=torch.float64)
    got = list(blocks(x, x, x, True, budget=budget))
    assert torch.equal(torch.cat([b.idx for b in got]), torch.arange(n))
    sizes = [b.idx.numel() for b in got]
    for b in got:
        r, m = b.idx.numel(), b.k.shape[-2]
        assert m == int(b.idx.max()) + 1
        assert r * m <= budget or r <= MIN_ROWS and r * m <= LONG_BUDGET
    assert sizes[0] == 64  # the most rows r with r x r keys within the budget
    rows = torch.tensor([0, 5, 300, 599])  # sampled rows, sorted: the same rule
    assert torch.equal(torch.cat([b.idx for b in blocks(x, x, x, True, rows, budget)]), rows)


@pytest.mark.parametrize("rows", [None, torch.tensor([0, 3, 4, 90, 91, 200, 299])])
def test_causal_masks_touch_only_the_hidden_corner(rows: torch.Tensor | None) -> None:
    """A plain causal block hides only keys past its first row: ``masked`` and
    ``visible_amax`` touch those columns only, ``visible`` and ``sees`` count from the row
    index; each equals the full mask's result, in place or not, for every operand shape a
    bound passes."""
    n = 300
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, n, 3, generator=g, dtype=torch.float64)
    bad = torch.rand(2, n, generator=g) < 0.01
    for b in blocks(x, x, x, True, rows, budget=2048):
        assert b.causal_only and b.mask is not None
        full = ~b.mask
        r, m = b.idx.numel(), b.k.shape[-2]
        for shape in [(2, r, m), (3, 2, r, m), (2, r, 1), (1, 1, m)]:
            t = torch.randn(*shape, generator=g, dtype=torch.float64)
            want = t.masked_fill(full, -7.0)
            got = b.masked(t, -7.0)
            assert torch.equal(got, want) and torch.equal(t, t.clone())
            assert got is not t or not full.any()
            for dim in (-1, (0, -1)):  # visible_amax copies only the hidden corner
                want_max = t.masked_fill(full, -math.inf).amax(dim, keepdim=True)
                assert torch.equal(b.visible_amax(t, dim), want_max)
            if t.shape == want.shape:
                t2 = t.clone()
                assert torch.equal(b.masked(t2, -7.0, inplace=True), want)
                assert torch.equal(t2, want)
        assert torch.equal(b.visible, b.mask.sum(-1).amax(0).to(torch.float64))
        held = bad[:, b.k0 : b.k0 + m]
        assert torch.equal(b.sees(held), (b.mask & held.unsqueeze(-2)).any(-1))


@pytest.mark.parametrize("window", [None, 40])
@pytest.mark.parametrize("rows", [None, torch.tensor([0, 3, 4, 90, 91, 200, 299])])
def test_per_key_arrays_and_prefix_extremes_form_once_per_stream(
    rows: torch.Tensor | None, window: int | None
) -> None:
    """``Block.per_key`` forms its array once per stream and gives each block its keys'
    slice (a replaced block with other values forms its own); ``vmax`` and named
    ``vrange``, continuing a causal stream's prefix extremes, equal the masked extremes of
    each block's own keys."""
    from dataclasses import replace

    from attnprec.analysis.bounds._rows import Visible, stream

    n = 300
    g = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(2, n, 3, generator=g, dtype=torch.float64) for _ in range(3))
    calls, seen = [], []

    def fn(x: torch.Tensor) -> torch.Tensor:
        calls.append(x is v)
        return x.abs() + 1.0

    def block(b):  # noqa: ANN001, ANN202
        seen.append(b.idx)
        got = b.per_key("|v| + 1", fn)
        assert torch.equal(got, b.v.abs() + 1.0)
        other = replace(b, v=b.v * 2)
        assert torch.equal(other.per_key("|v| + 1", fn), 2 * b.v.abs() + 1.0)
        # a view of the same memory, of the same shape, is not the stream's slice either
        first = b.v.as_strided(b.v.shape, (b.v.stride(0), 0, 1))
        assert torch.equal(replace(b, v=first).per_key("|v| + 1", fn), first.abs() + 1.0)
        mask = torch.ones(1, b.idx.numel(), b.k.shape[-2], dtype=torch.bool)
        mask = mask if b.mask is None else b.mask
        vis = mask.unsqueeze(-1)
        want_hi = torch.where(vis, got.unsqueeze(1), -math.inf).amax(-2)
        want_lo = torch.where(vis, -got.unsqueeze(1), math.inf).amin(-2)
        assert torch.equal(b.vmax(got, "|v| + 1"), want_hi)
        lo, hi = b.vrange(-got, got, "+-(|v| + 1)")
        assert torch.equal(lo, want_lo) and torch.equal(hi, want_hi)
        return {"hi": hi}

    vis = Visible(True, window=window)
    out = stream(block, q, k, v, vis, rows, budget=2048)
    assert out["hi"].shape[1] == (n if rows is None else rows.numel())
    assert sum(calls) == 1  # once on the stream's values; the replaced blocks on their own
    assert len(calls) == 1 + 2 * len(seen)


def test_per_row_arrays_follow_rows_in_any_order() -> None:
    """Arrays formed once per judged row are read at each row's place among ``rows``,
    whatever their order (a review: ``searchsorted`` on unsorted rows gave a row another
    row's absorbed share, its level 3.3e-5 off, and raised on decreasing rows)."""
    from attnprec.analysis.bounds._featured import featured_rounding
    from attnprec.analysis.precision import Precision

    n = 24
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, n, x, generator=g, dtype=torch.float64) for x in (4, 4, 3))
    v[0, 20] *= 80
    v[1, 2] *= -90
    prec = Precision("fp16", "fp16", "fp32")

    def bound(rows: torch.Tensor) -> dict[str, torch.Tensor]:
        return featured_rounding(q, k, v, prec, 0.5, True, 5.0, (1.0, 1.0, 0.5), rows)

    for rows in (torch.tensor([13, 3, 19, 0, 12, 14, 16, 23]), torch.arange(n - 1, -1, -3)):
        got, srt = bound(rows), bound(rows.sort().values)
        back = rows.argsort().argsort()
        for key in ("sound", "typical"):
            # (the blocks hold other rows: float64 evaluation order only, 1.9e-13 measured;
            # the defect was 1.7e-5)
            torch.testing.assert_close(got[key], srt[key][:, back], rtol=1e-12, atol=0)


def test_favor_key_exponents_are_formed_once_per_sequence(monkeypatch) -> None:  # noqa: ANN001
    """FAVOR+'s blocks take the keys' exponents from the sequence's, once: the running key
    maxima continue across blocks, so a block's own product, which may differ in its last
    bits, mixed two evaluations of one key (a review)."""
    from attnprec.analysis.bounds import favor
    from attnprec.analysis.precision import Precision

    calls = []
    real = favor.favor_exponents

    def counted(x, W, sc, terms, keys, precision):  # noqa: ANN001, ANN202
        calls.append(keys)
        return real(x, W, sc, terms, keys, precision)

    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 600, 8, generator=g, dtype=torch.float64) for _ in range(3))
    W = torch.randn(16, 8, generator=g, dtype=torch.float64)
    prec = Precision("bf16")
    want = favor.favor_rounding(q, k, v, prec, 8**-0.5, True, 5.0, W)
    monkeypatch.setattr(favor, "favor_exponents", counted)
    got = favor.favor_rounding(q, k, v, prec, 8**-0.5, True, 5.0, W)
    assert calls.count(True) == 1 and calls.count(False) > 2
    assert all(torch.equal(got[key], want[key]) for key in ("sound", "typical"))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("batch", [(), (3,), (64,), (4, 48)])
def test_blocks_count_the_batch_in_their_budget(batch: tuple[int, ...], causal: bool) -> None:
    """A row block's temporaries are ``[..., B, rows, keys]`` (times width): with many heads
    or channels the blocks take fewer rows (at least one), within LONG_BUDGET, and still
    cover every row once, in order."""
    from attnprec.analysis.bounds._rows import LONG_BUDGET, blocks

    n, width = 700, 3
    q = torch.zeros(*batch, n, 4, dtype=torch.float64)
    k, v = torch.zeros(*batch, n, 4, dtype=torch.float64), torch.zeros(1, n, 2)
    nb = math.prod(batch)
    seen = []
    for blk in blocks(q, k, v, causal, budget=2**12, width=width):
        cells = nb * blk.idx.numel() * blk.k.shape[-2] * width
        assert cells <= max(LONG_BUDGET, nb * blk.k.shape[-2] * width)
        seen.append(blk.idx)
    assert torch.equal(torch.cat(seen), torch.arange(n))


@pytest.mark.parametrize("batch", [1, 3])
def test_basis_groups_are_the_separate_products(batch: int) -> None:
    """Weights of one :class:`Basis` group are formed side by side and multiplied in one
    product: every aggregate equals the separate products' up to their summation order
    (within ``2 gamma_m`` of ``|w| @ |rhs|``), and a weight outside any group is formed
    alone."""
    from attnprec.analysis.bounds.quotient import Basis
    from attnprec.analysis.bounds.rounding import U64, gamma

    g = torch.Generator().manual_seed(11)
    n, dv = 50, 3
    q = torch.zeros(batch, n, 1, dtype=torch.float64)
    v = torch.randn(batch, n, dv, generator=g, dtype=torch.float64)
    blk = next(iter(blocks(q, q, v, True)))
    logw = torch.randn(batch, n, n, generator=g, dtype=torch.float64)
    nz = normalize(logw, torch.full_like(logw, 1e-9), v, blk)
    x = torch.rand(3, batch, n, n, generator=g, dtype=torch.float64)
    makers = {name: (lambda o, i=i: torch.mul(nz.p, x[i], out=o)) for i, name in enumerate("abc")}
    mat = v.abs()
    grouped = Basis(nz, makers, (mat,), (("a", "b"),))
    alone = Basis(nz, makers, (mat,))
    tol = 2 * gamma(n, U64)
    rhs = torch.cat([nz.v_center, mat], -1)
    for name in "abc":
        w = grouped.weight(name)
        assert torch.equal(w, alone.weight(name))
        for basis in (grouped, alone):
            basis.agg(name, mat), basis.agg(name, "sq")
        for kind, r in (("prod", rhs), ("vv", nz.vv)):
            diff = grouped._agg[(name, kind)] - alone._agg[(name, kind)]
            assert torch.all(diff.abs() <= tol * (w @ r.abs())), (name, kind)
        assert torch.equal(grouped.agg(name, "sum"), alone.agg(name, "sum"))
    assert set(grouped._bufs) == {("a", "b"), ("c",)}


def test_an_all_zero_matrix_is_left_out_of_the_products() -> None:
    """A value-shaped matrix of zeros (the values' load errors where every load is exact)
    has zero aggregates, and the products' right-hand side leaves it out (a third of the
    softmax bound's grouped product); the other matrices' aggregates are unchanged."""
    from attnprec.analysis.bounds.quotient import Basis

    g = torch.Generator().manual_seed(12)
    n, dv = 40, 3
    q = torch.zeros(1, n, 1, dtype=torch.float64)
    v = torch.randn(1, n, dv, generator=g, dtype=torch.float64)
    blk = next(iter(blocks(q, q, v, True)))
    logw = torch.randn(1, n, n, generator=g, dtype=torch.float64)
    nz = normalize(logw, torch.full_like(logw, 1e-9), v, blk)
    makers = {"a": lambda o: torch.mul(nz.p, 2.0, out=o)}
    zero, mat = torch.zeros_like(v), v.abs()
    with_zero, without = Basis(nz, makers, (zero, mat)), Basis(nz, makers, (mat,))
    assert torch.equal(with_zero.agg("a", zero), torch.zeros(1, n, dv, dtype=torch.float64))
    assert torch.equal(with_zero.agg("a", mat), without.agg("a", mat))
    assert with_zero._rhs is not None and with_zero._rhs.shape[-1] == 2 * dv
