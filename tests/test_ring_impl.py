"""impl's ring contract built-ins (impl.RING: ring, ring_zigzag, allgather) on real gloo groups of W = 2 and W = 4
CPU processes, against transformers' attention on the whole sequence.

Covers, for every kernel and each layout it declares, causal and not, float32 and float64, GQA (H=4, Hkv=2) plus
MHA, a non-default scale and a gradient through lse: the unsharded out and lse vs harness.verify.kernel_hf (llama's
eager_attention_forward in float32, transformers' sdpa path in float64; the lse a float64 logsumexp of the same
scores); dq, dk, dv unsharded vs autograd through the float64 reference; the bytes each rank sends (wrappers on
torch.distributed, as the harness installs them): forward (W - 1) x (K shard + V shard) exactly and no collective for
ring and ring_zigzag, and the backward's ring traffic; the layouts as data (shard/unshard, positions, the block plan
against the causal mask from global positions) in process.

Each W is one spawned group running every case (tests/ring_ranks.py): a group costs seconds, a case milliseconds.
Run with `-s` to see the largest errors measured.
"""

from __future__ import annotations

import math
import time

import pytest
import ring_ranks
import torch
import torch.multiprocessing as mp
from attn_ref import Worst, maxerr

from harness.verify import kernel_hf
from impl import RING, ring_layout

B, H, HKV, D = 2, 4, 2, 16
N = 12  # tokens per rank: zigzag chunks of 6
WORLDS = (2, 4)
# float32 out vs transformers' float32 eager: both are a few ulps off the exact result (values ~1 here), each its own
# way (matmul order; the ring merges W partials, each rescaled once more)
F32_OUT = 1e-5
F32_LSE = 1e-5  # vs the float64 logsumexp: lse ~ 5 to 10 here, float32 ulp ~ 1e-6, the merge's logaddexp per block
F32_GRAD = 2e-5  # float32 gradients (magnitude up to ~10) vs float64 ones: as tests/test_tiled_backward.py's F32_TOL
F64 = 1e-12  # float64 throughout on both sides: only summation order differs

WORST = Worst("test_ring_impl")


def kernel_layouts():
    return [(name, lay) for name, fn in RING.items() for lay in fn.layouts]


def make_cases(world: int) -> dict:
    """name -> case: the whole q, k, v, g, h and the call's options. Scores with std ~2 (q, k times 1.5)."""
    cases = {}
    gen = torch.Generator().manual_seed(world)
    S = world * N

    def add(kernel, layout, causal, dtype, hkv=HKV, scale=None, dlse=False):
        q = torch.randn(B, H, S, D, generator=gen, dtype=torch.float64) * 1.5
        k = torch.randn(B, hkv, S, D, generator=gen, dtype=torch.float64) * 1.5
        v = torch.randn(B, hkv, S, D, generator=gen, dtype=torch.float64)
        g = torch.randn(B, H, S, D, generator=gen, dtype=torch.float64)
        h = torch.randn(B, H, S, generator=gen, dtype=torch.float64)
        name = f"{kernel}-{layout}-{'causal' if causal else 'full'}-{str(dtype)[6:]}-h{H}kv{hkv}"
        name += (f"-scale{scale}" if scale else "") + ("-dlse" if dlse else "")
        cases[name] = dict(kernel=kernel, layout=layout, causal=causal, scale=scale, dlse=dlse,
                           q=q.to(dtype), k=k.to(dtype), v=v.to(dtype), g=g.to(dtype), h=h.float())  # fmt: skip

    for kernel, layout in kernel_layouts():
        for causal in (True, False):
            for dtype in (torch.float32, torch.float64):
                add(kernel, layout, causal, dtype)
        add(kernel, layout, True, torch.float64, hkv=H)  # MHA
    for kernel in ("ring", "ring_zigzag"):
        add(kernel, RING[kernel].layouts[0], True, torch.float64, scale=0.3, dlse=True)
    return cases


def spawn_group(world: int, tmp, cases: dict, limit: float = 300.0) -> list[dict]:
    """Runs every case on a fresh gloo group of `world` processes; each rank's results, rank order."""
    torch.save(cases, tmp / "cases.pt")
    args = (world, str(tmp / "store"), str(tmp / "cases.pt"), str(tmp))
    ctx = mp.spawn(ring_ranks.main, args=args, nprocs=world, join=False)
    deadline = time.monotonic() + limit
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            raise TimeoutError(f"the W={world} group ran past {limit} s: a rank waits on a transfer that never comes")
    return [torch.load(tmp / f"rank{r}.pt", weights_only=True) for r in range(world)]


@pytest.fixture(scope="module")
def groups(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    got = {}
    for world in WORLDS:
        cases = make_cases(world)
        got[world] = (cases, spawn_group(world, tmp_path_factory.mktemp(f"w{world}"), cases))
    yield got
    torch.set_num_threads(threads)
    print(f"\n[{WORST.module}] largest errors measured:")
    for key in sorted(WORST.errors):
        print(f"  {key:60s} {WORST.errors[key]:.3e}")


def reference(case: dict) -> dict:
    """transformers' attention on the whole sequence: out in the case's dtype (eager float32 / sdpa float64), lse and
    the gradients in float64 (autograd through the float64 path)."""
    q, k, v = case["q"], case["k"], case["v"]
    S, d = q.shape[2], q.shape[3]
    scale = case["scale"] or 1 / math.sqrt(d)
    keep4 = kernel_hf.allowed(B, S, S, case["causal"], None, None)
    path = "float64" if q.dtype == torch.float64 else "eager"
    ref = {"out": kernel_hf.forward(q, k, v, keep4, scale, path=path)}
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    out64 = kernel_hf.forward(q64, k64, v64, keep4, scale, path="float64")
    lse64 = kernel_hf.lse(q64, k64, keep4, scale, float64=True)
    ref["lse"] = lse64.detach()
    loss = (out64 * case["g"].double()).sum() + ((lse64 * case["h"].double()).sum() if case["dlse"] else 0)
    ref["dq"], ref["dk"], ref["dv"] = torch.autograd.grad(loss, (q64, k64, v64))
    return ref


def whole(ranks: list[dict], name: str, key: str, layout: str) -> torch.Tensor:
    return ring_layout.unshard([r[name][key] for r in ranks], layout)


def cases_of(kernel: str):
    return [(w, name) for w in WORLDS for name in make_cases(w) if name.startswith(kernel + "-")]


ALL = [pytest.param(w, name, id=f"w{w}-{name}") for kernel in RING for w, name in cases_of(kernel)]


@pytest.mark.gate
@pytest.mark.parametrize("world, name", ALL)
def test_forward_and_backward_vs_transformers(groups, world, name):
    cases, ranks = groups[world]
    case = cases[name]
    lay, f64 = case["layout"], case["q"].dtype == torch.float64
    ref = reference(case)
    out, lse = whole(ranks, name, "out", lay), whole(ranks, name, "lse", lay)
    assert out.dtype == case["q"].dtype and out.shape == case["q"].shape
    assert lse.dtype == (torch.float64 if f64 else torch.float32) and lse.shape == case["q"].shape[:3]
    tol_out, tol_lse, tol_grad = (F64, F64, F64) if f64 else (F32_OUT, F32_LSE, F32_GRAD)
    kind = f"{case['kernel']} {'f64' if f64 else 'f32'}"
    assert WORST.note(f"{kind} out", maxerr(out, ref["out"])) <= tol_out
    assert WORST.note(f"{kind} lse", maxerr(lse, ref["lse"])) <= tol_lse
    # the gradient run's forward is the same computation: bit for bit the no_grad one
    assert torch.equal(whole(ranks, name, "grad_out", lay), out)
    for key in ("dq", "dk", "dv"):
        got = whole(ranks, name, key, lay)
        assert got.dtype == case["q"].dtype
        assert WORST.note(f"{kind} {key}", maxerr(got, ref[key])) <= tol_grad, key


@pytest.mark.gate
@pytest.mark.parametrize("world", WORLDS)
def test_ring_sends_each_block_once(groups, world):
    """Forward: (W - 1) x (K shard + V shard) bytes point to point per rank, exactly, and no collective. Backward:
    the K/V blocks once more (W - 1) and the dK/dV accumulators W hops (home included), in the inputs' dtype here
    (float32 / float64 accumulate in their own)."""
    cases, ranks = groups[world]
    checked = 0
    for name, case in cases.items():
        if case["kernel"] not in ("ring", "ring_zigzag"):
            continue
        for r, res in enumerate(ranks):
            kv = res[name]["kv_bytes"]
            assert res[name]["fwd_p2p"] == (world - 1) * kv, (name, r)
            assert res[name]["fwd_coll"] == 0, (name, r)
            assert res[name]["grad_p2p"] == 2 * (world - 1) * kv + world * kv, (name, r)
            checked += 1
    assert checked == world * 12


@pytest.mark.gate
@pytest.mark.parametrize("world", WORLDS)
def test_allgather_gathers(groups, world):
    """The baseline's forward goes through dist.all_gather (K and V: each rank hands in its shard), not p2p."""
    cases, ranks = groups[world]
    for name, case in cases.items():
        if case["kernel"] == "allgather":
            for res in ranks:
                assert res[name]["fwd_p2p"] == 0 and res[name]["fwd_coll"] == res[name]["kv_bytes"], name


@pytest.mark.gate
@pytest.mark.parametrize("world", WORLDS)
def test_zigzag_odd_shard_is_a_clear_error(groups, world):
    for res in groups[world][1]:
        assert res["odd_zigzag"] is not None and "divisible by" in res["odd_zigzag"]


# ---- in process: no group needed ----


@pytest.mark.parametrize("layout", ring_layout.LAYOUTS)
@pytest.mark.parametrize("world", (1, 2, 3, 4))
def test_layout_round_trip_and_positions(layout, world):
    S = 2 * world * 3
    x = torch.arange(2 * S).view(1, 2, S, 1).float()  # (1, 2, S, 1): each token its position (and S + it)
    shards = [ring_layout.shard(x, r, world, layout) for r in range(world)]
    assert torch.equal(ring_layout.unshard(shards, layout), x)
    for r, s in enumerate(shards):
        pos = ring_layout.positions(r, world, S, layout)
        assert torch.equal(s[0, 0, :, 0].long(), pos)
    allpos = torch.cat([ring_layout.positions(r, world, S, layout) for r in range(world)])
    assert torch.equal(allpos.sort().values, torch.arange(S))  # every token on exactly one rank
    if layout == "zigzag":
        assert ring_layout.chunks(0, world, S, layout) == [(0, 3), (S - 3, S)]


@pytest.mark.parametrize("layout", ring_layout.LAYOUTS)
@pytest.mark.parametrize("world", (1, 2, 3, 4, 5))
def test_block_plan_is_the_global_causal_mask(layout, world):
    """The rectangles the kernels attend, block by block, are exactly the mask from the global positions."""
    n = 6
    for causal in (True, False):
        for r in range(world):
            for j in range(world):
                want = ring_layout.visible(r, j, world, n, causal, layout)
                assert torch.equal(ring_layout.planned(r, j, world, n, causal, layout), want), (r, j, causal)
    if layout == "zigzag" and world > 1:  # the balance: every rank attends the same number of pairs
        work = {sum(int(ring_layout.planned(r, j, world, n, True, layout).sum()) for j in range(world))
                for r in range(world)}  # fmt: skip
        assert len(work) == 1


def test_undeclared_layout_and_bad_input_are_errors():
    q = torch.zeros(1, 4, 4, 8)
    with pytest.raises(ValueError, match="layouts"):
        RING["ring"](q, q[:, :2], q[:, :2], group=None, layout="zigzag")
    with pytest.raises(ValueError, match="layouts"):
        RING["ring_zigzag"](q, q[:, :2], q[:, :2], group=None, layout="contiguous")
    with pytest.raises(ValueError, match="unknown ring layout"):
        ring_layout.check("striped", 2, 8)
    assert RING["ring"].layouts == ("contiguous",) and RING["ring_zigzag"].layouts == ("zigzag",)
    assert RING["allgather"].layouts == ("contiguous", "zigzag")
