"""The rank side of tests/test_ring_impl.py: W processes (torch.multiprocessing.spawn), a gloo group through a
FileStore, every case of a list run on every rank in one go (a spawned group costs seconds; a case milliseconds).

Each rank takes its shard of the whole q, k, v (and of the loss weights g, h) by the case's layout, runs the kernel
once under no_grad (out, lse and the bytes it sent) and once with gradients (out, lse, dq, dk, dv for loss
sum(out * g) [+ sum(lse * h)], and the bytes sent forward + backward), and saves what it got; the test process
unshards and compares. Bytes are counted by wrappers installed on torch.distributed's module attributes, as the
harness counts them: the kernels must look dist.isend (etc.) up at call time for these to see anything.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

SENDS = ("isend", "send")  # point to point: the ring's
COLLECTIVES = ("all_gather", "all_reduce", "broadcast", "reduce_scatter", "all_to_all", "batch_isend_irecv")


def count_bytes() -> dict:
    """Wraps dist's send functions (and collectives, so that a ring using one is seen); returns the live counter:
    "p2p" bytes sent point to point, "collective" bytes handed to collectives."""
    counter = {"p2p": 0, "collective": 0}

    def wrap(name, kind):
        orig = getattr(dist, name)

        def counted(tensor, *args, **kwargs):
            ts = tensor if isinstance(tensor, list) else [tensor]
            if name == "all_gather":  # all_gather(tensor_list, tensor): the tensor is what this rank sends
                ts = [args[0] if args else kwargs["tensor"]]
            counter[kind] += sum(t.numel() * t.element_size() for t in ts if isinstance(t, torch.Tensor))
            return orig(tensor, *args, **kwargs)

        setattr(dist, name, counted)

    for name in SENDS:
        wrap(name, "p2p")
    for name in COLLECTIVES:
        wrap(name, "collective")
    return counter


def run_case(fn, case: dict, rank: int, world: int, group, counter: dict) -> dict:
    from impl import ring_layout  # lazy: imported after the wrappers, as the harness does

    lay = case["layout"]
    q, k, v, g, h = (ring_layout.shard(case[x], rank, world, lay) for x in ("q", "k", "v", "g", "h"))
    kw = dict(group=group, causal=case["causal"], scale=case["scale"], layout=lay)
    got = {}
    before = dict(counter)
    with torch.no_grad():
        got["out"], got["lse"] = fn(q, k, v, **kw)
    got["fwd_p2p"], got["fwd_coll"] = counter["p2p"] - before["p2p"], counter["collective"] - before["collective"]

    before = dict(counter)
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    out, lse = fn(qg, kg, vg, **kw)
    loss = (out * g).sum() + ((lse * h).sum() if case["dlse"] else 0)
    loss.backward()
    got["grad_out"] = out.detach()
    got["dq"], got["dk"], got["dv"] = qg.grad, kg.grad, vg.grad
    got["grad_p2p"] = counter["p2p"] - before["p2p"]
    got["kv_bytes"] = k.numel() * k.element_size() + v.numel() * v.element_size()
    return got


def main(rank: int, world: int, store_path: str, cases_path: str, out_dir: str) -> None:
    """One rank: the whole case list, results saved to out_dir/rank{rank}.pt."""
    torch.set_num_threads(1)  # W ranks on a 2-core machine
    counter = count_bytes()
    from impl import RING  # lazy: after the wrappers

    store = dist.FileStore(store_path, world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))  # a hang becomes an error  # fmt: skip
    group = dist.new_group(list(range(world))) if world > 2 else dist.group.WORLD  # both kinds of group handle
    cases = torch.load(cases_path, weights_only=True)
    results = {}
    for name, case in cases.items():
        results[name] = run_case(RING[case["kernel"]], case, rank, world, group, counter)
    # the zigzag layout cannot cut a shard of odd length in two: a clear error on every rank, before any transfer
    q = torch.zeros(1, 2, 3, 4)
    try:
        RING["ring_zigzag"](q, q, q, group=group, layout="zigzag")
        results["odd_zigzag"] = None
    except ValueError as e:
        results["odd_zigzag"] = str(e)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    os._exit(0)  # not destroy_process_group: gloo torn down by two ranks at once can abort a process at exit
