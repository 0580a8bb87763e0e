"""The instrument: what a call costs, measured in the process that runs it.

- traffic: the bytes every aten op reads and writes (a TorchDispatchMode; views move nothing), what a GPU moves
  through HBM when each op is its own kernel;
- tensor peak: the most bytes of tensors alive at once (the same mode; also on the meta device, where nothing
  is allocated, so a call too big to run can be counted);
- resident-set peak: /proc/self/status VmHWM, reset through /proc/self/clear_refs, which sees every allocation,
  kernels' scratch included (on a CUDA device: torch.cuda's peak of allocated bytes instead);
- time: perf_counter around the call on a CPU; CUDA events around it on a GPU (launches are asynchronous);
- the machine: its float32 matmul rate and copy bandwidth (the roofline), measured in the same run.
"""

from __future__ import annotations

import ctypes
import gc
import os
import platform
import statistics
import time
import weakref
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

CPU = torch.device("cpu")

# ---------------------------------------------------------------------------------------------------------
# the machine: roofline and memory


def wall_clock(fn: Callable) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def cuda_clock(fn: Callable) -> float:
    """Seconds on the GPU from before the call's first launch to after its last kernel: CUDA events on the current
    stream, then a wait for the end event (the call returns as soon as its kernels are queued)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def clock_for(device: torch.device) -> Callable[[Callable], float]:
    return cuda_clock if device.type == "cuda" else wall_clock


def timed(fn: Callable, runs: int, min_s: float = 0.0, cap: int = 50, clock: Callable = wall_clock) -> list[float]:
    """At least `runs` timed calls, more (up to `cap`) until they add up to `min_s`: short calls are noisy."""
    ts: list[float] = []
    while len(ts) < runs or (sum(ts) < min_s and len(ts) < cap):
        ts.append(clock(fn))
    return ts


def roofline(device: torch.device = CPU, runs: int = 10) -> dict:
    """Measured float32 matmul rate (GFLOP/s, n x n @ n x n; n = 2048 on a CPU, 8192 on a GPU) and copy bandwidth
    (GB/s, 256 MB read + written) on `device`."""
    n = 8192 if device.type == "cuda" else 2048
    clock = clock_for(device)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=g).to(device), torch.randn(n, n, generator=g).to(device)
    a @ b
    t_mm = statistics.median(timed(lambda: a @ b, runs, clock=clock))
    src, dst = torch.ones(64 * 2**20, device=device), torch.empty(64 * 2**20, device=device)
    dst.copy_(src)
    t_cp = statistics.median(timed(lambda: dst.copy_(src), runs, clock=clock))
    return {
        "matmul_gflops": 2 * n**3 / t_mm / 1e9,
        "matmul_shape": [n, n, n],
        "copy_gbps": 2 * src.nbytes / t_cp / 1e9,
    }


def machine(device: torch.device = CPU) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "device": str(device),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "ram_bytes": meminfo("MemTotal"),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_bytes=props.total_memory, cuda=torch.version.cuda)
    return info


def meminfo(key: str) -> int | None:
    """/proc/meminfo's `key` in bytes, or None where there is none."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def status(key: str) -> int:
    """/proc/self/status's `key` (VmRSS, VmHWM) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def can_reset_hwm() -> bool:
    """Can VmHWM be reset here (Linux: /proc/self/clear_refs)?"""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        status("VmHWM")
        return True
    except (OSError, KeyError):
        return False


_libc = None


def trim() -> None:
    """Collect garbage and hand freed heap pages back to the OS, so a call that reuses them shows in its RSS."""
    global _libc
    gc.collect()
    try:
        _libc = _libc or ctypes.CDLL("libc.so.6")
        _libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


# ---------------------------------------------------------------------------------------------------------
# the meter: traffic at aten op boundaries, and the live bytes of the tensors a call creates


def nbytes(t: torch.Tensor) -> int:
    """Bytes a kernel touches reading or writing t: broadcast (stride-0) dimensions are one element, not many."""
    n = 1
    for size, stride in zip(t.shape, t.stride(), strict=True):
        if size == 0:
            return 0
        if stride != 0:
            n *= size
    return n * t.element_size()


_ALLOC_ONLY = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "empty_permuted"}
_OVERWRITE = {"copy_", "fill_", "zero_", "normal_", "uniform_", "random_"}  # write self without reading it
# Gathers read the elements they select, not their whole source: a paged cache's pool is far larger than the rows a
# sequence's gather picks (at most the source: an index may pick a row twice, a GPU's cache serves the second)
_GATHER = {"index", "index_select", "gather", "take", "embedding"}


class Meter(TorchDispatchMode):
    """Sums, over every aten op, the bytes of its tensor inputs (read) and outputs (written) -> `traffic`.

    Views (outputs sharing an input's storage, op not in place) move nothing and count zero; in-place ops read
    and write self; copy_/fill_ and out= arguments are written, not read; empty() allocates and writes nothing; a
    gather (index, index_select, gather, take, embedding) reads from its source only the bytes it outputs.
    Also tracks the storages created inside (freed when Python drops them) -> `tensor_peak`: the most bytes of
    tensors alive at once, inputs excluded. It sees tensors only (not kernels' internal scratch), which is why the
    measured peak is the RSS high-water mark and this is the computed one, for calls that cannot run.
    """

    def __init__(self):
        super().__init__()
        self.traffic = 0
        self.ops = 0
        self.live = 0
        self.tensor_peak = 0
        self._new: dict[int, int] = {}  # storage -> bytes, for storages created inside
        self._old: set[int] = set()  # storages that existed before (inputs)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func._schema.name.split("::")[-1]
        ins = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        outs = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        for t in ins:
            key = t.untyped_storage()._cdata
            if key not in self._new:
                self._old.add(key)
        in_keys = {t.untyped_storage()._cdata for t in ins}
        mutates = any(a.alias_info is not None and a.alias_info.is_write for a in func._schema.arguments)
        if not mutates and outs and all(t.untyped_storage()._cdata in in_keys for t in outs):
            return out  # a view: no data moves
        self.ops += 1
        dest = {id(t) for t in pytree.tree_leaves(kwargs.get("out")) if isinstance(t, torch.Tensor)}
        if name in _OVERWRITE and ins:
            dest.add(id(args[0]))
        src = args[0] if name in _GATHER and args and isinstance(args[0], torch.Tensor) else None
        self.traffic += sum(nbytes(t) for t in ins if id(t) not in dest and t is not src)
        if src is not None:  # the selected elements only
            self.traffic += min(nbytes(src), sum(nbytes(t) for t in outs))
        if name not in _ALLOC_ONLY:
            self.traffic += sum(nbytes(t) for t in outs)
        for t in outs:
            self._track(t)
        return out

    def _track(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        key = st._cdata
        if key in self._new or key in self._old:
            return
        n = st.nbytes()
        self._new[key] = n
        self.live += n
        self.tensor_peak = max(self.tensor_peak, self.live)
        weakref.finalize(st, self._free, key)

    def _free(self, key: int) -> None:
        self.live -= self._new.pop(key, 0)


def meter_call(fn: Callable) -> tuple[Meter, object]:
    with torch.no_grad(), Meter() as m:
        out = fn()
    return m, out


def human(b: float | None) -> str:
    if b is None:
        return "-"
    for unit, k in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(b) >= k:
            return f"{b / k:.3g} {unit}"
    return f"{b:.0f} B"
