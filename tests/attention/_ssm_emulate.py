"""Exact emulations of state-space kernels (and H3) under a declared precision, and the
declarations and schedules the bound tests run them in.

Every operation is a float64 operation rounded once to its declared format by the kernel
zoo's :class:`Arith` (benchmarks/_kernels_zoo.py): loads into compute, products and sums in
accumulate, exp (and expm1) in compute, the output rounded once to storage. The reduced
gated problem (per channel or per head) then runs the zoo's recurrent or chunked gated
kernel, so the schedules are the ones the gated bound documents.

``expm1`` (zoh) is evaluated as the kernels do: the degree-10 Taylor polynomial in Horner
form for ``x > -1/2``, ``exp(x) - 1`` below (``exp`` at the edge of the declared model with
``limit=True``).
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import torch

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "_kernels_zoo.py"


def load_zoo():
    name = "_kernels_zoo"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, _PATH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    return mod


Z = load_zoo()

FAMILIES = ("typical", "outliers", "sinks", "ties", "cancel")


def _declarations():
    from attnprec.analysis.precision import Precision

    return {
        "fp32": Precision("fp32"),
        "fp16": Precision("fp16"),
        "bf16": Precision("bf16"),
        "bf16-c16-a16": Precision("bf16", compute="bf16", accumulate="bf16"),
        "fp16-c16-a32": Precision("fp16", compute="fp16", accumulate="fp32"),
        # loads that round (fp32 into bf16): the keys', log-gates' and taps' load errors
        # (a mutation review: every other declaration here loads exactly)
        "fp32-c16-a32": Precision("fp32", compute="bf16", accumulate="fp32"),
        # loads and the store truncated (the CPU Triton interpreter's casts)
        "bf16-rtz": Precision("bf16", rounding="rtz"),
    }


DECLARATIONS = _declarations()
SCHEDULES = {  # (form, block, Arith options)
    "recurrent": ("recurrent", None, {}),
    "recurrent-limit": ("recurrent", None, {"limit": True}),
    "recurrent-pairwise-fma": ("recurrent", None, {"order": "pairwise", "fma": True}),
    "chunked4": ("chunked4", 4, {}),
    "chunked4-limit": ("chunked4", 4, {"limit": True}),
    "chunked3-sorted": ("chunked3", 3, {"order": "sorted"}),
}


def _gated(ar, q, k, v, lg, form):
    """The reduced gated problem (scale 1) by the zoo's ``"recurrent"`` or ``"chunked<c>"``
    kernel, its sums converted to compute."""
    if form == "recurrent":
        return ar.c(Z._gated_recurrent(ar, q, k, v, lg))
    return ar.c(Z._gated_chunked(ar, q, k, v, lg, int(form.removeprefix("chunked"))))


def _load(ar, x):
    """An operand as the kernel holds it: rounded to storage as the declaration rounds
    (``rtz`` too: a review found ``rtz`` declarations emulated to nearest), then loaded
    into compute."""
    from attnprec.analysis.precision import round_to

    x64 = torch.as_tensor(x, dtype=torch.float64)
    return ar.load(round_to(x64, ar.prec.storage, ar.prec.rounding))


#: 1/(k+1)! for k = 0..9: expm1(x) = x (c_0 + x (c_1 + ...)).
_EXPM1_COEFFS = tuple(1.0 / math.factorial(i + 1) for i in range(10))


def expm1(ar, x: torch.Tensor) -> torch.Tensor:
    """expm1 of a compute value ``x <= 0`` as the kernels compute it (rounded per op)."""
    small = x > -0.5
    xs = torch.where(small, x, torch.zeros_like(x))
    p = ar.c(torch.full_like(x, _EXPM1_COEFFS[-1]))
    for c in reversed(_EXPM1_COEFFS[:-1]):
        p = ar.c(ar.c(p * xs) + ar.c(torch.full_like(x, c)))
    poly = ar.c(p * xs)
    big = ar.c(ar.exp(torch.where(small, torch.zeros_like(x), x)) - 1.0)
    return torch.where(small, poly, big)


def _bbar(ar, dl, Al, Bl, L, disc, route):
    """B_bar [.., T, D, N] from loaded delta [.., T, D], A [D, N], B [.., T, N]."""
    if disc == "euler":
        return ar.mul(dl.unsqueeze(-1), Bl.unsqueeze(-2))
    e = expm1(ar, L)
    if route == "phi":  # expm1(L)/L * delta * B
        phi = ar.div(e, torch.where(L == 0, torch.ones_like(L), L))
        phi = torch.where(L == 0, torch.ones_like(phi), phi)
        return ar.mul(ar.c(phi * dl.unsqueeze(-1)), Bl.unsqueeze(-2))
    return ar.mul(ar.div(e, Al), Bl.unsqueeze(-2))


def selective_scan(
    C, B, u, *, delta, A, D=None, discretization="euler", prec, form="recurrent", route="div",
    **arith,
):  # fmt: skip
    """The selective scan under ``prec`` (the output in storage dtype): ``form``
    ``"recurrent"`` or ``"chunked<c>"``; ``route`` zoh's ``"div"`` (expm1 / A) or ``"phi"``;
    ``arith``: :class:`Arith` options (order, fma, limit, ftz)."""
    ar = Z.Arith(prec, **arith)
    Cl, Bl, ul = (_load(ar, x) for x in (C, B, u))
    T, N = Cl.shape[-2:]
    Dv = ul.shape[-1]
    batch = torch.broadcast_shapes(Cl.shape[:-2], Bl.shape[:-2], ul.shape[:-2], delta.shape[:-2])
    dl = _load(ar, delta).expand(*batch, T, Dv)
    Al = _load(ar, A).expand(Dv, N)
    L = ar.c(dl.unsqueeze(-1) * Al)  # [.., T, D, N]
    Bb = _bbar(ar, dl, Al, Bl, L, discretization, route).expand(*batch, T, Dv, N)
    qg = Cl.expand(*batch, T, N).unsqueeze(-3).expand(*batch, Dv, T, N)
    kg = Bb.movedim(-2, -3)
    vg = ul.expand(*batch, T, Dv).movedim(-1, -2).unsqueeze(-1)
    lg = L.expand(*batch, T, Dv, N).movedim(-2, -3)
    y = _gated(ar, qg, kg, vg, lg, form).squeeze(-1).movedim(-1, -2)
    if D is not None:
        y = ar.add(y, ar.c(_load(ar, D) * ul))
    return ar.store(y, prec.storage.torch_dtype)


def ssd(C, B, x, *, dt, A, D=None, prec, form="recurrent", **arith):
    """SSD under ``prec``: ``form`` ``"recurrent"`` or ``"chunked<c>"`` (segment sums over
    each span inside chunks, states between chunks)."""
    ar = Z.Arith(prec, **arith)
    Cl, Bl, xl = (_load(ar, t) for t in (C, B, x))
    T, N = Cl.shape[-2:]
    P = xl.shape[-1]
    A_t = torch.as_tensor(A, dtype=torch.float64)
    batch = torch.broadcast_shapes(Cl.shape[:-2], Bl.shape[:-2], xl.shape[:-2], dt.shape[:-1],
                                   A_t.shape)  # fmt: skip
    dtl = _load(ar, dt).expand(*batch, T)
    Al = _load(ar, A_t).expand(batch)
    lg = ar.c(Al.unsqueeze(-1) * dtl).unsqueeze(-1).expand(*batch, T, N)
    kd = ar.mul(dtl.unsqueeze(-1), Bl)
    q, v = Cl.expand(*batch, T, N), xl.expand(*batch, T, P)
    y = _gated(ar, q, kd, v, lg, form)
    if D is not None:
        y = ar.add(y, ar.c(_load(ar, D) * v))
    return ar.store(y, prec.storage.torch_dtype)


def h3(q, k, v, *, shift, log_decay, prec, form="recurrent", **arith):
    """H3 under ``prec``, every operation rounded to its declared format: loads, the shifted
    keys (products, then the sum over the taps in the Arith's order), the reduced gated
    problem by the zoo's recurrent or chunked kernel, the store."""
    ar = Z.Arith(prec, **arith)
    ql, kl, vl = (_load(ar, x) for x in (q, k, v))
    sh = _load(ar, shift)
    sh = sh if sh.dim() >= 2 else sh.unsqueeze(0)
    ld = _load(ar, log_decay)
    ld = ld.unsqueeze(-1) if ld.dim() == 1 else ld
    T, d_k = ql.shape[-2:]
    d_v = vl.shape[-1]
    m = sh.shape[-1]
    batch = torch.broadcast_shapes(ql.shape[:-2], kl.shape[:-2], vl.shape[:-2], sh.shape[:-2],
                                   ld.shape[:-2])  # fmt: skip
    ql, kl, vl = ql.expand(*batch, T, d_k), kl.expand(*batch, T, d_k), vl.expand(*batch, T, d_v)
    kk = torch.cat([kl.new_zeros(*batch, m - 1, d_k), kl], -2)
    win = kk.unfold(-2, m, 1)  # [..., T, d_k, m]
    ks = ar.dot(win, sh.flip(-1).unsqueeze(-3), -1)
    ld = ld.expand(*batch, d_k, ld.shape[-1])
    if ld.shape[-1] == 1:
        y = _gated(ar, ql, ks, vl, ld[..., 0].unsqueeze(-2).expand(*batch, T, d_k), form)
    else:
        qg = ql.unsqueeze(-3).expand(*batch, d_v, T, d_k)
        kg = ks.unsqueeze(-3).expand(*batch, d_v, T, d_k)
        vg = vl.movedim(-1, -2).unsqueeze(-1)
        lg = ld.movedim(-1, -2).unsqueeze(-2).expand(*batch, d_v, T, d_k)
        y = _gated(ar, qg, kg, vg, lg, form).squeeze(-1).movedim(-1, -2)
    return ar.store(y, prec.storage.torch_dtype)
