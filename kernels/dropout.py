"""Counter-based dropout: the keep/drop decision for element (row, col) of the probabilities is a
pure function of (seed, flat index), so the backward regenerates the forward's mask without storing
it. The same 32-bit integer hash is written twice, once with torch ops (CPU implementation, tests)
and once in Triton (``triton_attention.py``), so both paths draw the same mask for the same seed.

The hash is Chris Wellons' "lowbias32" integer mixer, applied to the low and high 32-bit halves of
the flat element index in turn. Multiplication modulo 2^32 is done in int64 without signed
overflow by splitting the constant into 16-bit halves.
"""
from __future__ import annotations

import torch

M32 = 0xFFFFFFFF
_C1 = 0x7FEB352D
_C2 = 0x846CA68B


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for int64 x in [0, 2^32), with every partial product below 2^63."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, _C1)
    x = x ^ (x >> 15)
    x = _mul32(x, _C2)
    return x ^ (x >> 16)


def hash_index(seed: int, index: torch.Tensor) -> torch.Tensor:
    """32-bit hash (as int64 in [0, 2^32)) of a non-negative int64 index tensor."""
    lo = index & M32
    hi = index >> 32
    return _mix32(_mix32(lo ^ (seed & M32)) ^ hi)


def threshold(p: float) -> int:
    """An element is kept when its hash is >= threshold(p): probability 1 - p (to 2^-32)."""
    return min(int(round(p * 2.0 ** 32)), 2 ** 32)


def keep_mask(seed: int, index: torch.Tensor, p: float) -> torch.Tensor:
    return hash_index(seed, index) >= threshold(p)


# seeds are drawn in [0, SEED_HIGH): the hash reads the low 32 bits
SEED_HIGH = 2 ** 31 - 1


def new_seed(device: torch.device) -> torch.Tensor:
    """A fresh seed from torch's default generator, so ``torch.manual_seed`` makes runs repeatable."""
    return torch.randint(0, SEED_HIGH, (1,), dtype=torch.int64, device="cpu")
