"""dustin_kernels: kernels for long-context speculative decoding with sparse verification.

    from dustin_kernels import attention_scores, select_tokens, sparse_verify

The README ("The ops") states the contract of each op; each is also `torch.ops.dustin_kernels.<name>`
(`dustin_kernels.library`), and `VerifyPlan` runs sparse or dense verification per layer of a step.
"""
from ._checks import trusted_inputs
from .ops.scores import attention_scores, attention_scores_layers
from .ops.select import select_tokens
from .ops.engine import attention_scores_paged, sparse_verify_varlen
from .ops.verify import VerifyPlan, dense_verify, sparse_verify, sparse_verify_paged

__all__ = ["attention_scores", "attention_scores_layers", "select_tokens", "sparse_verify", "sparse_verify_paged",
           "dense_verify", "sparse_verify_varlen", "attention_scores_paged", "VerifyPlan", "trusted_inputs"]
__version__ = "0.1.0"
