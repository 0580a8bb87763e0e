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

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

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


WEIGHT_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj")


def layer_grads(obj, contract: str, config: dict, w: dict, x, pos, mask, g) -> list:
    """Gradients of sum(out * g) w.r.t. x and the four weights (None where nothing flows back), for a layer or a
    module (built here, from weights that require grad, so a module that uses them directly gives their
    gradients)."""
    x = x.detach().clone().requires_grad_(True)
    w = {k: v.detach().clone().requires_grad_(True) for k, v in w.items()}
    with torch.enable_grad():
        if contract == "module":
            out = obj(config, w)(x, pos, attention_mask=mask)
        else:
            out = obj(x, w, config=config, position_ids=pos, attention_mask=mask)
        if not isinstance(out, torch.Tensor) or out.shape != g.shape:
            return [out]  # described and refused by the caller, like a forward output
        wanted = [x] + [w[n] for n in WEIGHT_NAMES]
        grads = torch.autograd.grad((out * g.to(out.dtype)).sum(), wanted, allow_unused=True)
    return list(grads)


def core_grads(obj, q, k, v, causal, scale, mask, g) -> list:
    """Gradients of sum(out * g) w.r.t. q, k and v."""
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    with torch.enable_grad():
        value = obj(q, k, v, causal=causal, scale=scale, attention_mask=mask)
        out = value[0] if isinstance(value, tuple) else value
        if not isinstance(out, torch.Tensor) or out.shape != g.shape:
            return [out]
        grads = torch.autograd.grad((out * g.to(out.dtype)).sum(), [q, k, v], allow_unused=True)
    return list(grads)


def serve(spec: str, contract: str) -> None:
    """The worker's main loop. Exits when the parent closes the channel."""
    proto_out = os.dup(1)
    os.dup2(2, 1)  # user code that prints writes to stderr, never into the channel
    proto_in = 0
    sys.stdin = open(os.devnull)  # noqa: SIM115 - the channel is fd 0; user code reading stdin gets nothing
    from harness.common import UserError
    from harness.verify.plugins import import_spec

    try:
        obj = import_spec(spec, {}, what=contract)
    except UserError as e:
        write_message(proto_out, {"ok": False, "error": {"type": "UserError", "message": str(e)}})
        return
    except Exception as e:  # noqa: BLE001 - reported to the parent, which decides
        write_message(proto_out, {"ok": False, "error": error(e)})
        return
    write_message(proto_out, {"ok": True})
    weights: dict[str, dict[str, torch.Tensor]] = {}  # key -> pristine weights, copied for every call
    configs: dict[str, dict] = {}
    modules: dict[str, object] = {}
    while True:
        try:
            header, tensors = read_message(proto_in)
        except Closed:
            return
        try:
            reply, out = handle(obj, contract, header, tensors, weights, configs, modules)
        except Exception as e:  # noqa: BLE001 - the implementation raised: a verdict, not a crash of the worker
            reply, out = {"ok": False, "error": error(e)}, None
        write_message(proto_out, reply, out)


def error(e: BaseException) -> dict:
    return {"type": type(e).__name__, "message": str(e), "traceback": traceback.format_exc()}


def handle(obj, contract, header, t, weights, configs, modules):
    op = header["op"]
    dev = torch.device(header.get("device", "cpu"))
    if op == "weights":  # pristine copies, kept for the calls that name this key
        weights[header["key"]] = {k: v.to(dev) for k, v in t.items()}
        configs[header["key"]] = header["config"]
        modules.pop(header["key"], None)
        return {"ok": True}, None
    if op == "layer":
        key = header["key"]
        w, config = {k: v.clone() for k, v in weights[key].items()}, json.loads(json.dumps(configs[key]))
        x, pos = t["x"].to(dev), t["position_ids"].to(dev)
        mask = t["attention_mask"].to(dev) if "attention_mask" in t else None
        with torch.no_grad():
            if contract == "module":
                if key not in modules:
                    modules[key] = obj(config, w)  # build(config, weights) once per fixture and dtype
                value = modules[key](x, pos, attention_mask=mask)
            else:
                value = obj(x, w, config=config, position_ids=pos, attention_mask=mask)
    elif op == "layer_grad":
        key = header["key"]
        config = json.loads(json.dumps(configs[key]))
        mask = t["attention_mask"].to(dev) if "attention_mask" in t else None
        value = tuple(layer_grads(obj, contract, config, weights[key], t["x"].to(dev), t["position_ids"].to(dev),
                                  mask, t["g"].to(dev)))  # fmt: skip
    elif op == "core_grad":
        mask = t["attention_mask"].to(dev) if "attention_mask" in t else None
        q, k, v, g = (t[n].to(dev) for n in ("q", "k", "v", "g"))
        value = tuple(core_grads(obj, q, k, v, header["causal"], header["scale"], mask, g))
    elif op == "core":
        q, k, v = (t[n].to(dev) for n in ("q", "k", "v"))
        mask = t["attention_mask"].to(dev) if "attention_mask" in t else None
        with torch.no_grad():
            value = obj(q, k, v, causal=header["causal"], scale=header["scale"], attention_mask=mask)
    else:
        raise ValueError(f"unknown op {op!r}")
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

    def __init__(self, spec: str, contract: str, device: str = "cpu"):
        self.spec, self.contract, self.device = spec, contract, device
        self.proc = None
        self.ready = False  # launched and answered: its code imported
        self.sent: set[str] = set()  # weight keys the current worker holds

    def launch(self) -> None:
        """Start the process without waiting for it: the workers of several implementations import torch and the
        user's code side by side. `start` (or the first call) waits for its answer."""
        from harness.common import ROOT

        if self.proc is not None:
            return
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 - the worker's stderr, read when it dies
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.getcwd(), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        env["PYTHONUNBUFFERED"] = "1"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "harness.verify.worker", self.spec, self.contract],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, env=env, start_new_session=True,
        )  # fmt: skip
        self.sent = set()
        self.ready = False

    def start(self, deadline: float | None) -> None:
        from harness.common import UserError

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


def _exit_words(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code} before answering"


if __name__ == "__main__":
    serve(sys.argv[1], sys.argv[2])
