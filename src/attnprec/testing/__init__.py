"""attnprec.testing: inputs, Hypothesis strategies and assertions for attention tests.

Use them from a test suite::

    from hypothesis import given
    from attnprec.testing import assert_within_bound, attention_inputs

    @given(attention_inputs("softmax", dtype=torch.float16))
    def test_my_attention(case):
        assert_within_bound(my_attention, case.method, case.q, case.k, case.v,
                            precision="fp16", **case.params)

Everything here loads on first use: the pytest plugin (:mod:`attnprec.testing.plugin`)
imports this package in every test run of a project that has attnprec installed, and must
not import torch or Hypothesis there.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "FAMILIES": "attnprec.testing.inputs",
    "SCALED_FAMILIES": "attnprec.testing.inputs",
    "make_inputs": "attnprec.testing.inputs",
    "BoundViolation": "attnprec.testing.assertions",
    "LAYOUTS": "attnprec.testing.assertions",
    "assert_attention_close": "attnprec.testing.assertions",
    "assert_within_bound": "attnprec.testing.assertions",
    "replay": "attnprec.testing.assertions",
    "real_inputs": "attnprec.testing.real",
    "real_metadata": "attnprec.testing.real",
    "METHODS": "attnprec.testing.strategies",
    "AttentionCase": "attnprec.testing.strategies",
    "attention_inputs": "attnprec.testing.strategies",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'attnprec.testing' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
