"""Generate stage, Triton half: the names ``ops.py``, the benchmarks and the tests use, from the
modules of ``triton_attn/`` where they live:

* ``triton_attn/attention.py``: the kernels, real Triton source (forward, backward preprocess, dQ,
  dK/dV), with the spec's parts imported from ``spec_parts.py``;
* ``triton_attn/codegen.py``: the only generated code, per spec: the score function, its
  derivative, the mask predicates and the operand tiles (``generate_source``);
* ``triton_attn/loader.py``: the kernel module of a spec (``kernels``), its explicit cache and the
  private folder the generated sources are written to (``cache_dir``);
* ``triton_attn/launch.py``: ``supports``, ``forward``, ``backward``, the tile table;
* ``triton_attn/ranges.py``: host-side block ranges (``block_ranges``, ``full_ranges``) and their
  explicit cache; for bands only four integers (``linear_band``), the kernels compute the rest.
"""
from .triton_attn.codegen import (  # noqa: F401
    LN2, LOG2E, generate_source, operand_names, predicates_supported, skip_op)
from .triton_attn.launch import (  # noqa: F401
    _blocks, _needs_row_stats, _threshold32, backward, decode_plan, forward, supports, target_arch)
from .triton_attn.loader import CACHE_ENV, KERNELS, cache_dir, kernels  # noqa: F401
from .triton_attn.ranges import (  # noqa: F401
    RANGES, _block_ranges, _linear_block_ranges, _ranges, block_ranges, full_ranges, linear_band)

# the loaded modules (``KERNELS``'s dict), under the name the first version had
_MODULES = KERNELS.modules
