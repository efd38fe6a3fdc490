"""The audit's power: does it flag defective kernels, and never correct ones?

Runs :func:`attnprec.analysis.audit.audit` on the kernel zoo of ``benchmarks/_kernels_zoo.py``
(exact emulations of a declared precision): for every method and declaration, the correct
kernel, its correct variants (summation orders, blocking, FMA, online and chunked
schedules) and a defect suite (classes x severity ladders), on every input family of
:func:`attnprec.testing.make_inputs` (fixed seeds). Writes
``benchmarks/results/audit_power.json`` (every figure) and ``docs/audit_power.md``.

Run: ``python benchmarks/audit_power.py [--quick] [--workers 2] [--evaluation state]``
(``state``: the bounds of log, linear, FAVOR+, gated and the SSMs evaluated from key states,
results in ``audit_power_state.json``; the doc is written for the full pair-evaluated run only).

Definitions (per method and declaration):

- a case is one kernel on one input family under one declaration; it is *flagged* at the
  sound level when some element is ``violated``, at the probabilistic level when some
  element is ``violated`` or ``atypical``; ``unbounded`` and ``undecided`` elements are
  counted apart (neither a pass nor a detection);
- false positives: flagged cases of the correct kernel and its variants (each under every
  declaration it is correct under);
- a defect level is flagged when one of its cases is; its *size* R is the largest, over
  the families, of ``max error of the defect / max error of the kernel it was applied to``
  on the same inputs (max errors against the exact method on the stored inputs, the
  audit's rounding check); levels whose output equals the base kernel's bit for bit on
  every family are no-ops and left out, and so are levels within the declaration
  (:func:`_kernels_zoo.allowed`: an approximate exp or reciprocal inside the declared
  ulps is a correct kernel; a flag on one is counted as a false positive);
- power ratio: the least R of a flagged level (the smallest defect the audit catches);
  largest miss: the greatest R of a level not flagged (the largest defect it lets pass).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _kernels_zoo as Z  # noqa: E402
from attnprec.analysis.audit import audit  # noqa: E402
from attnprec.testing.inputs import FAMILIES  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
STORAGES = ("fp32", "fp16", "bf16")


def _finite(x: float) -> Any:
    """JSON-safe float (inf and NaN as strings)."""
    if x is None:
        return None
    x = float(x)
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return x


def _num(x: Any) -> float:
    if isinstance(x, str):
        return float(x)
    return math.nan if x is None else float(x)


#: The figures of one case, in the order of its list in the JSON.
CASE_FIELDS = (
    "within", "atypical", "undecided", "unbounded", "violated",
    "max_error", "max_bound", "typical_bound", "tightness", "typical_tightness",
)  # fmt: skip
#: Defect cases add their size and whether the output equals the base kernel's bit for bit.
DEFECT_FIELDS = (*CASE_FIELDS, "ratio", "identical")


def _case(rep: Any) -> dict[str, Any]:
    """The figures of one audited case (the rounding check: the output against the exact
    method on the stored inputs; the counts are over both checks)."""
    c = rep.cases[0]
    chk = c.rounding if c.rounding is not None else c.total
    counts = dict(c.counts)
    out = {
        "counts": counts,
        "err": _finite(chk.max_error),
        "bound": _finite(chk.max_bound),
        "typical_bound": _finite(chk.typical_bound),
        "tightness": _finite(chk.tightness),
        "typical_tightness": _finite(chk.typical_tightness),
        "flag_sound": counts["violated"] > 0 or bool(c.mutated),
        "flag_prob": counts["violated"] + counts["atypical"] > 0 or bool(c.mutated),
    }
    if out["flag_prob"]:
        out["worst"] = {
            key: _finite(val) if isinstance(val, float) else val for key, val in chk.worst.items()
        }
    return out


def _round(x: Any) -> Any:
    if isinstance(x, float) and math.isfinite(x) and x != 0:
        return float(f"{x:.4g}")
    return x


def _pack(c: dict[str, Any], fields: tuple[str, ...]) -> list[Any]:
    """A case as a list in the order of ``fields``."""
    vals = {**c["counts"], "max_error": c["err"], "max_bound": c["bound"]}
    vals |= {key: c.get(key) for key in fields if key not in vals}
    return [_round(vals[key]) for key in fields]


def _packed(res: dict[str, Any]) -> dict[str, Any]:
    """The results of one declaration with every case as a list (``CASE_FIELDS``), the
    worst element of any flagged case of a correct kernel kept."""
    for kr in res["kernels"].values():
        for dc in kr["declarations"].values():
            fams = dc["families"]
            worst = {f: c["worst"] for f, c in fams.items() if "worst" in c}
            dc["families"] = {f: _pack(c, CASE_FIELDS) for f, c in fams.items()}
            if worst:
                dc["flagged_worst"] = worst
    for dc in res["defects"].values():
        for lv in dc["levels"]:
            lv["families"] = {f: _pack(c, DEFECT_FIELDS) for f, c in lv["families"].items()}
    return res


def dump(obj: Any, level: int = 0) -> str:
    """JSON with one key per line down to the cases, whose lists stay on one line."""
    pad = " " * level
    if isinstance(obj, dict) and obj:
        items = [f'{pad} {json.dumps(str(k))}: {dump(v, level + 1).lstrip()}' for k, v in
                 obj.items()]  # fmt: skip
        return pad + "{\n" + ",\n".join(items) + "\n" + pad + "}"
    return pad + json.dumps(obj, separators=(",", ":"))


def _ratio(err: float, base: float) -> float:
    if math.isnan(err):
        return math.inf
    if base > 0:
        return err / base
    return 1.0 if err == 0 else math.inf


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """One method and storage format: every declaration with that storage."""
    torch.set_num_threads(1)
    method, decls, n, d = job["method"], job["decls"], job["n"], job["d"]
    t0 = time.time()
    dtype = Z.DECLARATIONS[decls[0]].storage.torch_dtype
    inputs = {
        fam: Z.method_inputs(method, fam, n=n, d=d, dtype=dtype, seed=1000 + FAMILIES.index(fam))
        for fam in job["families"]
    }
    out: dict[str, Any] = {}
    for decl in decls:
        prec = Z.DECLARATIONS[decl]
        zoo = Z.zoo(method, prec)
        outputs: dict[str, dict[str, torch.Tensor]] = {}
        base_cases: dict[str, dict[str, Any]] = {}

        def audit_one(spec: Z.KernelSpec, p: Any, fam: str, y: torch.Tensor) -> dict[str, Any]:
            q, k, v, params = inputs[fam]
            rep = audit(
                lambda *a, _y=y, **kw: _y.clone(),
                method, q, k, v, precision=p, family=fam, kernel=spec.name, **params,
                **spec.how, bound_options=job.get("bound_options"),
            )  # fmt: skip
            return _case(rep)

        def run_kernel(spec: Z.KernelSpec, fam: str) -> torch.Tensor:
            q, k, v, params = inputs[fam]
            return spec.fn(q.clone(), k.clone(), v.clone(), **params)

        correct_like = [zoo["correct"], *zoo["variants"]]
        kern: dict[str, Any] = {}
        for spec in correct_like:
            outputs[spec.name] = {fam: run_kernel(spec, fam) for fam in inputs}
            decl_cases = {}
            for p in spec.valid:
                key = "declared" if p == spec.precision else "any_schedule"
                decl_cases[key] = {
                    "block": _block_name(p.block),
                    "families": {
                        fam: audit_one(spec, p, fam, outputs[spec.name][fam]) for fam in inputs
                    },
                }
            base_cases[spec.name] = decl_cases["declared"]["families"]
            kern[spec.name] = {
                "block": _block_name(spec.precision.block),
                "identical_to_correct": all(
                    torch.equal(outputs[spec.name][f], outputs["correct"][f]) for f in inputs
                ),
                "declarations": decl_cases,
            }
        defects: dict[str, Any] = {}
        for cls, ladder in zoo["defects"].items():
            levels = []
            for spec in ladder:
                base_out, base_case = outputs[spec.base], base_cases[spec.base]
                fams: dict[str, Any] = {}
                for fam in inputs:
                    y = run_kernel(spec, fam)
                    same = torch.equal(y, base_out[fam])
                    if same:
                        case = dict(base_case[fam], identical=True)
                    else:
                        case = dict(audit_one(spec, spec.precision, fam, y), identical=False)
                    case["ratio"] = _finite(_ratio(_num(case["err"]), _num(base_case[fam]["err"])))
                    fams[fam] = case
                noop = all(c["identical"] for c in fams.values())
                within = Z.allowed(cls, spec.precision, spec.level)
                levels.append(
                    {
                        "level": _finite(spec.level) if isinstance(spec.level, float) else
                        spec.level,
                        "label": spec.name.split("@", 1)[1],
                        "noop": noop,
                        "allowed": within,
                        "flag_sound": any(c["flag_sound"] for c in fams.values()),
                        "flag_prob": any(c["flag_prob"] for c in fams.values()),
                        "size": _finite(max(_num(c["ratio"]) for c in fams.values())),
                        "families": fams,
                    }
                )  # fmt: skip
            defects[cls] = {
                "base": ladder[0].base,
                "block": _block_name(ladder[0].precision.block),
                "what": Z.DEFECTS[cls].what,
                "levels": levels,
            }
        out[decl] = {
            "precision": Z.DECLARATIONS[decl].describe(),
            "kernels": kern,
            "defects": defects,
        }
        out[decl]["summary"] = summarize(out[decl])
        _packed(out[decl])
        print(
            f"  [{time.time() - t0:6.1f}s] {method:8s} {decl:13s} "
            + _one_line(out[decl]["summary"]),
            flush=True,
        )
    return {"method": method, "decls": out, "seconds": time.time() - t0}


def _block_name(b: int | None) -> Any:
    if b is None:
        return None
    return "ONE_PASS" if b >= Z.ONE_PASS else b


def summarize(res: dict[str, Any]) -> dict[str, Any]:
    """False positives, flagged fractions, power ratios and misses of one declaration."""
    fp_s = fp_p = n_cases = unb = und = 0
    fp_list = []
    for name, kr in res["kernels"].items():
        for key, dc in kr["declarations"].items():
            for fam, c in dc["families"].items():
                n_cases += 1
                unb += c["counts"]["unbounded"]
                und += c["counts"]["undecided"]
                if c["flag_sound"]:
                    fp_s += 1
                if c["flag_prob"]:
                    fp_p += 1
                if c["flag_sound"] or c["flag_prob"]:
                    fp_list.append(
                        {"kernel": name, "declaration": key, "family": fam, **c["counts"]}
                    )
    correct = res["kernels"]["correct"]["declarations"]["declared"]["families"]
    classes = {}
    sizes = {"prob": {"hit": [], "miss": []}, "sound": {"hit": [], "miss": []}}
    d_unb = d_und = n_allowed = fp_allowed_s = fp_allowed_p = 0
    n_levels = max(len(dc["levels"]) for dc in res["defects"].values())
    per_level = {lvl: {"applicable": 0, "sound": 0, "prob": 0} for lvl in range(1, n_levels + 1)}
    for cls, dc in res["defects"].items():
        live = [lv for lv in dc["levels"] if not (lv["noop"] or lv["allowed"])]
        for i, lv in enumerate(dc["levels"], 1):
            if lv["allowed"] and not lv["noop"]:
                n_allowed += 1
                fp_allowed_s += lv["flag_sound"]
                fp_allowed_p += lv["flag_prob"]
            if lv["noop"] or lv["allowed"]:
                continue
            per_level[i]["applicable"] += 1
            per_level[i]["sound"] += lv["flag_sound"]
            per_level[i]["prob"] += lv["flag_prob"]
            for c in lv["families"].values():
                if not c["identical"]:
                    d_unb += c["counts"]["unbounded"]
                    d_und += c["counts"]["undecided"]
            for lvl in ("prob", "sound"):
                key = "hit" if lv[f"flag_{lvl}"] else "miss"
                sizes[lvl][key].append((_num(lv["size"]), cls, lv["label"]))
        if not live:
            classes[cls] = {"applicable": False}
            continue
        top = live[-1]

        def first(lvl: str, _live: list = live) -> Any:
            hit = [lv for lv in _live if lv[f"flag_{lvl}"]]
            return None if not hit else {"label": hit[0]["label"], "size": hit[0]["size"]}

        classes[cls] = {
            "applicable": True,
            "severe_label": top["label"],
            "severe_size": top["size"],
            "severe_flag_sound": top["flag_sound"],
            "severe_flag_prob": top["flag_prob"],
            "first_flag_prob": first("prob"),
            "first_flag_sound": first("sound"),
            "max_size": _finite(max(_num(lv["size"]) for lv in live)),
            "never_flag_prob": not any(lv["flag_prob"] for lv in live),
            "never_flag_sound": not any(lv["flag_sound"] for lv in live),
        }
    app = [c for c in classes.values() if c["applicable"]]

    def pick(lst: list, fn: Any) -> Any:
        if not lst:
            return None
        s, cls, label = fn(lst, key=lambda t: t[0])
        return {"ratio": _finite(s), "defect": f"{cls}@{label}"}

    return {
        "correct_max_error": _finite(max(_num(c["err"]) for c in correct.values())),
        "correct_max_bound": _finite(max(_num(c["bound"]) for c in correct.values())),
        "correct_typical_bound": _finite(max(_num(c["typical_bound"]) for c in correct.values())),
        "correct_tightness": _finite(min(_num(c["tightness"]) for c in correct.values())),
        "correct_typical_tightness": _finite(
            min(_num(c["typical_tightness"]) for c in correct.values())
        ),
        "fp_cases": n_cases,
        "fp_sound": fp_s,
        "fp_prob": fp_p,
        "fp_list": fp_list,
        "allowed_levels": n_allowed,
        "allowed_flagged_sound": fp_allowed_s,
        "allowed_flagged_prob": fp_allowed_p,
        "unbounded_elements_correct": unb,
        "undecided_elements_correct": und,
        "unbounded_elements_defects": d_unb,
        "undecided_elements_defects": d_und,
        "classes_applicable": len(app),
        "classes_flagged_severe_sound": sum(c["severe_flag_sound"] for c in app),
        "classes_flagged_severe_prob": sum(c["severe_flag_prob"] for c in app),
        "per_level": per_level,
        "power_prob": pick(sizes["prob"]["hit"], min),
        "power_sound": pick(sizes["sound"]["hit"], min),
        "miss_prob": pick(sizes["prob"]["miss"], max),
        "miss_sound": pick(sizes["sound"]["miss"], max),
        "classes": classes,
    }


def _fmt(x: Any, spec: str = ".3g") -> str:
    if x is None:
        return "-"
    v = _num(x)
    if math.isinf(v):
        return "inf"
    return format(v, spec)


def _one_line(s: dict[str, Any]) -> str:
    pp, ps = s["power_prob"], s["power_sound"]
    return (
        f"FP sound {s['fp_sound']}/{s['fp_cases']} prob {s['fp_prob']}; flagged (severe) "
        f"prob {s['classes_flagged_severe_prob']}/{s['classes_applicable']} sound "
        f"{s['classes_flagged_severe_sound']}/{s['classes_applicable']}; power prob "
        f"{_fmt(pp and pp['ratio'])} sound {_fmt(ps and ps['ratio'])}; miss prob "
        f"{_fmt(s['miss_prob'] and s['miss_prob']['ratio'])} sound "
        f"{_fmt(s['miss_sound'] and s['miss_sound']['ratio'])}"
    )


def _jobs(
    methods: list[str], decls: list[str], n: int, d: int, fams: list[str], evaluation: str
) -> list[dict[str, Any]]:
    cost = {"log": 5, "taylor": 4, "polynomial": 4, "favor": 4, "gated": 3, "softmax": 3}
    cost["linear"] = cost["semiring"] = 2
    cost["selective_scan"] = cost["ssm"] = cost["h3"] = 3
    opts = None if evaluation == "pairs" else {"evaluation": evaluation}
    if opts is not None:  # taylor's zoo kernels are of the quadratic (scores) form
        methods = [m for m in methods if m in ("log", "linear", "favor", *Z.GATED)]
    jobs = []
    for m in methods:
        for st in STORAGES:
            ds = [x for x in decls if Z.DECLARATIONS[x].storage.name == st]
            if ds:
                jobs.append({"method": m, "decls": ds, "n": n, "d": d, "families": fams,
                             "bound_options": opts})  # fmt: skip
    jobs.sort(key=lambda j: -cost.get(j["method"], 1) * len(j["decls"]))
    return jobs


#: Fixed remarks at the end of the doc (true of any run: they follow from the definitions).
NOTES = [
    "- A defect is flagged only where its error exceeds the bound, so the power ratio of a",
    "  declaration cannot be much smaller than the bound's slack over the correct kernel",
    "  (the *bound/err* column), except on elements where the correct kernel happens to be",
    "  far inside its bound (a defect can be flagged with size 1: it moves a small output",
    "  element by an ulp, while the max error sits on a large one). Where the store to",
    "  fp16/bf16 dominates the error (fp32 compute and accumulate) the bound is within a",
    "  small factor of the observed error; where the kernel's own arithmetic dominates",
    "  (fp32 storage, narrow compute or accumulate) it is not, and at these sizes the",
    "  probabilistic level does not close the gap: with n <= 64 terms per sum its tail",
    "  factor (about 6-7 at confidence 1 - 1e-6 spread over the elements) is close to",
    "  sqrt(n), so it is barely below the worst case (at n = 256 it reaches further for",
    '  softmax and log under fp32: "Power at n = 256", in the twenty-sixth session\'s',
    "  reviews below).",
    "- The zoo's exp and division are correctly rounded (float64 then one rounding); the",
    "  declarations keep the default elementary model (exp 4 ulp, division 2 ulp), which",
    "  the `elementary_limit` and `stress` variants exercise (exp off by 3 ulp of fp32 after",
    "  the argument product `x * fl(log2 e)`, division off by 1 ulp, fp32 flush to zero,",
    '  sums largest term first). A CPU kernel could declare `elementary="libm"`.',
    "- Each kernel runs once per input family; `audit` receives a function returning that",
    "  output (the kernels are deterministic and never write into their inputs).",
    "- Cases of the correct kernels: each audited under the declaration its author would",
    "  write and under `block=None` where that is also valid (not for the chunks of gated",
    "  attention and the SSMs, whose decays exp a sum of up to `block` log-gates). A",
    '  blocked declaration says `block_sums="separate"`: the zoo sums each block of keys on',
    "  its own before adding it to the running sums.",
]


def write_doc(path: Path, data: dict[str, Any]) -> None:
    """docs/audit_power.md from the results."""
    meta = data["meta"]
    L: list[str] = []
    L += [
        "---",
        "orphan: true",  # not in the index's toctree (yet): keeps `sphinx-build -W` quiet
        "---",
        "",
        "# Audit power: defects caught, correct kernels passed",
        "",
        "How well does `attnprec.analysis.audit` separate correct kernels from defective",
        "ones? `benchmarks/audit_power.py` audits a zoo of kernels "
        "(`benchmarks/_kernels_zoo.py`) that",
        "emulate a declared `Precision` exactly on the CPU (every elementwise operation",
        "rounded to the compute format, every product and addition of a sum to the",
        "accumulate format, sums as explicit loops, one rounding at the store): for each",
        "method and declaration the correct kernel, correct variants (pairwise, blocked and",
        "largest-first summation, FMA dot products, online softmax, a two-pass softmax",
        "(`passes=2`: the exps recomputed against a first pass's sum), chunked linear-time",
        "forms, taylor's features in Based's form with its constants split over both sides,",
        "the polynomial's weights by Horner in compute (its chunked forms: degree-2",
        "features, the coefficients on the query side), a one-term semiring's weights",
        "`c exp(lam (s - m))` from the row maximum (the audit's `SoftMaxPlus(0.5)`, the",
        "quadratic form only),",
        "exp and division at the edge of the accuracy model, fp32 flush to zero) and",
        "a defect suite, each defect class with a severity ladder from mild to severe.",
        "The state-space models (`ssd`, `selective_scan`, the LTI `ssm`, `h3`) run through",
        "the gated recurrence their bounds reduce them to (docs/bounds/ssm.md): the kernel",
        "forms the log-gates `fl(A dt)` (`fl(delta A)`), the keys `fl(dt B)` (Euler's",
        "`fl(delta B)`; the zero-order hold's `fl(fl(expm1(fl(delta A))) / A) B`, the LTI",
        "SSM's default) and the skip `fl(D x)` in compute and adds the skip to the output's",
        "sum; H3 forms its shifted keys (each tap's product in compute, their sum in",
        "accumulate, held in compute) and decays by its loaded log-decays; the LTI SSM's",
        "variants add its",
        "direct convolution (one exp per lag, sums over the lags). Their parameters are the",
        "audit's own (`default_params`: every regime of the decay, a state carried over",
        "the first three quarters of the sequence). FAVOR+ (`favor`, an orthogonal",
        "projection of 2 d features) forms its feature exponents `W x' - |x'|^2 / 2 -",
        "log(m) / 2` in compute (the projection rounded to it), shifts each query's features",
        "by their largest and each key's by its own largest, then by the largest over the",
        "keys; its chunked forms carry the state in units of the running largest key",
        "exponent, rescaled when a chunk raises it (declared blocks of 16 and 64). Its bound",
        "under 16-bit compute is vacuous (docs/bounds/favor.md), so those rows show no power.",
        "",
        "Regenerate with:",
        "",
        "```",
        f"{meta['command']}",
        "```",
        "",
        f"Run on {meta['date']} in {meta['wall_seconds']:.0f} s wall time "
        f"({meta['workers']} worker process(es), {meta['machine']}, torch {meta['torch']}); "
        f"n_q = n_k = {meta['n']}, d = {meta['d']}, families {', '.join(meta['families'])} "
        f"(one fixed seed each); {meta['audits']} audits.",
        "",
        "## How to read the tables",
        "",
        "A *case* is one kernel on one input family under one declaration. It is flagged at",
        "the **sound** level when an element is `violated` (certified outside the worst-case",
        "bound: a proof of a defect, or of an unsound bound), at the **probabilistic** level",
        "when an element is `violated` or `atypical` (outside the probabilistic bound at",
        "confidence 1 - 1e-6 per case). `unbounded` and `undecided` elements are neither a",
        "pass nor a detection; they are counted apart.",
        "",
        "- **FP**: flagged cases among the correct kernel and its variants, each audited under",
        "  the declaration its author would write and, where also valid, `block=None` (any",
        "  schedule). The sound level must show 0.",
        "- **flagged**: defect classes whose most severe level is flagged, out of the classes",
        "  that change the output under this declaration (a level whose output equals the",
        "  base kernel's bit for bit on every family is a no-op and left out, e.g.",
        "  `values_narrow` at p >= 11 with fp16 storage, or `acc_narrow` at p = 16 with an",
        "  fp16 accumulator), and so is a level within the declaration: an approximate exp or",
        "  reciprocal inside the declared ulps is a correct kernel, whose flag would be a false",
        "  positive (counted in the overview): `exp_sin` at k = 22 anywhere, k >= 13 in fp16",
        "  compute, every level in bf16 compute; `exp2_poly` at P >= 5 in fp16 compute, P >= 4",
        "  in bf16; `rcp_approx` at k >= 16 in fp16 compute, k >= 13 in bf16.",
        "- **size** of a defect level: the largest, over the families, of its max error divided",
        "  by the max error of the kernel it was applied to, on the same inputs (errors",
        "  against the exact method on the stored inputs: the audit's rounding check, which",
        "  for taylor leaves out the Taylor truncation).",
        "- **power**: the size of the smallest flagged defect level (over all classes); **miss**:",
        "  the size of the largest defect level that is not flagged (`-`: none missed). The",
        "  project's target is power <= 4 in every declaration; a miss above 4 means a",
        "  defect that multiplies the error by that much passes the audit.",
        "- **bound/err**: the correct kernel's max sound bound over its max error (max over",
        "  the families): how far the bound sits above what a correct kernel does.",
        "",
        "Declarations: `fp32`, `fp16`, `bf16` are storage formats with fp32 compute and",
        "accumulate; `X-c16-a16` computes and accumulates in the storage format X;",
        "`X-c16-a32` computes in X and accumulates in fp32 (what PyTorch does with half",
        "tensors: matmul and sum accumulate in fp32 and round once). Blocks: softmax, log,",
        "taylor and linear declare `ONE_PASS` (the row maxima are found before any exp;",
        "no rescaling), gated and the SSMs `None` (their recurrence); online/chunked",
        "variants declare their block, and the online, gate-prefix and carry defects keep",
        "the block of the variant they are applied to (`online16`: 16, `chunked16`: 16).",
        "",
    ]
    L += _overview(data)
    for method in meta["methods"]:
        L += [f"## {method}", ""]
        L += [
            "| declaration | bound/err | FP sound | FP prob | unbounded/undecided (correct; "
            "defects) | flagged prob | flagged sound | power prob | power sound | miss prob "
            "| miss sound |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for decl, res in data["results"][method].items():
            s = res["summary"]
            bt = _num(s["correct_max_bound"]) / max(_num(s["correct_max_error"]), 1e-300)
            L.append(
                f"| {decl} | {_fmt(bt)} | {s['fp_sound']}/{s['fp_cases']} | "
                f"{s['fp_prob']}/{s['fp_cases']} | {s['unbounded_elements_correct']}/"
                f"{s['undecided_elements_correct']}; {s['unbounded_elements_defects']}/"
                f"{s['undecided_elements_defects']} | "
                f"{s['classes_flagged_severe_prob']}/{s['classes_applicable']} | "
                f"{s['classes_flagged_severe_sound']}/{s['classes_applicable']} | "
                f"{_pw(s['power_prob'])} | {_pw(s['power_sound'])} | {_pw(s['miss_prob'])} | "
                f"{_pw(s['miss_sound'])} |"
            )
        L += [""]
        decls = list(data["results"][method])
        L += [
            "Smallest flagged level per defect class (probabilistic / sound; `-`: never "
            "flagged, `n/a`: no-op, within the declaration or not applicable) and, in",
            "brackets, its size:",
            "",
            "| defect | " + " | ".join(decls) + " |",
            "|---|" + "---|" * len(decls),
        ]
        cls_names = list(
            dict.fromkeys(c for r in data["results"][method].values() for c in r["defects"])
        )
        for cls in cls_names:
            cells = []
            for decl in decls:
                c = data["results"][method][decl]["summary"]["classes"].get(cls)
                if not c or not c["applicable"]:
                    cells.append("n/a")
                    continue
                cells.append(f"{_first(c['first_flag_prob'])} / {_first(c['first_flag_sound'])}")
            L.append(f"| {cls} | " + " | ".join(cells) + " |")
        L += [""]
        L += [
            "Fraction of classes flagged per ladder step (1 mild ... 5 severe), prob / sound:",
            "",
        ]
        L += ["| declaration | " + " | ".join(f"step {i}" for i in range(1, 6)) + " |"]
        L += ["|---|" + "---|" * 5]
        for decl, res in data["results"][method].items():
            pl = res["summary"]["per_level"]
            cells = []
            for i in range(1, 6):
                e = pl.get(i) or pl.get(str(i))
                if not e or not e["applicable"]:
                    cells.append("-")
                else:
                    cells.append(f"{e['prob']}/{e['applicable']} / {e['sound']}/{e['applicable']}")
            L.append(f"| {decl} | " + " | ".join(cells) + " |")
        L += [""]
    L += ["## Defects never flagged", ""]
    L += [
        "Defect classes (applicable, not a no-op) that no level flags at the probabilistic",
        "level, with the size of their largest level (a size near 1 is a defect the",
        "rounding of the correct kernel hides; a large one is a gap in the audit):",
        "",
        "| method | declaration | defect | largest size |",
        "|---|---|---|---|",
    ]
    for method in meta["methods"]:
        for decl, res in data["results"][method].items():
            for cls, c in res["summary"]["classes"].items():
                if c.get("applicable") and c["never_flag_prob"]:
                    L.append(f"| {method} | {decl} | {cls} | {_fmt(c['max_size'])} |")
    L += [""]
    L += ["Flagged at the probabilistic level but never at the sound level:", ""]
    L += ["| method | declaration | defect | largest size |", "|---|---|---|---|"]
    for method in meta["methods"]:
        for decl, res in data["results"][method].items():
            for cls, c in res["summary"]["classes"].items():
                if c.get("applicable") and c["never_flag_sound"] and not c["never_flag_prob"]:
                    L.append(f"| {method} | {decl} | {cls} | {_fmt(c['max_size'])} |")
    L += [""]
    L += ["## The defect classes", ""]
    L += ["| class | what | ladder (mild to severe) | methods |", "|---|---|---|---|"]
    for name, dc in Z.DEFECTS.items():
        lv = ", ".join(Z._fmt_level(x) for x in dc.levels)
        L.append(f"| {name} | {dc.what} | {dc.level_name} = {lv} | {', '.join(dc.methods)} |")
    L += [""]
    L += ["## Notes", "", *NOTES, ""]
    path.write_text("\n".join(L), encoding="utf-8")


def _overview(data: dict[str, Any]) -> list[str]:
    """The headline figures over every method and declaration."""
    res = data["results"]
    rows = [(m, dn, r["summary"]) for m, per in res.items() for dn, r in per.items()]
    fp_s = sum(s["fp_sound"] for _, _, s in rows)
    fp_p = sum(s["fp_prob"] for _, _, s in rows)
    n_fp = sum(s["fp_cases"] for _, _, s in rows)
    L = ["## Overview", ""]
    n_al = sum(s["allowed_levels"] for _, _, s in rows)
    fp_als = sum(s["allowed_flagged_sound"] for _, _, s in rows)
    fp_alp = sum(s["allowed_flagged_prob"] for _, _, s in rows)
    L += [
        f"- False positives of the correct kernels and variants: {fp_s} of {n_fp} cases at "
        f"the sound level, {fp_p} at the probabilistic level; of the defect levels within "
        f"their declaration (that change the output), {fp_als} of {n_al} flagged at the "
        f"sound level, {fp_alp} at the probabilistic level.",
    ]

    def worst(key: str) -> float:
        return max(
            (_num(s[key]["ratio"]) for _, _, s in rows if s[key] is not None), default=math.nan
        )

    for lvl in ("prob", "sound"):
        met = [f"{m}/{dn}" for m, dn, s in rows if s[f"miss_{lvl}"] is None or
               _num(s[f"miss_{lvl}"]["ratio"]) <= 4]  # fmt: skip
        L.append(
            f"- {'Probabilistic' if lvl == 'prob' else 'Sound'} level: {len(met)} of "
            f"{len(rows)} method/declaration pairs miss no defect of size above 4 "
            f"(largest miss anywhere: {_fmt(worst(f'miss_{lvl}'))})."
        )
    by_decl: dict[str, list[float]] = {}
    for _, dn, s in rows:
        bt = _num(s["correct_max_bound"]) / max(_num(s["correct_max_error"]), 1e-300)
        by_decl.setdefault(dn, []).append(bt)
    L.append(
        "- Sound bound over the correct kernel's error (max bound / max error, range over "
        "the methods): "
        + "; ".join(f"{dn} {_fmt(min(v))}-{_fmt(max(v))}" for dn, v in by_decl.items())
        + "."
    )
    L.append("")
    return L


def _pw(p: Any) -> str:
    if not p:
        return "-"
    return f"{_fmt(p['ratio'])} ({p['defect']})"


def _first(f: Any) -> str:
    if not f:
        return "-"
    return f"{f['label']} ({_fmt(f['size'])})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller run (n=32, 2 families)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--methods", nargs="*", default=list(Z.METHODS))
    ap.add_argument("--decls", nargs="*", default=list(Z.DECLARATIONS))
    ap.add_argument("--n", type=int, default=None)
    ap.add_argument(
        "--families", nargs="*", choices=list(FAMILIES), default=None,
        help="input families (default: all; 'real' holds 128 tokens, so larger n leave it out)",
    )  # fmt: skip
    ap.add_argument(
        "--evaluation", choices=["pairs", "state"], default="pairs",
        help="the bounds' evaluation (state: the linear-time methods only)",
    )  # fmt: skip
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--doc", type=Path, default=None)
    ap.add_argument("--from-json", type=Path, default=None, help="only rewrite the doc")
    args = ap.parse_args(argv)
    if args.from_json is not None:
        data = json.loads(args.from_json.read_text(encoding="utf-8"))
        write_doc(args.doc or ROOT / "docs" / "audit_power.md", data)
        return 0
    n = args.n or (32 if args.quick else 64)
    d = 16
    fams = ["typical", "outliers"] if args.quick else list(FAMILIES)
    if args.families:
        fams = list(args.families)
    # only the whole default study rewrites the published doc and its JSON
    whole = (
        args.n is None and not args.families
        and args.methods == list(Z.METHODS) and args.decls == list(Z.DECLARATIONS)
    )  # fmt: skip
    name = "audit_power" + ("_quick" if args.quick else "")
    name += "" if args.evaluation == "pairs" else f"_{args.evaluation}"
    name += "" if whole or args.quick else "_partial"
    out = args.out or RESULTS / f"{name}.json"
    full = whole and not args.quick and args.evaluation == "pairs"
    doc = args.doc or (ROOT / "docs" / "audit_power.md" if full else None)
    jobs = _jobs(args.methods, args.decls, n, d, fams, args.evaluation)
    t0 = time.time()
    results: dict[str, dict[str, Any]] = {j["method"]: {} for j in jobs}
    print(f"audit_power: {len(jobs)} jobs on {args.workers} workers, n={n}, d={d}", flush=True)
    if args.workers <= 1:
        done = [run_job(j) for j in jobs]
    else:
        import multiprocessing as mp

        done = []
        with ProcessPoolExecutor(args.workers, mp_context=mp.get_context("spawn")) as ex:
            futs = [ex.submit(run_job, j) for j in jobs]
            for i, f in enumerate(as_completed(futs), 1):
                r = f.result()
                done.append(r)
                print(
                    f"[{time.time() - t0:6.1f}s] job {i}/{len(jobs)} done: {r['method']} "
                    f"({r['seconds']:.0f} s)",
                    flush=True,
                )
    for r in done:
        results[r["method"]].update(r["decls"])
    # methods and declarations in their canonical order, whatever order the jobs finished in
    results = {m: results[m] for m in Z.METHODS if m in results}
    for m in results:
        results[m] = {dn: results[m][dn] for dn in Z.DECLARATIONS if dn in results[m]}
    wall = time.time() - t0
    audits = 0
    for m in results.values():
        for res in m.values():
            for kr in res["kernels"].values():
                audits += sum(len(dc["families"]) for dc in kr["declarations"].values())
            for dc in res["defects"].values():
                for lv in dc["levels"]:
                    audits += sum(not c[-1] for c in lv["families"].values())
    cmd = "python benchmarks/audit_power.py" + (" --quick" if args.quick else "")
    cmd += "" if args.evaluation == "pairs" else f" --evaluation {args.evaluation}"
    data = {
        "meta": {
            "command": cmd,
            "date": _dt.date.today().isoformat(),
            "wall_seconds": wall,
            "workers": args.workers,
            "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "torch": torch.__version__,
            "n": n,
            "d": d,
            "families": fams,
            "seeds": {f: 1000 + FAMILIES.index(f) for f in fams},
            "methods": list(results),
            "declarations": {k: Z.DECLARATIONS[k].describe() for k in args.decls},
            "audits": audits,
            "case_fields": list(CASE_FIELDS),
            "defect_case_fields": list(DEFECT_FIELDS),
        },
        "results": results,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(dump(data) + "\n", encoding="utf-8")
    print(f"wrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    if doc is not None:
        write_doc(doc, data)
        print(f"wrote {doc.relative_to(ROOT) if doc.is_relative_to(ROOT) else doc}")
    print(f"\n{audits} audits in {wall:.0f} s")
    for m, per in results.items():
        for decl, res in per.items():
            print(f"{m:8s} {decl:13s} {_one_line(res['summary'])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
