"""attnprec.analysis.bounds: sound error bounds for every attention method.

Approximation (Taylor, range-adapted minimax polynomials, FAVOR+ random features, semiring
linearizations), rounding primitives, and :func:`attention_error_bound`, which assembles
quantization + approximation + rounding per output element. Derivations: docs/bounds/.
"""

from attnprec.analysis.bounds.attention import ErrorBound, attention_error_bound
from attnprec.analysis.bounds.favor import (
    block_factor,
    favor_error_bound,
    favor_features_needed,
    favor_projection_error_bound,
    favor_variance,
    mixture_error_bound,
    mixture_features_needed,
)
from attnprec.analysis.bounds.minimax import (
    minimax_degree_needed,
    minimax_exp_coeffs,
    minimax_weight_bound,
    polynomial_error_bound,
    polynomial_output_bound,
    polynomial_ratio_range,
)
from attnprec.analysis.bounds.rounding import (
    block_fma_gamma,
    blocked_gamma,
    dot_gamma,
    gamma,
    hm_failure_probability,
    hm_lambda,
    lse_bound,
    matmul_bound,
    pairwise_gamma,
    probabilistic_gamma,
    softmax_bound,
    sum_gamma,
)
from attnprec.analysis.bounds.semiring import (
    semiring_degree_needed,
    semiring_features_needed,
    semiring_output_bound,
    semiring_taylor_error_bound,
)
from attnprec.analysis.bounds.taylor import (
    taylor_degree_needed,
    taylor_error_bound,
    taylor_output_bound,
    taylor_ratio_range,
    taylor_weight_bound,
)

__all__ = [
    "ErrorBound",
    "attention_error_bound",
    "taylor_weight_bound",
    "taylor_ratio_range",
    "taylor_output_bound",
    "taylor_degree_needed",
    "taylor_error_bound",
    "minimax_exp_coeffs",
    "minimax_weight_bound",
    "minimax_degree_needed",
    "polynomial_ratio_range",
    "polynomial_output_bound",
    "polynomial_error_bound",
    "favor_variance",
    "block_factor",
    "favor_error_bound",
    "favor_projection_error_bound",
    "favor_features_needed",
    "mixture_error_bound",
    "mixture_features_needed",
    "semiring_output_bound",
    "semiring_degree_needed",
    "semiring_features_needed",
    "semiring_taylor_error_bound",
    "gamma",
    "sum_gamma",
    "pairwise_gamma",
    "blocked_gamma",
    "dot_gamma",
    "matmul_bound",
    "block_fma_gamma",
    "probabilistic_gamma",
    "hm_failure_probability",
    "hm_lambda",
    "lse_bound",
    "softmax_bound",
]
