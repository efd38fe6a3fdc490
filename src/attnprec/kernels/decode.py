"""Batched decode: one token for every (batch, head) state, in one kernel launch.

``decode_step(kind_or_state, *tokens)`` advances every row of a :class:`KernelState` by one
token: ``q, k, v`` for ``"log"``, ``"taylor"``, ``"polynomial"``, ``phi_q, phi_k, v`` for
``"linear"``, ``a, b`` for ``"recurrence"``. Each kind has a decode kernel of its own
(``_log_decode``, ``_featured_decode``, ``_recurrence_step``): the causal graph with a
one-token chunk, a few batch rows per program, so its cost is the state read and written
once plus O(state) arithmetic, where the causal kernels would compute a whole chunk of
:data:`~attnprec.kernels._common.BLOCK` tokens for the one. On CUDA the step can be
captured in a CUDA graph (``cuda_graph=True``, or :func:`decode_graph` for the zero-copy
form), keyed by shape and dtype and kept with the state. Graph in docs/kernels.md,
"Decode".
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from attnprec._validate import check_bool, check_int, resolve_scale
from attnprec.attention.taylor import taylor_coeffs
from attnprec.kernels import _featured, log, recurrence
from attnprec.kernels._common import KernelState, check_kernel_tensor, interpreted
from attnprec.kernels.taylor import _coeffs, feature_tables

__all__ = ["DECODE_KINDS", "DecodeGraph", "decode_graph", "decode_step"]

#: What ``decode_step`` takes as ``kind_or_state`` (a string starts from the empty state).
DECODE_KINDS = ("log", "taylor", "polynomial", "linear", "recurrence")

Launch = Callable[[tuple[torch.Tensor, ...], torch.Tensor, tuple[torch.Tensor, ...]], None]


class _Plan:
    """How a state's kind decodes: token names and widths, output width, the launch."""

    def __init__(
        self, names: tuple[str, ...], widths: tuple[int, ...] | None, d_out: int | None,
        launch: Launch,
    ) -> None:  # fmt: skip
        self.names = names
        self.widths = widths  # None: one scalar per row (recurrence)
        self.d_out = d_out
        self.launch = launch


def _plan(state: KernelState) -> _Plan:
    """The decode plan of ``state`` (cached with it: feature tables are built once)."""
    plan = state.cache.get("plan")
    if isinstance(plan, _Plan):
        return plan
    dev = state.tensors[0].device
    if state.kind == "log":
        dk, dv, sc, _ = state.key

        def launch_log(xs: tuple[torch.Tensor, ...], y: torch.Tensor,
                       st: tuple[torch.Tensor, ...]) -> None:  # fmt: skip
            log.decode_launch(xs[0], xs[1], xs[2], y, st, sc)

        plan = _Plan(("q", "k", "v"), (dk, dk, dv), dv, launch_log)
    elif state.kind == "polynomial":
        d, dv, c, s, _ = state.key
        idx, w, _ = feature_tables(d, c, s, dv, dev)

        def launch_poly(xs: tuple[torch.Tensor, ...], y: torch.Tensor,
                        st: tuple[torch.Tensor, ...]) -> None:  # fmt: skip
            _featured.decode_launch(xs[0], xs[1], xs[2], y, st, idx, w)

        plan = _Plan(("q", "k", "v"), (d, d, dv), dv, launch_poly)
    elif state.kind == "linear":
        m, dv, _ = state.key

        def launch_lin(xs: tuple[torch.Tensor, ...], y: torch.Tensor,
                       st: tuple[torch.Tensor, ...]) -> None:  # fmt: skip
            _featured.decode_launch(xs[0], xs[1], xs[2], y, st)

        plan = _Plan(("phi_q", "phi_k", "v"), (m, m, dv), dv, launch_lin)
    elif state.kind == "recurrence":

        def launch_rec(xs: tuple[torch.Tensor, ...], y: torch.Tensor,
                       st: tuple[torch.Tensor, ...]) -> None:  # fmt: skip
            recurrence.decode_launch(xs[0], xs[1], y, st)

        plan = _Plan(("a", "b"), None, None, launch_rec)
    else:
        raise ValueError(f"state: a {state.kind!r} state has no decode step")
    state.cache["plan"] = plan
    return plan


def _token_batch(lead: torch.Size) -> torch.Size:
    """The rows of a token's leading shape: a trailing token axis of size 1 is dropped."""
    return lead[:-1] if len(lead) and lead[-1] == 1 else lead


def _flatten(
    state: KernelState, plan: _Plan, tokens: tuple[object, ...]
) -> tuple[tuple[torch.Tensor, ...], torch.Size]:
    """Check the tokens against the state; return them as contiguous ``[nb, width]`` (or
    ``[nb]``) tensors and the output's shape."""
    if len(tokens) != len(plan.names):
        raise TypeError(
            f"tokens: a {state.kind!r} step takes {', '.join(plan.names)}; got "
            f"{len(tokens)} tensors"
        )
    dtype = state.key[-1]
    dev = state.tensors[0].device
    nb = state.batch.numel()
    out: list[torch.Tensor] = []
    out_shape = torch.Size()
    for i, (name, x) in enumerate(zip(plan.names, tokens, strict=True)):
        x = check_kernel_tensor(name, x)
        tail: tuple[int, ...]
        if x.dtype != dtype:
            raise TypeError(f"{name}: expected the state's dtype {dtype}, got {x.dtype}")
        if x.device != dev:
            raise ValueError(f"{name}: expected the state's device {dev}, got {x.device}")
        if plan.widths is None:
            lead, tail = x.shape, ()
        else:
            width = plan.widths[i]
            if x.dim() == 0 or x.shape[-1] != width:
                raise ValueError(
                    f"{name}: expected last dimension {width} (from the state), got shape "
                    f"{tuple(x.shape)}"
                )
            lead, tail = x.shape[:-1], (width,)
        rows = _token_batch(lead)
        if rows != state.batch and tuple(rows) != (nb,) and tuple(lead) != (nb,):
            want = [*state.batch, 1, *tail] if plan.widths else [*state.batch]
            raise ValueError(
                f"{name}: expected one token per state row, shape {want} or "
                f"{[nb, *tail]}, got {list(x.shape)}"
            )
        if i == 0:
            out_shape = torch.Size([*lead, plan.d_out]) if plan.d_out is not None else x.shape
        out.append(x.reshape(nb, *tail))
    return tuple(out), out_shape


def _new_state(kind: str, tokens: tuple[object, ...], params: dict[str, Any]) -> KernelState:
    """The empty state of ``kind`` for the rows and sizes of ``tokens``."""
    if kind not in DECODE_KINDS:
        raise ValueError(f"kind_or_state: expected a KernelState or one of {DECODE_KINDS}, "
                         f"got {kind!r}")  # fmt: skip
    allowed = {
        "log": {"scale"},
        "taylor": {"scale", "degree"},
        "polynomial": {"scale", "coeffs"},
        "linear": set(),
        "recurrence": {"x0"},
    }[kind]
    for name, val in params.items():
        if val is not None and name not in allowed:
            raise ValueError(f"{name}: not a parameter of a {kind!r} decode step")
    names = ("a", "b") if kind == "recurrence" else (
        ("phi_q", "phi_k", "v") if kind == "linear" else ("q", "k", "v"))  # fmt: skip
    if len(tokens) != len(names):
        raise TypeError(f"tokens: a {kind!r} step takes {', '.join(names)}; got "
                        f"{len(tokens)} tensors")  # fmt: skip
    first = check_kernel_tensor(names[0], tokens[0])
    dev, dtype = first.device, first.dtype
    if kind == "recurrence":
        batch = _token_batch(first.shape)
        x0 = params.get("x0")
        if x0 is not None:
            x0 = check_kernel_tensor("x0", x0)
            if x0.dtype != dtype:
                raise TypeError(f"x0: expected the dtype of a ({dtype}), got {x0.dtype}")
            if _token_batch(x0.shape) != batch and tuple(x0.shape) != (batch.numel(),):
                raise ValueError(f"x0: expected shape {list(batch)}, got {list(x0.shape)}")
            x0 = x0.reshape(-1).contiguous()
        return KernelState("recurrence", recurrence.recurrence_state(x0, batch.numel(), dev),
                           batch, (dtype,))  # fmt: skip
    if first.dim() == 0:
        raise ValueError(f"{names[0]}: expected shape [..., 1, d], got []")
    v = check_kernel_tensor("v", tokens[2])
    if v.dim() == 0:
        raise ValueError("v: expected shape [..., 1, d_v], got []")
    batch = _token_batch(first.shape[:-1])
    nb = batch.numel()
    d, dv = first.shape[-1], v.shape[-1]
    if kind == "log":
        sc = log.kernel_scale(params.get("scale"), d)
        tensors: tuple[torch.Tensor, ...] = (
            torch.full((nb, d), float("-inf"), dtype=torch.float32, device=dev),
            torch.zeros(nb, d, dv, dtype=torch.float32, device=dev),
            torch.zeros(nb, d, dtype=torch.float32, device=dev),
        )
        return KernelState("log", tensors, batch, (d, dv, sc, dtype))
    if kind == "linear":
        zs = (torch.zeros(nb, d, dv, dtype=torch.float32, device=dev),
              torch.zeros(nb, d, dtype=torch.float32, device=dev))  # fmt: skip
        return KernelState("linear", zs, batch, (d, dv, dtype))
    if kind == "taylor":
        deg = params.get("degree")
        c = _coeffs(taylor_coeffs(check_int("degree", 2 if deg is None else deg, 0)))
    else:
        if params.get("coeffs") is None:
            raise ValueError("coeffs: a 'polynomial' decode step needs coeffs")
        c = _coeffs(params["coeffs"])
    s = resolve_scale(params.get("scale"), d)
    idx, _, _ = feature_tables(d, c, s, dv, dev)  # checks the state size
    m = idx.shape[0]
    zs = (torch.zeros(nb, m, dv, dtype=torch.float32, device=dev),
          torch.zeros(nb, m, dtype=torch.float32, device=dev))  # fmt: skip
    return KernelState("polynomial", zs, batch, (d, dv, c, s, dtype))


def _check_params(state: KernelState, params: dict[str, Any]) -> None:
    """Parameters given with a state must be the state's own (they are taken from it)."""
    for name, val in params.items():
        if val is None:
            continue
        if name == "x0":
            raise ValueError("x0: a state is given; x0 only starts a 'recurrence' decode")
        if name == "scale" and state.kind in ("log", "polynomial"):
            d, sc = state.key[0], state.key[2 if state.kind == "log" else 3]
            default = 1.0 if state.kind == "log" else None
            if resolve_scale(val, d, default=default) == sc:
                continue
        elif name == "degree" and state.kind == "polynomial":
            if _coeffs(taylor_coeffs(check_int("degree", val, 0))) == state.key[2]:
                continue
        elif name == "coeffs" and state.kind == "polynomial":
            if _coeffs(val) == state.key[2]:
                continue
        raise ValueError(f"{name}: {val!r} does not match the {state.kind!r} state {state.key}")


def _graph_usable(device: torch.device) -> bool:
    """CUDA graphs only for CUDA tensors with CUDA present (never under the interpreter)."""
    return device.type == "cuda" and torch.cuda.is_available() and not interpreted()


class _CudaGraphBackend:
    """Capture with :class:`torch.cuda.CUDAGraph`; warm-up (compilation) on a side stream."""

    def capture(self, warm: Callable[[], None], body: Callable[[], None]) -> Callable[[], None]:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            warm()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            body()
        return graph.replay


def _graph_backend() -> Any:
    """The capture backend (tests replace it to check the graph logic on the CPU)."""
    return _CudaGraphBackend()


class DecodeGraph:
    """One decode step of a state captured in a CUDA graph on fixed buffers.

    ``inputs``: the token buffers, flattened (``[nb, width]``, or ``[nb]`` for the
    recurrence); ``output``: the ``[nb, d_v]`` (``[nb]``) result buffer. :meth:`replay`
    runs the captured kernel on them, advancing the state (in place) by one token;
    ``graph(*tokens)`` copies the tokens in first and returns ``output`` viewed in the
    first token's shape. ``output`` is overwritten by the next replay: clone what you keep.
    The graph reads the state's tensors at their addresses: they must stay the state's
    (every kernel here updates them in place).
    """

    def __init__(self, state: KernelState, tokens: tuple[torch.Tensor, ...],
                 out_shape: torch.Size) -> None:  # fmt: skip
        plan = _plan(state)
        self.state = state
        self.inputs = tuple(x.clone() for x in tokens)
        first = tokens[0]
        nb = first.shape[0]
        shape = (nb, plan.d_out) if plan.d_out is not None else (nb,)
        self.output = torch.empty(shape, dtype=first.dtype, device=first.device)
        self.out_shape = out_shape
        # Compile and warm up on a copy of the state: the warm-up must not advance it.
        scratch = tuple(t.clone() for t in state.tensors)
        self._replay = _graph_backend().capture(
            lambda: plan.launch(self.inputs, self.output, scratch),
            lambda: plan.launch(self.inputs, self.output, state.tensors),
        )

    def replay(self) -> None:
        """Run the captured step on ``inputs`` (state updated in place, result in ``output``)."""
        self._replay()

    def __call__(self, *tokens: torch.Tensor) -> torch.Tensor:
        """Copy ``tokens`` (each with ``inputs[i].numel()`` elements) in, replay, return
        ``output`` in the first token's shape (a view of the buffer)."""
        for buf, x in zip(self.inputs, tokens, strict=True):
            buf.copy_(x.reshape(buf.shape))
        self._replay()
        return self.output.view(self.out_shape)


def decode_graph(state: KernelState, *tokens: torch.Tensor) -> DecodeGraph:
    """The :class:`DecodeGraph` of ``state`` for tokens shaped like ``tokens`` (captured once
    per shape and dtype, kept with the state). CUDA only.

    Parameters
    ----------
    state : KernelState
        A causal kernel state (as returned with ``return_state=True``).
    *tokens : torch.Tensor
        One token per state row, as :func:`decode_step` takes them, on CUDA; they fix the
        captured shapes and dtype.

    Returns
    -------
    DecodeGraph
        The cached graph; calling it copies new tokens in and replays the step, so its
        outputs carry :func:`decode_step`'s error guarantee.

    Raises
    ------
    TypeError
        If ``state`` is not a :class:`KernelState`.
    ValueError
        The tokens are not CUDA tensors (or CUDA is absent, or the interpreter runs), or
        they do not match the state (as :func:`decode_step`).
    """
    if not isinstance(state, KernelState):
        raise TypeError(f"state: expected a KernelState, got {type(state).__name__}")
    xs, out_shape = _flatten(state, _plan(state), tokens)
    return _graph_for(state, xs, out_shape)


def _graph_for(state: KernelState, xs: tuple[torch.Tensor, ...],
               out_shape: torch.Size) -> DecodeGraph:  # fmt: skip
    if not _graph_usable(xs[0].device):
        raise ValueError(
            f"cuda_graph: CUDA graphs need CUDA tensors and CUDA present (not the "
            f"interpreter); got device {xs[0].device}"
        )
    graphs = state.cache.setdefault("graphs", {})
    key = (tuple(x.shape for x in xs), xs[0].dtype, tuple(out_shape))
    if key not in graphs:
        graphs[key] = DecodeGraph(state, xs, out_shape)
    graph: DecodeGraph = graphs[key]
    return graph


def decode_step(
    kind_or_state: str | KernelState,
    *tokens: torch.Tensor,
    scale: float | None = None,
    degree: int | None = None,
    coeffs: Sequence[float] | torch.Tensor | None = None,
    x0: torch.Tensor | None = None,
    cuda_graph: bool = False,
) -> tuple[torch.Tensor, KernelState]:
    r"""Advance every row of a state by one token, in one kernel launch.

    Parameters
    ----------
    kind_or_state : str or KernelState
        A state (from a causal prefill with ``return_state=True``, or from an earlier
        ``decode_step``), updated in place; or one of :data:`DECODE_KINDS` to start from the
        empty state (the sizes, rows, dtype and device taken from the tokens).
    *tokens : torch.Tensor
        ``q, k, v`` (``"log"``, ``"taylor"``, ``"polynomial"``), ``phi_q, phi_k, v``
        (``"linear"``) or ``a, b`` (``"recurrence"``): one token per state row, shaped
        ``[*batch, 1, d]`` (``[*batch, d]`` and ``[nb, d]``, ``nb`` the number of rows, are
        accepted too; the recurrence takes ``[*batch]``, ``[*batch, 1]`` or ``[nb]``), in the
        state's dtype (float16, bfloat16, float32) and device (CUDA, or CPU under
        ``TRITON_INTERPRET=1``). No broadcasting. Non-contiguous tensors are copied.
    scale, degree, coeffs
        As the prefill kernels (``log``: scale, default 1; ``taylor``: degree, default 2,
        and scale, default ``1/sqrt(d_k)``; ``polynomial``: coeffs and scale). With a state
        they are taken from it: given ones must match it.
    x0 : torch.Tensor, optional
        ``"recurrence"`` started from a string: the initial value per row (default 0).
    cuda_graph : bool
        On CUDA, replay the step from a CUDA graph captured on first use for this shape and
        dtype (kept with the state; see :func:`decode_graph`): the inputs are copied into
        its buffers and the output cloned out. Ignored on the CPU / under the interpreter,
        where the same kernel runs directly.

    Returns
    -------
    (torch.Tensor, KernelState)
        The outputs, shaped like the first token with the last dimension ``d_v`` (the
        recurrence: like ``a``), in the state's dtype; and the state (the same object when
        one was given).

    Raises
    ------
    TypeError
        Wrong number of tokens, dtypes (naming the token), a non-KernelState.
    ValueError
        Shapes that do not give one token per state row, a device mismatch, parameters
        that do not belong to the kind or do not match the state, a state without a decode
        step (naming the argument).

    Notes
    -----
    Each kind runs its causal graph with a one-token chunk (docs/kernels.md, "Decode"):
    every output is within ``rounding_bound(method, ..., precision_for(dtype, interpreted),
    causal=True, block=1)`` of the exact causal output of the tokens so far (the
    recurrence: ``recurrence_rounding_bound(..., block=1)``), so ``n`` decode steps agree
    with a causal prefill of the same ``n`` tokens within the sum of the two bounds. With
    and without ``cuda_graph`` the same kernel runs on the same values: identical results.
    NaN propagates as in the prefill kernels.
    """
    params = {"scale": scale, "degree": degree, "coeffs": coeffs, "x0": x0}
    if isinstance(kind_or_state, KernelState):
        state = kind_or_state
        _check_params(state, params)
    elif isinstance(kind_or_state, str):
        state = _new_state(kind_or_state, tokens, params)
    else:
        raise TypeError(f"kind_or_state: expected a KernelState or a kind name, got "
                        f"{type(kind_or_state).__name__}")  # fmt: skip
    plan = _plan(state)
    xs, out_shape = _flatten(state, plan, tokens)
    nb = state.batch.numel()
    if check_bool("cuda_graph", cuda_graph) and nb > 0 and _graph_usable(xs[0].device):
        graph = _graph_for(state, xs, out_shape)
        for buf, x in zip(graph.inputs, xs, strict=True):
            buf.copy_(x)
        graph.replay()
        return graph.output.clone().view(out_shape), state
    shape = (nb, plan.d_out) if plan.d_out is not None else (nb,)
    y = torch.empty(shape, dtype=xs[0].dtype, device=xs[0].device)
    if nb > 0:
        plan.launch(xs, y, state.tensors)
    return y.view(out_shape), state
