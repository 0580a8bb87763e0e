"""Ring attention's textbook (harness/bugs/ring.py) and the catalog's ring bugs, on real gloo process groups.

One spawn of 4 rank processes (this file run as a script) serves every check: the W = 4 group of all four, and two
W = 2 groups, ranks {0, 1} and {2, 3} (the second's group ranks are not its global ranks: p2p must map them with
get_global_rank). Every rank builds the same seeded whole-sequence q, k, v, takes its shard (the layout's positions,
worked out here, not by the code under test), runs the textbook and every bug (each imported by its name,
`module:NAME`, as a rank process of verify --ring does), and compares its shard with transformers' eager attention
on the whole sequence (harness.verify.kernel_hf: llama's eager function, or sdpa's math kernel in float64), forward
and gradients. The test process then checks the textbook everywhere, and that each bug differs exactly where its
entry says it shows.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parent.parent
B, H, Hkv, S, d = 2, 4, 2, 16, 8  # GQA, g = 2; S divisible by 2W for W = 2 and 4
# the textbook: (dtype, layout, causal, scale); bugs run in float64, scale None, on each declared layout, causal or not
TEXTBOOK = [(dt, lay, c, None) for dt in ("float64", "float32") for lay in ("contiguous", "zigzag") for c in (1, 0)]
TEXTBOOK += [("float64", "zigzag", 1, 0.3)]
# float64 against float64: the two only differ in summation order; the lse is float32 by the contract (|lse| < 10:
# its rounding < 1e-6). float32 against transformers' float32 eager path: 16 keys' worth of float32 rounding.
TOL = {"float64": 1e-12, "float32": 2e-5}
LSE_TOL = 1e-5
SHOWS = 1e-6  # a bug shows where its float64 error passes this, far above the textbook's 1e-12 and below any bug's

ALL, CAUSAL, W4_CAUSAL = "all", "causal", "W4_causal"
# where each entry's bug shows, as its hint says: every setting; under causal only; under causal with W >= 3 only
WHERE = {"ring_merge_unrescaled": ALL, "ring_merge_sum": ALL, "ring_lse_base2": ALL, "ring_empty_block_nan": CAUSAL,
         "ring_remote_diagonal_mask": CAUSAL, "ring_future_blocks_seen": CAUSAL, "ring_zigzag_first_chunk": CAUSAL,
         "ring_own_block_skipped": ALL, "ring_own_block_twice": ALL, "ring_wrong_neighbour": W4_CAUSAL,
         "ring_dkv_not_returned": ALL}  # fmt: skip


def shard(r: int, W: int, layout: str) -> torch.Tensor:
    """The indices of rank r's tokens in the whole sequence, in the order the rank holds them."""
    n = S // W
    if layout == "contiguous":
        return torch.arange(r * n, (r + 1) * n)
    c = S // (2 * W)  # zigzag: 2W chunks; rank r holds chunk r, then chunk 2W-1-r
    return torch.cat([torch.arange(r * c, (r + 1) * c), torch.arange((2 * W - 1 - r) * c, (2 * W - r) * c)])


def err(got, want) -> float:
    return float("inf") if not torch.isfinite(got).all() else float((got.double() - want.double()).abs().max())


# ---- the rank process


def measure(fn, group, dtype: str, layout: str, causal: bool, scale, grad: bool, sent: list) -> dict:
    from harness.verify import kernel_hf  # lazy: only the rank processes need transformers

    W, r = dist.get_world_size(group), dist.get_rank(group)
    dt = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(0)  # the same whole tensors on every rank
    q, g = (torch.randn(B, H, S, d, generator=gen, dtype=torch.float64).to(dt) for _ in range(2))
    k, v = (torch.randn(B, Hkv, S, d, generator=gen, dtype=torch.float64).to(dt) for _ in range(2))
    i = shard(r, W, layout)
    qs, ks, vs = (t[:, :, i].clone().requires_grad_(grad) for t in (q, k, v))
    before = sent[0]
    out, lse = fn(qs, ks, vs, group=group, causal=bool(causal), scale=scale, layout=layout)
    row = {"W": W, "rank": r, "dtype": dtype, "layout": layout, "causal": causal, "scale": scale,
           "sent": sent[0] - before, "kv_bytes": ks.nbytes + vs.nbytes, "out_dtype": str(out.dtype),
           "lse_dtype": str(lse.dtype), "shapes": [list(out.shape), list(lse.shape)]}  # fmt: skip
    Q, K, V = (t.clone().requires_grad_(grad) for t in (q, k, v))
    keep = kernel_hf.allowed(B, S, S, bool(causal), None, None)  # (B, 1, S, S), queries at positions 0 .. S-1
    sc = d**-0.5 if scale is None else scale
    ref = kernel_hf.forward(Q, K, V, keep, sc, path="float64" if dtype == "float64" else "eager")  # (B, H, S, d)
    row["out"], row["lse"] = err(out, ref[:, :, i]), err(lse, kernel_hf.lse(q, k, keep, sc)[:, :, i])
    if grad:
        (out * g[:, :, i]).sum().backward()  # every rank backpropagates its own shard's loss
        (ref * g).sum().backward()  # the whole sequence's: the sum of every rank's
        row |= {n: err(a.grad, b.grad[:, :, i]) for n, a, b in (("dq", qs, Q), ("dk", ks, K), ("dv", vs, V))}
    return row


def run_group(group, plan: list, sent: list) -> list[dict]:
    from harness.bugs import ring  # lazy: run as a script, the rank imports what it runs

    rows = [measure(ring.textbook, group, *case, grad=True, sent=sent) | {"name": "textbook"} for case in TEXTBOOK]
    for spec, kind in plan:
        module, name = spec.split(":")
        fn = getattr(importlib.import_module(module), name)
        for layout in fn.layouts:
            for causal in (1, 0):
                rows.append(measure(fn, group, "float64", layout, causal, None, kind == "backward", sent)
                            | {"name": name})  # fmt: skip
    return rows


def rank_main(rank: int, store: str, out: str, plan: str) -> None:
    sent = [0]
    isend = dist.isend

    def counted(tensor, *args, **kw):  # what a rank sends point to point (the forward's only traffic)
        sent[0] += tensor.nbytes
        return isend(tensor, *args, **kw)

    dist.isend = counted
    dist.init_process_group("gloo", store=dist.FileStore(store, 4), rank=rank, world_size=4)
    every = dist.new_group([0, 1, 2, 3])
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank creates every group, in the same order
    todo = json.loads(Path(plan).read_text())
    rows = run_group(every, todo, sent) + run_group(pairs[rank // 2], todo, sent)
    Path(out, f"rank{rank}.json").write_text(json.dumps(rows))
    dist.barrier()
    os._exit(0)  # not destroy_process_group: gloo torn down by two ranks at once can abort a process at exit


# ---- the test process


def ring_entries():
    from harness.bugs.catalog import CATALOG

    return [b for b in CATALOG if b.contract == "ring"]


@pytest.fixture(scope="module")
def rows(tmp_path_factory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("ring")
    plan = tmp / "plan.json"
    plan.write_text(json.dumps([(f"{b.fn.__module__}:{b.fn.__name__}", b.kind) for b in ring_entries()]))
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, __file__, str(r), str(tmp / "store"), str(tmp), str(plan)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(4)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)[-5000:]
    return [row for r in range(4) for row in json.loads((tmp / f"rank{r}.json").read_text())]


@pytest.mark.gate
def test_the_textbook_matches_transformers(rows):
    """Forward, lse and gradients of every rank's shard, float64 and float32, both layouts, causal or not, GQA."""
    book = [r for r in rows if r["name"] == "textbook"]
    assert len(book) == len(TEXTBOOK) * (4 + 2 * 2)  # the W = 4 group's ranks and both pairs'
    for r in book:
        tol = TOL[r["dtype"]]
        assert max(r["out"], r["dq"], r["dk"], r["dv"]) < tol and r["lse"] < LSE_TOL, r
        assert r["out_dtype"] == f"torch.{r['dtype']}" and r["lse_dtype"] == "torch.float32", r
        assert r["shapes"] == [[B, H, S // r["W"], d], [B, H, S // r["W"]]], r


@pytest.mark.gate
def test_the_textbook_sends_each_kv_block_once_round_the_ring(rows):
    """The forward's point-to-point bytes per rank: exactly (W - 1) x (its K shard + V shard)."""
    for r in rows:
        if r["name"] == "textbook":
            assert r["sent"] == (r["W"] - 1) * r["kv_bytes"], r


@pytest.mark.gate
def test_every_ring_bug_shows_exactly_where_its_entry_says(rows):
    """Each bug's largest error over the ranks and both W = 2 groups, per (W, layout, causal): above SHOWS where its
    entry says it shows, at the textbook's level elsewhere. A backward bug's forward is right everywhere."""
    entries = {b.name: b for b in ring_entries()}
    assert WHERE.keys() == entries.keys()
    for name, b in entries.items():
        worst: dict[tuple, float] = {}
        for r in rows:
            if r["name"] != name:
                continue
            key = (r["W"], r["layout"], r["causal"])
            if b.kind == "backward":
                assert r["out"] < TOL["float64"] and r["lse"] < LSE_TOL, r
                e = max(r["dq"], r["dk"], r["dv"])
            else:
                e = max(r["out"], r["lse"] / LSE_TOL * SHOWS)  # lse only as precise as float32
            worst[key] = max(worst.get(key, 0.0), e)
        assert len(worst) == 2 * 2 * len(b.fn.layouts), (name, worst)
        want = {k for k in worst if WHERE[name] == ALL or (k[2] and (WHERE[name] == CAUSAL or k[0] >= 3))}
        shown = {k for k, e in worst.items() if e > SHOWS}
        assert shown == want, (name, sorted(shown), sorted(want), worst)


def test_the_ring_entries():
    """Importable by name, as a rank process finds them; the three stages; a third held out, across the stages."""
    entries = ring_entries()
    assert len(entries) >= 9
    for b in entries:
        module, name = b.fn.__module__, b.fn.__name__
        assert name == b.name and getattr(importlib.import_module(module), name) is b.fn, b
        assert b.kernel() is b.fn and set(b.fn.layouts) <= {"contiguous", "zigzag"}, b
        assert b.stage in ("ring_merge", "ring_mask", "ring_order"), b
    held = [b for b in entries if b.held_out]
    assert 3 * len(held) >= len(entries) and {b.stage for b in held} == {"ring_merge", "ring_mask", "ring_order"}
    assert {b.stage for b in entries if not b.held_out} == {"ring_merge", "ring_mask", "ring_order"}
    assert [b.name for b in entries if b.kind == "backward"] == ["ring_dkv_not_returned"]


if __name__ == "__main__":
    rank_main(int(sys.argv[1]), *sys.argv[2:5])
