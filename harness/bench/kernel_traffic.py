"""Count the bytes a Triton kernel moves to and from global memory, by running it in Triton's interpreter.

With TRITON_INTERPRET=1 (more precisely: a kernel decorated while interpreter mode was on), every memory access of a
kernel is executed by `triton.runtime.interpreter.InterpreterBuilder`. In triton 3.x every load and store ends in
one of two methods:

    create_masked_load(ptrs, mask, other, ...)   tl.load with a mask; tl.load without one (create_load builds an
                                                 all-true mask and calls it); tensor-descriptor loads and gathers
                                                 (create_descriptor_load materialises pointers + bounds mask and
                                                 calls it); tl.atomic_load
    create_masked_store(ptrs, value, mask, ...)  the same for tl.store, descriptor stores and scatters,
                                                 tl.atomic_store

(block pointers, tl.make_block_ptr, no longer exist in 3.9; where a Triton version still has them, check that they
route here too). Read-modify-write atomics (create_atomic_rmw, create_atomic_cas) go straight to the C++ interpreter,
so they are wrapped separately and counted as one read and one write of each active lane.

`count()` wraps these methods on the class for the duration of a `with` block (restored on exit, also on error) and
adds, per call, (number of active lanes) * (element size): lanes whose mask is False move no data on a GPU either, so
they are excluded; a load without a mask counts every lane. Pointers are counted per access, not deduplicated: two
programs loading the same block count it twice, as two reads from global memory (an L2 hit on a GPU is not modelled).

This module imports nothing from the rest of the harness.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np


@dataclass
class Traffic:
    """Bytes and calls counted while `count()` was active."""

    load_bytes: int = 0
    store_bytes: int = 0
    load_calls: int = 0
    store_calls: int = 0

    @property
    def total_bytes(self) -> int:
        return self.load_bytes + self.store_bytes


def _itemsize(ptrs) -> int:
    """Bytes per element pointed to (bool pointers are loaded as int8 by tl.load: 1 byte)."""
    return max(1, ptrs.get_element_ty().primitive_bitwidth // 8)


def _lanes(ptrs, mask) -> int:
    """Active lanes: the mask (broadcast to the pointers' shape) or, without one, every lane."""
    shape = np.shape(ptrs.data)
    if mask is None:
        return int(np.prod(shape, dtype=np.int64))
    return int(np.count_nonzero(np.broadcast_to(np.asarray(mask.data, dtype=bool), shape)))


@contextlib.contextmanager
def count():
    """with count() as t: kernel[grid](...)  ->  t.load_bytes, t.store_bytes, t.load_calls, t.store_calls.

    The kernel must run in the interpreter; a compiled kernel bypasses the wrapped methods (t stays at zero: check
    t.load_calls)."""
    from triton.runtime.interpreter import InterpreterBuilder as IB  # lazy: triton is slow to import

    t = Traffic()
    originals = {n: getattr(IB, n) for n in ("create_masked_load", "create_masked_store")}
    for name in ("create_atomic_rmw", "create_atomic_cas"):  # absent in some versions: wrap what exists
        if hasattr(IB, name):
            originals[name] = getattr(IB, name)

    def masked_load(self, ptrs, mask, other, cache_policy, is_volatile):
        t.load_calls += 1
        t.load_bytes += _lanes(ptrs, mask) * _itemsize(ptrs)
        return originals["create_masked_load"](self, ptrs, mask, other, cache_policy, is_volatile)

    def masked_store(self, ptrs, value, mask, cache_policy):
        t.store_calls += 1
        t.store_bytes += _lanes(ptrs, mask) * _itemsize(ptrs)
        return originals["create_masked_store"](self, ptrs, value, mask, cache_policy)

    def atomic_rmw(self, rmwOp, ptr, val, mask, *args):
        n = _lanes(ptr, mask) * _itemsize(ptr)
        t.load_calls, t.store_calls = t.load_calls + 1, t.store_calls + 1
        t.load_bytes, t.store_bytes = t.load_bytes + n, t.store_bytes + n
        return originals["create_atomic_rmw"](self, rmwOp, ptr, val, mask, *args)

    def atomic_cas(self, ptr, cmp, val, *args):
        n = _lanes(ptr, None) * _itemsize(ptr)
        t.load_calls, t.store_calls = t.load_calls + 1, t.store_calls + 1
        t.load_bytes, t.store_bytes = t.load_bytes + n, t.store_bytes + n
        return originals["create_atomic_cas"](self, ptr, cmp, val, *args)

    wrappers = {
        "create_masked_load": masked_load,
        "create_masked_store": masked_store,
        "create_atomic_rmw": atomic_rmw,
        "create_atomic_cas": atomic_cas,
    }
    try:
        for name in originals:
            setattr(IB, name, wrappers[name])
        yield t
    finally:
        for name, fn in originals.items():
            setattr(IB, name, fn)
