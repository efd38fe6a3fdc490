"""Operations at their declared accuracy, erring the most (the witnesses of the bounds'
terms in tests/analysis/bounds/test_orders*.py)."""

import math

import torch


def ulp_off(exact: float, up: bool, ulps: float) -> float:
    """The fp32 number farthest above (``up``) or below ``exact`` within ``ulps`` ulps of
    it: an operation at its declared accuracy, erring the most."""
    ulp = 2.0 ** (math.floor(math.log2(abs(exact))) - 23)
    z = torch.tensor(exact, dtype=torch.float32)
    step = torch.tensor(math.inf if up else -math.inf, dtype=torch.float32)
    while abs(float(nxt := torch.nextafter(z, step)) - exact) <= ulps * ulp:
        z = nxt
    return float(z)
