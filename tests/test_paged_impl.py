"""The serving path's built-ins: impl.PAGED (paged_naive, paged_split, paged_triton in Triton's interpreter) and
impl.VARLEN (varlen_tiled), against transformers' attention over each sequence's own dense keys and values.

The reference: per sequence, the dense k/v the test wrote into the pool, masks from transformers' masking_utils and
the eager functions of tests/variants_ref.py (gpt_oss's for plain attention and sinks, gemma2's for softcap), in the
kernel's dtype; and the same attention in float64 written out here (`exact`) for the error budget and lse.
Tolerances: float32, |ours - f64| <= 1e-5 (outputs O(1)); bfloat16, the FlashAttention rule |ours - f64| <=
2 |transformers bf16 - f64| + eps/8 max|f64| (float16 likewise); lse within 1e-5 (float32) / 1e-4 (bf16 inputs:
float32 rounding) of float64's logsumexp, plus max|s| eps/2 for varlen_tiled, whose tiled core rounds half-precision
scores to their dtype as transformers does.

Caches are built as vLLM's and FlashInfer's tests build them: pools with several times more blocks than the batch
uses, the pool's last block among the used ones, no sequence's pages contiguous or in order, table entries past a
sequence's pages pointing at unowned blocks, and NaN in every slot no sequence owns (a kernel reading one gets NaN).
Lengths 1, page - 1, page, page + 1 and a few thousand (the PyTorch kernels; the interpreter gets a few hundred) in
one batch; page sizes 1, 16, 256; decode (Sq = 1) and chunked prefill (Sq = 5); GQA, MQA, g = 3; windows, softcap,
sinks; float32 and bfloat16. Beyond transformers: pages permuted with their table give identical outputs; any
num_splits (empty parts included) equals the unsplit result; rows that see no key give out 0, lse -inf or the sink;
a pool of 32768 blocks; the Triton kernel's counted traffic equals its closed form, and at 32k tokens is within
1.1x of the KV cache. Varlen: per-sequence agreement, isolation (perturbing one sequence moves no other), gradients
against float64 autograd of the dense reference.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from itertools import pairwise

import pytest
import torch
from variants_ref import allowed, reference

from harness.bench.kernel_traffic import count
from impl import PAGED, VARLEN, paged
from impl import paged_triton as pt

NAN = float("nan")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread: thousands of small ops, for which a second thread on a shared 2-core machine only adds
    OpenMP barriers (as tests/attn_ref.py's Worst.single_threaded)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@dataclass
class Batch:
    q: torch.Tensor  # (B, H, Sq, d)
    k_cache: torch.Tensor  # (num_blocks, page, Hkv, d)
    v_cache: torch.Tensor
    block_table: torch.Tensor  # (B, max_blocks) int32
    cache_seqlens: torch.Tensor  # (B,) int32
    k: list  # per sequence (Hkv, L, d): what the test wrote, the reference's keys
    v: list

    def select(self, rows: list[int]) -> Batch:
        """The sub-batch of those sequences (the same pool)."""
        return Batch(self.q[rows], self.k_cache, self.v_cache, self.block_table[rows], self.cache_seqlens[rows],
                     [self.k[b] for b in rows], [self.v[b] for b in rows])  # fmt: skip

    def run(self, name, **kw):
        return PAGED[name](self.q, self.k_cache, self.v_cache, block_table=self.block_table,
                           cache_seqlens=self.cache_seqlens, **kw)  # fmt: skip


def paged_batch(lens, *, page, H=4, Hkv=2, d=16, Sq=1, dtype=torch.float32, seed=0, blocks=None) -> Batch:
    """A shuffled, NaN-filled pool holding len(lens) sequences (module docstring); q and k ~ 1.5 N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    pages = [-(-L // page) for L in lens]
    used = sum(pages)
    num_blocks = blocks or 3 * used + 5  # many more blocks than the batch uses
    order = torch.randperm(num_blocks, generator=g).tolist()
    last = order.index(num_blocks - 1)
    order[0], order[last] = order[last], order[0]  # the pool's last block is used (by the first sequence)
    unowned = torch.tensor(order[used:])
    table = unowned[torch.randint(len(unowned), (len(lens), max(pages) + 2), generator=g)].to(torch.int32)
    k_cache = torch.full((num_blocks, page, Hkv, d), NAN, dtype=dtype)
    v_cache = torch.full_like(k_cache, NAN)
    ks, vs, at = [], [], 0
    for b, L in enumerate(lens):
        mine = order[at : at + pages[b]]
        at += pages[b]
        if mine == sorted(mine):
            mine = mine[::-1]  # never in order, never contiguous (for two pages or more)
        table[b, : len(mine)] = torch.tensor(mine, dtype=torch.int32)
        k = (torch.randn(Hkv, L, d, generator=g) * 1.5).to(dtype)  # (Hkv, L, d)
        v = torch.randn(Hkv, L, d, generator=g).to(dtype)
        t = torch.arange(L)
        k_cache[table[b, t // page].long(), t % page] = k.transpose(0, 1)  # (L, Hkv, d) into their slots
        v_cache[table[b, t // page].long(), t % page] = v.transpose(0, 1)
        ks.append(k)
        vs.append(v)
    q = (torch.randn(len(lens), H, Sq, d, generator=g) * 1.5).to(dtype)
    return Batch(q, k_cache, v_cache, table, torch.tensor(lens, dtype=torch.int32), ks, vs)


def exact(q, k, v, keep, *, scale=None, softcap=0.0, sinks=None, scores=None):
    """float64 attention: q (1, H, Sq, d), k/v (1, Hkv, L, d), keep (1, 1, Sq, L) -> out (H, Sq, d), lse (H, Sq).
    scores: a list that gets the largest |score| a row sees (the size of a half-precision score's rounding)."""
    q, k, v = q.double(), k.double(), v.double()
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)  # (1, H, L, d): KV head j -> j*g ..
    s = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5 if scale is None else scale)  # (1, H, Sq, L)
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(~keep, float("-inf"))
    if scores is not None:
        scores.append(float(s[s.isfinite()].abs().max()) if s.isfinite().any() else 0.0)
    if sinks is not None:
        s = torch.cat([s, sinks.double().view(1, -1, 1, 1).expand(*s.shape[:3], 1)], dim=-1)  # (1, H, Sq, L + 1)
    lse = torch.logsumexp(s, dim=-1)  # (1, H, Sq)
    p = torch.exp(s - lse[..., None]).nan_to_num(0.0)[..., : k.shape[2]]  # the sink's column dropped
    return (p @ v)[0], lse[0]


@dataclass
class Expected:
    """What one sequence's out (H, Sq, d) and lse (H, Sq) are checked against."""

    out64: torch.Tensor  # float64 attention (`exact`)
    lse64: torch.Tensor
    hf_err: float  # transformers' error in the inputs' dtype against out64
    smax: float  # the largest |score| a row sees


def expect(q, k, v, *, causal=True, window=None, softcap=0.0, sinks=None) -> Expected:
    """q (H, Sq, d), k/v (Hkv, L, d): transformers' attention in q's dtype (masks from masking_utils, the eager
    functions of tests/variants_ref.py) and `exact`."""
    q, k, v = q[None], k[None], v[None]  # (1, H, Sq, d), (1, Hkv, L, d)
    keep = allowed(1, q.shape[2], k.shape[2], window, causal)  # (1, 1, Sq, L), masking_utils'
    smax = []
    o64, lse64 = exact(q, k, v, keep, softcap=softcap, sinks=sinks, scores=smax)
    hf = reference(q, k, v, keep, softcap=softcap, sinks=sinks)[0]  # (H, Sq, d) in q's dtype
    return Expected(o64, lse64, float((hf.double() - o64).abs().max()), smax[0])


def compare(out, lse, want: Expected, *, label="", half_scores=False):
    """float32: |out - f64| <= 1e-5 (transformers' own float32 error under that too); half precision: the
    FlashAttention rule (module docstring). lse: float64's within 1e-5 (float32) / 1e-4; half_scores: the kernel
    rounds half-precision scores to their dtype (as transformers does; the tiled core), so lse is within that
    rounding, max|s| eps / 2, more."""
    assert lse.dtype == torch.float32, label
    err = float((out.double() - want.out64).abs().max())
    if out.dtype == torch.float32:
        assert want.hf_err < 1e-5, f"{label}: the reference itself is off"
        assert err <= 1e-5, (label, err)
    else:
        floor = torch.finfo(out.dtype).eps / 8 * float(want.out64.abs().max())
        assert err <= 2 * want.hf_err + floor, (label, err, want.hf_err)
    tol = 1e-5 if out.dtype == torch.float32 else 1e-4
    if half_scores and out.dtype != torch.float32:
        tol += want.smax * torch.finfo(out.dtype).eps / 2
    torch.testing.assert_close(lse.double(), want.lse64, atol=tol, rtol=1e-6, msg=label)


def check_batch(c: Batch, out, lse, expected=None, **kw):
    """Every sequence of c against transformers and float64 (expected: computed already, or None)."""
    assert out.shape == c.q.shape and out.dtype == c.q.dtype and lse.shape == c.q.shape[:3]
    assert torch.isfinite(out).all(), "NaN or inf in the output: an unowned slot was read"
    for b in range(c.q.shape[0]):
        want = expected[b] if expected else expect(c.q[b], c.k[b], c.v[b], **kw)
        compare(out[b], lse[b], want, label=f"sequence {b} (length {c.k[b].shape[1]})")


def lengths(page: int, *, long: tuple[int, ...], Sq: int = 1) -> list[int]:
    """1, page - 1, page, page + 1 (those >= Sq and >= 1), 40 and `long`: one batch of mixed lengths."""
    return sorted({n for n in (1, page - 1, page, page + 1, 40, *long) if n >= max(Sq, 1)})


@functools.cache
def case(page: int, variant: str, dtype: torch.dtype, Sq: int = 1, heads=(4, 2)):
    """A batch (lengths up to 2500; the interpreter's sub-batch stops at 300 / 70), its keywords and its expected
    results per sequence, shared by the three kernels."""
    kw = dict((VARIANTS if Sq == 1 else PREFILL)[variant])
    if "sinks" in kw:
        kw["sinks"] = torch.linspace(-2.0, 4.0, heads[0])
    long = (300, 2500) if Sq == 1 else (70, 1500)
    c = paged_batch(lengths(page, long=long, Sq=Sq), page=page, H=heads[0], Hkv=heads[1], Sq=Sq, dtype=dtype,
                    seed=page + Sq)  # fmt: skip
    expected = [expect(c.q[b], c.k[b], c.v[b], **kw) for b in range(len(c.k))]
    return c, kw, expected


def run_case(name, c, kw, expected, *, interpreter_max):
    """The kernel on the batch (the interpreter: on the sequences up to interpreter_max tokens), checked."""
    keep = [b for b, k in enumerate(c.k) if name != "paged_triton" or k.shape[1] <= interpreter_max]
    c = c.select(keep)
    out, lse = c.run(name, **kw)
    check_batch(c, out, lse, [expected[b] for b in keep])


VARIANTS = {  # name -> keywords; decode
    "plain": {},
    "window": {"window": (6, 0)},
    "softcap": {"softcap": 2.0},
    "sinks": {"sinks": None},  # per head: case()
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("page", [1, 16, 256])
@pytest.mark.parametrize("name", list(PAGED))
def test_decode_matches_transformers(name, page, variant, dtype):
    """Decode (Sq = 1), GQA 4/2, lengths 1, page +- 1, 40, 300 and 2500 (the interpreter: up to 300)."""
    run_case(name, *case(page, variant, dtype), interpreter_max=300)


@pytest.mark.parametrize("variant", ["plain", "sinks"])
@pytest.mark.parametrize("name", list(PAGED))
def test_decode_float16(name, variant):
    """float16 (the FlashAttention rule against transformers in float16), page 16."""
    run_case(name, *case(16, variant, torch.float16), interpreter_max=300)


PREFILL = {  # name -> keywords; chunked prefill
    "causal": {},
    "two_sided_window": {"causal": False, "window": (4, 1)},
    "window_sinks": {"window": (7, 0), "sinks": None},
}


@pytest.mark.parametrize("heads", [(4, 1), (6, 2)], ids=["mqa", "g3"])
@pytest.mark.parametrize("variant", list(PREFILL))
@pytest.mark.parametrize("page", [1, 16, 256])
@pytest.mark.parametrize("name", list(PAGED))
def test_chunked_prefill_matches_transformers(name, page, variant, heads):
    """Sq = 5 new tokens per sequence, bottom-right aligned; MQA and g = 3 (not a power of two); lengths 5,
    page +- 1, 40, 70, 1500 (the interpreter: up to 70)."""
    run_case(name, *case(page, variant, torch.float32, Sq=5, heads=heads), interpreter_max=70)


def test_the_cache_is_built_as_described():
    """The helper's pools: the last block used, pages neither contiguous nor in order, NaN in every unowned slot,
    table entries past a sequence's pages pointing at unowned blocks."""
    c = paged_batch([1, 15, 16, 17, 40], page=16)
    owned = torch.zeros(c.k_cache.shape[:2], dtype=torch.bool)
    used = set()
    for b, L in enumerate(c.cache_seqlens.tolist()):
        t = torch.arange(L)
        owned[c.block_table[b, t // 16].long(), t % 16] = True
        mine = c.block_table[b, : -(-L // 16)].tolist()
        used |= set(mine)
        if len(mine) > 1:
            assert mine != sorted(mine)
    assert c.k_cache.shape[0] - 1 in used and c.k_cache.shape[0] > 2 * len(used)
    assert torch.isnan(c.k_cache[~owned]).all() and not torch.isnan(c.k_cache[owned]).any()
    for b, L in enumerate(c.cache_seqlens.tolist()):
        assert not set(c.block_table[b, -(-L // 16) :].tolist()) & used


@pytest.mark.parametrize("name", list(PAGED))
def test_pages_permuted_with_their_table(name):
    """Moving every block elsewhere in the pool and rewriting the table to match changes nothing, bit for bit."""
    c = paged_batch([3, 17, 33], page=4, seed=3)
    want = c.run(name, window=(9, 0))
    perm = torch.randperm(c.k_cache.shape[0], generator=torch.Generator().manual_seed(1))
    inverse = torch.argsort(perm)  # block n moves to position inverse[n]
    got = PAGED[name](c.q, c.k_cache[perm], c.v_cache[perm], block_table=inverse[c.block_table.long()].int(),
                      cache_seqlens=c.cache_seqlens, window=(9, 0))  # fmt: skip
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    control = PAGED[name](c.q, c.k_cache[perm], c.v_cache[perm], block_table=c.block_table,
                          cache_seqlens=c.cache_seqlens, window=(9, 0))  # fmt: skip
    assert not torch.equal(control[0], want[0])  # the old table on the moved pool: wrong (here NaN)


@pytest.mark.parametrize("sinks", [None, torch.tensor([0.0, 1.0, -1.0, 3.0])], ids=["no_sinks", "sinks"])
@pytest.mark.parametrize("num_splits", [1, 2, 3, 7, 64])
def test_split_equals_unsplit(num_splits, sinks):
    """Any num_splits, parts shorter than a page or empty (64 parts for 1-token sequences), merges to the unsplit
    result; the sink enters once (counting it per part would move every row)."""
    c = paged_batch([1, 5, 16, 17, 200], page=16, Sq=1, seed=num_splits)
    want = c.run("paged_naive", sinks=sinks, softcap=3.0)
    got = c.run("paged_split", sinks=sinks, softcap=3.0, num_splits=num_splits)
    torch.testing.assert_close(got[0], want[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got[1], want[1], atol=1e-6, rtol=1e-6)


def test_split_merge_by_lse():
    """merge() on hand-made parts: the lse-weighted sum, an empty part (lse -inf) weighing nothing, a row no part
    saw giving out 0 and lse -inf, the sink once."""
    outs = torch.tensor([[[[1.0], [5.0]]], [[[3.0], [0.0]]], [[[0.0], [0.0]]]])  # (3 parts, H=1, Sq=2, d=1)
    inf = float("inf")
    lses = torch.tensor([[[0.0, -inf]], [[0.0, -inf]], [[-inf, -inf]]])  # (3, 1, 2)
    out, lse = paged.merge(outs, lses)
    assert torch.allclose(out[0, 0], torch.tensor([2.0])) and out[0, 1].item() == 0.0
    assert torch.allclose(lse[0], torch.tensor([torch.log(torch.tensor(2.0)).item(), -inf]))
    out, lse = paged.merge(outs, lses, torch.tensor([[0.0]]))
    assert torch.allclose(out[0, 0], torch.tensor([4.0 / 3.0])) and lse[0, 1].item() == 0.0


@pytest.mark.parametrize("name", list(PAGED))
def test_rows_that_see_no_key(name):
    """Out 0 and lse -inf (the sink with sinks) where a row sees nothing, never NaN: Sq = 3 against a 1-token
    sequence (its rows at positions -2, -1) and an empty one (a batch slot with no sequence), causal or not."""
    c = paged_batch([1, 0, 20], page=16, Sq=3, H=2, Hkv=1, seed=5)
    sinks = torch.tensor([0.25, -1.5])
    cases = (((4, 0), True, [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2)]), (None, False, [(1, 0), (1, 1), (1, 2)]))
    for window, causal, empty in cases:
        for s in (None, sinks):
            out, lse = c.run(name, sinks=s, causal=causal, window=window)
            assert torch.isfinite(out).all()
            for b, i in empty:
                assert (out[b, :, i] == 0).all(), (causal, s, b, i)
                assert torch.equal(lse[b, :, i], torch.full((2,), float("-inf")) if s is None else s)
            assert (lse[2] > -float("inf")).all() and (out[2] != 0).any()  # control: the long sequence sees keys
            assert causal or (out[0] != 0).all()  # without causal the 1-token sequence's rows all see it


@pytest.mark.parametrize("name", list(PAGED))
def test_a_pool_of_32768_blocks(name):
    """vLLM's large-pool case: block indices up to 32767 (page 4 x 32768 blocks), the last block used; MHA."""
    c = paged_batch([1, 9, 60], page=4, H=2, Hkv=2, d=8, blocks=32768, seed=11)
    assert int(c.block_table.max()) > 30000
    out, lse = c.run(name, window=(20, 0))
    check_batch(c, out, lse, window=(20, 0))


@pytest.mark.parametrize("name", list(PAGED))
def test_bad_input_is_a_value_error(name):
    c = paged_batch([5, 9], page=4)
    with pytest.raises(ValueError, match="cache_seqlens"):
        PAGED[name](c.q, c.k_cache, c.v_cache, block_table=c.block_table, cache_seqlens=torch.tensor([5, 99]))
    bad = c.block_table.clone()
    bad[1, 0] = c.k_cache.shape[0]
    with pytest.raises(ValueError, match="block_table"):
        PAGED[name](c.q, c.k_cache, c.v_cache, block_table=bad, cache_seqlens=c.cache_seqlens)


# --------------------------------------------------------------------------------------------------------------
# the Triton kernel's traffic


TRAFFIC = [  # lens, page, Sq, keywords, dtype
    ([1, 15, 16, 17, 70], 16, 1, {}, torch.float32),
    ([1, 2, 3, 70], 1, 1, {"sinks": torch.zeros(6)}, torch.bfloat16),
    ([1, 255, 256, 257], 256, 1, {"window": (100, 0)}, torch.float32),
    ([5, 40], 8, 5, {"causal": False, "window": (3, 2)}, torch.float16),
]


@pytest.mark.parametrize("case", TRAFFIC, ids=["page16", "page1_sinks", "page256_window", "prefill_window"])
def test_triton_traffic_is_its_closed_form(case):
    """The interpreter's count of every byte loaded and stored == traffic(), exactly: each owned K/V row the row
    sees once, one table entry per page (per tile for pages >= BLOCK_N), q/out/lse/sinks once per program."""
    lens, page, Sq, kw, dtype = case
    c = paged_batch(lens, page=page, H=6, Hkv=2, d=24, Sq=Sq, dtype=dtype)
    with count() as t:
        c.run("paged_triton", **kw)
    want = pt.traffic(lens, H=6, Hkv=2, Sq=Sq, d=24, page_size=page, dtype=dtype, causal=kw.get("causal", True),
                      window=kw.get("window"), has_sinks="sinks" in kw)  # fmt: skip
    assert t.load_calls > 0, "the kernel did not run in the interpreter"
    assert (t.load_bytes, t.store_bytes) == (want["load_bytes"], want["store_bytes"])


@pytest.mark.parametrize("tokens", [1024, 8192, 32768])
def test_triton_traffic_against_the_kv_cache(tokens):
    """A decode step reads the cache once: Llama-3-8B's heads (32/8, d 128), bf16, page 16, 4 sequences."""
    lens = [tokens] * 4
    ratio = pt.traffic(lens, H=32, Hkv=8, Sq=1, d=128, page_size=16, dtype=torch.bfloat16)["load_bytes"] / (
        pt.kv_cache_bytes(lens, Hkv=8, d=128, dtype=torch.bfloat16))
    assert 1.0 < ratio <= 1.1, ratio


@pytest.mark.slow
@pytest.mark.parametrize("page,dtype,variant", [(1, "bf16", "plain"), (16, "fp16", "window"), (256, "bf16", "all"),
                                                (16, "fp32", "plain")])  # fmt: skip
def test_triton_compiles_for_a_gpu(page, dtype, variant):
    """The compiled path without a GPU: the kernel lowers to an sm_90 cubin for pages of 1, 16, 256."""
    import triton  # lazy: triton is slow to import
    from triton.backends.compiler import GPUTarget  # lazy: as above
    from triton.compiler import ASTSource  # lazy: as above

    from impl import triton_cpu

    triton_cpu.load(pt)
    fn = pt.paged_decode
    if type(fn).__name__ != "JITFunction":
        pytest.fail("TRITON_INTERPRET=1 is set: unset it to compile")
    on = variant != "plain"
    consts = dict(HAS_LEFT=on, HAS_RIGHT=True, SOFTCAP=variant == "all", HAS_SINKS=variant == "all", HEAD_DIM=128,
                  D_PAD=128, G_PAD=16, PAGE=page, BLOCK_N=pt.BLOCK_N, NPAGES=max(pt.BLOCK_N // page, 1),
                  EMULATE_BF16=False, PRECISION="ieee" if dtype == "fp32" else "tf32")  # fmt: skip
    if variant != "all":
        consts["Sinks"] = None
    sig = {}
    for p in fn.params:
        n = p.name
        sig[n] = ("constexpr" if p.is_constexpr or n in consts else f"*{dtype}" if n in ("Q", "K", "V", "Out")
                  else "*i32" if n in ("Table", "Lens") else "*fp32" if n in ("Lse", "Sinks")
                  else "fp32" if n in ("scale", "softcap") else "i32")  # fmt: skip
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(n),): v for n, v in consts.items()})
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 2})
    assert kernel.asm["cubin"]


# --------------------------------------------------------------------------------------------------------------
# varlen


def packed(lens, *, H=4, Hkv=2, d=16, dtype=torch.float64, seed=0):
    """q (total_q, H, d), k, v (total_k, Hkv, d) and int32 cu_seqlens for (len_q, len_k) pairs."""
    g = torch.Generator().manual_seed(seed)
    tq, tk = sum(a for a, _ in lens), sum(b for _, b in lens)
    q = (torch.randn(tq, H, d, generator=g) * 1.5).to(dtype)
    k = (torch.randn(tk, Hkv, d, generator=g) * 1.5).to(dtype)
    v = torch.randn(tk, Hkv, d, generator=g).to(dtype)
    cu = [torch.tensor([0, *torch.tensor(x).cumsum(0).tolist()], dtype=torch.int32) for x in zip(*lens, strict=True)]
    return q, k, v, cu[0], cu[1]


def run_varlen(q, k, v, cq, ck, **kw):
    mq = int((cq[1:] - cq[:-1]).max())
    mk = int((ck[1:] - ck[:-1]).max())
    return VARLEN["varlen_tiled"](q, k, v, cu_seqlens_q=cq, cu_seqlens_k=ck, max_seqlen_q=mq, max_seqlen_k=mk, **kw)


LENS = [(1, 1), (5, 5), (3, 20), (17, 17), (1, 40), (0, 6), (33, 33)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("variant", ["plain", "window", "softcap", "sinks", "noncausal_window"])
def test_varlen_matches_transformers(variant, dtype):
    kw = {"plain": {}, "window": {"window": (4, 0)}, "softcap": {"softcap": 2.0},
          "sinks": {"sinks": torch.tensor([0.5, -1.0, 2.0, 4.0])},
          "noncausal_window": {"causal": False, "window": (3, 2)}}[variant]  # fmt: skip
    q, k, v, cq, ck = packed(LENS, dtype=dtype, seed=1)
    out, lse = run_varlen(q, k, v, cq, ck, **kw)
    assert out.shape == q.shape and lse.shape == (4, q.shape[0]) and lse.dtype == torch.float32
    for b, ((q0, q1), (k0, k1)) in enumerate(zip(pairwise(cq.tolist()), pairwise(ck.tolist()), strict=True)):
        if q1 > q0:
            want = expect(q[q0:q1].transpose(0, 1), k[k0:k1].transpose(0, 1), v[k0:k1].transpose(0, 1), **kw)
            compare(out[q0:q1].transpose(0, 1), lse[:, q0:q1], want, label=f"sequence {b}", half_scores=True)


def test_varlen_sequences_do_not_see_each_other():
    """Perturbing one sequence's queries, keys and values moves its rows and no other's, bit for bit."""
    q, k, v, cq, ck = packed(LENS, dtype=torch.float32, seed=2)
    want, want_lse = run_varlen(q, k, v, cq, ck)
    b = 3  # (17, 17): rows 9 .. 25 of q, keys 26 .. 42
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    q2[cq[b] : cq[b + 1]] += 1.0
    k2[ck[b] : ck[b + 1]] *= -1.0
    v2[ck[b] : ck[b + 1]] += 3.0
    got, got_lse = run_varlen(q2, k2, v2, cq, ck)
    mine = torch.zeros(q.shape[0], dtype=torch.bool)
    mine[cq[b] : cq[b + 1]] = True
    assert torch.equal(got[~mine], want[~mine]) and torch.equal(got_lse[:, ~mine], want_lse[:, ~mine])
    assert not torch.allclose(got[mine], want[mine])


@pytest.mark.parametrize("variant", ["causal", "window_sinks_softcap"])
def test_varlen_gradients(variant):
    """dq, dk, dv (and dsinks) through out and lse, float64, against autograd of `exact` per sequence."""
    kw = {} if variant == "causal" else {"window": (5, 0), "softcap": 3.0}
    lens = [(1, 1), (3, 20), (17, 17), (0, 4), (9, 30)]
    q, k, v, cq, ck = packed(lens, seed=4)
    sinks = torch.tensor([0.5, -1.0, 2.0, 1.0], dtype=torch.float32) if kw else None
    leaves = [t.requires_grad_() for t in (q, k, v)] + ([sinks.requires_grad_()] if kw else [])
    w = torch.randn(q.shape, dtype=q.dtype, generator=torch.Generator().manual_seed(9))
    out, lse = run_varlen(q, k, v, cq, ck, sinks=sinks, **kw)
    got = torch.autograd.grad((out * w).sum() + lse.sum(), leaves)
    loss = 0.0
    for (q0, q1), (k0, k1) in zip(pairwise(cq.tolist()), pairwise(ck.tolist()), strict=True):
        qb, kb, vb = (t.transpose(0, 1)[None] for t in (q[q0:q1], k[k0:k1], v[k0:k1]))  # (1, heads, len, d)
        keep = allowed(1, int(q1 - q0), int(k1 - k0), kw.get("window"), True)
        o, s = exact(qb, kb, vb, keep, softcap=kw.get("softcap", 0.0), sinks=sinks)  # (H, len_q, d), (H, len_q)
        loss = loss + (o.transpose(0, 1) * w[q0:q1]).sum() + s.sum()
    want = torch.autograd.grad(loss, leaves)
    for name, a, b in zip("q k v sinks".split(), got, want, strict=False):
        torch.testing.assert_close(a.double(), b.double(), atol=1e-6 if name == "sinks" else 1e-9, rtol=1e-6,
                                   msg=f"d{name}")  # fmt: skip


def test_varlen_bad_cu_seqlens():
    q, k, v, cq, ck = packed([(2, 2), (3, 3)])
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        run_varlen(q, k, v, torch.tensor([0, 2, 4], dtype=torch.int32), ck)
    with pytest.raises(ValueError, match="max_seqlen"):
        VARLEN["varlen_tiled"](q, k, v, cu_seqlens_q=cq, cu_seqlens_k=ck, max_seqlen_q=2, max_seqlen_k=3)
