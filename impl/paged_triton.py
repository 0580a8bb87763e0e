"""Paged decode attention as a Triton kernel (the paged contract, impl/paged.py), in the manner of vLLM's
PagedAttention and FlashAttention's flash_attn_with_kvcache, written for reading.

A decode step is memory-bound: each new token does O(L d) arithmetic per head against L cached keys, so its time is
the time to read the KV cache. The kernel's one job is therefore to read each sequence's keys and values once:

- One program per (sequence b, KV head j, query row i). It loads the g = H / Hkv query heads j*g .. j*g + g - 1 of
  row i as a (G_PAD, D_PAD) tile, so every K/V tile it loads serves all g heads (GQA's whole point at decode time:
  the cache is Hkv heads wide, read once, not H times). Chunked prefill (Sq > 1) runs Sq programs per head; each
  reads the keys its row sees (decode's Sq = 1 is the case this kernel is shaped for).
- The keys are walked in tiles of BLOCK_N consecutive token positions. A tile either lies inside one page
  (page_size >= BLOCK_N: one block-table entry) or covers BLOCK_N / page_size whole pages (page_size < BLOCK_N, down
  to 1: one entry per page). Each token's address is block_table[b, t // page_size] * stride_block +
  (t % page_size) * stride_slot: pages anywhere in the pool, in any order.
- Only the keys this row sees are loaded: t in [lo, hi) with hi <= cache_seqlens[b] (causal: p + 1; a window's
  right side: p + right + 1) and lo its window's left edge; the loads are masked to that range, so a slot past the
  sequence's end (NaN in the harness) is never read, and the block-table entries of pages outside it neither.
- Online softmax in float32 (impl/flash_triton_fwd.py's equation 6), with the sink as the first logit seen
  (m = sink, l = 1), softcap from exp (tanh_sech2), out = acc / l, lse = m + log l (natural log, float32).

Its traffic in closed form (`traffic`; tests/test_paged_impl.py checks it against the interpreter's count): per
program, cache_seqlens[b] (4 bytes), q's g rows, the sinks' g logits, the block-table entries of the tiles' pages,
(hi - lo) keys and values, out's g rows and g lse values. At decode with L tokens that is the sequence's KV-cache bytes
plus O(g d + L / page_size) bytes: `traffic(...) / kv_cache_bytes(...)` -> 1 as L grows.

CUDA tensors run compiled; CPU tensors in Triton's interpreter (impl/triton_cpu.py; `tl` is None until then).
Forward only: a decode kernel, no autograd. Verified in the interpreter; on a GPU only compiled (to an sm_90 cubin,
tests/test_paged_impl.py's slow tier), not yet run or timed there.
"""

from __future__ import annotations

import sys

import torch

from impl import masks, paged, triton_cpu
from impl.flash_triton_fwd import cast, tanh_sech2

tl = None  # triton.language, once loaded (impl/triton_cpu.py): importing this module does not import triton

BLOCK_N = 64  # keys per tile (a power of two >= 16: tl.dot's minimum on a GPU); a page of 16 is 4 pages per tile


@triton_cpu.jit
def paged_decode(
    Q, K, V, Table, Lens, Sinks, Out, Lse,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kn, stride_ks, stride_kh, stride_kd,  # the pool: block, slot, KV head, d
    stride_vn, stride_vs, stride_vh, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_tb, stride_tp,  # block table: sequence, page
    H, G, Sq, scale, win_left, win_right, softcap,  # G = H / Hkv query heads per KV head
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, HAS_SINKS: tl.constexpr,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, G_PAD: tl.constexpr,
    PAGE: tl.constexpr, BLOCK_N: tl.constexpr, NPAGES: tl.constexpr,  # NPAGES = max(BLOCK_N // PAGE, 1)
    EMULATE_BF16: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    # -- which program: sequence b, KV head hk, query row i; its rows are the query heads hk*G .. hk*G + G - 1
    b = tl.program_id(0).to(tl.int64)  # 64-bit offsets: block * stride_kn passes 2^31 elements in a big pool
    hk = tl.program_id(1).to(tl.int64)
    i = tl.program_id(2)
    L = tl.load(Lens + b)  # this sequence's length, its new tokens included
    p = L - Sq + i  # the query's position: bottom-right aligned
    offs_g = tl.arange(0, G_PAD)  # (G_PAD,) rows: the group's query heads, padded to a power of two
    offs_d = tl.arange(0, D_PAD)  # (D_PAD,) head_dim padded to a power of two
    offs_n = tl.arange(0, BLOCK_N)  # (BLOCK_N,) keys within a tile
    g_ok = offs_g < G
    d_ok = offs_d < HEAD_DIM
    h = hk * G + offs_g  # (G_PAD,) query heads

    # -- the group's queries, loaded once: (G_PAD, D_PAD)
    q = tl.load(Q + b * stride_qb + h[:, None] * stride_qh + i * stride_qm + offs_d[None, :] * stride_qd,
                mask=g_ok[:, None] & d_ok[None, :], other=0.0)  # fmt: skip
    if EMULATE_BF16:
        q = q.to(tl.float32)

    # -- state: running max m, running sum l, accumulator acc (float32); a sink is the first logit seen
    m_i = tl.full([G_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.full([G_PAD], 0.0, dtype=tl.float32)
    if HAS_SINKS:
        m_i = tl.load(Sinks + h, mask=g_ok, other=float("-inf"))  # (G_PAD,) float32
        l_i = tl.where(m_i == float("-inf"), 0.0, 1.0)  # exp(sink - sink); a -inf sink is no sink
    acc = tl.full([G_PAD, D_PAD], 0.0, dtype=tl.float32)

    # -- the keys this row sees: [lo, hi), never past L; the tile grid starts at the tile holding lo
    lo = 0
    hi = L
    if HAS_LEFT:
        lo = tl.maximum(p - win_left, 0)
    if HAS_RIGHT:
        hi = tl.minimum(tl.maximum(p + win_right + 1, 0), L)
    lo = tl.minimum(lo, hi)
    start = lo // BLOCK_N * BLOCK_N
    stop = tl.where(hi > lo, hi, start)  # an empty range walks no tile (and loads no table entry)
    table = Table + b * stride_tb
    k_head = K + hk * stride_kh
    v_head = V + hk * stride_vh

    for start_n in range(start, stop, BLOCK_N):
        keys = start_n + offs_n  # (BLOCK_N,) token positions
        key_ok = (keys >= lo) & (keys < hi)
        # -- the tile's pages: NPAGES whole pages (PAGE < BLOCK_N) or the one page holding the tile; an entry is
        #    loaded only for a page holding a key of [lo, hi)
        pages = start_n // PAGE + tl.arange(0, NPAGES)  # (NPAGES,)
        page_ok = (pages * PAGE < hi) & ((pages + 1) * PAGE > lo)
        blocks = tl.load(table + pages * stride_tp, mask=page_ok, other=0).to(tl.int64)  # (NPAGES,)
        per_key = tl.reshape(tl.broadcast_to(blocks[:, None], (NPAGES, BLOCK_N // NPAGES)), (BLOCK_N,))  # (BLOCK_N,)
        slots = keys % PAGE  # (BLOCK_N,) each token's slot in its page
        k_rows = per_key * stride_kn + slots * stride_ks  # (BLOCK_N,) each token's offset in the K pool
        v_rows = per_key * stride_vn + slots * stride_vs  # (BLOCK_N,) and in the V pool (its own strides)
        # -- K^T (D_PAD, BLOCK_N): this KV head's keys, once for all G query heads
        k = tl.load(k_head + k_rows[None, :] + offs_d[:, None] * stride_kd, mask=d_ok[:, None] & key_ok[None, :],
                    other=0.0)  # fmt: skip
        if EMULATE_BF16:
            k = k.to(tl.float32)
        s = tl.dot(q, k, input_precision=PRECISION) * scale  # (G_PAD, BLOCK_N) float32, scaled after the product
        if SOFTCAP:
            t, _ = tanh_sech2(s / softcap)
            s = softcap * t
        s = tl.where(key_ok[None, :], s, float("-inf"))  # keys outside [lo, hi): no weight (after the cap)
        # -- online softmax: m' = max(m, rowmax S), P = exp(S - m'), rescale what was accumulated by exp(m - m')
        m_new = tl.maximum(m_i, tl.max(s, 1))  # (G_PAD,)
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing seen yet: no shift (-inf - -inf)
        prob = tl.exp(s - shift[:, None])  # (G_PAD, BLOCK_N)
        alpha = tl.exp(m_i - shift)
        l_i = l_i * alpha + tl.sum(prob, 1)
        # -- V (BLOCK_N, D_PAD), the same rows of the pool
        v = tl.load(v_head + v_rows[:, None] + offs_d[None, :] * stride_vd, mask=key_ok[:, None] & d_ok[None, :],
                    other=0.0)  # fmt: skip
        if EMULATE_BF16:
            v = v.to(tl.float32)
        acc = tl.dot(cast(prob, v.dtype, EMULATE_BF16), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new

    # -- epilogue: out = acc / l (0 for a row that saw nothing), lse = m + log l (-inf there, or the sink)
    o = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # (G_PAD, D_PAD)
    o_ptrs = Out + b * stride_ob + h[:, None] * stride_oh + i * stride_om + offs_d[None, :] * stride_od
    tl.store(o_ptrs, cast(o, Out.dtype.element_ty, EMULATE_BF16), mask=g_ok[:, None] & d_ok[None, :])
    tl.store(Lse + (b * H + h) * Sq + i, m_i + tl.log(l_i), mask=g_ok)  # Lse is (B, H, Sq) contiguous


# --------------------------------------------------------------------------------------------------------------
# the launch and the contract


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def paged_triton(q, k_cache, v_cache, *, block_table, cache_seqlens, causal=True, scale=None, window=None,
                 softcap=0.0, sinks=None, block_n=BLOCK_N) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The paged contract (impl/paged.py): q [B, H, Sq, d]; k_cache, v_cache [num_blocks, page_size, Hkv, d] with
    page_size a power of two -> out [B, H, Sq, d] in q's dtype, lse [B, H, Sq] float32. float32, bfloat16, float16;
    any strides. CUDA tensors run compiled, CPU tensors in Triton's interpreter."""
    lens = paged.check(q, k_cache, v_cache, block_table, cache_seqlens)
    B, H, Sq, d = q.shape
    Hkv, page = k_cache.shape[2], k_cache.shape[1]
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16) or not q.dtype == k_cache.dtype == v_cache.dtype:
        raise ValueError(f"q, k_cache, v_cache: one dtype of float32/bfloat16/float16, got {q.dtype}, "
                         f"{k_cache.dtype}, {v_cache.dtype}")  # fmt: skip
    if page & (page - 1) or block_n < 16 or block_n & (block_n - 1):
        raise ValueError(f"page_size must be a power of two and block_n one >= 16, got {page}, {block_n}")
    masks.check_sinks(sinks, H)
    softcap = float(softcap or 0.0)
    if not 0.0 <= softcap < float("inf"):
        raise ValueError(f"softcap must be a finite float >= 0 (0: off), got {softcap}")
    limit = max(lens, default=0) + Sq  # a side wider than any sequence is unbounded: keeps it in int32
    left, right = (None if w is None else min(w, limit) for w in masks.bounds(window, causal))
    out = torch.empty_like(q)  # (B, H, Sq, d)
    lse = torch.full((B, H, Sq), float("-inf"), dtype=torch.float32, device=q.device)  # (B, H, Sq)
    if q.numel() == 0:
        return out, lse
    table = block_table.to(q.device, torch.int32)  # (B, max_blocks): 4 bytes an entry, as traffic() counts
    seqlens = cache_seqlens.to(q.device, torch.int32).contiguous()  # (B,)
    sinks = None if sinks is None else sinks.detach().to(q.device, torch.float32).contiguous()  # (H,)
    triton_cpu.load(sys.modules[__name__])  # imports triton, rebinds paged_decode (and tl) to the decorated kernel
    interpret = not (q.is_cuda and triton_cpu.compiled(paged_decode))
    args = (
        q, k_cache, v_cache, table, seqlens, sinks, out, lse, *q.stride(), *k_cache.stride(), *v_cache.stride(),
        *out.stride(), *table.stride(), H, H // Hkv, Sq, d**-0.5 if scale is None else float(scale),
        left or 0, right or 0, softcap if softcap > 0 else 1.0,
    )  # fmt: skip
    constexprs = dict(
        HAS_LEFT=left is not None, HAS_RIGHT=right is not None, SOFTCAP=softcap > 0, HAS_SINKS=sinks is not None,
        HEAD_DIM=d, D_PAD=max(16, _pow2(d)), G_PAD=max(16, _pow2(H // Hkv)),  # >= 16: tl.dot's minimum on a GPU
        PAGE=page, BLOCK_N=block_n, NPAGES=max(block_n // page, 1),
        EMULATE_BF16=interpret and q.dtype == torch.bfloat16,  # the interpreter's bfloat16 (impl/flash_triton_fwd.py)
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # float32: exact products, not TF32's 10 bits
    )  # fmt: skip
    grid = (B, Hkv, Sq)  # one program per (sequence, KV head, query row)
    if interpret:
        triton_cpu.launch_interpreted(paged_decode, grid, *args, **constexprs)
    else:
        paged_decode[grid](*args, **constexprs, num_warps=4, num_stages=2)
    return out, lse


# --------------------------------------------------------------------------------------------------------------
# traffic in closed form


def row_keys(L: int, Sq: int, i: int, left: int | None, right: int | None) -> tuple[int, int]:
    """[lo, hi): the keys query row i of a sequence of length L loads (the kernel's lo, hi; left/right None =
    unbounded, causal already folded into right)."""
    p = L - Sq + i
    lo = 0 if left is None else max(p - left, 0)
    hi = L if right is None else min(max(p + right + 1, 0), L)
    return min(lo, hi), hi


def table_entries(lo: int, hi: int, page: int, block_n: int = BLOCK_N) -> int:
    """Block-table entries one program loads for keys [lo, hi): one per page holding a key (page < block_n), or one
    per tile (a tile lies in one page: page >= block_n)."""
    if hi <= lo:
        return 0
    if page >= block_n:
        return -(-(hi - lo // block_n * block_n) // block_n)
    return (hi - 1) // page - lo // page + 1


def traffic(cache_seqlens, *, H: int, Hkv: int, Sq: int, d: int, page_size: int, dtype, causal: bool = True,
            window=None, has_sinks: bool = False, block_n: int = BLOCK_N) -> dict:  # fmt: skip
    """Bytes the kernel moves to and from global memory, exactly (masked lanes move nothing): {"load_bytes",
    "store_bytes"}. cache_seqlens: the B lengths (ints). Per program (b, KV head, row i), keys [lo, hi):

        loads  = 4 (cache_seqlens[b]) + g d size (q) + 4 g (sinks) + 4 entries (block table) + 2 (hi - lo) d size
        stores = g d size (out) + 4 g (lse)
    """
    size = torch.empty((), dtype=dtype).element_size()
    g = H // Hkv
    left, right = masks.bounds(window, causal)
    loads = stores = 0
    for L in (int(n) for n in cache_seqlens):
        for i in range(Sq):
            lo, hi = row_keys(L, Sq, i, left, right)
            loads += 4 + g * d * size + (4 * g if has_sinks else 0) + 4 * table_entries(lo, hi, page_size, block_n)
            loads += 2 * (hi - lo) * d * size
            stores += g * d * size + 4 * g
    return {"load_bytes": Hkv * loads, "store_bytes": Hkv * stores}


def kv_cache_bytes(cache_seqlens, *, Hkv: int, d: int, dtype) -> int:
    """The physical limit of a decode step: every owned token's K and V, read once."""
    size = torch.empty((), dtype=dtype).element_size()
    return sum(int(n) for n in cache_seqlens) * Hkv * 2 * d * size
