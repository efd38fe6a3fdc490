"""Published attention code under the audit: certified verdicts for third-party implementations.

Audits public implementations of the methods attnprec covers, in fp32, fp16 and bf16 storage,
on the input families ``typical``, ``outliers`` and ``sinks`` (one fixed seed each):

- Heinsen's log-space attention (``heinsen_attention.LogAttention``, GitHub
  glassroom/heinsen_attention): method ``log``;
- the pure-PyTorch reference ("naive") implementations of flash-linear-attention (PyPI
  ``fla-core``): softmax attention with grouped K/V heads and a sliding window
  (``fla/ops/attn/naive.py``), linear attention (``linear_attn``), gated linear attention
  with per-channel and scalar gates (``gla``, ``simple_gla``, recurrent and chunked), Based
  (second-order Taylor) and ReBased (squared scores): methods ``softmax``, ``gated``,
  ``linear``, ``taylor``, ``polynomial``;
- FAVOR+ of ``performer-pytorch`` (PyPI): method ``favor``.

For each implementation, storage format and family it records the element classes of
:func:`attnprec.testing.assert_attention_close` (or :func:`attnprec.analysis.audit.audit` for
the gated recurrences, whose per-position gates the assertion does not re-lay) under two
declarations: the default ``Precision(dtype)`` (fp32 work, one rounding at the store) and
the one read from the source (where the code keeps intermediates in the storage format); and
the fingerprint (:func:`attnprec.analysis.fingerprint.infer_precision`): the tightest
(compute, accumulate) declaration met.

Where the code fails its bound, :func:`evidence` runs the experiments that tell a defect of
the code from rounding (float64 runs with its epsilons on and off, the overflowing
reciprocal, the log-sums' rounding); on the first family it also records the fingerprint.

Third-party code is never copied into this project. ``--fetch`` puts it in the scratch
directory ``--sources`` at run time: ``pip download`` of the pinned PyPI packages (unpacked
there) and Heinsen's file (not on PyPI) from ``--heinsen-git``: a bare git directory (a
mirror) or a URL to clone. Functions are loaded from their files by name (their top-level
imports are not run: the names they use are provided), and called as their authors wrote
them; adapters only transpose layouts and, for Heinsen's interface, take ``log v`` and
``exp`` of the output in float64.

Run: ``python benchmarks/published_audit.py --fetch --sources /tmp/published`` (then
without ``--fetch``); ``--quick`` is one family and fp16 only. Writes
``benchmarks/results/published_audit.json`` and the tables of ``docs/published_audit.md``
(between its GENERATED markers). About 15 minutes on two shared CPU cores.
"""

from __future__ import annotations

import argparse
import ast
import datetime as _dt
import hashlib
import json
import math
import platform
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from attnprec.analysis.audit import audit_output
from attnprec.analysis.fingerprint import infer_precision
from attnprec.analysis.precision import FORMATS, ONE_PASS, Precision, round_to
from attnprec.attention import favor_attention
from attnprec.testing import BoundViolation, assert_attention_close, make_inputs

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "published_audit.json"
DOC = ROOT / "docs" / "published_audit.md"

#: PyPI packages fetched (pinned), and the files read from them.
PYPI = {"fla-core": "0.6.0", "performer-pytorch": "1.1.4", "einops": "0.8.2"}
HEINSEN_GIT = "https://github.com/glassroom/heinsen_attention"
HEINSEN_REV = "heinsen_attention/REVISION"
FILES = {
    "heinsen": "heinsen_attention/heinsen_attention/heinsen_attention.py",
    "fla_attn": "fla/ops/attn/naive.py",
    "fla_linear": "fla/ops/linear_attn/naive.py",
    "fla_gla": "fla/ops/gla/naive.py",
    "fla_simple_gla": "fla/ops/simple_gla/naive.py",
    "fla_based": "fla/ops/based/naive.py",
    "fla_rebased": "fla/ops/rebased/naive.py",
    "performer": "performer_pytorch/performer_pytorch.py",
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FAMILIES = ("typical", "outliers", "sinks")
B, H, T, D = 1, 4, 32, 16  # batch, (query) heads, positions, head size


# --------------------------------------------------------------------------------------------
# Fetching and loading third-party code


def fetch(dest: Path, heinsen_git: str) -> None:
    """Download the pinned packages into ``dest`` and unpack them there; put Heinsen's file
    there from ``heinsen_git``: a bare git directory (``git show HEAD:...``, e.g. a mirror)
    or a URL or path to ``git clone``. The commit is written beside the file."""
    dest.mkdir(parents=True, exist_ok=True)
    wheels = dest / "wheels"
    specs = [f"{name}=={ver}" for name, ver in PYPI.items()]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(wheels), *specs]
    subprocess.run(cmd, check=True)
    for whl in sorted(wheels.glob("*.whl")):
        with zipfile.ZipFile(whl) as z:
            z.extractall(dest)
    target = dest / FILES["heinsen"]
    target.parent.mkdir(parents=True, exist_ok=True)
    git_dir = Path(heinsen_git)
    if not (git_dir / "HEAD").is_file():  # not a bare repository: clone it
        git_dir = dest / "_heinsen_clone"
        if not git_dir.exists():
            subprocess.run(["git", "clone", "--bare", heinsen_git, str(git_dir)], check=True)
    git = ["git", f"--git-dir={git_dir}"]
    rel = FILES["heinsen"].split("/", 1)[1]
    text = subprocess.run([*git, "show", f"HEAD:{rel}"], check=True, capture_output=True).stdout
    target.write_bytes(text)
    rev = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True)
    (dest / HEINSEN_REV).write_text(rev.stdout.strip() + "\n")


def load(
    sources: Path, key: str, names: tuple[str, ...], provide: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The named top-level functions and classes of a third-party file, defined in a
    namespace that provides torch, ``nn``, ``F``, ``math``, einops' ``rearrange`` and
    ``repeat``, and ``provide`` (the file's own imports and other statements are not run)."""
    path = sources / FILES[key]
    if not path.exists():
        raise SystemExit(f"--sources: {path} is missing (run with --fetch first)")
    sys.path.insert(0, str(sources))  # einops, unpacked from its wheel
    try:
        import einops
    except ImportError:  # the file's functions that use it fail when called
        einops = None
    finally:
        sys.path.remove(str(sources))
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    keep = [
        n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name in names
    ]
    missing = set(names) - {n.name for n in keep}
    if missing:
        raise SystemExit(f"{path}: no top-level {sorted(missing)}")
    ns: dict[str, Any] = {
        "torch": torch, "nn": torch.nn, "F": F, "math": math, "__name__": f"_published_{key}",
        **({"rearrange": einops.rearrange, "repeat": einops.repeat} if einops else {}),
        **(provide or {}),
    }  # fmt: skip
    exec(compile(ast.Module(keep, type_ignores=[]), str(path), "exec"), ns)  # noqa: S102
    return {name: ns[name] for name in names}


def provenance(sources: Path) -> dict[str, Any]:
    """Versions and SHA-256 of the files read."""
    out: dict[str, Any] = {"files": {}}
    for key, rel in FILES.items():
        p = sources / rel
        if p.exists():
            out["files"][key] = {"path": rel, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
    for name, ver in PYPI.items():
        out[name] = ver
    rev = sources / HEINSEN_REV
    out["heinsen_attention"] = rev.read_text().strip() if rev.exists() else None
    return out


# --------------------------------------------------------------------------------------------
# The implementations, as attnprec sees them


@dataclass
class Impl:
    """One implementation: how to call it in its own layout and what it computes.

    ``call(q, k, v, extra)`` takes and returns tensors in ``layout`` (``q`` with ``H``
    heads, ``k``/``v`` with ``H // group``); ``params(inputs)`` gives attnprec's keywords
    (in the same layout as the assertion takes them); ``declared(dtype)`` the declaration
    read from the source.
    """

    name: str
    source: str
    method: str
    layout: str
    call: Callable[..., torch.Tensor]
    params: Callable[[dict[str, Any]], dict[str, Any]]
    declared: Callable[[str], Precision]
    note: str
    group: int = 1
    extra: Callable[[dict[str, Any], str], dict[str, Any]] = field(default=lambda inputs, dt: {})


def _bthd(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2)


def _same_dtype(dt: str) -> Precision:
    """Plain PyTorch in the storage format: intermediates rounded to it, fp32 sums inside
    each operation (PyTorch's CPU matmul and softmax)."""
    return Precision(dt, compute=dt, accumulate="fp32")


def _all_storage(dt: str) -> Precision:
    """Sums kept in the storage format as well (a running state or a log-sum stored in it)."""
    return Precision(dt, compute=dt, accumulate=dt)


def _fp32_inside(dt: str) -> Precision:
    """Converted to fp32 at the start, rounded once at the end."""
    return Precision(dt)


def implementations(sources: Path) -> list[Impl]:
    """Every audited implementation, loaded from ``sources``."""
    impls: list[Impl] = []

    # Heinsen: log-space attention on log V; the adapter takes log v and exp of the output
    # in float64 (log v rounded to the storage format, as the interface requires).
    LogAttention = load(sources, "heinsen", ("LogAttention",))["LogAttention"]

    def heinsen(causal: bool) -> Callable[..., torch.Tensor]:
        mod = LogAttention(is_causal=causal)  # as constructed (training mode)

        def call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **_: Any) -> torch.Tensor:
            log_v = torch.log(v.double()).to(v.dtype)
            return torch.exp(mod(q, k, log_v).double())

        return call

    for causal in (False, True):
        impls.append(
            Impl(
                f"LogAttention(is_causal={causal})", "heinsen_attention", "log", "bhtd",
                heinsen(causal), lambda i, c=causal: {"causal": c},
                _all_storage,
                "log-sums (its running sums) stored in the storage format, output a "
                "difference of two; positive values (log V)",
            )
        )  # fmt: skip

    # flash-linear-attention: softmax with grouped K/V heads and a sliding window, [B, T, H, D].
    attn = load(sources, "fla_attn", ("naive_parallel_attn",))["naive_parallel_attn"]
    for window in (None, 16):

        def call_attn(q, k, v, window=window, **_):  # type: ignore[no-untyped-def]
            return attn(q, k, v, window_size=window, causal=True)[0]

        impls.append(
            Impl(
                f"naive_parallel_attn(window_size={window})", "fla-core", "softmax", "bthd",
                call_attn,
                lambda i, w=window: {"causal": True, **({"window": w} if w else {})},
                lambda dt: Precision(dt, compute=dt, accumulate="fp32", block=ONE_PASS),
                "einsum and softmax in the storage format; 4 query heads on 2 K/V heads",
                group=2,
            )
        )  # fmt: skip

    # Linear attention: unnormalized (gated with unit gates) and normalized (linear).
    lin = load(sources, "fla_linear", ("naive_recurrent_linear_attn",))
    rec_lin = lin["naive_recurrent_linear_attn"]
    impls.append(
        Impl(
            "naive_recurrent_linear_attn", "fla-core", "gated", "bthd",
            lambda q, k, v, **_: rec_lin(q, k, v)[0],
            lambda i: {"causal": True, "log_g": torch.zeros(B, H, T, dtype=torch.float64)},
            _fp32_inside, "fp32 recurrence, rounded at the end; gates of 1",
        )
    )  # fmt: skip
    impls.append(
        Impl(
            "naive_recurrent_linear_attn(normalize=True)", "fla-core", "linear", "bthd",
            lambda q, k, v, **_: rec_lin(q, k, v, normalize=True)[0],
            lambda i: {"causal": True, "feature_map": None},
            _fp32_inside, "fp32, + 1e-10 in the normalizer; q, k positive features (elu + 1)",
            extra=lambda i, dt: {"positive_qk": True},
        )
    )  # fmt: skip

    # Gated linear attention: per-channel gates (GLA) and scalar gates (simple GLA).
    gla = load(sources, "fla_gla", ("naive_recurrent_gla",))["naive_recurrent_gla"]
    impls.append(
        Impl(
            "naive_recurrent_gla", "fla-core", "gated", "bthd",
            lambda q, k, v, gk, **_: gla(q, k, v, gk)[0],
            lambda i: {"causal": True, "log_g": i["gk"].transpose(1, 2).double()},
            _fp32_inside, "fp32 recurrence with per-channel gates",
            extra=lambda i, dt: {"gk": _gates(i, dt, per_channel=True)},
        )
    )  # fmt: skip
    sg = load(sources, "fla_simple_gla", ("naive_recurrent_simple_gla", "naive_chunk_simple_gla"))
    impls.append(
        Impl(
            "naive_recurrent_simple_gla", "fla-core", "gated", "bthd",
            lambda q, k, v, g, **_: sg["naive_recurrent_simple_gla"](q, k, v, g)[0],
            lambda i: {"causal": True, "log_g": i["g"].transpose(1, 2).double()},
            _fp32_inside, "fp32 recurrence with one gate per head and step",
            extra=lambda i, dt: {"g": _gates(i, dt, per_channel=False)},
        )
    )  # fmt: skip
    impls.append(
        Impl(
            "naive_chunk_simple_gla(chunk_size=16)", "fla-core", "gated", "bthd",
            lambda q, k, v, g, **_: sg["naive_chunk_simple_gla"](q, k, v, g, chunk_size=16)[0],
            lambda i: {"causal": True, "log_g": i["g"].transpose(1, 2).double()},
            _fp32_inside, "fp32 chunks of 16 with exp of gate-sum differences; fp32 output",
            extra=lambda i, dt: {"g": _gates(i, dt, per_channel=False)},
        )
    )  # fmt: skip

    # Based (1 + s + s^2/2) and ReBased (s^2), [B, H, T, D], computed in the storage format.
    based = load(sources, "fla_based", ("naive_parallel_based",))["naive_parallel_based"]
    rebased = load(sources, "fla_rebased", ("naive_parallel_rebased",))["naive_parallel_rebased"]
    impls.append(
        Impl(
            "naive_parallel_based", "fla-core", "taylor", "bhtd",
            lambda q, k, v, **_: based(q, k, v), lambda i: {"causal": True, "degree": 2},
            _same_dtype, "scores and weights in the storage format, + 1e-6 in the normalizer",
        )
    )  # fmt: skip
    impls.append(
        Impl(
            "naive_parallel_rebased", "fla-core", "polynomial", "bhtd",
            lambda q, k, v, **_: rebased(q, k, v),
            lambda i: {"causal": True, "coeffs": (0.0, 0.0, 1.0)},
            _same_dtype, "squared scores in the storage format, + 1e-6 in the normalizer",
        )
    )  # fmt: skip

    # Performer's FAVOR+ (softmax kernel features), non-causal and causal (its reference
    # loop without CUDA), with its eps = 1e-4 added to the features and with eps = 0.
    pf = load(
        sources, "performer",
        ("softmax_kernel", "linear_attention", "causal_linear_attention_noncuda",
         "gaussian_orthogonal_random_matrix", "orthogonal_matrix_chunk"),
        {"TORCH_GE_1_8_0": True},
    )  # fmt: skip
    draw = pf["gaussian_orthogonal_random_matrix"]

    def performer(causal: bool, eps: float) -> Callable[..., torch.Tensor]:
        def call(q, k, v, W, **_):  # type: ignore[no-untyped-def]
            qp = pf["softmax_kernel"](q, projection_matrix=W, is_query=True, eps=eps)
            kp = pf["softmax_kernel"](k, projection_matrix=W, is_query=False, eps=eps)
            if causal:  # its own eps = 1e-6 in the denominator, zeroed with the features'
                den_eps = {} if eps else {"eps": 0.0}
                return pf["causal_linear_attention_noncuda"](qp, kp, v, **den_eps)
            return pf["linear_attention"](qp, kp, v)

        return call

    for causal in (False, True):
        for eps in (1e-4, 0.0):
            impls.append(
                Impl(
                    f"FastAttention softmax kernel (causal={causal}, eps={eps:g})",
                    "performer-pytorch", "favor", "bhtd", performer(causal, eps),
                    lambda i, c=causal: {"causal": c, "projection": i["W"].double()},
                    _all_storage if causal else _same_dtype,
                    "features, D_inv = 1 / normalizer and sums in the storage format"
                    + ("; prefix sums carried in it; denominator + 1e-6 (0 with eps=0)"
                       if causal else ""),
                    extra=lambda i, dt: {"W": _projection(draw, dt)},
                )
            )  # fmt: skip
    return impls


def _gates(inputs: dict[str, Any], dt: str, per_channel: bool) -> torch.Tensor:
    """Log-gates as flash-linear-attention draws them (logsigmoid / 16), in ``[B, T, H(, D)]``
    and exactly representable in the storage format."""
    g = torch.Generator().manual_seed(1234)
    shape = (B, T, H, D) if per_channel else (B, T, H)
    x = F.logsigmoid(torch.randn(*shape, generator=g, dtype=torch.float64)) / 16
    return round_to(x, dt).to(DTYPES[dt])


def _projection(draw: Callable[..., torch.Tensor], dt: str) -> torch.Tensor:
    """Performer's default projection, drawn by its own ``gaussian_orthogonal_random_matrix``
    (orthogonal Gaussian blocks, its default d log d features) from a fixed seed, rounded to
    the storage format (the code casts the projection to the inputs' dtype itself)."""
    torch.manual_seed(99)
    w = draw(int(D * math.log(D)), D).double()
    return round_to(w, dt).to(torch.float32)


# --------------------------------------------------------------------------------------------
# Inputs and one audit


def inputs(family: str, dt: str, impl: Impl) -> dict[str, Any]:
    """q [B, H, T, D], k/v [B, H / group, T, D] of ``family`` in ``dt`` (fixed seed), in
    the implementation's layout; positive values for Heinsen (log V); positive features
    where the method needs them."""
    g = torch.Generator().manual_seed(FAMILIES.index(family))
    q, k, v = make_inputs(family, n_q=T, d_k=D, batch=(B, H), dtype=torch.float64, generator=g)
    h_kv = H // impl.group
    k, v = k[:, :h_kv], v[:, :h_kv]
    if impl.method == "log":
        v = torch.exp2(torch.tanh(v))  # in [1/2, 2]
    x = {"q": q, "k": k, "v": v}
    out = {key: round_to(val, dt).to(DTYPES[dt]) for key, val in x.items()}
    if impl.name.endswith("normalize=True)"):
        for key in ("q", "k"):
            out[key] = round_to(F.elu(out[key].double()) + 1, dt).to(DTYPES[dt])
    out.update(impl.extra(out, dt))
    if impl.layout == "bthd":
        out.update({key: _bthd(out[key]) for key in ("q", "k", "v")})
    return out


def run_case(impl: Impl, family: str, dt: str, fingerprint: bool) -> dict[str, Any]:
    """Element classes under the default and the declared precision, and the fingerprint."""
    x = inputs(family, dt, impl)
    q, k, v = x["q"], x["k"], x["v"]
    extra = {key: val for key, val in x.items() if key not in ("q", "k", "v")}
    t0 = time.perf_counter()
    out = impl.call(q, k, v, **extra)
    params = impl.params(x)
    row: dict[str, Any] = {
        "implementation": impl.name, "source": impl.source, "method": impl.method,
        "dtype": dt, "family": family, "layout": impl.layout, "note": impl.note,
        "out_dtype": str(out.dtype).replace("torch.", ""),
    }  # fmt: skip
    for label, prec in (("default", Precision(dt)), ("declared", impl.declared(dt))):
        report = judge(impl, out, q, k, v, params, prec)
        c = report.cases
        counts = {cls: sum(case.counts[cls] for case in c) for cls in c[0].counts}
        tight = min(case.total.tightness for case in c)
        err = max(case.total.max_error for case in c)
        bound = max(case.total.max_bound for case in c)
        bad = [case for case in c if case.verdict != "ok"]
        chk = c[0].total
        if bad:
            chk = bad[0].total
            if chk.verdict == "ok" and bad[0].rounding is not None:
                chk = bad[0].rounding
        row[label] = {
            "precision": prec.describe(), "verdict": report.verdict, "counts": counts,
            "elements": sum(case.elements for case in c), "max_error": err,
            "max_bound": bound, "tightness": tight,
            "rounding_tightness": min(
                (case.rounding.tightness for case in c if case.rounding is not None),
                default=None,
            ),
            "check": chk.against, "worst": chk.worst,
        }  # fmt: skip
    if fingerprint:
        fn, qi, ki, vi, pi = internal(impl, q, k, v, extra, params)
        cands = [("fp64", "fp64"), ("fp32", "fp32")]
        if dt == "fp32":
            cands += [("bf16", "fp32")]
        else:
            cands += [(dt, "fp32"), (dt, dt)]
        fp = infer_precision(fn, impl.method, qi, ki, vi, candidates=cands, **pi)
        row["fingerprint"] = {"best": fp.best, "summary": fp.summary, "rows": [
            {"compute": r["compute"], "accumulate": r["accumulate"], "met": r["met"],
             "bound": r["bound"], "counts": r["counts"]} for r in fp.rows
        ]}  # fmt: skip
    row["seconds"] = round(time.perf_counter() - t0, 2)
    return row


def judge(
    impl: Impl,
    out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    params: dict[str, Any],
    prec: Precision,
) -> Any:
    """The assertion's report (its failure's report when it raises); the gated recurrences,
    whose per-position gates it does not re-lay, through the audit in [B, H, T, D]."""
    if impl.method == "gated":
        qi, ki, vi, oi = (_bthd(x) if impl.layout == "bthd" else x for x in (q, k, v, out))
        return audit_output(oi, "gated", qi, ki, vi, precision=prec, kernel=impl.name, **params)
    try:
        return assert_attention_close(
            out, q, k, v, method=impl.method, layout=impl.layout, precision=prec, **params
        )
    except BoundViolation as e:
        return e.report


def internal(
    impl: Impl,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    extra: dict[str, Any],
    params: dict[str, Any],
) -> tuple[Callable[..., torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """The implementation as a function of attnprec's [B, H, T, D] (K/V heads repeated),
    for the fingerprint."""
    g = impl.group

    def to_int(x: torch.Tensor, rep: bool = False) -> torch.Tensor:
        x = _bthd(x) if impl.layout == "bthd" else x
        return x.repeat_interleave(g, dim=1) if rep and g > 1 else x

    def fn(qi: torch.Tensor, ki: torch.Tensor, vi: torch.Tensor, **_: Any) -> torch.Tensor:
        kk, vv = ki[:, ::g], vi[:, ::g]  # the K/V heads as given (exact copies)
        if impl.layout == "bthd":
            qi, kk, vv = _bthd(qi), _bthd(kk), _bthd(vv)
        o = impl.call(qi.contiguous(), kk.contiguous(), vv.contiguous(), **extra)
        return _bthd(o) if impl.layout == "bthd" else o

    return fn, to_int(q), to_int(k, True), to_int(v, True), params


def evidence(sources: Path) -> dict[str, Any]:
    """Experiments that tell a defect from rounding, on the ``typical`` inputs.

    - ``performer_float64``: Performer's code run in float64 (rounding negligible) with its
      eps terms on and off, against attnprec's FAVOR+ with the same projection: the error
      that remains is the code's formula, not its precision;
    - ``performer_fp16_normalizer``: per variant and family of the fp16 runs, the smallest
      normalizer ``q' . sum k'``, the rows where it is 0 or its reciprocal (the code's
      ``D_inv``) exceeds fp16's largest finite number, and the non-finite outputs;
    - ``heinsen_bf16``: the relative error of ``LogAttention`` in bf16 against its float64
      run, and the part of it that rounding only ``log S`` and ``log Z`` (computed in
      float64) to bf16 before their difference explains.
    """
    ev: dict[str, Any] = {}
    impls = {i.name: i for i in implementations(sources)}
    name = "FastAttention softmax kernel (causal=False, eps=0)"
    pf = load(
        sources, "performer",
        ("softmax_kernel", "linear_attention", "causal_linear_attention_noncuda"),
        {"TORCH_GE_1_8_0": True},
    )  # fmt: skip
    x = inputs("typical", "fp32", impls[name])
    q, k, v, W = (x[key].double() for key in ("q", "k", "v", "W"))
    rows = []
    for causal in (False, True):
        ref = favor_attention(q, k, v, projection=W, causal=causal)
        for eps in (1e-4, 0.0):
            for den in (1e-6, 0.0) if causal else (None,):
                qp = pf["softmax_kernel"](q, projection_matrix=W, is_query=True, eps=eps)
                kp = pf["softmax_kernel"](k, projection_matrix=W, is_query=False, eps=eps)
                if causal:
                    o = pf["causal_linear_attention_noncuda"](qp, kp, v, eps=den)
                else:
                    o = pf["linear_attention"](qp, kp, v)
                err = o - ref
                rows.append({
                    "causal": causal, "feature_eps": eps, "denominator_eps": den,
                    "max_abs_error": err.abs().max().item(),
                    "row0_max_rel_error": (err[..., 0, :] / ref[..., 0, :]).abs().max().item(),
                })  # fmt: skip
    ev["performer_float64"] = rows
    fmax, over = FORMATS["fp16"].max, []
    for causal in (False, True):
        for eps in (1e-4, 0.0):
            impl = impls[f"FastAttention softmax kernel (causal={causal}, eps={eps:g})"]
            for family in FAMILIES:
                x = inputs(family, "fp16", impl)
                qp = pf["softmax_kernel"](x["q"], projection_matrix=x["W"], is_query=True, eps=eps)
                kp = pf["softmax_kernel"](x["k"], projection_matrix=x["W"], is_query=False, eps=eps)
                ks = kp.cumsum(-2) + (1e-6 if eps else 0.0) if causal else kp.sum(-2)[..., None, :]
                den = (qp * ks).sum(-1)  # the normalizer q' . sum k', as the code forms it
                out = impl.call(x["q"], x["k"], x["v"], W=x["W"])
                over.append({
                    "causal": causal, "eps": eps, "family": family, "rows": den.numel(),
                    "min_normalizer": den.min().item(),
                    "rows_normalizer_zero": int((den == 0).sum()),
                    "rows_reciprocal_overflows": int((1.0 / den.double() > fmax).sum()),
                    "nonfinite_outputs": int((~torch.isfinite(out)).sum()), "outputs": out.numel(),
                })  # fmt: skip
    ev["performer_fp16_normalizer"] = over
    heinsen = []
    for causal in (False, True):
        impl = impls[f"LogAttention(is_causal={causal})"]
        x = inputs("typical", "bf16", impl)
        q, k, v = x["q"].double(), x["k"].double(), x["v"].double()
        o16 = impl.call(x["q"], x["k"], x["v"]).double()
        o64 = impl.call(q, k, v)
        s = q[..., :, None, :] + k[..., None, :, :]  # [B, H, n_q, n_k, d_k]
        if causal:
            s = s.masked_fill(torch.ones(T, T).triu(1).bool()[..., None], -math.inf)
        log_z = torch.logsumexp(s, dim=(-2, -1))[..., None]
        log_s = torch.logsumexp(s[..., None] + v.log()[..., None, :, None, :], dim=(-3, -2))
        rb = lambda t: round_to(t, "bf16")  # noqa: E731
        split = torch.exp(rb(rb(log_s) - rb(log_z))) / torch.exp(log_s - log_z) - 1
        heinsen.append({
            "causal": causal, "max_abs_log_S": log_s.abs().max().item(),
            "max_abs_log_Z": log_z.abs().max().item(),
            "observed_max_rel_error": ((o16 - o64) / o64).abs().max().item(),
            "log_S_log_Z_rounding_max_rel_error": split.abs().max().item(),
        })  # fmt: skip
    ev["heinsen_bf16"] = heinsen
    return ev


# --------------------------------------------------------------------------------------------
# Tables


def _g(x: Any) -> str:
    return "-" if x is None else (f"{x:.3g}" if isinstance(x, float) else str(x))


def _classes(r: dict[str, Any]) -> str:
    c = r["counts"]
    parts = [f"{c[k]} {k}" for k in ("violated", "unbounded", "undecided", "atypical") if c[k]]
    return ", ".join(parts) if parts else f"all {r['elements']} within"


def tables(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """The generated Markdown of docs/published_code.md."""
    lines = [
        f"Run on {meta['date']}: {meta['seconds']:.0f} s ({meta['machine']}, torch "
        f"{meta['torch']}); B = {B}, H = {H} query heads, T = {T}, D = {D}; families "
        f"{', '.join(FAMILIES)} (seed = the family's index); sources: fla-core "
        f"{meta['provenance'].get('fla-core')}, performer-pytorch "
        f"{meta['provenance'].get('performer-pytorch')}, heinsen_attention at "
        f"{(meta['provenance'].get('heinsen_attention') or 'unknown')[:12]}.",
        "",
        "### Verdicts per implementation and storage format",
        "",
        "Over the families: the verdict under the default declaration `Precision(dtype)` "
        "(fp32 work, one rounding at the store) and under the declaration read from the "
        "source; the element classes that failed; the largest error; the least bound / error "
        "of the total check (against the exact target: softmax for taylor, polynomial and "
        "favor, whose approximation part is the exact difference, hence about 1) and of the "
        "rounding check (against the method itself on the stored inputs); below 1: "
        "violated; the fingerprint on the typical family (the tightest (compute, accumulate) "
        "met).",
        "",
        "| implementation | method | storage | default: verdict (failing elements) "
        "| declared | declared: verdict (failing elements) | max error | least bound/error "
        "(declared: total; rounding) | fingerprint |",
        "| --- | --- | --- | --- | --- | --- | ---: | ---: | --- |",
    ]
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["implementation"], r["dtype"]), []).append(r)
    for (name, dt), rs in groups.items():
        lines.append(
            f"| `{name}` | {rs[0]['method']} | {dt} | {_summary(rs, 'default')} | "
            f"{_decl(rs[0]['declared']['precision'])} | {_summary(rs, 'declared')} | "
            f"{_g(max(r['declared']['max_error'] for r in rs))} | "
            f"{_g(min(r['declared']['tightness'] for r in rs))}; {_rnd(rs)} | {_fingerprint(rs)} |"
        )
    lines += [
        "",
        "### Every case",
        "",
        "| implementation | storage | family | default | declared | max error | max bound "
        "(declared) | least bound/error | where the worst element is |",
        "| --- | --- | --- | --- | --- | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        d = r["declared"]
        w = d["worst"] or {}
        where = (
            f"{w.get('class')} at {tuple(w.get('index', ()))}: out {_g(w.get('output'))}, "
            f"exact {_g(w.get('reference'))}"
            if w
            else "-"
        )
        lines.append(
            f"| `{r['implementation']}` | {r['dtype']} | {r['family']} | "
            f"{r['default']['verdict']} ({_classes(r['default'])}) | {d['verdict']} "
            f"({_classes(d)}) | {_g(d['max_error'])} | {_g(d['max_bound'])} | "
            f"{_g(d['tightness'])} | {where} |"
        )
    return "\n".join(lines)


def _rnd(rs: list[dict[str, Any]]) -> str:
    vals = [r["declared"]["rounding_tightness"] for r in rs]
    return _g(min(vals)) if None not in vals else "-"


def _decl(desc: str) -> str:
    head = desc.split(";")[0].replace("storage=", "").replace(", rounding=rne", "")
    one = "one pass" in desc
    return head.split(", ", 1)[1] + (", one pass" if one else "")


def _summary(rs: list[dict[str, Any]], key: str) -> str:
    order = ["ok", "ATYPICAL", "UNDECIDED", "UNBOUNDED", "VIOLATED"]
    verdict = max((r[key]["verdict"] for r in rs), key=order.index)
    total = {c: sum(r[key]["counts"][c] for r in rs) for c in rs[0][key]["counts"]}
    n = sum(r[key]["elements"] for r in rs)
    bad = [
        f"{total[c]} {c}" for c in ("violated", "unbounded", "undecided", "atypical") if total[c]
    ]
    return f"{verdict}" + (f" ({', '.join(bad)} of {n})" if bad else f" ({n} within)")


def _fingerprint(rs: list[dict[str, Any]]) -> str:
    rs = [r for r in rs if "fingerprint" in r]
    if not rs:
        return "-"
    met: dict[tuple[str, str], int] = {}
    for r in rs:
        for c in r["fingerprint"]["rows"]:
            if c["met"]:
                met[(c["compute"], c["accumulate"])] = (
                    met.get((c["compute"], c["accumulate"]), 0) + 1
                )
    order = [(c["compute"], c["accumulate"]) for c in rs[0]["fingerprint"]["rows"]]
    every = [p for p in order if met.get(p, 0) == len(rs)]
    return f"{every[0][0]} / {every[0][1]}" if every else "none met"


def write_doc(text: str) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _generated import splice

    splice(DOC, "published_audit.py", text)


# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sources", type=Path, default=Path("/tmp/attnprec_published"))
    ap.add_argument("--fetch", action="store_true", help="pip download / git clone into --sources")
    ap.add_argument(
        "--heinsen-git", default=HEINSEN_GIT, help="bare git dir (mirror) or URL to clone"
    )
    ap.add_argument("--quick", action="store_true", help="typical family, fp16, no fingerprint")
    ap.add_argument("--only", nargs="+", default=None, help="implementations whose name has any")
    ap.add_argument("--no-fingerprint", dest="fingerprint", action="store_false")
    ap.add_argument("--out", type=Path, default=None, help=f"JSON (default {RESULTS})")
    ap.add_argument("--no-doc", dest="doc", action="store_false")
    args = ap.parse_args(argv)
    if args.fetch:
        fetch(args.sources, args.heinsen_git)
    torch.manual_seed(0)
    impls = implementations(args.sources)
    if args.only:
        impls = [i for i in impls if any(s in i.name for s in args.only)]
    dtypes = ["fp16"] if args.quick else list(DTYPES)
    families = ["typical"] if args.quick else list(FAMILIES)
    t0 = time.perf_counter()
    rows = []
    for impl in impls:
        for dt in dtypes:
            for fam in families:
                fp = args.fingerprint and not args.quick and fam == families[0]
                r = run_case(impl, fam, dt, fp)
                rows.append(r)
                print(
                    f"{impl.name:<55} {dt} {fam:<9} default {r['default']['verdict']:<9} "
                    f"declared {r['declared']['verdict']:<9} "
                    f"err {r['declared']['max_error']:.3g} ({r['seconds']} s)",
                    flush=True,
                )
    meta = {
        "date": _dt.date.today().isoformat(),
        "seconds": time.perf_counter() - t0,
        "machine": f"{platform.machine()}, {platform.system()}",
        "torch": torch.__version__,
        "provenance": provenance(args.sources),
    }
    ev = evidence(args.sources) if not args.only and not args.quick else None
    text = tables(rows, meta)
    if args.quick and args.out is None:
        print(text)
        return 0
    out = args.out or RESULTS
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"meta": meta, "evidence": ev, "rows": rows}, indent=1, default=str) + "\n"
    )
    if args.doc:
        write_doc(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
