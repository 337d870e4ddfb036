"""fusion_pass.kernels: the attention spec, the CPU implementation, the Triton kernels and the
custom ops ``fusion_pass::attention`` / ``fusion_pass::attention_backward``.

Importing this package registers the custom ops. It never imports the pass (``fusion_pass``'s
other modules): the spec is the only hand-off.
"""
from .spec import AttentionSpec, ScoreOp, dtype_name, to_dtype  # noqa: F401
from .ops import fused_attention  # noqa: F401  (registers the custom ops)
