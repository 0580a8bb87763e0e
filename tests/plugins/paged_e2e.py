"""Paged kernels for `e2e --paged` by file (`tests/plugins/paged_e2e.py:last_slot_as_zero`): the catalog's paged bugs,
one module attribute per bug, and a bug in no catalog that waits for a page boundary."""

from harness.bugs.catalog import CATALOG
from impl.paged import paged_naive

globals().update({b.name: b.kernel() for b in CATALOG if b.contract == "paged"})


def last_slot_as_zero(q, k_cache, v_cache, *, block_table, cache_seqlens, causal=True, scale=None, window=None,
                      softcap=0.0, sinks=None):  # fmt: skip
    """Every page's last slot read as 0 (its key and its value): right until a sequence fills a page."""
    k, v = k_cache.clone(), v_cache.clone()
    k[:, -1], v[:, -1] = 0.0, 0.0  # (num_blocks, page, Hkv, d): slot page - 1 of every block
    return paged_naive(q, k, v, block_table=block_table, cache_seqlens=cache_seqlens, causal=causal, scale=scale,
                       window=window, softcap=softcap, sinks=sinks)  # fmt: skip
