"""How the ring contract calls the code on one rank: in the rank's worker process (worker.py imports this module
before the code, so the counters below are in place whatever the code imports).

    the group     made on the first call from the header: gloo on a CPU (nccl on CUDA), the ranks meeting through
                  a FileStore the judge names; the code gets it as `group`
    the counters  every point-to-point and collective function of torch.distributed (the module's attributes, and
                  distributed_c10d's, which torch's own functions call) wrapped to add the bytes this rank sends and
                  receives; only the outermost call counts (send calls isend; batch_isend_irecv calls its ops)
    the reply     (meta, *what the code returned): meta int64 [bytes sent, bytes received, calls, returned a tuple]

A collective is counted as the bandwidth-optimal algorithm moves it, per rank (W ranks, n the tensor's bytes):

    all_gather, all_gather_into_tensor      sends (W - 1) n, receives (W - 1) n   (n: this rank's input)
    all_reduce                              2 (W - 1) / W n each way               (ring all-reduce)
    reduce_scatter(_tensor), all_to_all(*)  (W - 1) / W of the input each way
    broadcast, scatter (root)               the root sends (W - 1) n; the others receive n
    gather, reduce                          the others send n; the root receives (W - 1) n

Bytes that bypass torch.distributed's Python functions (the process group's C++ methods called directly) are not
counted: the ratio is information, never part of the verdict.
"""

from __future__ import annotations

import datetime
import functools
import threading

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d

POINT = ("send", "recv", "isend", "irecv")
COLLECTIVE = ("all_gather", "all_gather_into_tensor", "all_reduce", "reduce_scatter", "reduce_scatter_tensor",
              "broadcast", "all_to_all", "all_to_all_single", "gather", "scatter", "reduce")  # fmt: skip


class Counter(threading.local):
    def __init__(self):
        self.sent = self.received = self.calls = self.depth = 0


COUNT = Counter()


def nbytes(t) -> int:
    if isinstance(t, torch.Tensor):
        return t.numel() * t.element_size()
    if isinstance(t, list | tuple):
        return sum(nbytes(x) for x in t)
    return 0


def _arg(args, kw, i: int, name: str):
    return args[i] if len(args) > i else kw.get(name)


def _root(args, kw, i: int, name: str, group) -> bool:
    """Is this rank the collective's root (src or dst, a global rank; group_src/group_dst within the group)?"""
    me = dist.get_rank(group)
    if kw.get(f"group_{name}") is not None:
        return kw[f"group_{name}"] == me
    r = _arg(args, kw, i, name)
    return r is not None and r == dist.get_rank()


def moved(name: str, args, kw) -> tuple[int, int]:
    """(bytes sent, bytes received) by this rank in one call of torch.distributed's `name`."""
    group = kw.get("group")
    W = dist.get_world_size(group)
    if name in ("send", "isend"):
        return nbytes(_arg(args, kw, 0, "tensor")), 0
    if name in ("recv", "irecv"):
        return 0, nbytes(_arg(args, kw, 0, "tensor"))
    if name in ("all_gather", "all_gather_into_tensor"):
        n = nbytes(_arg(args, kw, 1, "tensor" if name == "all_gather" else "input_tensor"))
        return (W - 1) * n, (W - 1) * n
    if name == "all_reduce":
        n = 2 * (W - 1) * nbytes(_arg(args, kw, 0, "tensor")) // W
        return n, n
    if name in ("reduce_scatter", "reduce_scatter_tensor", "all_to_all", "all_to_all_single"):
        n = (W - 1) * nbytes(_arg(args, kw, 1, "input_list" if name == "reduce_scatter" else "input")) // W
        return n, n
    if name == "broadcast":
        n = nbytes(_arg(args, kw, 0, "tensor"))
        return ((W - 1) * n, 0) if _root(args, kw, 1, "src", group) else (0, n)
    if name == "scatter":
        out = nbytes(_arg(args, kw, 0, "tensor"))
        return ((W - 1) * out, 0) if _root(args, kw, 2, "src", group) else (0, out)
    if name in ("gather", "reduce"):
        n = nbytes(_arg(args, kw, 0, "tensor"))
        return (0, (W - 1) * n) if _root(args, kw, 2 if name == "gather" else 1, "dst", group) else (n, 0)
    return 0, 0


def counted(name: str, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kw):
        if COUNT.depth == 0:
            try:
                s, r = moved(name, args, kw)
            except Exception:  # noqa: BLE001 - a call torch itself refuses: it raises below, with its own words
                s = r = 0
            COUNT.sent, COUNT.received, COUNT.calls = COUNT.sent + s, COUNT.received + r, COUNT.calls + 1
        COUNT.depth += 1
        try:
            return fn(*args, **kw)
        finally:
            COUNT.depth -= 1

    wrapper.__counted__ = True
    return wrapper


def install() -> None:
    """Wrap each function once, in both modules (batch_isend_irecv checks `op is isend` against c10d's name, and a
    P2POp built from dist.isend then carries the same wrapper)."""
    for name in POINT + COLLECTIVE:
        fn = getattr(c10d, name, None)
        if fn is None or getattr(fn, "__counted__", False):
            continue
        w = counted(name, fn)
        setattr(c10d, name, w)
        if getattr(dist, name, None) is fn:
            setattr(dist, name, w)


install()


def group(header: dict, state: dict):
    """This rank's process group, made on the first call (the judge starts a fresh set of ranks for each)."""
    if "group" not in state:
        backend = "nccl" if header["device"].startswith("cuda") else "gloo"
        store = dist.FileStore(header["store"], header["world"])
        dist.init_process_group(backend, store=store, rank=header["rank"], world_size=header["world"],
                                timeout=datetime.timedelta(seconds=header["comm_timeout"]))  # fmt: skip
        state["group"] = dist.group.WORLD
    return state["group"]


def meta(value) -> torch.Tensor:
    return torch.tensor([COUNT.sent, COUNT.received, COUNT.calls, int(isinstance(value, tuple))], dtype=torch.int64)


def call_code(code, header: dict, t: dict, state: dict, q, k, v):
    g = group(header, state)
    COUNT.sent = COUNT.received = COUNT.calls = 0
    return code(q, k, v, group=g, causal=header["causal"], scale=header["scale"], layout=header["layout"])


def ring(code, header: dict, t: dict, state: dict):
    """attn(q, k, v, *, group, causal=True, scale=None, layout="contiguous") -> out or (out, lse) on this rank's
    shard -> (meta, *what it returned)."""
    with torch.no_grad():
        value = call_code(code, header, t, state, t["q"], t["k"], t["v"])
    return (meta(value), *(value if isinstance(value, tuple) else (value,)))


def ring_grad(code, header: dict, t: dict, state: dict):
    """The same call with q, k, v requiring grad, then sum(out * g) backpropagated on every rank -> (meta, dq, dk,
    dv): the backward's communication is the code's (its autograd Function's), counted with the forward's."""
    q, k, v = (t[n].detach().clone().requires_grad_(True) for n in ("q", "k", "v"))
    with torch.enable_grad():
        value = call_code(code, header, t, state, q, k, v)
        out = value[0] if isinstance(value, tuple) else value
        if not isinstance(out, torch.Tensor) or out.shape != t["g"].shape:
            return (meta(value), out)  # described and refused by the judge, like a forward output
        grads = torch.autograd.grad((out * t["g"].to(out.dtype)).sum(), [q, k, v], allow_unused=True)
    return (meta(value), *grads)
