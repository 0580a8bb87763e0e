"""The first diagnosis of a paged kernel (`--paged`): probes that ask the kernel directly, on a batch of the
diagnosis's own (float32, the failing scenarios' page size and new-token count, lengths 1, a page - 1, a page, a page
+ 1 and longer; every slot no sequence owns finite and random here, so a misread shows as a wrong value, not NaN).
Each names what it measured, in this order:

    plain       the probe batch answered right: the failure is elsewhere (the keywords, half precision, a page
                size): serving.py goes on (the kernel asked as a --core kernel, then the pattern)
    permute     the cache's blocks and the table permuted together (the same tokens at other physical blocks):
                the output must not change; if it does, the kernel reads by physical position: block_table
    lengths     transformers on cache_seqlens + 1, - 1, every sequence to the longest, to the table's end, and the
                queries at positions 0 .. Sq - 1: the one the output matches names seqlens (causal_mask for the last)
    neighbours  one sequence's own slots (and queries) changed: no other sequence may move: block_table
    addresses   transformers on keys read through a mistaken address (page j + 1 or j - 1, token t + 1 or t - 1):
                matched, block_table
    map         q = k = 0 (every score equal) and each slot's value one-hot by what it is to a sequence (each of
                its tokens, the tail of its last page, its table's entries past its pages, other sequences' slots,
                blocks nobody owns): the weights read off which slots it reads and how often; a token never read
                (not the last ones) or a slot it does not own is block_table, its last keys missed or slots past
                its length read is seqlens
    NaN         NaN only in the tails of the sequences' last pages, then only in blocks nobody owns: NaN in a
                sequence's output is seqlens (it reads past its length), block_table (it reads a page it does not
                own); also when the probe batch is answered right but the failing outputs hold NaN (slots read and
                masked after: 0 x NaN is NaN)
    split       one key holds all the attention (a score 40 above the rest): sequences short enough to fit one part
                give its value, longer ones lose weight to other parts: the partial results are merged wrongly,
                split_merge
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch

from harness.verify import kernel_hf, paged_cases
from harness.verify.diagnosis import serving
from harness.verify.diagnosis.evidence import Diagnosis
from harness.verify.diagnosis.serving import GATE, ask, matches, moved, seq_err
from harness.verify.paged_cases import PagedInputs, PagedScenario, addresses, build, gather

DOMINANT = 40.0  # the split probe's score gap: e^-40 leaves the other keys nothing


def probe_scenario(runs: dict, failing: list[str]) -> PagedScenario:
    """float32, GQA, head_dim 32; the failing scenarios' page size and new-token count, plain attention."""
    fs = [runs[n].s for n in failing]
    sq = 1 if any(s.Sq == 1 for s in fs) else min(s.Sq for s in fs)
    pages = [s.page for s in fs]
    page = max(set(pages), key=lambda p: (pages.count(p), p > 1, -p))
    causal = any(s.causal for s in fs)
    lens = sorted({n for n in (1, page - 1, page, page + 1, 2 * page + 3, 3 * page, 9) if n >= sq}
                  | {sq, sq + page + 1, sq + 2 * page})  # fmt: skip
    return PagedScenario("probe", "the diagnosis's batch", lens=tuple(lens), page=page, Sq=sq, H=4, Hkv=2, d=32,
                         causal=causal, seed=11)  # fmt: skip


def truth(x: PagedInputs, s: PagedScenario, lens: list[int] | None = None, top_left: bool = False,
          read=gather) -> list[torch.Tensor | None]:  # fmt: skip
    """transformers in float64 per sequence (H, Sq, d), on keys read by `read(x, b, n)` (the harness's gather, or a
    simulated misread), n = lens[b] keys (default cache_seqlens); None where n < Sq (nothing to simulate)."""
    lens = x.cache_seqlens.tolist() if lens is None else lens
    out = []
    for b, n in enumerate(lens):
        if n < max(s.Sq, 1):
            out.append(None)
            continue
        k, v = read(x, b, n)
        keep4 = paged_cases.allowed(s.Sq, n, s.causal, None, top_left)
        ref = kernel_hf.forward(x.q[b : b + 1].double(), k.double(), v.double(), keep4, paged_cases.scale_of(s),
                                path="float64")  # fmt: skip
        out.append(ref[0])
    return out


# ---------------------------------------------------------------------------------------------------------
# the probes


def permuted(x: PagedInputs, seed: int = 3) -> PagedInputs:
    """The same tokens at other physical blocks: block n moves to perm[n], the table follows."""
    perm = torch.randperm(x.k_cache.shape[0], generator=torch.Generator().manual_seed(seed))
    k, v, owned = torch.empty_like(x.k_cache), torch.empty_like(x.v_cache), torch.empty_like(x.owned)
    k[perm], v[perm], owned[perm] = x.k_cache, x.v_cache, x.owned
    return replace(x, k_cache=k, v_cache=v, block_table=perm[x.block_table.long()].to(torch.int32), owned=owned)


def permute_probe(x, out, call, s) -> Diagnosis | None:
    out2, _ = call(permuted(x), causal=s.causal, scale=None)
    if not moved(out, out2):
        return None
    by = max(seq_err(out, out2))
    return Diagnosis("block_table", f"moving the cache's blocks to other physical indices, the block table "
                     f"following them (the same tokens, read through the table), changes the output (by {by:.2e}): "
                     "the kernel reads pages by their physical position (e.g. a sequence's pages assumed "
                     "contiguous), not through block_table[b, t // page_size]", "probe:permute")  # fmt: skip


LENGTHS = (  # (name, lengths from (cache_seqlens, table width in tokens), what the kernel does)
    ("plus_one", lambda L, W: [n + 1 for n in L], "reads one key past each sequence's end (cache_seqlens + 1; the "
     "slot there is NaN in the matrix)"),
    ("minus_one", lambda L, W: [n - 1 for n in L], "misses each sequence's last key (cache_seqlens - 1)"),
    ("longest", lambda L, W: [max(L)] * len(L), "reads every sequence to the longest one's length: cache_seqlens "
     "ignored"),
    ("whole_table", lambda L, W: [W] * len(L), "reads every block-table entry to its end: cache_seqlens ignored"),
)


def lengths_probe(x, out, call, s, right) -> Diagnosis | None:
    L = x.cache_seqlens.tolist()
    width = x.block_table.shape[1] * x.page
    for name, lens, what in LENGTHS:
        if matches(out, truth(x, s, lens(L, width)), right):
            return Diagnosis("seqlens", f"the output is transformers' with the keys read to other lengths: it "
                             f"{what}; sequence b has exactly cache_seqlens[b] keys, its new tokens included",
                             f"probe:seqlens_{name}")  # fmt: skip
    if s.causal and matches(out, truth(x, s, top_left=True), right):
        where = "the new query at position 0" if s.Sq == 1 else f"the {s.Sq} new queries at positions 0..{s.Sq - 1}"
        return Diagnosis("causal_mask", f"the output is transformers' with {where}: the new tokens are the last Sq of "
                         "each sequence, query i at position cache_seqlens[b] - Sq + i (bottom-right, as a KV cache "
                         "places them)", "probe:top_left")  # fmt: skip
    return None


def changed(x: PagedInputs, b0: int, seed: int = 5) -> PagedInputs:
    """Sequence b0's own slots and its queries drawn anew; nothing else touched."""
    g = torch.Generator().manual_seed(seed)
    k, v, q = x.k_cache.clone(), x.v_cache.clone(), x.q.clone()
    at = addresses(x.block_table, b0, int(x.cache_seqlens[b0]), x.page)
    k[at] = torch.randn(k[at].shape, generator=g).to(k.dtype)
    v[at] = torch.randn(v[at].shape, generator=g).to(v.dtype)
    q[b0] = torch.randn(q[b0].shape, generator=g).to(q.dtype)
    return replace(x, q=q, k_cache=k, v_cache=v)


def neighbours_probe(x, out, call, s) -> Diagnosis | None:
    for b0 in range(len(x.cache_seqlens)):
        out2, _ = call(changed(x, b0), causal=s.causal, scale=None)
        hit = [b for b in range(out.shape[0]) if b != b0 and moved(out[b], out2[b])]
        if hit:
            return Diagnosis("block_table", f"changing only the slots sequence {b0} owns (its keys and values) moves "
                             f"the output of sequence {hit[0]} (lengths {x.cache_seqlens.tolist()}, page "
                             f"{x.page}): a sequence reads pages it does not own; token t of sequence b is at block "
                             "block_table[b, t // page_size], slot t % page_size", "probe:neighbours")  # fmt: skip
    return None


def misread(page_shift: int = 0, token_shift: int = 0):
    """gather's mistaken twin: token t read at logical page t // page + page_shift, or at token t + token_shift's
    address (a negative index wraps to the table's last column, as torch indexing does)."""

    def read(x: PagedInputs, b: int, n: int):
        t = torch.arange(n) + token_shift
        blocks = x.block_table[b, (torch.div(t, x.page, rounding_mode="floor") + page_shift) % x.block_table.shape[1]]
        slots = t % x.page
        k, v = x.k_cache[blocks.long(), slots], x.v_cache[blocks.long(), slots]
        return k.permute(1, 0, 2)[None], v.permute(1, 0, 2)[None]  # (1, Hkv, n, d)

    return read


ADDRESSES = (
    ("next_page", misread(page_shift=1), "reads logical page j + 1 for page j (block_table[b, t // page_size + 1])"),
    ("prev_page", misread(page_shift=-1), "reads logical page j - 1 for page j (block_table[b, t // page_size - 1])"),
    ("next_token", misread(token_shift=1), "reads token t + 1's slot for token t (the slot off by one)"),
    ("prev_token", misread(token_shift=-1), "reads token t - 1's slot for token t (the slot off by one)"),
)


def addresses_probe(x, out, call, s, right) -> Diagnosis | None:
    for name, read, what in ADDRESSES:
        if matches(out, truth(x, s, read=read), right):
            return Diagnosis("block_table", f"the output is transformers' on keys read through a mistaken address: "
                             f"the kernel {what}; token t of sequence b is at block block_table[b, t // page_size], "
                             "slot t % page_size", f"probe:address_{name}")  # fmt: skip
    return None


MAP_D = 128  # the address map's head_dim: a channel per token (C of them per call), one for the tokens of the other
# calls, one per class of slot a sequence does not own:
CLASSES = ("the tail of its last page, past its length", "blocks its table row points at past its pages",
           "slots other sequences own", "blocks no sequence owns")
C = MAP_D - 1 - len(CLASSES)


def slot_classes(x: PagedInputs, b: int, chunk: int) -> torch.Tensor:
    """(num_blocks, page) long: the channel each slot's value lights for sequence b's map: its own tokens
    chunk * C .. chunk * C + C - 1 one each, its other tokens C, then CLASSES."""
    n = int(x.cache_seqlens[b])
    cls = torch.full(x.owned.shape, C + 4)  # blocks no sequence owns
    cls[x.owned] = C + 3  # other sequences' slots
    pages = -(-n // x.page)
    cls[x.block_table[b, :pages].long()] = C + 1  # its own blocks: the tail, until its tokens are written below
    cls[x.block_table[b, pages:].long()] = C + 2
    t = torch.arange(n)
    cls[addresses(x.block_table, b, n, x.page)] = torch.where(t // C == chunk, t % C, C)
    return cls


def read_map(x: PagedInputs, b: int, call, s) -> tuple[torch.Tensor, torch.Tensor]:
    """(the weight sequence b's last query gives each of its tokens, the weight on each of CLASSES), every score
    equal (q = k = 0) and each slot's value one-hot by its channel (slot_classes): 1 / length on each own token and
    nothing elsewhere is right."""
    n = int(x.cache_seqlens[b])
    own, extra = torch.zeros(n, dtype=torch.float64), None
    for chunk in range(-(-n // C)):
        v = torch.nn.functional.one_hot(slot_classes(x, b, chunk), MAP_D).float()  # (num_blocks, page, MAP_D)
        v = v[:, :, None].expand(*x.owned.shape, s.Hkv, MAP_D).contiguous()  # (num_blocks, page, Hkv, MAP_D)
        probe = replace(x, q=torch.zeros(*x.q.shape[:3], MAP_D), k_cache=torch.zeros_like(v), v_cache=v)
        out, _ = call(probe, causal=s.causal, scale=None)
        w = out[b, :, -1].double().mean(0)  # (MAP_D,): the last query sees every key; heads alike
        own[chunk * C : (chunk + 1) * C] = w[: min(C, n - chunk * C)]
        extra = w[C + 1 :] if extra is None else extra  # the same in every call
    return own, extra


def address_map_probe(x, out, call, s) -> Diagnosis | None:
    """Which slots each sequence reads, and how often (read_map): slots it does not own, then a token never read
    while another is read in its place (or not only its last ones), name block_table; then only its last keys
    missed, or slots past its length read, name seqlens."""
    found: dict[str, Diagnosis] = {}
    for b, n in enumerate(x.cache_seqlens.tolist()):
        own, extra = read_map(x, b, call, s)
        if not torch.isfinite(own).all() or not torch.isfinite(extra).all():
            return None
        low = 0.25 / n
        never = [t for t in range(n) if own[t] < low]
        read = own[own >= low]
        uneven = bool(read.numel()) and float(read.max()) > 1.5 * float(read.min())  # one token in another's place
        where = f"sequence {b} (length {n}, page {x.page}), every score equal"
        share = {name: float(w) for name, w in zip(CLASSES, extra, strict=True) if w > low}
        foreign = {k: w for k, w in share.items() if k in CLASSES[2:]}
        if foreign:
            what = ", ".join(f"{w:.0%} of its weight on {k}" for k, w in foreign.items())
            found.setdefault("foreign", Diagnosis("block_table", f"{where}: {what}: token t of sequence b is at block "
                             "block_table[b, t // page_size], slot t % page_size", "probe:address_map"))  # fmt: skip
        suffix = bool(never) and never == list(range(n - len(never), n))
        if never and (uneven or not suffix):
            more = [t for t in range(n) if own[t] > 1.5 * float(read.min())] if uneven else []
            dup = f"; tokens {more[:6]} weigh more" if more else ""
            past = f"; {sum(share.values()):.0%} of its weight past its length" if share else ""
            found.setdefault("address", Diagnosis("block_table", f"{where}: tokens {never[:6]}"
                             f"{' ...' if len(never) > 6 else ''} are never read{dup}{past} (each should weigh "
                             f"1/{n}): a token's address is off (page block_table[b, t // page_size], slot "
                             "t % page_size)", "probe:address_map"))  # fmt: skip
        elif suffix and not share:
            found.setdefault("short", Diagnosis("seqlens", f"{where}: its last {len(never)} key(s) are never read: "
                             "sequence b has cache_seqlens[b] keys, its new tokens included",
                             "probe:address_map_short"))  # fmt: skip
        elif share and not never:
            what = ", ".join(f"{w:.0%} of its weight on {k}" for k, w in share.items())
            found.setdefault("long", Diagnosis("seqlens", f"{where}: {what}: it reads past its length; bound the "
                             "keys by cache_seqlens[b]", "probe:address_map_long"))  # fmt: skip
    return next((found[k] for k in ("foreign", "address", "short", "long") if k in found), None)


def nan_probe(x, out, call, s) -> Diagnosis | None:
    """NaN where only a read past a sequence's length, then only a read of a block nobody owns, can find it."""
    if not torch.isfinite(out).all():
        return None
    mine = torch.zeros_like(x.owned[:, 0])  # (num_blocks,) blocks some sequence owns
    for b, n in enumerate(x.cache_seqlens.tolist()):
        mine[x.block_table[b, : -(-n // x.page)].long()] = True
    tails = mine[:, None] & ~x.owned  # (num_blocks, page): past a length, in an owned block
    for where, stage, what in ((tails, "seqlens", "the slots past its length in its own last page (NaN there, "
                                "nowhere else): bound the keys by cache_seqlens[b]"),
                               (~mine[:, None].expand_as(x.owned), "block_table", "blocks no sequence owns (NaN "
                                "there, nowhere else): read only block_table[b, :ceil(cache_seqlens[b] / "
                                "page_size)]")):  # fmt: skip
        k, v = x.k_cache.clone(), x.v_cache.clone()
        k[where], v[where] = float("nan"), float("nan")
        got, _ = call(replace(x, k_cache=k, v_cache=v), causal=s.causal, scale=None)
        bad = [b for b in range(got.shape[0]) if not torch.isfinite(got[b]).all()]
        if bad:
            return Diagnosis(stage, f"sequences {bad} (lengths {[int(x.cache_seqlens[b]) for b in bad]}, page "
                             f"{x.page}) come out NaN when NaN fills {what}", f"probe:nan_{stage}")  # fmt: skip
    return None


def dominant(s: PagedScenario) -> tuple[PagedScenario, PagedInputs]:
    """A batch where one key per sequence (at a place every new query sees) outscores the rest by DOMINANT."""
    lens = tuple(n for n in (1, 2, 3, 5, 9, 17, 33, 65, 129, 300) if n >= s.Sq)
    p = replace(s, lens=lens, seed=13)
    x = build(p, fill="random")
    g = torch.Generator().manual_seed(17)
    u = torch.nn.functional.normalize(torch.randn(p.d, generator=g), dim=0)
    a = (DOMINANT * p.d**0.5) ** 0.5  # a^2 * u.u / sqrt(d) = DOMINANT
    q = (a * u).expand_as(x.q).contiguous()
    k = x.k_cache * 0.1  # the other keys score within about +-1 of 0
    for b, n in enumerate(lens):
        t = int(torch.randint(n - p.Sq + 1, (1,), generator=g))  # a position every new query sees
        blocks, slots = addresses(x.block_table, b, n, p.page)
        k[blocks[t], slots[t]] = a * u
    return p, replace(x, q=q, k_cache=k)


def split_probe(call, s) -> Diagnosis | None:
    p, x = dominant(s)
    out, _ = call(x, causal=p.causal, scale=None)
    errs = seq_err(out, truth(x, p))
    lens = list(p.lens)
    if errs[0] > GATE or max(errs) <= 0.05:
        return None
    right = [n for n, e in zip(lens, errs, strict=True) if e <= GATE]
    first = next(n for n, e in zip(lens, errs, strict=True) if e > GATE)
    worst = max(range(len(lens)), key=lambda i: errs[i])
    some = f"the sequence of {right[0]} key gives" if len(right) == 1 else \
        f"the sequences of {', '.join(map(str, right))} keys give"
    return Diagnosis("split_merge", f"one key holding all the attention (a score {DOMINANT:g} above every other): "
                     f"{some} its value, from {first} keys on the output drifts off it (by {errs[worst]:.2g} at "
                     f"{lens[worst]} keys): partial results over parts of the keys are combined wrongly; merge them "
                     "by their lse: lse = logsumexp_i lse_i, out = sum_i exp(lse_i - lse) out_i",
                     "probe:split")  # fmt: skip


def probe_paged(runs: dict, failing: list[str], call) -> Diagnosis | None:
    """The probes in order on the probe batch; None when no probe names the failure. A probe batch answered right:
    only the NaN probe, when the failing outputs hold NaN (a kernel that reads unowned slots and masks them after)."""
    s = probe_scenario(runs, failing)
    x = build(s, fill="random")
    out, _ = call(x, causal=s.causal, scale=None)
    right = truth(x, s)
    if max(seq_err(out, right)) <= GATE:
        nan = any(not torch.isfinite(runs[n].out).all() for n in failing)
        return ask(lambda: nan_probe(x, out, call, s)) if nan else None
    for probe in (lambda: permute_probe(x, out, call, s), lambda: lengths_probe(x, out, call, s, right),
                  lambda: neighbours_probe(x, out, call, s), lambda: addresses_probe(x, out, call, s, right),
                  lambda: address_map_probe(x, out, call, s), lambda: nan_probe(x, out, call, s),
                  lambda: split_probe(call, s)):  # fmt: skip
        found = ask(probe)
        if found is not None:
            return found
    return None


# ---------------------------------------------------------------------------------------------------------
# the verdict


def as_core(call) -> Callable:
    """A paged kernel asked as a --core kernel (dense q, k, v; no padding mask), for serving.as_core: the keys go
    into a page-16 cache under a shuffled table, NaN elsewhere."""

    def core_call(q, k, v, *, causal=True, scale=None, mask=None, **kw):
        if mask is not None:
            raise ValueError("the paged contract has no padding mask")
        B, H, Sq, d = q.shape
        s = PagedScenario("adapter", "", lens=(k.shape[2],) * B, Sq=Sq, H=H, Hkv=k.shape[1], d=d, dtype=q.dtype)
        x = build(s)
        kc, vc = x.k_cache.clone(), x.v_cache.clone()
        for b in range(B):
            at = addresses(x.block_table, b, k.shape[2], s.page)
            kc[at], vc[at] = k[b].transpose(0, 1), v[b].transpose(0, 1)  # (Sk, Hkv, d)
        return call(replace(x, q=q, k_cache=kc, v_cache=vc), causal=causal, scale=scale, **kw)

    return core_call


def diagnose_paged(runs: dict, failing: list[str], passing: list[str], call, cache: dict) -> Diagnosis:
    """call(x, causal=, scale=[, window=, softcap=, sinks=]) -> (out, lse or None) runs the kernel; cache: the core
    matrix's references (serving.as_core)."""
    return serving.diagnose(runs, failing, passing, lambda f: probe_paged(runs, f, call), as_core(call), cache,
                            paged=True)  # fmt: skip
