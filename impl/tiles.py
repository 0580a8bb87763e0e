"""What the tiled forward and backward (impl/tiled.py) share: which key blocks a query block visits, the masks of
the tiles that cross a window's edge, the score tile itself, and the sink logits laid out as the tile's rows.

Every tile is (n, g*bq, bk): n of the B*Hkv (batch, KV head) pairs, each with the g query heads of its KV head
stacked as g blocks of bq rows (row r of KV head j is query head j*g + r // bq), against bk keys. Both passes must
build a tile's scores and masks identically: the backward recomputes the forward's probabilities from its lse.
"""

from __future__ import annotations

import torch

BLOCK_Q = 128  # query rows per tile (times g, the query heads per KV head)
BLOCK_K = 256  # keys per tile (the backward's; the forward's default is FORWARD_BLOCK_K)
FORWARD_BLOCK_K = 512
TILE_BYTES = 1 << 20  # the forward's score tile: about this size, so that it and a head's K and V stay in L2


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 inputs accumulate in float64; float32 and half precision in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def padding_bias(attention_mask, Hkv: int, dtype, device):
    """[B, Sk] of 1/0 -> (B*Hkv, 1, Sk) additive bias, one row per tile batch entry (b, KV head): 0 for a key,
    -inf for padding (None: no padding)."""
    if attention_mask is None:
        return None
    B, Sk = attention_mask.shape
    keep = attention_mask.to(device).bool()[:, None, None, :].expand(B, Hkv, 1, Sk).reshape(B * Hkv, 1, Sk)
    return torch.zeros(keep.shape, dtype=dtype, device=device).masked_fill_(~keep, float("-inf"))  # (B*Hkv, 1, Sk)


def key_span(i0: int, i1: int, offset: int, Sk: int, left: int | None, right: int | None) -> tuple[int, int]:
    """Keys [start, stop) that some query of rows i0..i1-1 may see: query i sits at position p = offset + i and sees
    p - left .. p + right (impl.masks.bounds: causal already folded into right; None = unbounded). Every key block
    outside this span is skipped, so a fixed window costs a fixed number of key blocks per query block."""
    start = 0 if left is None else max(0, offset + i0 - left)
    stop = Sk if right is None else min(Sk, offset + i1 + right)  # the last query's p + right, plus one
    return start, max(start, stop)


def key_blocks(i0, i1, offset, Sk, left, right, block_k) -> list[tuple[int, int]]:
    """The key blocks [j0, j1) a query block visits: its key span cut into block_k keys (the last one shorter)."""
    start, stop = key_span(i0, i1, offset, Sk, left, right)
    return [(j0, min(j0 + block_k, stop)) for j0 in range(start, stop, block_k)]


def edge_bias(i0, i1, j0, j1, offset, left, right, dtype, device):
    """(bq, bk) additive bias, -inf where key j is outside query i's window (j < p - left or j > p + right), 0
    elsewhere; None when the whole tile is inside every row's window (the common case: nothing to add).

    The tile crosses the left edge when its first key is before the last query's window starts, the right edge
    (the causal diagonal, for right = 0) when its last key is after the first query's window ends.
    """
    first, last = offset + i0, offset + i1 - 1  # the block's first and last query positions
    crosses_left = left is not None and j0 < last - left
    crosses_right = right is not None and j1 - 1 > first + right
    if not (crosses_left or crosses_right):
        return None
    p = torch.arange(first, last + 1, device=device)[:, None]  # (bq, 1)
    j = torch.arange(j0, j1, device=device)[None, :]  # (1, bk)
    outside = torch.zeros(i1 - i0, j1 - j0, dtype=torch.bool, device=device)  # (bq, bk)
    if crosses_left:
        outside |= j < p - left
    if crosses_right:
        outside |= j > p + right
    return torch.zeros(outside.shape, dtype=dtype, device=device).masked_fill_(outside, float("-inf"))  # (bq, bk)


def mask_tile(s, i0, i1, j0, j1, offset, left, right, pad, g: int, biases: dict | None = None):
    """Adds the window/causal edge bias (to each of the g heads' bq rows) and the padding bias pad (n, 1, Sk) to the
    tile s (n, g*bq, bk), in place. Masks are added as 0 / -inf biases: an add over the tile is much cheaper than a
    masked_fill_ here. biases: a dict the caller keeps for one call, so that a bias is built once per distinct tile
    position relative to the edges (the diagonal tiles of aligned blocks all share one), never across calls."""
    key = (offset + i0 - j0, i1 - i0, j1 - j0)  # all that edge_bias depends on, for this call's window
    if biases is not None and key in biases:
        bias = biases[key]
    else:
        bias = edge_bias(i0, i1, j0, j1, offset, left, right, s.dtype, s.device)  # (bq, bk) or None
        if biases is not None:
            biases[key] = bias
    if bias is not None:
        s.view(-1, g, i1 - i0, j1 - j0).add_(bias)  # (n, g, bq, bk): the same rows for each head
    if pad is not None:
        s.add_(pad[..., j0:j1])  # (n, g*bq, bk) + (n, 1, bk)
    return s


def heads_per_tile(N: int, rows: int, cols: int, itemsize: int) -> int:
    """How many of the N (batch, KV head) pairs one forward tile of rows x cols takes: as many as fit TILE_BYTES,
    at least one. Fewer, larger tiles cost less Python per FLOP; a tile past L2 costs every pass over it more."""
    return max(1, min(N, TILE_BYTES // max(1, rows * cols * itemsize)))


def score_tile(qi, kT, alpha: float, same: bool):
    """alpha * Q_i K_j^T in the accumulator dtype: qi (n, R, d), kT (n, d, bk) -> (n, R, bk), a new buffer.

    float32 / float64 (same): one GEMM, the scale as baddbmm's alpha (beta=0: the first argument is unused).
    Half precision: the GEMM in the input dtype, then float32, then the scale.
    """
    if same:
        return torch.baddbmm(qi.new_empty(()), qi, kT, beta=0, alpha=alpha)
    return torch.bmm(qi, kT).float().mul_(alpha)


def forward_heads(N: int, g: int, block_q: int | None, block_k: int | None, dtype) -> int:
    """How many (batch, KV head) pairs the forward's score tiles take at once (tiled_forward.py's grouping)."""
    wide = accumulator_dtype(dtype)
    return heads_per_tile(N, g * (block_q or BLOCK_Q), block_k or FORWARD_BLOCK_K, torch.finfo(wide).bits // 8)


def score_tiles(qi, kT, alpha: float, same: bool, n: int):
    """score_tile over the batch in groups of n pairs: the backward recomputes the forward's scores in the
    forward's GEMM batches, so that they are the same bits. A batched GEMM's rounding can depend on how many
    matrices it is given; P = exp(S - lse) must use the very S that made lse, or at scores in the thousands
    (a float32 ulp of 0.01) P is off by exp(ulp) where the reference's gradient is exactly zero."""
    N = qi.shape[0]
    if n >= N:
        return score_tile(qi, kT, alpha, same)
    return torch.cat([score_tile(qi[h0:h0 + n], kT[h0:h0 + n], alpha, same) for h0 in range(0, N, n)])


def sink_rows(sinks, B: int, Hkv: int, g: int, bq: int, dtype, device):
    """sinks [H] -> (B*Hkv, g*bq, 1) in dtype: each tile row's sink logit (row r of KV head j: query head
    j*g + r // bq)."""
    return sinks.to(device, dtype).view(1, Hkv, g, 1, 1).expand(B, Hkv, g, bq, 1).reshape(B * Hkv, g * bq, 1)
