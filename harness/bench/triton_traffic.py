"""The Triton kernel's global-memory traffic in closed form: the bytes (and load/store calls) the block schedule of
impl/flash_triton_fwd.py's forward kernel moves, for the bench's rows where the kernel cannot be counted (on a GPU,
or past the interpreter's budget). Exact for the kernel as written, windows and sinks included: tests/test_triton.py
compares it with kernel_traffic's count of the interpreted kernel.

Query block i (rows i*bm .. i*bm + bm - 1, positions p = Sk - Sq + row) loads the keys [lo_i, hi_i) its rows' bands
span (impl.flash_triton.band: p - left <= key <= p + right, a side None = unbounded):

    lo_i = clamp(Sk - Sq + i bm - left, 0, Sk)            (0 without a left bound)
    hi_i = clamp(Sk - Sq + (i + 1) bm + right, 0, Sk)     (Sk without a right bound; causal: right = 0)

(the kernel clips its last row's position to Sk - 1; with right >= 0 that leaves hi_i as written). Both are clamped
arithmetic series in i, so their sums have a closed form (`clamped_sum`), and keys_seen = sum hi_i - sum lo_i.
"""

from __future__ import annotations

import torch

from impl.flash_triton import BLOCK_M, BLOCK_N, MASK_DTYPE, band
from impl.gqa import groups


def clamped_sum(c: int, step: int, n: int, top: int) -> int:
    """sum over i = 0 .. n-1 of min(top, max(0, c + i step)), step > 0, in closed form.

    Terms <= 0 (the first z) count 0, terms >= top (from index t on) count top; between them an arithmetic series.
    """
    if n <= 0 or top <= 0:
        return 0
    z = min(max(-c // step + 1, 0), n)  # i <= -c / step: c + i step <= 0
    t = min(max(-(-(top - c) // step), z), n)  # the first i with c + i step >= top (>= z: such terms are > 0)
    series = (t - z) * c + step * (t * (t - 1) // 2 - z * (z - 1) // 2)  # sum of c + i step for i = z .. t-1
    return series + (n - t) * top


def block_keys(i: int, Sq: int, Sk: int, *, causal: bool, block_m: int, window=None) -> tuple[int, int]:
    """(lo, hi): query block i loads keys lo .. hi - 1 (the kernel's key_range)."""
    left, right = band(causal, window)
    offset = Sk - Sq
    lo = 0 if left is None else min(max(offset + i * block_m - left, 0), Sk)
    hi = Sk if right is None else min(max(offset + (i + 1) * block_m + right, 0), Sk)
    return lo, hi


def keys_seen(Sq: int, Sk: int, *, causal: bool, block_m: int, window=None) -> int:
    """Sum over query blocks of hi - lo, the keys the blocks load, in closed form (module docstring)."""
    n = -(-Sq // block_m)
    left, right = band(causal, window)
    offset = Sk - Sq
    his = n * Sk if right is None else clamped_sum(offset + block_m + right, block_m, n, Sk)
    los = 0 if left is None else clamped_sum(offset - left, block_m, n, Sk)
    return his - los


def tiles_loaded(Sq: int, Sk: int, *, causal: bool, block_m: int, block_n: int, window=None) -> int:
    """K/V tiles the forward's loops visit, over the query blocks: block i walks the tile grid from the tile holding
    lo to hi, cdiv(hi - floor(lo / block_n) block_n, block_n) tiles (a sum over the n blocks, not a closed form)."""
    total = 0
    for i in range(-(-Sq // block_m)):
        lo, hi = block_keys(i, Sq, Sk, causal=causal, block_m=block_m, window=window)
        total += -(-(hi - lo // block_n * block_n) // block_n)
    return total


def traffic_model(
    B, H, Hkv, Sq, Sk, d, *, dtype, causal, block_m=BLOCK_M, block_n=BLOCK_N, has_mask=False, window=None,
    has_sinks=False,
) -> dict:  # fmt: skip
    """Bytes (and load/store calls) the kernel's block schedule moves to and from global memory.

    Per program (query block i of one batch and head): its Q rows once (rows < Sq, d lanes each: padded lanes
    are masked off); the keys lo_i .. hi_i - 1 of K and of V (whole tiles inside the band, edge tiles masked to
    [lo_i, hi_i): block_n does not change the bytes, only the number of loads); the padding mask over the same keys
    (1 byte each); with sinks, its head's sink (one float32); out (rows x d, q's dtype) and lse (rows x 4 bytes)
    stored once. GQA does not change the count: each program reads its KV head's blocks itself (no repeated K/V in
    memory; re-reads by the g heads of a group are counted as reads, as a GPU issues them, whether or not L2 serves
    them). Hkv is accepted for the signature's sake. softcap moves no data: it is not a parameter.
    """
    groups(H, Hkv)
    size = torch.empty((), dtype=dtype).element_size()
    n = -(-Sq // block_m)
    keys = keys_seen(Sq, Sk, causal=causal, block_m=block_m, window=window)
    per_head_loads = Sq * d * size + 2 * keys * d * size + (keys * MASK_DTYPE.itemsize if has_mask else 0)
    per_head_loads += n * 4 if has_sinks else 0
    per_head_stores = Sq * (d * size + 4)
    tiles = tiles_loaded(Sq, Sk, causal=causal, block_m=block_m, block_n=block_n, window=window)
    return {
        "load_bytes": B * H * per_head_loads,
        "store_bytes": B * H * per_head_stores,
        "load_calls": B * H * (n * (2 if has_sinks else 1) + tiles * (3 if has_mask else 2)),
        "store_calls": B * H * 2 * n,
    }
