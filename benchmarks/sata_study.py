"""The SATA claim, certified: how far is truncated-Taylor attention from softmax attention?

Heinsen & Kozachkov (2026, "Self-attention at constant cost per token via symmetry-aware
Taylor approximation", SATA) report that four Taylor terms (degree 3) reconstruct causal
softmax attention over 102,400 tokens with elementwise errors "of the same magnitude as
float16 resolution" (fp16 N(0, 1) inputs, head sizes 8-64, scale 1/sqrt(d), errors
measured against float64 attention). Their measured error mixes the truncation with the
rounding of their fp16 implementation; this study isolates the truncation: the *exact*
degree-P Taylor output (and the exact output of the relative-minimax polynomial of the
same degree on the score range) against the *exact* softmax output, both on the fp16
inputs as stored, with certified intervals.

Per configuration (degree P in 1..6, ``taylor`` or ``minimax``; head size d) on sampled
causal rows (first, last, the rows 2^k - 1 and a uniform draw):

- the certified error ``|y_P - y|`` per element as an interval ``[lo, hi]``: both outputs
  evaluated in float64 with certified radii (the evaluation of
  :mod:`attnprec.analysis.bounds.approximation`, streamed over row blocks; O(rows n d),
  no feature map), ``lo = |y^_P - y^| - radii``, ``hi = |y^_P - y^| + radii`` (``hi`` is the
  a-posteriori bound :func:`~attnprec.analysis.bounds.taylor.taylor_error_bound` /
  :func:`~attnprec.analysis.bounds.minimax.polynomial_error_bound`); its max and median
  over the elements (each an interval: order statistics are monotone);
- the a-priori bound ``B(R, P) max_j |v_jc - y_ic|`` with ``R`` the largest ``|s|`` over
  the sampled rows (:func:`~attnprec.analysis.bounds.taylor.taylor_output_bound`,
  :func:`~attnprec.analysis.bounds.minimax.polynomial_output_bound`; ``inf`` once the
  polynomial may be <= 0 on ``[-R, R]``);
- the fraction of (row, visible key) weights ``T_P(s) < 0`` (certified negative, and
  possibly negative), the rows whose normalizer is certified <= 0, and those whose normalizer
  is not certified nonzero (no finite certificate: a certified negative one has one);
- fp16 resolution: 2^-11 (unit roundoff), 10^-3 (``torch.finfo(float16).resolution``,
  the line SATA draws) and the half-ulp of each output in fp16; the fraction of elements
  whose certified error is within that half-ulp.

A spot check (``--check-rows``) recomputes a few rows with
:func:`attnprec.analysis.reference.reference` (the float64 backend, one row at a time)
and asserts that both certified intervals of every element overlap.

The ``real`` family (captured MiniLM activations, :mod:`attnprec.testing.real`) holds 128
tokens of head size 32: it runs at n = 128, d = 8, 16, 32, every row, 72 heads.

Run: ``python benchmarks/sata_study.py [--quick]`` (results in
``benchmarks/results/sata_study.json`` or ``sata_study_quick.json``; the plot
``docs/_static/sata_study.png`` when matplotlib is installed). Summary in docs/sata.md.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from attnprec._device import computing_on
from attnprec._validate import check_float, check_qkv, resolve_scale
from attnprec.analysis._reference_float64 import _polynomial_weights
from attnprec.analysis.bounds._rows import logits64, stream
from attnprec.analysis.bounds.approximation import polynomial_output, target_output
from attnprec.analysis.bounds.attention import sample_rows
from attnprec.analysis.bounds.minimax import (
    minimax_exp_coeffs,
    polynomial_output_bound,
    polynomial_ratio_range,
)
from attnprec.analysis.bounds.rounding import U64, gamma, upper
from attnprec.analysis.bounds.taylor import taylor_output_bound, taylor_ratio_range
from attnprec.testing.inputs import make_inputs

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PLOT = ROOT / "docs" / "_static" / "sata_study.png"
FP16_U = 2.0**-11
FP16_RESOLUTION = 1e-3  # torch.finfo(torch.float16).resolution
#: Rows with at least this many visible keys are "long context" in the summaries.
LATE = 1024


def _configs(degrees: Sequence[int], radius: float, minimax: bool) -> list[dict[str, Any]]:
    """The weight polynomials: Taylor 1/p! (float64, within relative 2^-53 of the exact
    coefficients) and, with ``minimax``, the float64 minimax coefficients on [-R, R]."""
    out = []
    for P in degrees:
        coeffs = [1.0 / math.factorial(p) for p in range(P + 1)]
        lo = taylor_ratio_range(radius, P)[0]
        out.append({"method": "taylor", "degree": P, "coeffs": coeffs, "rel": U64, "pos": lo > 0})
    if minimax:
        for P in degrees:
            c = minimax_exp_coeffs(radius, P).tolist()
            lo = polynomial_ratio_range(tuple(c), radius)[0]
            out.append({"method": "minimax", "degree": P, "coeffs": c, "rel": 0.0, "pos": lo > 0})
    return out


def _half_ulp_fp16(y: torch.Tensor) -> torch.Tensor:
    """Half the fp16 ulp at |y| (2^-25 in the subnormal range), as float64."""
    e = torch.frexp(y.abs())[1].to(torch.float64)  # |y| = m 2^e, m in [0.5, 1)
    return torch.exp2(torch.clamp(e - 12.0, min=-25.0))


def _interval(x: torch.Tensor) -> list[float]:
    return [float(x.min()), float(x.max())]


def _num(x: float) -> float | str:
    return x if math.isfinite(x) else ("inf" if x > 0 else "-inf" if x < 0 else "nan")


def study(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    rows: int | Sequence[int] | None = 512,
    degrees: Sequence[int] = (1, 2, 3, 4, 5, 6),
    minimax: bool = True,
    scale: float | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Certified truncation errors of Taylor / minimax attention against softmax (causal).

    Parameters
    ----------
    q, k, v : torch.Tensor
        ``[n, d]`` or ``[B, n, d]`` floats, taken as exact (their float values).
    rows : int or sequence of int or None
        Query rows: a count (first and last rows, the rows 2^k - 1, a uniform draw with
        ``seed``), indices, or None for every row.
    degrees : sequence of int
        Degrees P of the weight polynomials.
    minimax : bool
        Also the relative-minimax polynomials on [-R, R], R covering every score seen.
    scale : float, optional
        Score scale (default 1/sqrt(d), the method table's).

    Returns
    -------
    dict
        ``radius`` (R, an upper bound of every ``|scale q_i.k_j|`` the rows see),
        ``rows`` (indices), and per configuration (``configs``) its error interval
        statistics, bounds, weight signs and fp16 comparisons (module docstring), plus the
        per-element arrays ``lo``, ``hi`` (``[B, rows, d_v]``) under ``arrays``. Every
        error interval is certified: the exact ``|y_P - y|`` of each element lies in
        ``[lo, hi]``.
    """
    if q.dim() == 2:
        q, k, v = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_float(name, x)
        if x.dim() != 3:
            raise ValueError(f"{name}: expected [n, d] or [B, n, d], got {tuple(x.shape)}")
    n, _, d, _ = check_qkv(q, k, v, causal=True)
    sc = resolve_scale(scale, d)
    q, k, v = (x.to(torch.float64) for x in (q, k, v))
    bounds = tuple(2**j - 1 for j in range(1, n.bit_length() + 1))
    idx = sample_rows(n, rows, seed=seed, boundaries=bounds) if isinstance(rows, int) else rows
    idx = torch.arange(n) if idx is None else sample_rows(n, idx)
    assert idx is not None

    def radius(blk: Any) -> dict[str, torch.Tensor]:
        x, sig, _ = logits64(blk.q, blk.k, sc)
        a = blk.masked(x.abs() + sig, 0.0).amax(-1)
        return {"r": upper(a, 2)}

    R = float(stream(radius, q, k, v, True, idx)["r"].max())
    R = math.ceil(R * 64) / 64  # a round radius >= every score (the minimax design radius)
    cfgs = _configs(degrees, R, minimax)

    def block(blk: Any) -> dict[str, torch.Tensor]:
        tgt = target_output(blk, sc)
        vmin, vmax = blk.vrange(blk.v, blk.v)
        dev = torch.maximum(vmax - (tgt.y - tgt.eps_y), (tgt.y + tgt.eps_y) - vmin)
        vis = (blk.idx + 1).to(torch.float64).expand(q.shape[0], -1)  # causal: keys 0..i
        out = {"y": tgt.y, "ry": tgt.eps_y, "dev": upper(dev, 3), "vis": vis}
        x, sig, _ = logits64(blk.q, blk.k, sc)  # (taylor: 1/p! within 2^-53, as the bound)
        m = blk.k.shape[-2]
        for c, cfg in enumerate(cfgs):
            y, rad = polynomial_output(blk, sc, cfg["coeffs"], cfg["rel"])
            diff = (y - tgt.y).abs()  # within a relative u of |y^_P - y^|
            rad_sum = upper(rad + tgt.eps_y, 1)
            # each factor 1 -+ 4u covers the rounding before it (and of itself)
            lo = (diff * (1 - 4 * U64) - rad_sum) * (1 - 4 * U64)
            hi = upper(diff * (1 + 2 * U64) + rad_sum, 3)
            out[f"lo{c}"] = torch.nan_to_num(lo, nan=0.0).clamp_min(0.0)
            out[f"hi{c}"] = torch.where(torch.isnan(hi), math.inf, hi)
            out[f"dpos{c}"] = torch.isfinite(rad).all(-1).to(torch.float64)
            if cfg["pos"]:  # p(s) / e^s certified > 0 on [-R, R], which holds every score
                zero = torch.zeros_like(vis)
                out[f"neg{c}"] = out[f"negmaybe{c}"] = out[f"dnonpos{c}"] = zero
                continue
            w, e = _polynomial_weights(x.clone(), sig, tuple(cfg["coeffs"]), cfg["rel"])
            w, e = blk.masked(w, 0.0), blk.masked(e, 0.0)
            out[f"neg{c}"] = (w + e < 0).sum(-1).to(torch.float64)
            out[f"negmaybe{c}"] = (w - e < 0).sum(-1).to(torch.float64)
            D = w.sum(-1)
            e_D = upper(e.sum(-1) + gamma(m, U64) * w.abs().sum(-1), 4)
            out[f"dnonpos{c}"] = (D + e_D <= 0).to(torch.float64)
        return out

    got = stream(block, q, k, v, True, idx, width=4)
    y, ry, dev, vis = got["y"], got["ry"], got["dev"], got["vis"]
    half = _half_ulp_fp16((y.abs() - ry).clamp_min(0.0))
    half_hi = _half_ulp_fp16(y.abs() + ry)
    late = (vis >= LATE).unsqueeze(-1).expand_as(y)
    pairs = float(vis.sum())
    summaries, arrays = [], {}
    for c, cfg in enumerate(cfgs):
        lo, hi = got[f"lo{c}"], got[f"hi{c}"]
        if cfg["method"] == "taylor":
            B = taylor_output_bound(R, cfg["degree"])
        else:
            B = polynomial_output_bound(tuple(cfg["coeffs"]), R)
        prior = upper(B * dev, 1) if math.isfinite(B) else torch.full_like(dev, math.inf)
        prior = torch.where(dev == 0, torch.zeros_like(dev), prior)  # one key: y_P = y
        s = {
            "method": cfg["method"],
            "degree": cfg["degree"],
            "coeffs": cfg["coeffs"],
            "err_max": [float(lo.max()), _num(float(hi.max()))],
            "err_median": [float(lo.median()), _num(float(hi.median()))],
            "err_max_late": [float(lo[late].max()), _num(float(hi[late].max()))]
            if bool(late.any())
            else None,
            "aposteriori_max": _num(float(hi.max())),
            "apriori_factor": _num(B),
            "apriori_max": _num(float(prior.max())),
            "apriori_median": _num(float(prior.median())),
            "neg_weight_frac": float(got[f"neg{c}"].sum()) / pairs,
            "neg_weight_frac_upper": float(got[f"negmaybe{c}"].sum()) / pairs,
            "rows_normalizer_nonpos": int(got[f"dnonpos{c}"].sum()),
            "rows_normalizer_uncertified": int((got[f"dpos{c}"] == 0).sum()),
            "frac_within_half_ulp": float((hi <= half).to(torch.float64).mean()),
            "frac_beyond_half_ulp": float((lo > half_hi).to(torch.float64).mean()),
            "frac_within_fp16_u": float((hi <= FP16_U).to(torch.float64).mean()),
            "frac_within_1e-3": float((hi <= FP16_RESOLUTION).to(torch.float64).mean()),
        }
        summaries.append(s)
        arrays[(cfg["method"], cfg["degree"])] = (lo, hi)
    return {
        "n": n,
        "d": d,
        "heads": q.shape[0],
        "scale": sc,
        "radius": R,
        "rows": idx.tolist(),
        "row_count": int(idx.numel()),
        "elements": int(y.numel()),
        "output_abs_median": float(y.abs().median()),
        "output_abs_max": float(y.abs().max()),
        "ref_radius_max": float(ry.max()),
        "half_ulp_median": float(half.median()),
        "half_ulp_min": float(half.min()),
        "configs": summaries,
        "arrays": arrays,
    }


def spot_check(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, res: dict[str, Any], rows: list[int]
) -> int:
    """Recompute ``rows`` with :func:`attnprec.analysis.reference.reference` (float64
    backend, one row at a time) for softmax and every configuration; assert that the
    reference's certified error interval of every element overlaps the study's. Returns
    the number of elements checked."""
    from attnprec.analysis.reference import reference

    if q.dim() == 2:
        q, k, v = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
    pos = [res["rows"].index(i) for i in rows]
    ref_s = reference("softmax", q, k, v, causal=True, rows=rows, backend="float64")
    checked = 0
    for cfg in res["configs"]:
        if cfg["method"] == "taylor":
            kw: dict[str, Any] = {"degree": cfg["degree"]}
        else:
            kw = {"coeffs": cfg["coeffs"]}
        method = "taylor" if cfg["method"] == "taylor" else "polynomial"
        ref = reference(method, q, k, v, causal=True, rows=rows, backend="float64", **kw)
        diff = (ref.value - ref_s.value).abs()
        rad = ref.radius + ref_s.radius
        lo_r = (diff * (1 - 4 * U64) - rad * (1 + 4 * U64)) * (1 - 4 * U64)
        hi_r = upper(diff * (1 + 2 * U64) + rad, 3)
        lo, hi = (a[:, pos] for a in res["arrays"][(cfg["method"], cfg["degree"])])
        ok = (torch.maximum(lo, lo_r) <= torch.minimum(hi, hi_r)) | torch.isinf(hi_r)
        if not bool(ok.all()):
            raise AssertionError(
                f"{cfg['method']} degree {cfg['degree']}: the study's interval and the "
                "reference's do not overlap"
            )
        checked += int(ok.numel())
    return checked


def _plot(results: list[dict[str, Any]], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install matplotlib)")
        return
    runs = [r for r in results if r["family"] == "typical"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True, layout="constrained")
    for ax, stat, title in (
        (axes[0], "err_max", "max over sampled elements"),
        (axes[1], "err_median", "median over sampled elements"),
    ):
        for i, r in enumerate(runs):
            for method, style in (("taylor", "-o"), ("minimax", "--s")):
                cs = [c for c in r["configs"] if c["method"] == method]
                ys = [float(c[stat][1]) for c in cs]
                ax.plot([c["degree"] for c in cs], ys, style, color=f"C{i}", alpha=0.8,
                        label=f"d={r['d']} {method}")  # fmt: skip
        ax.axhline(FP16_RESOLUTION, color="k", lw=1, ls=":", label="1e-3 (finfo resolution)")
        ax.axhline(FP16_U, color="k", lw=1, ls="-.", label="2^-11 (fp16 u)")
        med = min(r["half_ulp_median"] for r in runs)
        ax.axhline(med, color="grey", lw=1, label="median fp16 half-ulp of outputs")
        ax.set(yscale="log", xlabel="degree P (P + 1 Taylor terms)", title=title)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("certified |y_P - y_softmax| (upper end)")
    axes[1].legend(fontsize=7, ncol=2)
    n = runs[0]["n"] if runs else 0
    fig.suptitle(f"Truncation error vs exact causal softmax, fp16 N(0,1) inputs, n = {n}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"plot: {path}")


def _fmt(x: float | str | None) -> str:
    if x is None:
        return "-"
    x = float(x)
    return "inf" if math.isinf(x) else "0" if x == 0 else f"{x:.2g}"


def _err(iv: list | None) -> str:
    """An error interval's upper end, or ">= lo" where the upper end is infinite."""
    if iv is None:
        return "-"
    return _fmt(iv[1]) if math.isfinite(float(iv[1])) else f">= {_fmt(iv[0])}"


def table(path: Path, family: str = "typical") -> str:
    """The docs table (markdown) from a results file: one row per configuration."""
    data = json.loads(path.read_text())
    lines = [
        "| family | d | method | P | max error | median error | max, rows >= 1024 keys "
        "| a-priori max | neg. weights | rows D <= 0 (D not certified != 0) | within half-ulp |",
        "|---|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in (r for r in data["results"] if r["family"] == family):
        for c in r["configs"]:
            lines.append(
                f"| {r['family']} | {r['d']} | {c['method']} | {c['degree']} "
                f"| {_err(c['err_max'])} | {_err(c['err_median'])} "
                f"| {_err(c['err_max_late'])} | {_fmt(c['apriori_max'])} "
                f"| {c['neg_weight_frac']:.3g} | {c['rows_normalizer_nonpos']} "
                f"({c['rows_normalizer_uncertified']}) | {c['frac_within_half_ulp']:.3f} |"
            )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="n=4096, 64 rows, d=8,16 (smoke run)")
    ap.add_argument("--n", type=int, default=102_400)
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--heads", type=int, nargs="+", default=[8, 16, 32, 64])
    ap.add_argument("--degrees", type=int, nargs="+", default=[1, 2, 3, 4, 5, 6])
    ap.add_argument("--check-rows", type=int, default=2, help="rows spot-checked by reference()")
    ap.add_argument("--no-real", action="store_true", help="skip the real-activation family")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="where the study computes (cuda: a GPU)")
    ap.add_argument("--out", type=Path, help="results file (default benchmarks/results/...)")
    ap.add_argument("--table", type=Path, help="print the markdown table of a results file")
    ap.add_argument("--family", default="typical", help="the family --table prints")
    ap.add_argument(
        "--early",
        type=int,
        metavar="M",
        help="every row of the first M tokens of the same inputs (causal: those rows see only "
        "those tokens), certified, to sata_early.json: the early rows the sample holds few of",
    )
    a = ap.parse_args(argv)
    if a.table:
        print(table(a.table, a.family))
        return
    if a.quick:
        a.n, a.rows, a.heads = 4096, 64, [8, 16]
    if a.early:
        _early(a)
        return
    results = []
    t_all = time.perf_counter()
    for d in a.heads:
        g = torch.Generator().manual_seed(a.seed + d)
        q, k, v = make_inputs("typical", n_q=a.n, d_k=d, dtype=torch.float16, generator=g)
        t0 = time.perf_counter()
        with computing_on(torch.device(a.device)):
            res = study(*(x.to(a.device) for x in (q, k, v)), rows=a.rows, degrees=a.degrees,
                        seed=a.seed)  # fmt: skip
        res["seconds"] = time.perf_counter() - t0
        chk = [res["rows"][-1], res["rows"][len(res["rows"]) // 2]][: a.check_rows]
        t1 = time.perf_counter()
        res["spot_check_elements"] = spot_check(q, k, v, res, sorted(set(chk))) if chk else 0
        res["spot_check_seconds"] = time.perf_counter() - t1
        res["family"] = "typical"
        results.append(res)
        _report(res)
    if not a.no_real:
        for d in (dd for dd in a.heads if dd <= 32):
            q, k, v = make_inputs("real", n_q=128, d_k=d, batch=(72,), dtype=torch.float16)
            t0 = time.perf_counter()
            res = study(q, k, v, rows=None, degrees=a.degrees)
            res["seconds"] = time.perf_counter() - t0
            res["family"] = "real"
            results.append(res)
            _report(res)
    for r in results:
        r.pop("arrays")
        r["rows"] = r["rows"] if r["family"] == "typical" else "all"
    out = {
        "script": "benchmarks/sata_study.py",
        "args": {key: (str(x) if isinstance(x, Path) else x) for key, x in vars(a).items()},
        "machine": platform.platform(),
        "torch": torch.__version__,
        "fp16": {"u": FP16_U, "finfo_resolution": FP16_RESOLUTION},
        "seconds": time.perf_counter() - t_all,
        "results": results,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out["device"] = torch.cuda.get_device_name() if a.device == "cuda" else "cpu"
    path = a.out or RESULTS / ("sata_study_quick.json" if a.quick else "sata_study.json")
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"results: {path} ({out['seconds']:.0f} s)")
    if not a.no_plot and not a.quick:
        _plot(results, PLOT)


def _early(a: argparse.Namespace) -> None:
    """Every row of the first ``a.early`` tokens of each head's inputs (the study's draw:
    same seeds, so the same tokens), certified as the study certifies its sampled rows,
    written to ``sata_early.json``: a maximum over sampled rows is only a lower bound of
    the maximum over every row, and the early rows, where few keys share the weight, hold
    the largest errors."""
    results = []
    t_all = time.perf_counter()
    for d in a.heads:
        g = torch.Generator().manual_seed(a.seed + d)
        q, k, v = make_inputs("typical", n_q=a.n, d_k=d, dtype=torch.float16, generator=g)
        q, k, v = (x[: a.early] for x in (q, k, v))
        t0 = time.perf_counter()
        res = study(q, k, v, rows=None, degrees=a.degrees, minimax=False)
        res["seconds"] = time.perf_counter() - t0
        res["family"] = "typical"
        res["of_n"] = a.n
        res.pop("arrays")
        res["rows"] = "all"
        results.append(res)
        _report(res)
    out = {
        "script": "benchmarks/sata_study.py --early",
        "args": {key: (str(x) if isinstance(x, Path) else x) for key, x in vars(a).items()},
        "machine": platform.platform(),
        "torch": torch.__version__,
        "seconds": time.perf_counter() - t_all,
        "results": results,
    }
    path = a.out or RESULTS / "sata_early.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"results: {path} ({out['seconds']:.0f} s)")


def _report(r: dict[str, Any]) -> None:
    print(
        f"{r['family']} n={r['n']} d={r['d']} heads={r['heads']} rows={r['row_count']} "
        f"R={r['radius']} |y| median {r['output_abs_median']:.3g} half-ulp median "
        f"{r['half_ulp_median']:.3g} ({r['seconds']:.0f} s)"
    )
    for c in r["configs"]:
        print(
            f"  {c['method']:7s} P={c['degree']} max [{c['err_max'][0]:.3g}, "
            f"{float(c['err_max'][1]):.3g}] median [{c['err_median'][0]:.3g}, "
            f"{float(c['err_median'][1]):.3g}] a-priori max {float(c['apriori_max']):.3g} "
            f"neg {c['neg_weight_frac']:.3g} D<=0 rows {c['rows_normalizer_nonpos']} "
            f"uncert {c['rows_normalizer_uncertified']} within half-ulp "
            f"{c['frac_within_half_ulp']:.3f}"
        )


if __name__ == "__main__":
    main()
