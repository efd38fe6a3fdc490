"""benchmarks/sata_study.py at a tiny size, against independent certified references."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

from attnprec.analysis.bounds.taylor import taylor_error_bound
from attnprec.analysis.reference import reference
from attnprec.testing.inputs import make_inputs

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "sata_study.py"
_spec = importlib.util.spec_from_file_location("sata_study", _PATH)
assert _spec is not None and _spec.loader is not None
S = sys.modules.setdefault("sata_study", importlib.util.module_from_spec(_spec))
if not hasattr(S, "study"):
    _spec.loader.exec_module(S)

N, D, ROWS = 256, 16, 24


@pytest.fixture(scope="module")
def case():
    g = torch.Generator().manual_seed(3)
    q, k, v = make_inputs("typical", n_q=N, d_k=D, dtype=torch.float16, generator=g)
    res = S.study(q, k, v, rows=ROWS, degrees=(1, 2, 6), minimax=True)
    return q, k, v, res


@pytest.fixture(scope="module")
def exact(case):
    """Per configuration: the exact error |y_P - y| per element, pinned by two arb
    references (radii: the float64 conversion of the values), as (value, slack)."""
    q, k, v, res = case
    rows = res["rows"]
    ref_s = reference("softmax", q, k, v, causal=True, rows=rows, backend="arb")
    out = {}
    for cfg in res["configs"]:
        if cfg["method"] == "taylor":
            kw = {"degree": cfg["degree"]}
        else:
            kw = {"coeffs": cfg["coeffs"]}
        name = "taylor" if cfg["method"] == "taylor" else "polynomial"
        ref = reference(name, q, k, v, causal=True, rows=rows, backend="arb", **kw)
        diff = (ref.value - ref_s.value).abs()
        rad = ref.radius + ref_s.radius
        out[cfg["method"], cfg["degree"]] = (diff, 4 * 2.0**-53 * diff + 2 * rad)
    return out


def test_intervals_hold_the_exact_error(case, exact):
    """Every element's [lo, hi] contains the exact error (disjoint from the arb enclosure
    would be a defect), and the max-error interval contains the exact max."""
    _, _, _, res = case
    rows = res["rows"]
    assert 0 in rows and N - 1 in rows and len(rows) >= ROWS
    for cfg in res["configs"]:
        key = (cfg["method"], cfg["degree"])
        diff, slack = exact[key]
        lo, hi = res["arrays"][key]
        assert bool((lo <= diff + slack).all()), key
        assert bool((hi >= diff - slack).all()), key
        assert cfg["err_max"][0] <= float(diff.max()) + float(slack.max())
        assert float(cfg["err_max"][1]) >= float(diff.max()) - float(slack.max())


def test_degree_six_beats_degree_one(case):
    _, _, _, res = case
    by = {(c["method"], c["degree"]): c for c in res["configs"]}
    assert float(by["taylor", 6]["err_max"][1]) < by["taylor", 1]["err_max"][0]
    assert float(by["taylor", 6]["err_median"][1]) < by["taylor", 1]["err_median"][0]


def test_negative_weights_counted(case):
    """Degree 1: T_1(s) = 1 + s < 0 counted directly on the float64 scores of the sampled
    rows lies between the certified and the possible counts; even degrees have none."""
    q, k, v, res = case
    idx = torch.tensor(res["rows"])
    s = (q.double()[idx] @ k.double().T) / math.sqrt(D)
    visible = torch.arange(N)[None, :] <= idx[:, None]
    direct = float(((1 + s < 0) & visible).sum()) / float(visible.sum())
    by = {(c["method"], c["degree"]): c for c in res["configs"]}
    t1 = by["taylor", 1]
    assert 0 < t1["neg_weight_frac"] <= direct <= t1["neg_weight_frac_upper"]
    for key in (("taylor", 2), ("taylor", 6)):
        assert by[key]["neg_weight_frac_upper"] == 0.0
        assert by[key]["rows_normalizer_uncertified"] == 0


def test_aposteriori_bound_agrees(case, exact):
    """The library's taylor_error_bound on the same rows holds the exact error and every
    certified lower end of the study."""
    q, k, v, res = case
    for P in (1, 6):
        bound = taylor_error_bound(q, k, v, P, causal=True, rows=res["rows"])
        diff, slack = exact["taylor", P]
        assert bool((bound >= diff - slack).all())
        assert bool((bound >= res["arrays"]["taylor", P][0]).all())


def test_bad_input_names_the_argument():
    q = torch.randn(2, 3, 8, 4)
    with pytest.raises(ValueError, match="q"):
        S.study(q, q, q, rows=2)


def test_every_early_row_is_the_studys_on_those_rows(tmp_path):
    """``--early M``: every row of the first M tokens, certified as the study certifies its
    sampled rows; a row the sample holds gets the same certified error there (causal: a
    row sees only the tokens up to it)."""
    import json

    out = tmp_path / "early.json"
    S.main(["--early", "64", "--n", "256", "--heads", "8", "--degrees", "3", "--out", str(out)])
    (res,) = json.loads(out.read_text())["results"]
    assert res["row_count"] == 64 and res["rows"] == "all" and res["of_n"] == 256
    g = torch.Generator().manual_seed(8)  # (the study's seed for d = 8)
    q, k, v = make_inputs("typical", n_q=256, d_k=8, dtype=torch.float16, generator=g)
    whole = S.study(q, k, v, rows=list(range(64)), degrees=(3,), minimax=False)
    assert res["configs"][0]["err_max"] == whole["configs"][0]["err_max"]
