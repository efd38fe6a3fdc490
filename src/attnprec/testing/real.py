"""Real attention operands: q, k, v captured from all-MiniLM-L6-v2 (6 layers x 12 heads).

The file ``attnprec/data/minilm_qkv.pt`` is written by ``benchmarks/capture_real.py`` (the
model is a dev-only dependency; the package reads only the saved file). It holds the outputs
of the query, key and value projections for one English passage of 128 tokens, stored as
float16 ``[layers, heads, tokens, d_head]`` with ``d_head = 32``: these float16 values are the
exact inputs every consumer sees.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from importlib import resources
from typing import Any

import torch

__all__ = ["real_inputs", "real_metadata"]

_FILE = "minilm_qkv.pt"


@functools.lru_cache(maxsize=1)
def _load() -> dict[str, Any]:
    with resources.files("attnprec.data").joinpath(_FILE).open("rb") as f:
        data: dict[str, Any] = torch.load(f, weights_only=True)
    return data


def real_metadata() -> dict[str, Any]:
    """Describe the captured operands.

    Returns
    -------
    dict
        ``model``, ``layers``, ``heads``, ``d_head``, ``tokens``, ``sentences``,
        ``token_strings`` and ``layout`` (a copy: mutating it changes nothing).
    """
    return dict(_load()["meta"])


def real_inputs(
    n_q: int,
    n_k: int | None = None,
    d_k: int = 32,
    d_v: int | None = None,
    batch: Sequence[int] = (),
    *,
    offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return captured ``q [*batch, n_q, d_k]``, ``k [*batch, n_k, d_k]``, ``v [*batch, n_k, d_v]``.

    Each batch element is one (layer, head) of the model, taken in the order
    ``slot = layer * heads + head`` starting at ``offset``; q takes the first ``n_q`` tokens,
    k and v the first ``n_k`` tokens, and each the first ``d_k`` (``d_v``) channels of the head.

    Parameters
    ----------
    n_q, n_k : int
        Query and key counts (``n_k`` defaults to ``n_q``); at most the captured token count.
    d_k, d_v : int
        Channels kept (``d_v`` defaults to ``d_k``); at most the head dimension (32).
    batch : sequence of int
        Leading dimensions; their product plus ``offset`` is at most layers x heads (72).
    offset : int
        First (layer, head) slot used.

    Returns
    -------
    q, k, v : torch.Tensor
        float64, exactly the captured float16 values (no error: they are the inputs).

    Raises
    ------
    ValueError
        If a size exceeds what was captured (naming the argument and the limit).
    """
    data = _load()
    q_all, k_all, v_all = data["q"], data["k"], data["v"]
    layers, heads, tokens, d_head = q_all.shape
    n_k = n_q if n_k is None else n_k
    d_v = d_k if d_v is None else d_v
    for name, val, limit in (
        ("n_q", n_q, tokens),
        ("n_k", n_k, tokens),
        ("d_k", d_k, d_head),
        ("d_v", d_v, d_head),
    ):
        if not isinstance(val, int) or isinstance(val, bool) or val < 1:
            raise ValueError(f"{name}: expected a positive integer, got {val!r}")
        if val > limit:
            raise ValueError(
                f"{name}: the real activations hold at most {limit} "
                f"({'tokens' if name[0] == 'n' else 'channels per head'}), got {val}"
            )
    b = tuple(int(x) for x in batch)
    if any(x < 1 for x in b):
        raise ValueError(f"batch: expected positive sizes, got {b}")
    slots = layers * heads
    if not isinstance(offset, int) or isinstance(offset, bool) or not 0 <= offset < slots:
        raise ValueError(f"offset: expected an integer in [0, {slots}), got {offset!r}")
    count = math.prod(b)
    if offset + count > slots:
        raise ValueError(
            f"batch: the real activations hold {slots} (layer, head) pairs, "
            f"batch {b} from offset {offset} needs {offset + count}"
        )

    def take(x: torch.Tensor, n: int, d: int) -> torch.Tensor:
        flat = x.reshape(slots, tokens, d_head)[offset : offset + count, :n, :d]
        return flat.reshape(*b, n, d).to(torch.float64)

    return take(q_all, n_q, d_k), take(k_all, n_k, d_k), take(v_all, n_k, d_v)
