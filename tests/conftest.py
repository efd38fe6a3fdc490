"""Test-wide settings: Hypothesis profiles and the Triton interpreter on the CPU."""

import os

import torch

# The interpreter must be chosen before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist each worker has a core of its own; more threads only oversubscribe, and
# torch's thread pool costs milliseconds per call on the tiny tensors the tests use.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

from hypothesis import HealthCheck, settings  # noqa: E402

_common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("default", max_examples=100, **_common)
# CI: derandomized so a red run reproduces; >= 200 examples per property.
settings.register_profile("ci", max_examples=200, derandomize=True, print_blob=True, **_common)
# thorough: 50x the CI examples (>= 10^4 per property), run by hand: --hypothesis-profile=thorough
settings.register_profile("thorough", max_examples=10_000, **_common)
settings.load_profile("ci" if os.environ.get("CI") else "default")
