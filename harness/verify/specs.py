"""SPEC, as the command line takes it: a built-in name, `package.module:name` or `path/to/file.py:name`, and the
import of what it names. A file is imported under a private module name registered in sys.modules (code that looks
its own module up, such as torch.compile's tracing, finds it), never shadowing an installed package."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path

from harness.common import UserError, one_line


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
