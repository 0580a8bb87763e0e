"""The Triton kernel's global-memory traffic in closed form: the bytes (and load/store calls) the block schedule of
impl/flash_triton.py's forward kernel moves, for the bench's rows where the kernel cannot be counted (on a GPU, or
past the interpreter's budget). Exact for the kernel as written: tests/test_triton.py compares it with
kernel_traffic's count of the interpreted kernel.
"""

from __future__ import annotations

import torch

from impl.flash_triton import BLOCK_M, BLOCK_N, MASK_DTYPE
from impl.gqa import groups


def block_hi(i: int, Sq: int, Sk: int, causal: bool, block_m: int) -> int:
    """One past the last key query block i loads (the kernel's `hi`)."""
    return min(max(Sk - Sq + (i + 1) * block_m, 0), Sk) if causal else Sk


def keys_seen(Sq: int, Sk: int, *, causal: bool, block_m: int) -> int:
    """Sum over query blocks of hi, the keys a block loads (0 .. hi-1), in closed form.

    hi_i = min(Sk, max(0, Sk - Sq + (i+1) block_m)) causal, Sk otherwise, for query blocks i = 0 .. n-1,
    n = ceil(Sq / block_m). Causal: the last block has hi = Sk; the first z = max(0, (Sq - Sk) // block_m) blocks
    (only when Sq > Sk) see nothing; the others are an arithmetic series.
    """
    n = -(-Sq // block_m)
    if not causal or n == 0:
        return n * Sk
    offset = Sk - Sq
    z = max(0, (Sq - Sk) // block_m)  # blocks i with (i+1) block_m <= Sq - Sk
    mid = n - 1 - z  # blocks z .. n-2: hi_i = offset + (i+1) block_m
    return Sk + mid * offset + block_m * ((n - 1) * n // 2 - z * (z + 1) // 2)


def traffic_model(B, H, Hkv, Sq, Sk, d, *, dtype, causal, block_m=BLOCK_M, block_n=BLOCK_N, has_mask=False) -> dict:
    """Bytes (and load/store calls) the kernel's block schedule moves to and from global memory.

    Per program (query block i of one batch and head): its Q rows once (rows < Sq, d lanes each: padded lanes
    are masked off); the keys 0 .. hi_i - 1 of K and of V (stage-1 tiles whole, stage-2 tiles masked to keys <
    hi_i: the tiles cover exactly hi_i keys, so block_n does not change the bytes, only the number of loads); the
    padding mask over the same keys (1 byte each); out (rows x d, q's dtype) and lse (rows x 4 bytes) stored once.
    GQA does not change the count: each program reads its KV head's blocks itself (no repeated K/V in memory;
    re-reads by the g heads of a group are counted as reads, as a GPU issues them, whether or not L2 serves them).
    Hkv is accepted for the signature's sake.
    """
    groups(H, Hkv)
    size = torch.empty((), dtype=dtype).element_size()
    keys = keys_seen(Sq, Sk, causal=causal, block_m=block_m)
    per_head_loads = Sq * d * size + 2 * keys * d * size + (keys * MASK_DTYPE.itemsize if has_mask else 0)
    per_head_stores = Sq * (d * size + 4)
    n = -(-Sq // block_m)
    tiles = sum(-(-block_hi(i, Sq, Sk, causal, block_m) // block_n) for i in range(n))  # K, V (and mask) loads
    return {
        "load_bytes": B * H * per_head_loads,
        "store_bytes": B * H * per_head_stores,
        "load_calls": B * H * (n + tiles * (3 if has_mask else 2)),
        "store_calls": B * H * 2 * n,
    }
