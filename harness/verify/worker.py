"""The process boundary between the judge and the code it judges.

Every implementation that is not a built-in runs in its own worker: a fresh Python interpreter (a subprocess,
never a fork) that imports the user's code and answers calls. The parent holds the fixtures and the references
and computes every comparison and verdict; inputs reach the worker as copies and outputs come back as copies. So
the code under test cannot edit the parent's tensors, change its torch state, patch its comparison, or end its
run: an exit (any code, 0 included) or a signal is a dead worker, a hang is a killed one.

    parent                                          worker (python -m harness.verify.worker SPEC CONTRACT)
    Worker.call(op, header, tensors) --message-->   import SPEC; per message: copy inputs, call, describe output
                                     <--message--   {"ok": true, ...} + tensors, or {"ok": false, "error": ...}

A message is a length-prefixed JSON header and a safetensors blob: nothing in it can execute code, so the parent
never unpickles what the worker sends. The worker's stdout is redirected to its stderr (a print in user code
cannot corrupt the channel); its stderr goes to a file whose tail is shown when it dies.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import select
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from harness.common import ROOT, UserError
from harness.verify.specs import import_spec

MAX_HEADER = 1 << 24  # bytes of JSON a message may carry


# ---------------------------------------------------------------------------------------------------------
# the wire format: 8 bytes header length, 8 bytes blob length, JSON header, safetensors blob


def pack(header: dict, tensors: dict[str, torch.Tensor] | None = None) -> bytes:
    head = json.dumps(header).encode()
    blob = st_save({k: v.detach().cpu().contiguous().clone() for k, v in (tensors or {}).items()}) if tensors else b""
    return struct.pack("<QQ", len(head), len(blob)) + head + blob


def unpack(head: bytes, blob: bytes) -> tuple[dict, dict[str, torch.Tensor]]:
    header = json.loads(head)
    if not isinstance(header, dict):
        raise ValueError("message header is not a JSON object")
    return header, (st_load(blob) if blob else {})


class Closed(Exception):
    """The other side is gone (end of file)."""


def _read_exact(fd: int, n: int, deadline: float | None) -> bytes:
    out = bytearray()
    while len(out) < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError
        chunk = os.read(fd, min(n - len(out), 1 << 20))
        if not chunk:
            raise Closed
        out += chunk
    return bytes(out)


def read_message(fd: int, deadline: float | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    n_head, n_blob = struct.unpack("<QQ", _read_exact(fd, 16, deadline))
    if n_head > MAX_HEADER:
        raise ValueError(f"message header of {n_head} bytes")
    head = _read_exact(fd, n_head, deadline)
    return unpack(head, _read_exact(fd, n_blob, deadline))


def write_message(fd: int, header: dict, tensors=None) -> None:
    data = memoryview(pack(header, tensors))
    while data:
        data = data[os.write(fd, data) :]


# ---------------------------------------------------------------------------------------------------------
# the worker side


def describe(obj) -> dict:
    """What came back, in words the parent can check without trusting it."""
    if not isinstance(obj, torch.Tensor):
        return {"type": type(obj).__module__ + "." + type(obj).__qualname__}
    d = {"type": "tensor", "shape": list(obj.shape), "dtype": str(obj.dtype).removeprefix("torch."),
         "device": str(obj.device), "layout": str(obj.layout).removeprefix("torch.")}  # fmt: skip
    d["sendable"] = obj.layout == torch.strided and obj.device.type != "meta"
    return d


def results(value) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """The call's return value -> descriptions and the tensors that can travel (out, or out and lse)."""
    items = list(value) if isinstance(value, tuple) else [value]
    descs, tensors = [describe(v) for v in items], {}
    for i, (d, v) in enumerate(zip(descs, items, strict=True)):
        if d.get("sendable"):
            tensors[f"r{i}"] = v.detach()
    return descs, tensors


def serve(spec: str, contract: str) -> None:
    """The worker's main loop. Exits when the parent closes the channel. Each call names the function that runs
    the code (`module:function`, taking (code, header, tensors, state)): this loop knows no contract."""
    proto_out = os.dup(1)
    os.dup2(2, 1)  # user code that prints writes to stderr, never into the channel
    proto_in = 0
    sys.stdin = open(os.devnull)  # noqa: SIM115 - the channel is fd 0; user code reading stdin gets nothing
    try:
        obj = import_spec(spec, {}, what=contract)
    except UserError as e:
        write_message(proto_out, {"ok": False, "error": {"type": "UserError", "message": str(e)}})
        return
    except Exception as e:  # noqa: BLE001 - reported to the parent, which decides
        write_message(proto_out, {"ok": False, "error": error(e)})
        return
    write_message(proto_out, {"ok": True})
    # key -> pristine weights (copied for every call), their config, what a module contract built from them
    state: dict[str, dict] = {"weights": {}, "configs": {}, "modules": {}}
    while True:
        try:
            header, tensors = read_message(proto_in)
        except Closed:
            return
        try:
            reply, out = handle(obj, header, tensors, state)
        except Exception as e:  # noqa: BLE001 - the implementation raised: a verdict, not a crash of the worker
            reply, out = {"ok": False, "error": error(e)}, None
        write_message(proto_out, reply, out)


def error(e: BaseException) -> dict:
    return {"type": type(e).__name__, "message": str(e), "traceback": traceback.format_exc()}


def handle(obj, header: dict, t: dict, state: dict):
    dev = torch.device(header.get("device", "cpu"))
    t = {k: v.to(dev) for k, v in t.items()}
    if header["op"] == "weights":  # pristine copies, kept for the calls that name this key
        key = header["key"]
        state["weights"][key], state["configs"][key] = t, header["config"]
        state["modules"].pop(key, None)
        return {"ok": True}, None
    if header["op"] != "call":
        raise ValueError(f"unknown op {header['op']!r}")
    module, _, fn = header["serve"].partition(":")
    value = getattr(importlib.import_module(module), fn)(obj, header, t, state)
    descs, out = results(value)
    return {"ok": True, "results": descs}, out


# ---------------------------------------------------------------------------------------------------------
# the parent side


@dataclass
class Fault(Exception):
    """The implementation did not answer with a result: stage crash, timeout or contract."""

    stage: str  # "crash" | "timeout" | "contract"
    message: str
    traceback: str | None = None

    def __str__(self) -> str:
        return self.message


class Worker:
    """One implementation's worker process. `call` raises Fault when the worker dies or runs out of time; after
    that the worker is gone and the next call starts a new one."""

    def __init__(self, spec: str, contract: str, device: str = "cpu", serve_module: str = ""):
        self.spec, self.contract, self.device = spec, contract, device
        self.serve_module = serve_module  # the module whose function runs the code, imported in the worker
        self.proc = None
        self.ready = False  # launched and answered: its code imported
        self.sent: set[str] = set()  # weight keys the current worker holds

    def launch(self) -> None:
        """Start the process without waiting for it: the workers of several implementations import torch and the
        user's code side by side. `start` (or the first call) waits for its answer."""
        if self.proc is not None:
            return
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 - the worker's stderr, read when it dies
        env = dict(os.environ)
        path = [str(ROOT), os.getcwd(), *import_root(self.serve_module), env.get("PYTHONPATH", "")]
        env["PYTHONPATH"] = os.pathsep.join(path).rstrip(os.pathsep)
        env["PYTHONUNBUFFERED"] = "1"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "harness.verify.worker", self.spec, self.contract],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, env=env, start_new_session=True,
        )  # fmt: skip
        self.sent = set()
        self.ready = False

    def start(self, deadline: float | None) -> None:
        self.launch()
        header, _ = self._receive(deadline, "starting (importing the code)")
        if not header.get("ok"):
            err = header.get("error", {})
            if err.get("type") in ("UserError", "ModuleNotFoundError", "ImportError", "SyntaxError"):
                self.stop()
                raise UserError(err.get("message", "")) if err.get("type") == "UserError" else UserError(
                    f"cannot import '{self.spec}' ({err.get('type')}: {err.get('message', '')[:150]}); check the "
                    "module path and that it imports on its own")  # fmt: skip
            self.stop()
            raise Fault("crash", f"importing {self.spec} raised {err.get('type')}: {err.get('message', '')}",
                        err.get("traceback"))  # fmt: skip
        self.ready = True

    def _receive(self, deadline, doing: str):
        try:
            return read_message(self.proc.stdout.fileno(), deadline)
        except TimeoutError:
            self.stop()
            raise Fault("timeout", f"no answer within the time limit while {doing}: the worker was killed "
                        "(raise --timeout if it is only slow)") from None  # fmt: skip
        except (Closed, ValueError, OSError, struct.error) as e:
            code = self.proc.wait() if self.proc.poll() is not None or isinstance(e, Closed) else None
            tail = self.tail()
            self.stop()
            how = _exit_words(code) if code is not None else f"sent an unreadable message ({e})"
            raise Fault("crash", f"the implementation's process {how} while {doing}" + (f"; its last output: {tail}"
                        if tail else ""), tail) from None  # fmt: skip

    def tail(self, n: int = 300) -> str:
        try:
            self.log.seek(0)
            text = self.log.read().decode(errors="replace")
        except (OSError, ValueError, AttributeError):
            return ""
        return " ".join(text.split())[-n:]

    def call(self, header: dict, tensors: dict, deadline: float | None, doing: str):
        if not self.ready:
            self.start(deadline)
        try:
            write_message(self.proc.stdin.fileno(), {**header, "device": self.device}, tensors)
        except OSError:
            pass  # it died: the read below says how
        reply, out = self._receive(deadline, doing)
        if not reply.get("ok"):
            err = reply.get("error", {})
            raise Fault("crash", f"raised {err.get('type')}: {err.get('message', '')}", err.get("traceback"))
        return reply, out

    def weights(self, key: str, config: dict, weights: dict, deadline) -> None:
        if not self.ready or key not in self.sent:
            self.call({"op": "weights", "key": key, "config": config}, weights, deadline, "receiving weights")
            self.sent.add(key)

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the worker and anything it started
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass
        self.proc, self.ready = None, False


def import_root(module: str) -> list[str]:
    """The folder that makes `module` importable by its name, when it is not the harness's own (a contract
    registered from elsewhere, e.g. a test file): the worker imports the contract by name."""
    spec = importlib.util.find_spec(module) if module else None
    if spec is None or not spec.origin or module.startswith("harness."):
        return []
    return [str(Path(spec.origin).parents[len(module.split(".")) - 1])]


def _exit_words(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code} before answering"


if __name__ == "__main__":
    serve(sys.argv[1], sys.argv[2])
