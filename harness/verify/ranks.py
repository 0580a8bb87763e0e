"""A ring kernel under test: W rank processes, each a worker (worker.py, isolation.py) running the same code on its
shard, meeting in a process group the harness makes (ring_serve.py).

    a call      the inputs go to every rank, then the judge waits for all W replies at once (the ranks compute side
                by side, exchanging blocks; none can answer before its peers have sent what it needs)
    faults      per rank: the first rank to raise or die is `crash` named by its rank (its peers, waiting on it,
                fail after it: said, not blamed); ranks still waiting at the deadline are `timeout`, named (a
                deadlock from mismatched sends reads as that); after any fault every rank process is ended and the
                implementation's remaining cases on that target are not run (the loop's rule after a death); the
                next target starts a fresh group
    built-ins   run the same way (a ring cannot run in one process): by their importable name, module:function

Under torchrun the ranks are the launched processes instead (launched.py).
"""

from __future__ import annotations

import importlib
import select
import tempfile
import time
from pathlib import Path

import torch

from harness.common import UserError
from harness.verify import contracts
from harness.verify.plugins import Impl, check_spec, serving
from harness.verify.worker import Fault, Worker, accepts, claimed_layouts, reply_limit

LAYOUTS = ("contiguous", "zigzag")
GRACE_S = 5.0  # after one rank's fault, how long its peers get to report theirs (they fail waiting on it)


def spec_of(fn) -> str:
    """The importable name of a built-in ring kernel (impl/ or the bug catalog): what its rank processes import."""
    spec = f"{fn.__module__}:{fn.__name__}"
    if getattr(importlib.import_module(fn.__module__), fn.__name__, None) is not fn:
        raise ValueError(f"{spec} is not importable by that name: a rank process could not find it")
    return spec


class Ranks(Impl):
    """One ring implementation: a group of W rank workers at a time (W changes with the target)."""

    def __init__(self, name: str, contract: str, code: str, *, builtin: bool = False, device: str = "cpu"):
        super().__init__(name, contract, device=device)
        self.code, self._builtin = code, builtin
        self.workers: list[Worker] = []
        self.store: str | None = None
        self._tmp: tempfile.TemporaryDirectory | None = None
        self.comm: list[dict] = []  # per call: [{"rank", "sent", "received", "calls"}], read by the contract
        self.early: Fault | None = None  # a fault while importing, given as the next call's verdict

    @property
    def builtin(self) -> bool:
        return self._builtin

    @property
    def alive(self) -> bool:
        return bool(self.workers) and all(w.proc is not None for w in self.workers)

    def rank_device(self, rank: int) -> str:
        if str(self.device).startswith("cuda"):
            return f"cuda:{rank % max(1, torch.cuda.device_count())}"
        return str(self.device)

    def start(self, W: int) -> None:
        """W fresh rank workers, importing the code side by side; a failed import is the next call's verdict."""
        if len(self.workers) == W and self.alive:
            return
        self.reset()
        self._tmp = tempfile.TemporaryDirectory(prefix="attn-ring-")
        self.store = str(Path(self._tmp.name) / "store")
        serve = serving(contracts.get(self.contract)).partition(":")[0]
        self.workers = [Worker(self.code, self.contract, self.rank_device(r), serve) for r in range(W)]
        for w in self.workers:
            w.launch()
        deadline = self.deadline if self.deadline is not None else time.monotonic() + 900.0
        for r, w in enumerate(self.workers):
            try:
                w.start(deadline)
            except Fault as e:
                self.early = Fault(e.stage, f"rank {r}: {e.message}", e.traceback)
                self.reset(keep_early=True)
                return

    def prepare(self, timeout: float) -> None:
        """The code imported now, so that a spec naming nothing importable is told before any work is done."""
        if self.workers:
            return
        self.deadline = time.monotonic() + timeout if self.deadline is None else self.deadline
        self.start(2)  # the first target's ranks: started once, not again

    def signature(self) -> dict | None:
        return self.workers[0].signature if self.workers else None

    def accepts(self, name: str) -> bool:
        if not self.workers and self.early is None:
            self.start(1)
        return self.early is not None or accepts(self.signature(), name)

    def layouts(self, W: int = 1) -> tuple[str, ...]:
        """The layouts the code declares (its `layouts` attribute; default contiguous only), asked of the W ranks
        about to run."""
        if self.early is None:
            self.start(W)
        if self.early is not None or not self.workers:
            return ("contiguous",)
        return claimed_layouts(self.workers[0].layouts, LAYOUTS) or ("contiguous",)

    def call_ranks(self, contract, W: int, header: dict, tensors: list[dict], doing: str,
                   expect: int) -> list[tuple[list, list]]:  # fmt: skip
        """contract's serve on every rank (tensors[r] to rank r) -> [(descriptions, items)] by rank, or Fault."""
        if self.early is not None:
            fault, self.early = self.early, None
            raise fault
        self.start(W)
        if self.early is not None:
            fault, self.early = self.early, None
            raise fault
        comm_s = max(1.0, (self.deadline - time.monotonic()) if self.deadline is not None else 900.0) + 60
        for r, w in enumerate(self.workers):
            w.send({**header, "op": "call", "serve": serving(contract), "rank": r, "world": W, "store": self.store,
                    "comm_timeout": comm_s, "device": self.rank_device(r)}, tensors[r], self.deadline)  # fmt: skip
        return self._gather(header, doing, reply_limit(expect))

    def _gather(self, header: dict, doing: str, max_blob: int) -> list[tuple[list, list]]:
        """Every rank's reply, as they come; the faults in the order they happened."""
        deadline = self.deadline if self.deadline is not None else time.monotonic() + 900.0
        pending = {w.fd_out: r for r, w in enumerate(self.workers)}
        got: dict[int, tuple[list, list]] = {}
        faults: list[tuple[int, Fault]] = []
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            ready, _, _ = select.select(list(pending), [], [], left)
            for fd in ready:
                r = pending.pop(fd)
                try:
                    _, descs, out = self.workers[r].reply(header, max(deadline, time.monotonic() + GRACE_S),
                                                          f"{doing} (rank {r})", max_blob)  # fmt: skip
                    got[r] = (descs, [out.get(f"r{i}") for i in range(len(descs))])
                except Fault as e:
                    faults.append((r, e))
                    deadline = min(deadline, time.monotonic() + GRACE_S)
        if faults or pending:
            W = len(self.workers)
            self.reset()  # every rank process ended: the group is broken
            raise verdict(faults, sorted(pending.values()), W, doing)
        return [got[r] for r in range(len(self.workers))]

    def reset(self, keep_early: bool = False) -> None:
        for w in self.workers:
            w.stop()
        self.workers = []
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
        if not keep_early:
            self.early = None


def verdict(faults: list[tuple[int, Fault]], waiting: list[int], W: int, doing: str, ended: bool = True) -> Fault:
    """The group's fault: the first rank that failed, named; or the ranks that never returned."""
    if faults:
        # the cause, not its echo: a peer's transport error ("Connection reset by peer") follows the rank that died
        faults = sorted(faults, key=lambda x: echo(x[1]))  # stable: otherwise in the order they happened
        r, first = faults[0]
        after = [f"rank {q} ({f.stage})" for q, f in faults[1:]] + [f"rank {q} (no answer)" for q in waiting]
        more = f"; then {', '.join(after)}, waiting on it" if after else ""
        return Fault(first.stage, f"rank {r} of {W}: {first.message}{more}; every rank process was ended"
                     if ended else f"rank {r} of {W}: {first.message}{more}",
                     first.traceback)  # fmt: skip
    names = ", ".join(map(str, waiting))
    done = sorted(set(range(W)) - set(waiting))
    return Fault("timeout", f"rank{'s' * (len(waiting) > 1)} {names} of {W} never returned while {doing}"
                 + (f" (rank{'s' * (len(done) > 1)} {', '.join(map(str, done))} did)" if done else "")
                 + ": a deadlock (a send or receive with no match) reads as this; every rank process was ended "
                 "(raise --timeout if it is only slow)")  # fmt: skip


ECHOES = ("connection reset by peer", "connection closed by peer", "read error", "socket closed", "broken pipe",
          "timed out", "connection refused")  # fmt: skip


def echo(f: Fault) -> bool:
    """A rank's fault that reads as a peer's failure seen from here (the process group's transport broke)."""
    return f.stage == "crash" and "raised" in f.message and any(e in f.message.lower() for e in ECHOES)


def make(spec: str, fn, contract: str, device: str = "cpu") -> Ranks:
    """A ring implementation from the command line's SPEC (a built-in's name, with its function) or a test's."""
    if fn is not None:
        return Ranks(spec, contract, spec_of(fn), builtin=True, device=device)
    if ":" not in spec:
        raise UserError(f"unknown ring kernel '{spec}'; give a built-in's name or module:function "
                        "(or path/to/file.py:function)")  # fmt: skip
    check_spec(spec)
    return Ranks(spec, contract, spec, device=device)
