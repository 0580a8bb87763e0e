"""Implementations under test, behind one interface whatever their contract and wherever they run.

Three contracts, each chosen by its own option:
    layer   --impl SPEC     attention(x, weights, *, config, position_ids, attention_mask=None) -> [B, S, D]
    module  --module SPEC   build(config, weights) -> layer; layer(x, position_ids, attention_mask=None) -> [B, S, D]
    core    --core SPEC     attn(q, k, v, *, causal=True, scale=None, attention_mask=None) -> out or (out, lse)

SPEC is a built-in name or `module:name` / `path/to/file.py:name`. Built-ins run in this process on fresh copies of
every input; everything else runs in a worker process (worker.py) that imports it. Either way the output is
described and checked here before anything compares it: a wrong type, shape, dtype or device is stage `contract`,
never a silent cast. A file is imported under a private module name registered in sys.modules (code that looks
its own module up, such as torch.compile's tracing, finds it), never shadowing an installed package.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
import time
from pathlib import Path

import torch

from harness.common import UserError, one_line
from harness.verify.worker import Fault, Worker, core_grads, describe, layer_grads, results


def import_spec(spec: str, builtins: dict | None = None, what: str = "implementation"):
    """`name` (a key of builtins), `module:attr` or `path/to/file.py:attr` -> the object it names."""
    builtins = builtins or {}
    if spec in builtins:
        return builtins[spec]
    if ":" not in spec:
        known = ", ".join(builtins) or "none"
        raise UserError(
            f"unknown {what} '{spec}'; built-ins: {known}, or give package.module:function "
            "(or path/to/file.py:function)"
        )
    mod_name, _, attr = spec.rpartition(":")
    try:
        module = _import_file(mod_name) if mod_name.endswith(".py") else _import_module(mod_name)
    except (ImportError, SyntaxError) as e:  # the spec names nothing importable: bad input
        raise UserError(
            f"cannot import '{mod_name}' ({type(e).__name__}: {one_line(str(e), 150)}); "
            "check the module path and that it imports on its own"
        ) from None
    obj = getattr(module, attr, None)
    if not callable(obj):
        raise UserError(f"'{mod_name}' has no callable '{attr}'; give module:name following the {what} contract")
    return obj


def _import_module(name: str):
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    return importlib.import_module(name)


def _import_file(path_text: str):
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise UserError(f"{path_text}: no such file; give path/to/file.py:function")
    path = path.resolve()
    # private and unique per file: two plug-ins both called attention.py never collide, and no installed package
    # named like the file is shadowed
    name = f"_attention_verify_plugin_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


CONTRACTS = ("layer", "module", "core")
LAYOUTS = ("hf", "meta")


class Impl:
    """An implementation under test. `deadline` (time.monotonic()) bounds every call until it is changed."""

    def __init__(self, spec: str, contract: str, layout: str = "hf", device: str = "cpu"):
        self.spec, self.contract, self.layout, self.device = spec, contract, layout, device
        self.deadline: float | None = None

    @property
    def builtin(self) -> bool:
        return False

    @property
    def alive(self) -> bool:
        """Can it still answer? (A worker that died or was killed for its time cannot.)"""
        return True

    def layer(self, key: str, config: dict, weights: dict, x, pos, mask) -> torch.Tensor:
        """The layer (or module) on these inputs; key names the weights (fixture, dtype) for caching."""
        raise NotImplementedError

    def core(self, q, k, v, *, causal: bool = True, scale: float | None = None, mask=None):
        """-> (out, lse or None)."""
        raise NotImplementedError

    @property
    def backend(self) -> str | None:
        """What actually ran, where an implementation chooses (sdpa's backend), for the report."""
        return None

    def launch(self) -> None:
        """Start importing the code without waiting (several implementations' workers import side by side)."""

    def prepare(self, timeout: float) -> None:
        """Import the code now, so a spec that names nothing importable is bad input before any work is done."""

    def forget(self, key: str) -> None:
        """The weights under this key changed (a training step): send them again on the next call."""

    def layer_grad(self, key: str, config: dict, weights: dict, x, pos, mask, g) -> dict:
        """Gradients of sum(out * g): {"x": ..., "q_proj": ..., ...} (a weight whose gradient does not flow back
        to the given tensor is absent: a module that copies its weights)."""
        raise NotImplementedError

    def core_grad(self, q, k, v, *, causal: bool = True, scale: float | None = None, mask=None, g) -> dict:
        """Gradients of sum(out * g): {"q": ..., "k": ..., "v": ...}."""
        raise NotImplementedError

    def reset(self) -> None:
        """Forget state after a fault (a worker is killed; the next call starts a fresh one)."""

    def close(self) -> None:
        self.reset()

    def _weights(self, weights: dict) -> dict:
        if self.layout == "meta":  # q/k rows in Meta's interleaved RoPE order, as its checkpoints store them
            from harness.checkpoints.sources.base import half_split_to_interleaved

            H = self._config["num_attention_heads"]
            Hkv = self._config["num_key_value_heads"]
            weights = dict(weights, q_proj=half_split_to_interleaved(weights["q_proj"], H),
                           k_proj=half_split_to_interleaved(weights["k_proj"], Hkv))  # fmt: skip
        return weights


class Builtin(Impl):
    """A built-in (impl/ or the bug catalog): trusted code, run here, on fresh copies of every input."""

    def __init__(self, spec: str, contract: str, fn, **kw):
        super().__init__(spec, contract, **kw)
        self.fn = fn

    @property
    def builtin(self) -> bool:
        return True

    @property
    def backend(self) -> str | None:
        if self.spec != "sdpa":
            return None
        from impl import sdpa

        return sdpa.last_backend  # the backend that ran last (a silent fall-back shows here)

    @property
    def interpreted(self) -> bool:
        """Run in Triton's interpreter here (on a CPU): slow, so it gets the shorter scenario list."""
        from impl import INTERPRETED_ON_CPU

        return self.spec in INTERPRETED_ON_CPU and not str(self.device).startswith("cuda")

    def _on(self, t):
        """A fresh copy on this implementation's device: nothing it does reaches the caller's tensor."""
        return None if t is None else t.to(self.device, copy=True)

    def layer(self, key, config, weights, x, pos, mask):
        w = {k: self._on(v) for k, v in weights.items()}
        with torch.no_grad():
            out = self.fn(self._on(x), w, config=config, position_ids=self._on(pos), attention_mask=self._on(mask))
        check_layer(results(out)[0], out, x, self.device)
        return out.to(x.device)  # back where the caller's tensors are

    def core(self, q, k, v, *, causal=True, scale=None, mask=None):
        with torch.no_grad():
            value = self.fn(self._on(q), self._on(k), self._on(v), causal=causal, scale=scale,
                            attention_mask=self._on(mask))  # fmt: skip
        descs, _ = results(value)
        items = list(value) if isinstance(value, tuple) else [value]
        return check_core(descs, items, q, self.device)

    def layer_grad(self, key, config, weights, x, pos, mask, g):
        w = {k: self._on(v) for k, v in weights.items()}
        grads = layer_grads(self.fn, "layer", config, w, self._on(x), self._on(pos), self._on(mask), self._on(g))
        wrt = {"x": x, **{n: weights[n] for n in GRAD_OF[1:]}}
        return check_grads([describe(t) for t in grads], grads, wrt, "layer", self.device)

    def core_grad(self, q, k, v, *, causal=True, scale=None, mask=None, g):
        grads = core_grads(self.fn, self._on(q), self._on(k), self._on(v), causal, scale, self._on(mask), self._on(g))
        return check_grads([describe(t) for t in grads], grads, {"q": q, "k": k, "v": v}, "core", self.device)


GRAD_OF = ("x", "q_proj", "k_proj", "v_proj", "o_proj")


def check_grads(descs: list[dict], items: list, wrt: dict, contract: str, device=None) -> dict:
    """Gradients as they came back -> {name: tensor} (where the inputs are), each of its input's shape and dtype,
    on the implementation's device."""
    if len(descs) == 1 and len(wrt) > 1:  # the forward output itself, refused
        raise Fault("contract", f"computing gradients: {_contract_error('the output', descs[0], 'a tensor').message}")
    out = {}
    for (name, like), d, t in zip(wrt.items(), descs, items, strict=True):
        if d.get("type") == "builtins.NoneType":
            if contract == "module" and name != "x":
                continue  # the module keeps its own copy of this weight: nothing to compare
            raise Fault("contract", f"no gradient reaches {name}: the computation is not differentiable w.r.t. it")
        _check_tensor(f"the gradient of {name}", d, t, like.shape, like.dtype, torch.device(device or like.device))
        out[name] = t.to(like.device)
    return out


class Isolated(Impl):
    """User code, run in its worker process; nothing it does reaches this process."""

    def __init__(self, spec: str, contract: str, **kw):
        super().__init__(spec, contract, **kw)
        self.worker = Worker(spec, contract, self.device)
        self.early: Fault | None = None  # a fault while importing, given as the first call's verdict

    def launch(self) -> None:
        self.worker.launch()

    def prepare(self, timeout: float) -> None:
        try:
            self.worker.start(time.monotonic() + timeout)
        except Fault as e:
            self.early = e

    def forget(self, key: str) -> None:
        self.worker.sent.discard(key)

    def _raise_early(self) -> None:
        if self.early is not None:
            fault, self.early = self.early, None
            raise fault

    def layer(self, key, config, weights, x, pos, mask):
        self._raise_early()
        self._config = config
        self.worker.weights(key, config, self._weights(weights), self.deadline)
        t = {"x": x, "position_ids": pos} | ({} if mask is None else {"attention_mask": mask})
        reply, out = self.worker.call({"op": "layer", "key": key}, t, self.deadline, "running the layer")
        got = out.get("r0")
        check_layer(reply["results"], got, x, self.device)
        return got.to(x.device)

    def core(self, q, k, v, *, causal=True, scale=None, mask=None):
        self._raise_early()
        t = {"q": q, "k": k, "v": v} | ({} if mask is None else {"attention_mask": mask})
        reply, out = self.worker.call({"op": "core", "causal": causal, "scale": scale}, t, self.deadline,
                                      "running the kernel")  # fmt: skip
        items = [out.get(f"r{i}") for i in range(len(reply["results"]))]
        return check_core(reply["results"], items, q, self.device)

    @property
    def alive(self) -> bool:
        return self.worker.proc is not None

    def layer_grad(self, key, config, weights, x, pos, mask, g):
        self._raise_early()
        self._config = config
        self.worker.weights(key, config, self._weights(weights), self.deadline)
        t = {"x": x, "position_ids": pos, "g": g} | ({} if mask is None else {"attention_mask": mask})
        reply, out = self.worker.call({"op": "layer_grad", "key": key}, t, self.deadline, "computing gradients")
        items = [out.get(f"r{i}") for i in range(len(reply["results"]))]
        wrt = {"x": x, **{n: weights[n] for n in GRAD_OF[1:]}}
        grads = check_grads(reply["results"], items, wrt, self.contract, self.device)
        if self.layout == "meta":  # its q/k rows were in Meta's order: their gradients come back in it
            from harness.checkpoints.sources.base import interleaved_to_half_split

            for name, n in (("q_proj", config["num_attention_heads"]), ("k_proj", config["num_key_value_heads"])):
                if name in grads:
                    grads[name] = interleaved_to_half_split(grads[name], n)
        return grads

    def core_grad(self, q, k, v, *, causal=True, scale=None, mask=None, g):
        self._raise_early()
        t = {"q": q, "k": k, "v": v, "g": g} | ({} if mask is None else {"attention_mask": mask})
        reply, out = self.worker.call({"op": "core_grad", "causal": causal, "scale": scale}, t, self.deadline,
                                      "computing gradients")  # fmt: skip
        items = [out.get(f"r{i}") for i in range(len(reply["results"]))]
        return check_grads(reply["results"], items, {"q": q, "k": k, "v": v}, "core", self.device)

    def reset(self) -> None:
        self.worker.stop()


def resolve(spec: str, contract: str = "layer", *, layout: str = "hf", device: str = "cpu") -> Impl:
    """A spec as given on the command line -> an Impl. The user's code is not imported here (its worker does)."""
    from impl import CORES, IMPLEMENTATIONS

    builtins = {"layer": IMPLEMENTATIONS, "core": CORES, "module": {}}[contract]
    if spec in builtins:
        return Builtin(spec, contract, builtins[spec], layout=layout, device=device)
    if ":" not in spec:
        known = ", ".join(builtins) or "none (give module:factory)"
        raise UserError(f"unknown implementation '{spec}' for the {contract} contract; built-ins: {known}, or give "
                        "package.module:name (or path/to/file.py:name)")  # fmt: skip
    mod_name, _, attr = spec.rpartition(":")
    if not attr.isidentifier():
        raise UserError(f"'{spec}': '{attr}' is not a Python name; give module:name or path/to/file.py:name")
    if mod_name.endswith(".py") and not Path(mod_name).expanduser().is_file():
        raise UserError(f"{mod_name}: no such file; give path/to/file.py:name")
    return Isolated(spec, contract, layout=layout, device=device)


def resolve_impl(spec: str):
    """(name as given, the layer-contract callable) for a built-in or, in this process, a user's module (the bug
    catalog's tests and the e2e tests use it; `verify` and `e2e` isolate user code through `resolve`)."""
    from impl import IMPLEMENTATIONS

    return spec, import_spec(spec, IMPLEMENTATIONS)


def _dtype_name(t: torch.dtype) -> str:
    return str(t).removeprefix("torch.")


def _contract_error(what: str, desc: dict, want: str) -> Fault:
    got = desc.get("type") if desc.get("type") != "tensor" else (
        f"a {desc['layout']} tensor {desc['shape']} {desc['dtype']} on {desc['device']}")  # fmt: skip
    return Fault("contract", f"{what}: returned {got}, expected {want} (see the contract)")


def _check_tensor(what: str, desc: dict, t, shape, dtype, device) -> None:
    want = f"a tensor {list(shape)} {_dtype_name(dtype)} on {device}"
    if desc.get("type") != "tensor" or not desc.get("sendable") or t is None:
        raise _contract_error(what, desc, want)
    if desc["shape"] != list(shape) or desc["dtype"] != _dtype_name(dtype) or desc["device"] != str(device):
        raise _contract_error(what, desc, want)


def check_layer(descs: list[dict], out, x: torch.Tensor, device=None) -> None:
    """A layer's output: one tensor of x's shape and dtype, on the device the implementation was given."""
    if len(descs) != 1:
        raise Fault("contract", f"the layer returned a tuple of {len(descs)}, expected one tensor {list(x.shape)}")
    _check_tensor("the layer", descs[0], out, x.shape, x.dtype, torch.device(device or x.device))


def check_core(descs: list[dict], items: list, q: torch.Tensor, device=None):
    """A kernel's output: out [B, H, Sq, d] in q's dtype, or (out, lse [B, H, Sq] float32), on its device.
    Returned where the caller's q is."""
    dev = torch.device(device or q.device)
    if len(descs) not in (1, 2):
        raise Fault("contract", f"the kernel returned a tuple of {len(descs)}, expected out or (out, lse)")
    _check_tensor("the kernel's out", descs[0], items[0], q.shape, q.dtype, dev)
    lse = None
    if len(descs) == 2:
        _check_tensor("the kernel's lse", descs[1], items[1], q.shape[:3], torch.float32, dev)
        lse = items[1].to(q.device)
    return items[0].to(q.device), lse


def check_output(out, x: torch.Tensor) -> None:
    """A layer's output checked where it runs (e2e's swapped modules): a Fault('contract') if it is wrong."""
    check_layer([describe(out)], out, x)
