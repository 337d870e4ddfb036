"""fusion_pass.kernels: the attention spec, the CPU implementation, the Triton kernels and the
custom ops ``fusion_pass::attention`` / ``fusion_pass::attention_backward``.

Importing this package registers the custom ops. It never imports the pass (``fusion_pass``'s
other modules): the spec is the only hand-off.
"""
if __name__ == "fusion_pass.kernels":
    from .spec import AttentionSpec, ScoreOp, dtype_name, to_dtype  # noqa: F401
    from .ops import fused_attention  # noqa: F401  (registers the custom ops)
else:
    # This folder was imported as a top-level ``kernels`` (the repository root is on sys.path, as
    # under ``python -m pytest``), e.g. by transformers probing for PyPI's ``kernels`` package with
    # an import. It is not that package: stay an empty module with a version no one accepts, and do
    # not register the custom ops a second time from a second copy of these modules.
    __version__ = "0.0.0"
