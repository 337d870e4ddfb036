"""The per-spec parts of the attention kernels, for plain attention (softmax(q k^T) v): the contract
that ``codegen.py`` fills for each ``AttentionSpec``.

``attention.py`` imports these names; the loader (``loader.py``) executes ``attention.py`` in a
fresh module per spec and then the generated source (``codegen.generate_source``) in the same
namespace, which redefines every name below. Triton resolves a kernel's globals when it first
compiles it, so each spec's kernels call that spec's functions. Imported on its own (reading,
linting, tests of the helpers), ``attention.py`` gets this plain version.

Operands: ``OPS`` is the flat tuple of the spec's captured operands as the launcher passes them
(``launch._operands``); ``T`` the tuple of their tiles that ``operand_tiles`` loads for one
(query block, key block) tile, which ``score_mod`` and ``score_mod_backward`` read.
"""
import triton
import triton.language as tl

# Python-level: whether the forward has a full-tile path (tiles every row keeps whole skip the
# mask step and the bounds checks); the launcher reads it
HAS_FULL_TILES = True
# the score is kept in base-2 units (log2(e) folded into the chain, exp2 in the kernels)
LOG2_UNITS = tl.constexpr(False)
# SDPA's safe softmax: a row whose every score is -inf gives 0, not NaN
SAFE_SOFTMAX = tl.constexpr(False)
# dropout: keep an element when its hash is >= DROP_THRESHOLD; kept values scale by DROP_SCALE
HAS_DROPOUT = tl.constexpr(False)
DROP_THRESHOLD = tl.constexpr(0)
DROP_SCALE = tl.constexpr(1.0)
# > 0 when the chain on a full tile is one product s * FULL_SCALE (in base-2 units): the forward
# then takes FlashAttention-2's form (max of the raw products, one FMA per score)
FULL_SCALE = tl.constexpr(0.0)


@triton.jit
def qk_round(s):
    """The raw product q k^T (fp32) as the model's qk dtype holds it: the generated one, for a
    float16 spec, turns the products past float16's range into +-inf (eager rounds them so)."""
    return s


@triton.jit
def operand_values(OPS):
    """OPS with each scalar operand's pointer replaced by its value (loaded once per program,
    before a kernel's loops); the generated one loads them. Plain attention has no operands."""
    return OPS


@triton.jit
def operand_tiles(OPS, off_b, off_h, offs_m, offs_n, valid):
    """The tiles of the captured operands and masks for one tile of scores."""
    return ()


@triton.jit
def operand_tiles_full(OPS, off_b, off_h, offs_m, offs_n, valid):
    """``operand_tiles`` on a full tile: the skipped mask is not evaluated (a 0 in its slot)."""
    return ()


@triton.jit
def score_mod(s, T):
    """score_mod(q k^T) on a tile, in the units of the kernels' exponential."""
    return s


@triton.jit
def score_mod_full(s, T):
    """``score_mod`` on a full tile (the skipped predicate's step is the identity there)."""
    return s


@triton.jit
def score_mod_backward(ds, s0, T):
    """d(score_mod)/ds0 applied to ds (natural units), at the raw product s0."""
    return ds


@triton.jit
def score_mod_backward_store(ds, s0, T, DC, GRAD: tl.constexpr, off_bh, pid_m, blk_n, offs_m,
                             offs_n, valid, N_Q, N_K, BLOCK_M: tl.constexpr, num_n_blocks):
    """``score_mod_backward``, also storing the gradients of the captured operands whose bit is set
    in GRAD into their buffers in the tuple DC (per element for tensors, per tile for scalars)."""
    return ds
