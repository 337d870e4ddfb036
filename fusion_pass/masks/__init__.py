"""Stage 4, analyse (masks): read the subgraph that builds an attention mask as a predicate.

A mask reaches the scores as a boolean "keep" tensor (``where(keep, s, min)``, ``masked_fill``) or as
an additive float tensor (``s + mask`` with ``mask = where(keep, 0, finfo.min)``,
``masked_fill(~keep, -inf)``, ``(1 - keep.float()) * min``...). When that tensor is built in the graph
from index arithmetic (arange, tril/triu, comparisons, abs, //, %, and/or/not, indexing a padding
mask by aranges), the kernel does not need to load it: it can compute ``keep(b, h, i, j)`` and skip
whole tiles that are known empty. ``analyse_mask`` walks the nodes that build the mask and
interprets each op *symbolically* (sympy), so the predicate it returns equals the graph's mask by
construction; nothing is guessed from names or sampled values. Where an op is outside what it can
interpret, it returns a ``NearMissReason`` naming the node, and the caller keeps the mask as a
tensor (loaded by the kernel), which is always correct.

What it hands on (to the spec and the kernels): a ``MaskPredicate``:
* ``keep``: a sympy Boolean over the score axes ``b, h, i, j`` (batch, head, query, key), Dynamo's
  size symbols (``s27``...), and *data atoms*: ``d_<node>(b, j)``, a tensor from the graph (padding
  mask, document ids, a registered buffer) indexed by index expressions; ``data`` lists those nodes;
* for additive masks the kept value (0) and the masked value (finfo.min or -inf), and
  ``exact_below()``: the |s| below which ``s + masked == masked`` in the mask's dtype, so the caller can
  prove ``s + mask == where(keep, s, masked)``;
* ``classify()``: causal (any offset), sliding window (one or two sided), prefix-LM, chunked,
  document (block-diagonal from ids), padding, and their conjunctions;
* ``block_sparsity(...)``: for block sizes and concrete lengths, each tile empty / full / partial for
  the data-free part of the predicate (interval reasoning per tile, exact dense evaluation of the tiles
  it cannot decide), and ``evaluate(...)``: the dense mask, used by the tests as the proof check.

Soundness rules kept throughout:
* integers are exact in sympy, and torch's are equal to them only without wraparound, so every
  integer node's value range (index symbols over 0 <= p < size, sizes from Dynamo's shape
  environment and below ``DIM_BOUND``, data over its dtype's whole range) is proven to fit the node's
  dtype, and every operand to fit the dtype the op computes in (``uint8_t < 300`` compares with 44);
  integer division or remainder by a possible 0 and float -> int casts out of range are refused;
* float values are never computed in sympy, only in torch, in the graph's own dtypes and promotion
  (a float tensor is a finite table {condition: value});
* aliasing: any node read whose storage some node of the graph may write (in place, through any
  view, before or after, ``out=``, setitem, a higher-order op's body, an opaque call) is refused;
* data is only a graph input (placeholder or attribute) of integer or boolean dtype.
"""
from __future__ import annotations

# The package in reading order, each module importing only from those above it:
#   symbols   the index symbols and size helpers
#   evaluate  integer bounds, dense evaluation, tiles (block sparsity)
#   classify  bands, causal, windows, prefix, chunks, documents, padding
#   predicate MaskPredicate / NearMissReason (what is handed on)
#   values    the interpreter's symbolic values and tables
#   handlers  one handler per op, and the spelling -> handler table
#   interpret the interpreter and the entry points
from .classify import MaskClass, classify
from .evaluate import EMPTY, FULL, PARTIAL, block_sparsity, dense_block_sparsity
from .interpret import DIM_BOUND, analyse_index, analyse_mask
from .predicate import MaskPredicate, NearMissReason, is_causal, sliding_window
from .symbols import b, h, i, j
from .values import MAX_EXPR, MAX_TABLE

__all__ = ["DIM_BOUND", "EMPTY", "FULL", "MAX_EXPR", "MAX_TABLE", "PARTIAL", "MaskClass", "MaskPredicate",
           "NearMissReason", "analyse_index", "analyse_mask", "b", "block_sparsity", "classify",
           "dense_block_sparsity", "h", "i", "is_causal", "j", "sliding_window"]
