"""How the ring contract calls the code on one rank: in the rank's worker process (worker.py imports this module
before the code, so the counters below are in place whatever the code imports).

    the group     made on the first call from the header: gloo on a CPU (nccl on CUDA), the ranks meeting through
                  a FileStore the judge names; the code gets it as `group`
    the counters  every point-to-point and collective function of torch.distributed (the module's attributes, and
                  distributed_c10d's, which torch's own functions call) wrapped to add the bytes this rank sends and
                  receives; only the outermost call counts (send calls isend; batch_isend_irecv calls its ops)
    the reply     (meta, *what the code returned): meta int64 [bytes sent, bytes received, calls, returned a tuple]

A collective is counted as the bandwidth-optimal algorithm moves it, per rank (W ranks, n the tensor's bytes):

    all_gather (and _into_tensor, _single, _coalesced, _base)    sends and receives (W - 1) n (n: this rank's input)
    all_reduce (and _coalesced)             2 (W - 1) / W n each way               (ring all-reduce)
    reduce_scatter (and _tensor, _single, _base), all_to_all(_single)    (W - 1) / W of the input each way
    broadcast, scatter (root)               the root sends (W - 1) n; the others receive n
    gather, reduce                          the others send n; the root receives (W - 1) n

Bytes that bypass torch.distributed's Python functions (the process group's C++ methods called directly) are not
counted: the ratio is information, never part of the verdict.
"""

from __future__ import annotations

import datetime
import inspect
import threading

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d

POINT = ("send", "recv", "isend", "irecv")
# name -> (how its bytes move, the argument holding what this rank contributes)
COLLECTIVE = {
    "all_gather": ("gather", "tensor"),
    "all_gather_into_tensor": ("gather", "input_tensor"),
    "all_gather_single": ("gather", "input_tensor"),
    "_all_gather_base": ("gather", "input_tensor"),
    "all_gather_coalesced": ("gather", "input_tensor_list"),
    "all_reduce": ("all_reduce", "tensor"),
    "all_reduce_coalesced": ("all_reduce", "tensors"),
    "reduce_scatter": ("share", "input_list"),
    "reduce_scatter_tensor": ("share", "input"),
    "reduce_scatter_single": ("share", "input"),
    "_reduce_scatter_base": ("share", "input"),
    "all_to_all": ("share", "input_tensor_list"),
    "all_to_all_single": ("share", "input"),
    "broadcast": ("root_sends", "tensor"),
    "scatter": ("root_sends", "tensor"),
    "gather": ("root_receives", "tensor"),
    "reduce": ("root_receives", "tensor"),
}
ROOT_ARG = {"broadcast": "src", "scatter": "src", "gather": "dst", "reduce": "dst"}


class Counter:
    """The bytes this process moved, whatever thread moved them (a backward runs on autograd's threads)."""

    def __init__(self):
        self.sent = self.received = self.calls = 0
        self.lock = threading.Lock()
        self.local = threading.local()  # how deep in wrapped calls this thread is (only the outermost counts)

    def add(self, sent: int, received: int) -> None:
        with self.lock:
            self.sent, self.received, self.calls = self.sent + sent, self.received + received, self.calls + 1

    def reset(self) -> None:
        with self.lock:
            self.sent = self.received = self.calls = 0


COUNT = Counter()


def nbytes(t) -> int:
    if isinstance(t, torch.Tensor):
        return t.numel() * t.element_size()
    if isinstance(t, list | tuple):
        return sum(nbytes(x) for x in t)
    return 0


def _root(name: str, a: dict, group) -> bool:
    """Is this rank the collective's root (src/dst a global rank; group_src/group_dst within the group)?"""
    key = ROOT_ARG[name]
    if a.get(f"group_{key}") is not None:
        return a[f"group_{key}"] == dist.get_rank(group)
    return a.get(key) is not None and a[key] == dist.get_rank()


def moved(name: str, a: dict) -> tuple[int, int]:
    """(bytes sent, bytes received) by this rank in one call of torch.distributed's `name`, its arguments by name."""
    if name in ("send", "isend"):
        return nbytes(a.get("tensor")), 0
    if name in ("recv", "irecv"):
        return 0, nbytes(a.get("tensor"))
    group = a.get("group")
    W = dist.get_world_size(group)
    how, arg = COLLECTIVE[name]
    n = nbytes(a.get(arg))
    if how == "gather":
        return (W - 1) * n, (W - 1) * n
    if how == "all_reduce":
        return 2 * (W - 1) * n // W, 2 * (W - 1) * n // W
    if how == "share":
        return (W - 1) * n // W, (W - 1) * n // W
    if how == "root_sends":
        return ((W - 1) * n, 0) if _root(name, a, group) else (0, n)
    return (0, (W - 1) * n) if _root(name, a, group) else (n, 0)


def counted(name: str, fn):
    sig = inspect.signature(fn)

    def wrapper(*args, **kw):
        depth = getattr(COUNT.local, "depth", 0)
        if depth == 0:
            try:
                COUNT.add(*moved(name, sig.bind(*args, **kw).arguments))
            except Exception:  # noqa: BLE001 - a call torch itself refuses: it raises below, with its own words
                pass
        COUNT.local.depth = depth + 1
        try:
            return fn(*args, **kw)
        finally:
            COUNT.local.depth = depth

    wrapper.__name__, wrapper.__qualname__, wrapper.__doc__ = fn.__name__, fn.__qualname__, fn.__doc__
    wrapper.__signature__ = sig
    wrapper.__counted__ = True  # no __wrapped__: the original is not one attribute away
    return wrapper


def install() -> None:
    """Wrap each function once, in both modules (batch_isend_irecv checks `op is isend` against c10d's name, and a
    P2POp built from dist.isend then carries the same wrapper)."""
    for name in (*POINT, *COLLECTIVE):
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
        cuda = header["device"].startswith("cuda")
        if cuda:
            torch.cuda.set_device(header["device"])  # nccl's p2p needs the rank's device current
        store = dist.FileStore(header["store"], header["world"])
        dist.init_process_group("nccl" if cuda else "gloo", store=store, rank=header["rank"],
                                world_size=header["world"], timeout=datetime.timedelta(seconds=header["comm_timeout"]),
                                device_id=torch.device(header["device"]) if cuda else None)  # fmt: skip
        state["group"] = dist.group.WORLD
    return state["group"]


def meta(value) -> torch.Tensor:
    with COUNT.lock:
        counts = [COUNT.sent, COUNT.received, COUNT.calls]
    return torch.tensor([*counts, int(isinstance(value, tuple))], dtype=torch.int64)


def call_code(code, header: dict, t: dict, state: dict, q, k, v):
    g = group(header, state)
    COUNT.reset()
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
