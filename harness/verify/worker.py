"""The process boundary between the judge and the code it judges.

Every implementation that is not a built-in runs in its own worker: a fresh Python interpreter (a subprocess,
never a fork) that imports the user's code and answers calls, in namespaces of its own (isolation.py: it cannot
open the judge's memory, signal the judge or another worker, or outlive its verdict). The parent holds the
fixtures and the references and computes every comparison and verdict; inputs reach the worker as copies and
outputs come back as copies. So the code under test cannot edit the parent's tensors, change its torch state, patch
its comparison, or end its run: an exit (any code, 0 included) or a signal is a dead worker, a hang a killed one.

    parent                                          worker (python -m harness.verify.worker SPEC CONTRACT IN OUT)
    Worker.call(op, header, tensors) --message-->   import SPEC; per message: copy inputs, call, describe output
                                     <--message--   {"ok": true, ...} + tensors, or {"ok": false, "error": ...}

A message is a length-prefixed JSON header and a safetensors blob: nothing in it can execute code, so the parent
never unpickles what the worker sends. The channel is two pipes on descriptors 3 and up; stdin is /dev/null and
stdout and stderr go to a file whose tail is shown when the worker dies, so code that reads stdin or prints cannot
touch the channel. The parent believes nothing the worker says about its output: the sizes are read first and
capped by what the contract can need, and each description is checked against the tensor that really arrived.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
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

from harness.common import ROOT, UserError, one_line
from harness.verify import isolation
from harness.verify.specs import import_spec

MAX_HEADER = 1 << 24  # bytes of JSON a message to a worker may carry (a config, a key)
MAX_REPLY_HEADER = 1 << 20  # bytes of JSON a reply may carry: descriptions and an error's traceback
MAX_RESULTS = 64  # items a reply may describe
MAX_NAMES = 256  # parameter names a worker's signature may list
PRELOAD = "ATTN_WORKER_PRELOAD"  # the serve module a worker imports before the code (its environment, not its argv)
SLACK = 1 << 16  # bytes a reply's blob may carry beyond its tensors' data (the safetensors header)
ELEMENT = 8  # bytes of the widest element that can travel (float64, int64)
SENDABLE = {torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
            torch.int8, torch.uint8, torch.bool}  # fmt: skip


def reply_limit(elements: int) -> int:
    """The most bytes a reply's blob may take when the contract's outputs hold at most `elements` numbers."""
    return elements * ELEMENT + SLACK


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


@dataclass
class TooLarge(Exception):
    """A message announced more bytes than its reader allows: nothing beyond its 16-byte prefix was read."""

    part: str  # "header" | "blob"
    size: int
    limit: int


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


def read_message(fd: int, deadline: float | None = None, max_head: int = MAX_HEADER,
                 max_blob: int | None = None) -> tuple[dict, dict[str, torch.Tensor]]:  # fmt: skip
    """One message; its announced sizes are checked before anything else is read (TooLarge)."""
    n_head, n_blob = struct.unpack("<QQ", _read_exact(fd, 16, deadline))
    if n_head > max_head:
        raise TooLarge("header", n_head, max_head)
    if max_blob is not None and n_blob > max_blob:
        raise TooLarge("blob", n_blob, max_blob)
    head = _read_exact(fd, n_head, deadline)
    return unpack(head, _read_exact(fd, n_blob, deadline))


def write_message(fd: int, header: dict, tensors=None) -> None:
    data = memoryview(pack(header, tensors))
    while data:
        data = data[os.write(fd, data) :]


# ---------------------------------------------------------------------------------------------------------
# the worker side


def describe(obj) -> dict:
    """What came back, in words the parent checks against the tensors that arrive (it never trusts them)."""
    if not isinstance(obj, torch.Tensor):
        return {"type": type(obj).__module__ + "." + type(obj).__qualname__}
    d = {"type": "tensor", "shape": list(obj.shape), "dtype": str(obj.dtype).removeprefix("torch."),
         "device": str(obj.device), "layout": str(obj.layout).removeprefix("torch.")}  # fmt: skip
    d["sendable"] = (obj.layout == torch.strided and obj.device.type != "meta" and not obj.is_quantized
                     and obj.dtype in SENDABLE)  # fmt: skip
    return d


def results(value) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """The call's return value -> descriptions and the tensors that can travel (out, or out and lse). Items of a
    tuple say so (`in_tuple`): a 1-tuple is not the tensor a contract asks for."""
    items = list(value) if isinstance(value, tuple) else [value]
    descs, tensors = [describe(v) | ({"in_tuple": True} if isinstance(value, tuple) else {}) for v in items], {}
    for i, (d, v) in enumerate(zip(descs, items, strict=True)):
        if d.get("sendable"):
            tensors[f"r{i}"] = v.detach()
    return descs, tensors


def serve(spec: str, contract: str, proto_in: int, proto_out: int, serve_module: str = "") -> None:
    """The worker's main loop. Exits when the parent closes the channel. Each call names the function that runs
    the code (`module:function`, taking (code, header, tensors, state)): this loop knows no contract. serve_module,
    imported before the code, may set up what the code must find in place (the ring contract's byte counters)."""
    isolation.protect_self()  # another worker (or anything not privileged over this one) cannot open its memory
    isolation.die_with_parent()  # the judge (or the namespace's init) gone: this worker too
    for fd in (proto_in, proto_out):
        os.set_inheritable(fd, False)  # what the code starts does not get the channel
    try:
        if serve_module:
            importlib.import_module(serve_module)
        obj = import_spec(spec, {}, what=contract)
    except UserError as e:
        write_message(proto_out, {"ok": False, "error": {"type": "UserError", "message": str(e)}})
        return
    except Exception as e:  # noqa: BLE001 - reported to the parent, which decides
        write_message(proto_out, {"ok": False, "error": error(e)})
        return
    write_message(proto_out, {"ok": True, "signature": signature_of(obj), "layouts": layouts_of(obj)})
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


def signature_of(obj) -> dict:
    """The keyword names the code takes (inspect.signature; **kwargs takes any), so that the judge passes an optional
    keyword only to code that takes it. A signature that cannot be read takes none of them."""
    try:
        params = inspect.signature(obj).parameters.values()
    except (TypeError, ValueError):
        return {"names": [], "any": False}
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {"names": [p.name for p in params if p.kind in named][:MAX_NAMES],
            "any": any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params)}  # fmt: skip


def layouts_of(obj) -> list[str] | None:
    """The layouts a ring kernel declares (its `layouts` attribute), as words; None when it declares none."""
    got = getattr(obj, "layouts", None)
    if isinstance(got, str):
        got = (got,)
    return [x for x in got if isinstance(x, str)][:8] if isinstance(got, tuple | list) else None


def claimed_layouts(d, known: tuple[str, ...]) -> tuple[str, ...] | None:
    """A worker's word on its code's layouts, kept only where it names layouts the contract knows."""
    if not isinstance(d, list):
        return None
    return tuple(x for x in known if x in d) or None


def accepts(signature: dict | None, name: str) -> bool:
    """Does code with this signature (signature_of, or a worker's claim made safe by `claimed_signature`) take the
    keyword `name`?"""
    return bool(signature) and (signature["any"] or name in signature["names"])


def error(e: BaseException) -> dict:
    return {"type": type(e).__name__, "message": str(e)[:4000], "traceback": traceback.format_exc()[-60_000:]}


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
# the parent side: a reply is words and bytes from untrusted code, checked before they are believed


@dataclass
class Fault(Exception):
    """The implementation did not answer with a result: stage crash, timeout or contract."""

    stage: str  # "crash" | "timeout" | "contract"
    message: str
    traceback: str | None = None

    def __str__(self) -> str:
        return self.message


def _text(x, limit: int) -> str:
    """A string from the worker, as shown in a verdict: never longer than limit, one line."""
    return one_line(x if isinstance(x, str) else repr(x)[:limit], limit)


def _claimed(d: dict) -> dict:
    """A description of an item that did not travel, reduced to words safe to print."""
    out = {"type": _text(d.get("type"), 120)}
    if out["type"] == "tensor":
        shape = d.get("shape")
        out |= {"shape": shape if isinstance(shape, list) and all(type(n) is int for n in shape[:16]) else "?",
                "dtype": _text(d.get("dtype"), 40), "device": _text(d.get("device"), 40),
                "layout": _text(d.get("layout"), 40), "sendable": False}  # fmt: skip
    return out


def claimed_signature(d) -> dict:
    """A worker's word on its code's signature, kept only in the form signature_of gives (else: takes nothing
    optional). It decides only which scenarios that implementation runs: a false claim is its own verdict (a
    keyword it does not take raises; one it does take but denies is skipped, never a pass)."""
    if not isinstance(d, dict) or not isinstance(d.get("names"), list) or not isinstance(d.get("any"), bool):
        return {"names": [], "any": False}
    names = [n for n in d["names"][:MAX_NAMES] if isinstance(n, str) and len(n) <= 200]
    return {"names": names, "any": d["any"]}


def checked(reply: dict, tensors: dict[str, torch.Tensor]) -> list[dict]:
    """The reply's descriptions, made from the tensors that really arrived (shape, dtype); the worker's words are
    kept only for what did not travel (its type name, a tensor's device). A description that disagrees with its
    tensor, or a tensor nobody described, is `contract`; a malformed reply is `crash`."""
    items = reply.get("results")
    if not isinstance(items, list) or len(items) > MAX_RESULTS or not all(isinstance(d, dict) for d in items):
        raise Fault("crash", "the implementation's process sent a malformed reply (no list of results)")
    descs = []
    for i, d in enumerate(items):
        t = tensors.pop(f"r{i}", None)
        if t is None:
            descs.append(_claimed(d))
            continue
        real = describe(t) | {"device": _text(d.get("device"), 40)}
        if d.get("type") != "tensor" or d.get("shape") != real["shape"] or d.get("dtype") != real["dtype"]:
            said = _claimed(d)
            said = f"{said.get('shape')} {said.get('dtype')}" if said["type"] == "tensor" else said["type"]
            raise Fault("contract", f"the reply describes output {i} as {said} but carries a tensor "
                        f"{real['shape']} {real['dtype']}: a reply must carry what it says")  # fmt: skip
        descs.append(real | ({"in_tuple": True} if d.get("in_tuple") is True else {}))
    if tensors:
        raise Fault("contract", f"the reply carries tensors no result describes ({', '.join(sorted(tensors)[:4])})")
    return descs


class Worker:
    """One implementation's worker process. `call` raises Fault when the worker dies or runs out of time; after
    that the worker is gone and the next call starts a new one."""

    def __init__(self, spec: str, contract: str, device: str = "cpu", serve_module: str = ""):
        self.spec, self.contract, self.device = spec, contract, device
        self.serve_module = serve_module  # the module whose function runs the code, imported in the worker
        self.proc: isolation.Process | None = None
        self.ready = False  # launched and answered: its code imported
        self.sent: set[str] = set()  # weight keys the current worker holds
        self.signature: dict | None = None  # the code's keyword names, as its first worker claimed (None: not yet)
        self.layouts: list | None = None  # its `layouts` attribute, as claimed (a list of words, unchecked)

    def launch(self) -> None:
        """Start the process without waiting for it: the workers of several implementations import torch and the
        user's code side by side. `start` (or the first call) waits for its answer."""
        if self.proc is not None:
            return
        isolation.protect_self()  # the judge: no unprivileged process may open its memory (idempotent)
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 - the worker's stdout and stderr, read when it dies
        env = dict(os.environ)
        path = [str(ROOT), os.getcwd(), *import_root(self.serve_module), env.get("PYTHONPATH", "")]
        env["PYTHONPATH"] = os.pathsep.join(path).rstrip(os.pathsep)
        env["PYTHONUNBUFFERED"] = "1"
        to_worker, self.fd_in = os.pipe()  # the parent writes fd_in...
        self.fd_out, from_worker = os.pipe()  # ...and reads fd_out
        env[PRELOAD] = self.serve_module  # imported before the code (serve); the argv stays the protocol's
        argv = [sys.executable, "-m", "harness.verify.worker", self.spec, self.contract, str(to_worker),
                str(from_worker)]  # fmt: skip
        try:
            self.proc = isolation.spawn(argv, env=env, log=self.log, pass_fds=(to_worker, from_worker))
        except BaseException:
            os.close(self.fd_in)
            os.close(self.fd_out)
            raise
        finally:
            os.close(to_worker)
            os.close(from_worker)
        self.sent = set()
        self.ready = False

    def start(self, deadline: float | None) -> None:
        self.launch()
        header, _ = self._receive(deadline, "starting (importing the code)", MAX_REPLY_HEADER, 0)
        if header.get("ok") is not True:
            err = header.get("error") if isinstance(header.get("error"), dict) else {}
            self.stop()
            # the worker's words, shown as this implementation's verdict: never as the harness's own error
            raise Fault("crash", f"importing {self.spec} failed: {_text(err.get('type'), 80)}: "
                        f"{_text(err.get('message'), 600)}", _text(err.get("traceback"), 60_000))  # fmt: skip
        self.signature = claimed_signature(header.get("signature"))
        self.layouts = header.get("layouts")
        self.ready = True

    def _receive(self, deadline, doing: str, max_head: int, max_blob: int | None):
        try:
            return read_message(self.fd_out, deadline, max_head, max_blob)
        except TimeoutError:
            self.stop()
            raise Fault("timeout", f"no answer within the time limit while {doing}: the worker was killed "
                        "(raise --timeout if it is only slow)") from None  # fmt: skip
        except TooLarge as e:
            self.stop()
            raise Fault("contract", f"while {doing}, its reply announced a {e.part} of {e.size} bytes; what the "
                        f"contract asks for fits in {e.limit} bytes (nothing more was read)") from None  # fmt: skip
        except Exception as e:  # noqa: BLE001 - whatever the bytes were (garbage, a broken safetensors blob)
            ended = self.proc.proc.poll() is not None or isinstance(e, Closed)
            code = self._wait() if ended else None
            tail = self.tail()
            self.stop()
            how = _exit_words(code) if code is not None else f"sent an unreadable message ({type(e).__name__})"
            raise Fault("crash", f"the implementation's process {how} while {doing}" + (f"; its last output: {tail}"
                        if tail else ""), tail) from None  # fmt: skip

    def _wait(self) -> int | None:
        try:
            self.proc.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            return None
        return self.proc.exit_code()

    def tail(self, n: int = 300) -> str:
        try:
            self.log.seek(0, os.SEEK_END)
            size = self.log.tell()
            self.log.seek(max(0, size - 64 * n))
            text = self.log.read().decode(errors="replace")
        except (OSError, ValueError, AttributeError):
            return ""
        return " ".join(text.split())[-n:]

    def call(self, header: dict, tensors: dict, deadline: float | None, doing: str, max_blob: int | None = None):
        """-> (reply, [descriptions checked against the tensors that arrived], tensors by name)."""
        self.send(header, tensors, deadline)
        return self.reply(header, deadline, doing, max_blob)

    def send(self, header: dict, tensors: dict, deadline: float | None) -> None:
        """The first half of a call (several workers can then compute side by side: the ranks of a ring)."""
        if not self.ready:
            self.start(deadline)
        try:
            write_message(self.fd_in, {"device": self.device, **header}, tensors)
        except OSError:
            pass  # it died: the read of its reply says how

    def reply(self, header: dict, deadline: float | None, doing: str, max_blob: int | None = None):
        """The second half: the reply to what `send` sent, checked (see call)."""
        reply, out = self._receive(deadline, doing, MAX_REPLY_HEADER, max_blob)
        if reply.get("ok") is not True:
            err = reply.get("error") if isinstance(reply.get("error"), dict) else {}
            raise Fault("crash", f"raised {_text(err.get('type'), 80)}: {_text(err.get('message'), 2000)}",
                        _text(err.get("traceback"), 60_000) if "traceback" in err else None)  # fmt: skip
        if header.get("op") == "weights":
            return reply, [], out
        try:
            descs = checked(reply, dict(out))
        except Fault:
            self.stop()  # a worker that lies about its output is not asked again
            raise
        return reply, descs, out

    def weights(self, key: str, config: dict, weights: dict, deadline) -> None:
        if not self.ready or key not in self.sent:
            self.call({"op": "weights", "key": key, "config": config}, weights, deadline, "receiving weights", 0)
            self.sent.add(key)

    def stop(self) -> None:
        if self.proc is None:
            return
        isolation.kill(self.proc)  # the worker and everything it started
        try:
            self.proc.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        self.proc.close()
        for fd in (self.fd_in, self.fd_out):
            try:
                os.close(fd)
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
    serve(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), os.environ.pop(PRELOAD, ""))
