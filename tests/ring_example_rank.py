"""One rank of tests/test_examples_ring.py's process group: joins a gloo group of W ranks, runs every case of
DIR/cases.pt through its file's `attn` on this rank's contiguous shard, and saves out, lse and, where the case asks,
the gradients of sum(out * g) to DIR/rank{RANK}.pt.

    python tests/ring_example_rank.py RANK W DIR
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def load(path: str):
    spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main(rank: int, W: int, tmp: Path) -> None:
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp / "store"), W), rank=rank, world_size=W)
    mods, results = {}, []
    for case in torch.load(tmp / "cases.pt", weights_only=True):
        attn = (mods.get(case["file"]) or mods.setdefault(case["file"], load(case["file"]))).attn
        n = case["q"].shape[2] // W
        shard = slice(rank * n, (rank + 1) * n)  # contiguous: rank r holds tokens [r n, (r + 1) n)
        q, k, v = (case[x][:, :, shard].clone().requires_grad_(case["grad"]) for x in "qkv")  # (B, H|Hkv, n, d)
        out, lse = attn(q, k, v, group=dist.group.WORLD, causal=case["causal"], scale=case["scale"])
        res = {"out": out.detach(), "lse": lse.detach()}
        if case["grad"]:
            (out * case["g"][:, :, shard]).sum().backward()
            res.update(dq=q.grad, dk=k.grad, dv=v.grad)
        results.append(res)
    torch.save(results, tmp / f"rank{rank}.pt")
    dist.barrier()
    os._exit(0)  # not destroy_process_group: gloo torn down by two ranks at once can abort a process at exit


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]))
