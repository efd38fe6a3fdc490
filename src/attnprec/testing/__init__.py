"""attnprec.testing: inputs, Hypothesis strategies and assertions for attention tests.

The strategies (:func:`attention_inputs`) need Hypothesis; everything else here does not.

Use them from a test suite::

    from hypothesis import given
    from attnprec.testing import assert_within_bound, attention_inputs

    @given(attention_inputs("softmax", dtype=torch.float16))
    def test_my_attention(case):
        assert_within_bound(my_attention, case.method, case.q, case.k, case.v,
                            precision="fp16", **case.params)
"""

from typing import Any

from attnprec.testing.assertions import BoundViolation, assert_within_bound
from attnprec.testing.inputs import FAMILIES, make_inputs
from attnprec.testing.real import real_inputs, real_metadata

_STRATEGIES = ("METHODS", "AttentionCase", "attention_inputs")

__all__ = [
    "FAMILIES",
    "METHODS",
    "AttentionCase",
    "BoundViolation",
    "assert_within_bound",
    "attention_inputs",
    "make_inputs",
    "real_inputs",
    "real_metadata",
]


def __getattr__(name: str) -> Any:
    # The strategies need Hypothesis (a test dependency); load them on first use, so the
    # rest of the package (and the attnprec command, which reads the input families) works
    # without it.
    if name in _STRATEGIES:
        from attnprec.testing import strategies

        return getattr(strategies, name)
    raise AttributeError(f"module 'attnprec.testing' has no attribute {name!r}")
