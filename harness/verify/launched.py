"""`verify --ring` under torchrun (or any launcher that sets WORLD_SIZE, RANK, MASTER_ADDR, MASTER_PORT): the
launched processes are the ranks. Every rank runs the same verification in lock-step (the same cases, the same
probes: all deterministic); each calls the code on its own shard, then the ranks exchange what came back, in the
worker's wire format (worker.pack: JSON and safetensors, never pickle), over a gloo group of the harness's own, so
that every rank holds every rank's reply and reaches the same verdict. Rank 0 prints and writes the files.

    torchrun --nproc-per-node 2 -m harness verify --ring ring                       (this machine, gloo)
    torchrun --nnodes N --nproc-per-node G --rdzv-endpoint HOST:PORT -m harness verify --ring mod:attn  (GPUs, nccl)

What this mode gives up: the code runs in the launched process itself, beside the judge (no worker, no namespaces:
the launcher owns the processes), and a rank that hangs is ended by the process group's timeout (--timeout), not
killed: it is a `crash` from the rank whose collective timed out.
"""

from __future__ import annotations

import datetime
import os
import struct
import sys
from contextlib import contextmanager

import torch
import torch.distributed as dist

from harness.common import UserError, one_line
from harness.verify import ring_serve  # noqa: F401 - the byte counters, installed before the code is imported
from harness.verify.plugins import Impl
from harness.verify.ranks import LAYOUTS, verdict
from harness.verify.specs import import_spec
from harness.verify.worker import (
    Fault,
    accepts,
    checked,
    claimed_layouts,
    error,
    layouts_of,
    pack,
    results,
    signature_of,
    unpack,
)

_STATE: dict = {}
CODE_TIMEOUT_S = 300.0  # the code's process group: at most this long blocked in one collective (or --timeout)


def world() -> int | None:
    """W when launched as one of W > 1 ranks, else None."""
    try:
        W = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return None
    return W if W > 1 and "RANK" in os.environ else None


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def init(device: str, timeout: float) -> None:
    """The launched process group (the code's) and a gloo group of the harness's own, once."""
    if "mine" in _STATE:
        return
    backend = "nccl" if str(device).startswith("cuda") else "gloo"
    if str(device).startswith("cuda"):
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    # a rank whose code raised never joins its peers' collective: they wait for the group's timeout, then raise
    code = datetime.timedelta(seconds=min(timeout, CODE_TIMEOUT_S))
    _STATE["code_timeout"] = code
    dist.init_process_group(backend, init_method="env://", timeout=code)
    _STATE["mine"] = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout + CODE_TIMEOUT_S))


@contextmanager
def rank_zero_speaks():
    """Ranks other than 0 print nothing (their stdout goes nowhere); stderr stays, for a rank's own error."""
    if world() is None or rank() == 0:
        yield
        return
    keep = sys.stdout
    with open(os.devnull, "w") as sink:
        sys.stdout = sink
        try:
            yield
        finally:
            sys.stdout = keep


class Launched(Impl):
    def __init__(self, spec: str, contract: str, fn, device: str = "cpu"):
        super().__init__(spec, contract, device=device)
        self.fn = fn
        self.broken = False  # after a fault the code's group may be wedged: it is not called again
        self.group = None
        self.devices: dict[int, str] = {}

    @property
    def alive(self) -> bool:
        return not self.broken

    @property
    def builtin(self) -> bool:
        return True  # it runs in this process: no worker to warn about

    def rank_device(self, r: int) -> str:
        """Where rank r ran (each rank says so in its reply: on GPUs each launched process has its own)."""
        if r in self.devices:
            return self.devices[r]
        return f"cuda:{torch.cuda.current_device()}" if str(self.device).startswith("cuda") else str(self.device)

    def prepare(self, timeout: float) -> None:
        """The code imported on every rank, and the ranks agreeing that it was (a rank whose import failed would
        leave the others waiting in their first collective); then a process group of its own."""
        if self.group is not None:
            return
        init(self.device, timeout)
        why = ""
        if self.fn is None:
            try:
                self.fn = import_spec(self.spec, {}, what=self.contract)
            except UserError as e:
                why = str(e)
        said = [m.decode() for m in exchange(why.encode() or b"-", world(), _STATE["mine"])]
        bad = [(r, m) for r, m in enumerate(said) if m != "-"]
        if bad:
            raise UserError(f"rank {bad[0][0]}: {bad[0][1]}")
        # its own group: what a faulty kernel leaves unmatched in a group never reaches the next kernel's
        self.group = dist.new_group(backend="nccl" if str(self.device).startswith("cuda") else "gloo",
                                    timeout=_STATE["code_timeout"])  # fmt: skip

    def accepts(self, name: str) -> bool:
        self.prepare(900.0)
        return accepts(signature_of(self.fn), name)

    def layouts(self, W: int = 1) -> tuple[str, ...]:
        self.prepare(900.0)
        return claimed_layouts(layouts_of(self.fn), LAYOUTS) or ("contiguous",)

    def call_ranks(self, contract, W: int, header: dict, tensors: list[dict], doing: str,
                   expect: int) -> list[tuple[list, list]]:  # fmt: skip
        me = rank()
        dev = f"cuda:{torch.cuda.current_device()}" if str(self.device).startswith("cuda") else str(self.device)
        state = {"group": self.group}
        try:
            value = contract.serve(self.fn, {**header, "device": dev, "rank": me, "world": W},
                                   {k: v.to(dev, copy=True) for k, v in tensors[me].items()}, state)  # fmt: skip
            descs, out = results(value)
            message = pack({"ok": True, "results": descs, "device": dev}, out)
        except Exception as e:  # noqa: BLE001 - this rank's code raised: told to every rank, the verdict of all
            message = pack({"ok": False, "error": error(e)})
        try:
            replies = exchange(message, W, _STATE["mine"])
        except RuntimeError as e:  # a rank never reached the exchange (it hangs, or its process is gone)
            self.broken = True
            raise Fault("timeout", f"a rank never came back from the code while {doing}: the ranks' exchange "
                        f"failed ({one_line(str(e), 300)})") from None  # fmt: skip
        got, faults = [], []
        for r, m in enumerate(replies):
            try:
                got.append(_read(self, r, m, doing))
            except Fault as e:
                faults.append((r, e))
        if faults:
            self.broken = True
            raise verdict(faults, [], W, doing, ended=False)
        return got


def exchange(message: bytes, W: int, group) -> list[bytes]:
    """Every rank's bytes, on every rank (two all_gathers: the lengths, then the padded bytes)."""
    n = torch.tensor([len(message)], dtype=torch.int64)
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(W)]
    dist.all_gather(sizes, n, group=group)
    top = int(max(s.item() for s in sizes))
    buf = torch.zeros(top, dtype=torch.uint8)
    buf[: len(message)] = torch.frombuffer(bytearray(message), dtype=torch.uint8)
    got = [torch.zeros(top, dtype=torch.uint8) for _ in range(W)]
    dist.all_gather(got, buf, group=group)
    return [bytes(g[: int(s.item())].numpy()) for g, s in zip(got, sizes, strict=True)]


def _read(self, r: int, message: bytes, doing: str) -> tuple[list, list]:
    """One rank's reply, checked as a worker's is."""
    n_head, n_blob = struct.unpack("<QQ", message[:16])
    reply, tensors = unpack(message[16 : 16 + n_head], message[16 + n_head : 16 + n_head + n_blob])
    if isinstance(reply.get("device"), str):
        self.devices[r] = reply["device"][:40]
    if reply.get("ok") is not True:
        err = reply.get("error") or {}
        raise Fault("crash", f"raised {err.get('type')}: {err.get('message')} while {doing}",
                    err.get("traceback"))  # fmt: skip
    descs = checked(reply, dict(tensors))
    return descs, [tensors.get(f"r{i}") for i in range(len(descs))]


def make(spec: str, fn, contract: str, device: str = "cpu") -> Launched:
    return Launched(spec, contract, fn, device)
