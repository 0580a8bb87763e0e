"""The catalog's ring attention entries (contract "ring": verify --ring runs each on W = 2 and W = 4 rank processes by
its importable name, `harness.bugs.ring_mistakes:NAME`): ring.py's textbook with one step from ring_mistakes.py.

Kept apart from catalog.py for its length; catalog.py makes each a Bug (this module cannot import it: a cycle).
A hint says where the bug shows when that is not everywhere (tests/test_ring_bugs.py checks each claim).
"""

from __future__ import annotations

from harness.bugs import ring_mistakes as rm

HELD = {"held_out": True}


def entry(name: str, stage: str, bug: str, hint: str, **kw) -> dict:
    """A catalog.Bug's fields; fn is the ring_mistakes function of the same name."""
    return {"name": name, "stage": stage, "bug": bug, "hint": hint, "fn": getattr(rm, name)} | kw


ENTRIES: list[dict] = [
    # ring_merge: how the blocks' partial (out, lse) combine
    entry("ring_merge_unrescaled", "ring_merge", "the running output not rescaled when a block's lse raises the total",
          "the merge looks to add each block's share without rescaling the output so far: out = out exp(lse - "
          "lse_new) + out_s exp(lse_s - lse_new), lse_new = logaddexp(lse, lse_s)"),
    entry("ring_merge_sum", "ring_merge", "the blocks' normalised outputs summed",
          "weigh each block's output by its share of the softmax, exp(lse_s - lse_new)", **HELD),
    entry("ring_lse_base2", "ring_merge", "the merged lse by logaddexp2 (base 2), the weights by natural exp",
          "the merged lse looks taken in base 2: lse is a natural log, lse_new = logaddexp(lse, lse_s) (not "
          "logaddexp2), and the weights exp(lse_i - lse_new) use the same base"),
    entry("ring_empty_block_nan", "ring_merge", "a block with no visible key gives NaN (softmax over all -inf)",
          "a query that sees no key of a block (a later rank's, under causal) must get out_s = 0, lse_s = -inf, "
          "which weigh nothing in the merge; shows under causal only", **HELD),
    # ring_mask: which keys of a block a query sees
    entry("ring_remote_diagonal_mask", "ring_mask", "every block masked like the diagonal one (tril by index)",
          "remote blocks look masked like the rank's own (key j <= query i by index within the block): mask from "
          "global positions, key position <= query position, with the positions of the rank the block came from; "
          "shows under causal only"),
    entry("ring_future_blocks_seen", "ring_mask", "a later rank's block seen whole under causal (not skipped)",
          "the later ranks' keys are seen: with global positions their blocks are fully masked; skip or mask them; "
          "shows under causal only", **HELD),
    entry("ring_zigzag_first_chunk", "ring_mask", "zigzag: the shard's second chunk masked with its first chunk's "
          "positions", "under zigzag rank r holds chunks r and 2W-1-r: the second half's positions are "
          "(2W-1-r) S/2W onwards, not the first half's; shows with zigzag and causal only"),
    # ring_order: which block is where at which step
    entry("ring_own_block_skipped", "ring_order", "the rank's own (diagonal) block never attended",
          "the rank's own block looks skipped: step 0 attends the K/V the rank holds before any exchange"),
    entry("ring_own_block_twice", "ring_order", "one step too many: the own block comes round again and is merged "
          "twice", "the loop runs W + 1 steps: W blocks, W - 1 exchanges", **HELD),
    entry("ring_wrong_neighbour", "ring_order", "blocks received from r + 1 (sent to r - 1) while the masks assume "
          "r - s", "the blocks look to travel the other way round the ring from what the masks assume: receive from "
          "r - 1, send to r + 1, and the block at step s is rank r - s's; shows only with W >= 3 and causal (with "
          "W = 2 both neighbours are the same rank)"),
    entry("ring_dkv_not_returned", "ring_order", "dK/dV of a shard keep only its own rank's queries' contributions",
          "each rank's dk, dv look to hold only its own queries' part: the other ranks' contributions to a shard's "
          "dK/dV must travel back to its owner (round the ring, or a reduce-scatter)", kind="backward"),
]
