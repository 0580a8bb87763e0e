"""The harness's own paged KV cache for `e2e --paged`: pages allocated and keys and values written by the harness, as
a serving engine's block manager does (vLLM), so the kernel under test reads only what the harness wrote, through
the table the harness made.

    pool      per layer, k_cache and v_cache [num_blocks, page_size, Hkv, d], NaN everywhere at first: only the
              harness writes, and only a sequence's own tokens, so every slot no sequence owns (the tail of a
              sequence's last page, every block no sequence holds) stays NaN and a kernel that reads one shows it
    pages     handed out when a sequence's next token starts a new page, from a shuffled free list: never the
              physical neighbour of the sequence's previous page, so no sequence's pages are contiguous; the pool
              holds SPARE times as many blocks again as the run can need (at least MIN_SPARE more), and its last
              block is the first one handed out (an index bound off by one reads past the pool)
    table     block_table [B, max_pages + 1] int32, one for every layer (as vLLM's): the entries past a sequence's
              pages point at blocks no sequence ever gets (the contract calls them arbitrary)
    lengths   cache_seqlens [B] int32: the tokens each sequence has in the cache, the ones being added included
"""

from __future__ import annotations

import math

import torch

from harness.verify.paged_cases import MIN_SPARE, SPARE


class PagePool:
    """The cache of every layer for B sequences of at most capacity[b] tokens each, in pages of page_size slots.

    A forward adds tokens to some sequences: begin(seqs, n) makes room for n more tokens at the end of each (pages
    allocated) and counts them in; each layer then write()s its new keys and values and reads inputs(); nothing
    else changes the pool."""

    def __init__(self, capacity: list[int], page_size: int, seed: int = 0):
        self.page = page_size
        need = sum(math.ceil(n / page_size) for n in capacity)
        self.num_blocks = need + max(MIN_SPARE, SPARE * need)
        g = torch.Generator().manual_seed(seed)
        order = torch.randperm(self.num_blocks, generator=g)
        order = torch.cat((order[order == self.num_blocks - 1], order[order != self.num_blocks - 1]))  # last first
        self.free = order[: need + 1].tolist()  # what allocation draws from (one spare: the neighbour rule)
        never = order[need + 1 :]  # blocks no sequence ever owns: the table's entries past a sequence's pages
        width = max(math.ceil(n / page_size) for n in capacity) + 1
        self.table = never[torch.randint(len(never), (len(capacity), width), generator=g)].to(torch.int32)
        self.pages = [0] * len(capacity)  # pages each sequence holds
        self.lens = torch.zeros(len(capacity), dtype=torch.int32)  # (B,): tokens in the cache, new ones included
        self.start = self.lens.clone()  # (B,): where the tokens being added begin
        self.seqs: list[int] = []  # the sequences the current forward adds to
        self.k: dict[int, torch.Tensor] = {}  # layer -> (num_blocks, page, Hkv, d)
        self.v: dict[int, torch.Tensor] = {}

    def _allocate(self, b: int) -> None:
        """One more page for sequence b: the first free block that is not its last page's physical neighbour."""
        prev = int(self.table[b, self.pages[b] - 1]) if self.pages[b] else None
        i = next((i for i, n in enumerate(self.free) if prev is None or n != prev + 1), 0)
        self.table[b, self.pages[b]] = self.free.pop(i)
        self.pages[b] += 1

    def begin(self, seqs: list[int], n: int) -> None:
        """n new tokens at the end of each of seqs (the forward's batch rows, in order): pages where they need
        them; cache_seqlens counts them from now on."""
        self.seqs, self.start = list(seqs), self.lens.clone()
        for b in self.seqs:
            self.lens[b] += n
            while self.pages[b] * self.page < int(self.lens[b]):
                self._allocate(b)

    def addresses(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(blocks, slots) of the tokens sequence b is adding now."""
        t = torch.arange(int(self.start[b]), int(self.lens[b]))
        return self.table[b, t // self.page].long(), t % self.page

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v (len(seqs), Hkv, n, d): the new tokens' keys (rotated) and values, into their slots of this layer's
        pool (made on first use, NaN)."""
        if layer not in self.k:
            shape = (self.num_blocks, self.page, k.shape[1], k.shape[3])
            self.k[layer] = torch.full(shape, float("nan"), dtype=k.dtype, device=k.device)
            self.v[layer] = torch.full(shape, float("nan"), dtype=v.dtype, device=v.device)
        for row, b in enumerate(self.seqs):
            blocks, slots = self.addresses(b)
            self.k[layer][blocks, slots] = k[row].transpose(0, 1)  # (Hkv, n, d) -> (n, Hkv, d)
            self.v[layer][blocks, slots] = v[row].transpose(0, 1)

    def inputs(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(k_cache, v_cache, block_table [len(seqs), width], cache_seqlens [len(seqs)]) for this forward's rows."""
        rows = torch.tensor(self.seqs)
        dev = self.k[layer].device
        return self.k[layer], self.v[layer], self.table[rows].to(dev), self.lens[rows].to(dev)

    def owned(self) -> torch.Tensor:
        """(num_blocks, page) bool: the slots holding some sequence's token."""
        out = torch.zeros(self.num_blocks, self.page, dtype=torch.bool)
        for b, n in enumerate(self.lens.tolist()):
            t = torch.arange(n)
            out[self.table[b, t // self.page].long(), t % self.page] = True
        return out
