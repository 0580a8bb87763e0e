"""Triton kernels without a GPU: decorated on first use, and launched in Triton's interpreter on CPU tensors.

    @jit                 triton.jit, deferred: the function is kept as it is until `load` (importing triton is slow,
                         and only the Triton kernels need it)
    load(module)         import triton, decorate the module's @jit functions in the process's own mode (and bind the
                         @jit functions it imported from another kernel module to their decorated versions)
    compiled(f)          was f decorated for compiling (not for the interpreter)?
    interpreted(f)       f decorated for the interpreter, whatever the process's mode
    launch_interpreted   run a kernel in the interpreter, its callees swapped in for the launch only

The process's mode (compile, or TRITON_INTERPRET=1 set before triton was imported) is left as it was: other kernels
still compile on a GPU, and TRITON_INTERPRET is never left set. `interpreted` says why this takes more than setting
the variable.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import sys
import types
from collections.abc import Callable
from pathlib import Path

import numpy as np

STD_NAMES = ("max", "sum")  # triton.language functions impl's kernels call that are themselves @triton.jit
_marked: dict[str, dict[str, Callable]] = {}  # module name -> its @jit functions by name, undecorated
_owner: dict[Callable, str] = {}  # an undecorated @jit function -> the name of the module that defines it
_twins: dict = {}  # Python function -> its interpreted decoration


def jit(fn):
    """Mark fn (a kernel, or a function kernels call) for triton.jit; `load` decorates it. Returns fn unchanged."""
    _marked.setdefault(fn.__module__, {})[fn.__name__] = fn
    _owner[fn] = fn.__module__
    return fn


def load(module):
    """Import triton (once per module) and decorate `module`'s @jit functions with triton.jit, in the process's own
    mode. Their names in the module are rebound, so the calls between them resolve to the decorated versions, and
    `module.tl` (None until then: the name the kernels use) to triton.language, which is returned. A @jit function
    `module` imported from another kernel module (a helper the forward and backward kernels share) is loaded there
    and its name here rebound to that decorated version: triton.jit resolves a callee by the caller's globals."""
    if module.tl is None:
        import triton  # lazy: triton is slow to import
        import triton.language  # lazy: as triton

        for name in _marked.get(module.__name__, {}):
            setattr(module, name, triton.jit(getattr(module, name)))
        for name, obj in list(vars(module).items()):
            owner = _owner_of(obj)
            if owner is not None and owner != module.__name__:
                setattr(module, name, getattr(_loaded(owner), obj.__name__))
        module.tl = triton.language
    return module.tl


def _loaded(name: str):
    """The kernel module `name`, loaded."""
    module = sys.modules[name]
    load(module)
    return module


def _owner_of(obj) -> str | None:
    """The defining module of an undecorated @jit function, or None for anything else."""
    return _owner.get(obj) if isinstance(obj, types.FunctionType) else None


def compiled(f) -> bool:
    from triton.runtime.jit import JITFunction  # lazy: triton is slow to import

    return isinstance(f, JITFunction)


def interpreted(f):
    """`f` (a Python function or a @triton.jit function) decorated for Triton's interpreter.

    Triton decides between compiling and interpreting when a function is decorated: triton.jit reads
    triton.knobs.runtime.interpret (the TRITON_INTERPRET variable) and returns a JITFunction or an
    InterpretedFunction; nothing at launch looks at the variable again (triton 3.9's runtime/jit.py, `jit`). So
    setting TRITON_INTERPRET=1 once triton is imported changes nothing for functions already decorated, among them
    triton.language's own @jit functions (tl.max, tl.sum, decorated when triton.language is imported), which the
    interpreter cannot call ("Cannot call @triton.jit'd outside of the scope of a kernel").

    Hence: the interpreted version is made by decorating the same Python function again with TRITON_INTERPRET=1
    set only for that call (knobs.runtime.scope() restores the knob and the variable after it), and a launch
    swaps the kernel's callees for interpreted versions just as long as it runs (`launch_interpreted`). This works
    whether or not triton was imported before, in either mode, and leaves the process's mode as it was.
    """
    import triton  # lazy: triton is slow to import
    from triton.runtime.interpreter import InterpretedFunction  # lazy: as triton

    if isinstance(f, InterpretedFunction):  # TRITON_INTERPRET=1 was already set when f was decorated
        return f
    fn = getattr(f, "fn", f)  # a JITFunction keeps the Python function as .fn
    if fn not in _twins:
        with triton.knobs.runtime.scope():
            triton.knobs.runtime.interpret = True  # also sets os.environ["TRITON_INTERPRET"] = "1", until restored
            _twins[fn] = triton.jit(fn)
    return _twins[fn]


def launch_interpreted(kernel, grid, *args, **constexprs) -> None:
    """kernel[grid](*args, **constexprs) in the interpreter; `kernel` is a @jit function of a loaded module."""
    fn = getattr(kernel, "fn", kernel)
    with _interpreter_scope(sys.modules[fn.__module__], _callees(fn)):
        interpreted(kernel)[grid](*args, **constexprs)


def _callees(fn) -> list[tuple[object, str]]:
    """(module, name) of each @jit function fn calls, directly or through one another, named in the caller's own
    module (a helper imported from another kernel module is named in the importing module, and its own callees in
    the module that defines it)."""
    found, todo = [], [fn]
    while todo:
        f = todo.pop()
        module = sys.modules[f.__module__]
        for name in f.__code__.co_names:  # the global (and attribute) names the function's code uses
            callee = getattr(getattr(module, name, None), "fn", getattr(module, name, None))  # decorated or not
            if _owner_of(callee) is not None and (module, name) not in found:
                found.append((module, name))
                todo.append(callee)
    return found


@contextlib.contextmanager
def _interpreter_scope(module, callees):
    """For an interpreted launch: the kernel's callees (and tl's STD_NAMES) swapped for interpreted versions.

    The callees are the interpreter's own rewriting of each function (InterpretedFunction.rewrite()), called
    directly rather than as InterpretedFunctions: an InterpretedFunction called from a kernel re-patches
    triton.language on every call (twice per tile, for tl.max and tl.sum) and leaves triton.language.core patched
    afterwards, which would break a later compiled kernel in the same process. The launch itself has already
    patched everything these functions use (tl.*, tensor methods, tl.core.reduce). Restored on exit.
    """
    swaps = [(module.tl, n) for n in STD_NAMES] + callees
    saved = [(obj, name, getattr(obj, name)) for obj, name in swaps]
    try:
        for obj, name, f in saved:
            setattr(obj, name, interpreted(f).rewrite())
        with np.errstate(divide="ignore"), _one_blas_thread():  # log(0) = -inf for rows that see no key: intended
            yield
    finally:
        for obj, name, f in saved:
            setattr(obj, name, f)


@contextlib.contextmanager
def _one_blas_thread():
    """numpy's OpenBLAS on one thread while the interpreter runs (restored after; a no-op if it is not found).

    The interpreter computes each tile's tl.dot with np.matmul on BLOCK x d operands: thousands of tiny products,
    for which BLAS threads only add synchronisation, and on a machine busy with other processes every product waits
    for a thread to be scheduled. OPENBLAS_NUM_THREADS=1 only works if set before numpy is imported; this sets the
    thread count through OpenBLAS's own API instead.
    """
    fns = _openblas_threads()
    if fns is None:
        yield
        return
    get, set_ = fns
    before = get()
    set_(1)
    try:
        yield
    finally:
        set_(before)


@functools.cache
def _openblas_threads():
    """(get, set) of numpy's bundled OpenBLAS thread count, or None."""
    root = Path(np.__file__).parent
    for lib in [*root.parent.glob("numpy.libs/*openblas*"), *root.glob(".dylibs/*openblas*")]:
        try:
            so = ctypes.CDLL(str(lib))  # already loaded by numpy: the same library, not a second copy
        except OSError:
            continue
        for prefix, suffix in (("scipy_openblas_", "64_"), ("scipy_openblas_", ""), ("openblas_", "")):
            get, set_ = (getattr(so, f"{prefix}{op}_num_threads{suffix}", None) for op in ("get", "set"))
            if get is not None and set_ is not None:
                set_.argtypes = [ctypes.c_int]
                return get, set_
    return None
