"""Exact emulations of state-space kernels under a declared precision (for the bound tests).

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


def _load(ar, x):
    """An operand as the kernel holds it: rounded to storage, then loaded into compute."""
    from attnprec.analysis.precision import round_to

    return ar.load(round_to(torch.as_tensor(x, dtype=torch.float64), ar.prec.storage))


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
    if form == "recurrent":
        y = Z._gated_recurrent(ar, qg, kg, vg, lg, 1.0)
    else:
        y = Z._gated_chunked(ar, qg, kg, vg, lg, 1.0, int(form.removeprefix("chunked")))
    y = y.squeeze(-1).movedim(-1, -2)
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
    if form == "recurrent":
        y = Z._gated_recurrent(ar, q, kd, v, lg, 1.0)
    else:
        y = Z._gated_chunked(ar, q, kd, v, lg, 1.0, int(form.removeprefix("chunked")))
    if D is not None:
        y = ar.add(y, ar.c(_load(ar, D) * v))
    return ar.store(y, prec.storage.torch_dtype)
