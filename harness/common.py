"""What every pipeline shares: user errors (one line, exit 2), the argument parser, atomic writes, head sizes.

- `UserError`: bad input. Its message is one line naming the problem and the fix; `run_cli` prints it as
  `error: ...` on stderr and returns 2, never a traceback.
- `Parser`: argparse whose usage errors are one line and exit 2 too; `many(...)` declares an option that takes
  several values and accumulates them: `--impl a --impl b` == `--impl a b` (== `--impl a,b` where commas split);
  given at all, it replaces its default. `number(...)` declares a numeric option checked finite and in range.
- `write_atomic` / `write_json`: a temporary file renamed into place, so a reader never sees half a file; a write
  the file system refuses (full, read-only, no permission) is a UserError naming the path.
- `FIXTURES_DIR` and the folders beside it: where fixtures are (a checkout's fixtures/, or an installed copy's
  package data and user cache); harness/checkpoints/store.py resolves names over them.
- `heads(config)`: the head sizes every pipeline reads off a config; `compared_rows(x, mask)`: the rows a
  comparison looks at (real tokens, never padding).
"""

from __future__ import annotations

import argparse
import errno
import json
import math
import os
import re
import signal
import stat
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

# Where fixtures are: decided here, once (harness/checkpoints/store.py resolves names over these folders).
# - a checkout (fixtures/ beside harness/, as in the repository): fixtures/ holds everything: the committed fixtures,
#   the configs, and the synthetic fixtures `make synthetic` (or a first use) writes there;
# - an installed copy (pip): the committed fixtures and the configs are package data beside harness/
#   (attention_verify_fixtures, read-only); synthetic fixtures are made on first use into the user cache directory.
# $ATTN_FIXTURES names the folder fixtures are made in and looked up in first (in a checkout, the only one).
ROOT = Path(__file__).resolve().parent.parent
CHECKOUT = (ROOT / "fixtures").is_dir() and (ROOT / "pyproject.toml").is_file()
PACKAGED_FIXTURES = ROOT / "attention_verify_fixtures"


def user_fixtures_dir() -> Path:
    """The platform's user cache directory for this release's fixtures (~/.cache/attention-verify/0.1.0/fixtures on
    Linux): a release whose configs or extraction differ never reads another's synthetic fixtures."""
    import platformdirs  # lazy: only an installed copy without $ATTN_FIXTURES needs it

    try:
        release = version("attention-verify")
    except PackageNotFoundError:
        release = None
    return platformdirs.user_cache_path("attention-verify", appauthor=False, version=release) / "fixtures"


FIXTURES_DIR = Path(
    os.environ.get("ATTN_FIXTURES") or (ROOT / "fixtures" if CHECKOUT else user_fixtures_dir())
).absolute()
DOCS = ROOT / "docs"


class UserError(Exception):
    """Bad input (a missing file, a tampered fixture, an unknown name). Its message is one line: what and the fix."""


# ---------------------------------------------------------------------------------------------------------
# command line


class _Accumulate(argparse.Action):
    """nargs='+' that extends across repeats (argparse's own keeps only the last), optionally splitting commas. The
    first use replaces the default (`--dtype float16` runs float16 only); later repeats add to it."""

    def __init__(self, *args, split: bool = False, **kwargs):
        self.split = split
        super().__init__(*args, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        current = getattr(namespace, self.dest, None)
        # argparse puts the default object itself on the namespace: still that object means not given yet
        items = [] if current is None or current is self.default else list(current)
        for v in values:
            parts = [p.strip() for p in v.split(",")] if self.split and isinstance(v, str) else [v]
            items += [p for p in parts if p != ""]
        setattr(namespace, self.dest, items)


WEEK_S = 7 * 24 * 3600  # 604800: the longest time limit any option takes (past it, a typo, not a plan)


def span(lo: float, hi: float, above: bool = False) -> str:
    """A range in words, for the help and the error: 'between 1 and 1000', 'above 0 and at most 604800'."""
    lo_, hi_ = (str(v) if isinstance(v, int) else f"{v:g}" for v in (lo, hi))  # 2**63-1 in full, 0.5 as 0.5
    return f"above {lo_} and at most {hi_}" if above else f"between {lo_} and {hi_}"


def number(flag: str, lo: float, hi: float, *, kind: type = float, unit: str = "", above: bool = False):
    """An argparse type: the text as an int or a finite float in [lo, hi] ((lo, hi] with above=True); anything
    else is a UserError naming the option, the value and the range (one line, exit 2)."""
    what = ("a whole number" if kind is int else "a finite number") + (f" of {unit}" if unit else "")

    def parse(text: str):
        try:
            value = kind(text)
        except (TypeError, ValueError, OverflowError):
            value = None
        ok = value is not None and math.isfinite(value) and (lo < value if above else lo <= value) and value <= hi
        if not ok:
            raise UserError(f"{flag} {text}: give {what} {span(lo, hi, above)}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its own messages
    return parse


def whole_numbers(items: list[str], flag: str, lo: int, hi: int, e_g: str) -> tuple[int, ...]:
    """A repeatable option's values as whole numbers in [lo, hi], once each, in order; else one line naming them."""
    try:
        vals = tuple(int(t) for t in items)
    except ValueError:
        raise UserError(f"{flag} {' '.join(items)!r}: give whole numbers, e.g. {flag} {e_g}") from None
    if min(vals) < lo or max(vals) > hi:
        raise UserError(f"{flag} {' '.join(items)!r}: give numbers between {lo} and {hi}")
    return tuple(dict.fromkeys(vals))


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit code 2 like every other bad input."""

    def error(self, message: str):  # noqa: D401 - argparse API
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)

    def many(self, *flags: str, split: bool = False, **kwargs):
        """An option that takes several values and accumulates them over repeats; split=True also splits commas.
        Given at all, it replaces its default."""
        return self.add_argument(*flags, nargs="+", action=_Accumulate, split=split, **kwargs)

    def number(self, *flags: str, lo: float, hi: float, kind: type = float, unit: str = "", above: bool = False,
               help: str = "", **kwargs):  # fmt: skip
        """A numeric option, checked when parsed (finite, in range); the range is added to its help."""
        help = f"{help}; {span(lo, hi, above)}" if help else span(lo, hi, above)
        parse = number(flags[0], lo, hi, kind=kind, unit=unit, above=above)
        return self.add_argument(*flags, type=parse, help=help, **kwargs)


class Stopped(BaseException):
    """SIGTERM or SIGHUP (a CI cancel, a closed terminal): ends a run like Ctrl-C does (`stop_on_signals`)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _stopped(signum, frame):
    raise Stopped(signum)


def stop_on_signals() -> None:
    """SIGTERM and SIGHUP raise Stopped where the main thread is, so `finally` blocks end the workers and the
    command reports what it did; SIGUSR1 and SIGUSR2, which nothing here uses, are ignored."""
    for s in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, _stopped)
    for s in (signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(s, signal.SIG_IGN)


def hold_signals() -> None:
    """While what was done is being written: a second Ctrl-C, SIGTERM or SIGHUP waits until it is."""
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, signal.SIG_IGN)


def run_cli(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Run a CLI entry point: UserError -> one line on stderr and exit 2; Ctrl-C, SIGTERM, SIGHUP -> one line and
    the signal's exit code (128 + its number)."""
    held = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)}
    try:
        stop_on_signals()
        return main(argv)
    except UserError as e:
        print(f"error: {redact(one_line(str(e)))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written", file=sys.stderr)
        return 130
    except Stopped as e:
        print(f"error: stopped by {e}; nothing was written", file=sys.stderr)
        return 128 + e.signum
    finally:
        for s, handler in held.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)


# scheme://USERINFO@host: the user-info runs to the LAST '@' before a space or a quote, so a password holding '/',
# '@' or '?' (which no parser reads as the user-info) is removed whole; never past another scheme://.
_USERINFO = re.compile(r"""(?i)\b([a-z][a-z0-9+.-]*://)(?:(?!://)[^\s'"<>])*@""")
# name=VALUE after ?, &, ; or # where the name says what it is: token, access_token, hf_token, api_key, key, password,
# secret, sig, signature, credential, auth (any name containing one of them); the value runs past a '#' (a secret
# may hold one) to the next '&', ';', space or quote
_QUERY = re.compile(r"""(?i)([?&;#][^=&;#\s'"<>]*(?:token|key|passw|pwd|secret|sig|credential|auth)[^=&;#\s'"<>]*=)"""
                    r"""[^&;\s'"<>]*""")  # fmt: skip


def redact(text: str) -> str:
    """Credentials inside URLs removed: the user-info part (scheme://user:secret@host, a '/' in the secret too) and
    query-string credentials (?access_token=SECRET, &api_key=, &sig=, any *token*) -> ?access_token=REDACTED. Nothing
    printed or stored carries them."""
    return _QUERY.sub(r"\1REDACTED", _USERINFO.sub(r"\1", text))


def one_line(text: str, limit: int | None = None) -> str:
    s = " ".join(str(text).split())
    return s if limit is None or len(s) <= limit else s[: limit - 3] + "..."


# ---------------------------------------------------------------------------------------------------------
# writing results


def write_atomic(path: Path, data: bytes) -> None:
    """Write a result file: a temporary file renamed into place. Whatever is at path must be a regular file (a
    symlink, a FIFO or a device is refused, never replaced). A write the system refuses (a full disk, a read-only
    file system, no permission, a name too long) is a UserError naming the path; the temporary file is removed."""
    path = Path(path)
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        mode = None
    except OSError as e:
        raise _unwritable(path, e) from None
    if mode is not None and not stat.S_ISREG(mode):
        raise UserError(f"{path}: exists and is not a regular file; give the path of a regular file to write")
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise _unwritable(path, e) from None
        raise


def _unwritable(path: Path, e: OSError) -> UserError:
    why = e.strerror or errno.errorcode.get(e.errno or 0) or str(e)
    return UserError(f"{one_line(str(path), 200)}: cannot write it ({why}); free some space or give a path on a "
                     "writable file system")  # fmt: skip


def write_json(path: Path, doc) -> None:
    write_atomic(path, (json.dumps(doc, indent=1) + "\n").encode())


GENERATED_START, GENERATED_END = "<!-- generated by:", "<!-- end generated -->"


def generated_block(path: Path, option: str = "--doc") -> tuple[list[str], int, int]:
    """A docs page's lines and the indices of its `<!-- generated by: ... -->` and `<!-- end generated -->` lines;
    a UserError when the page cannot be read or has no such block. Called before a run, so a --doc page that cannot
    be filled is refused before the work, not after."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines(keepends=True)
        start = next(i for i, ln in enumerate(lines) if ln.startswith(GENERATED_START))
        end = next(i for i, ln in enumerate(lines) if i > start and ln.startswith(GENERATED_END))
    except (OSError, UnicodeDecodeError, StopIteration):
        raise UserError(f"{option} {path}: no '<!-- generated by: ... -->' ... '<!-- end generated -->' block to "
                        "fill; give the docs page that has one") from None  # fmt: skip
    return lines, start, end


def update_generated(path: Path, text: str) -> None:
    """Replace what lies between a docs page's `<!-- generated by: ... -->` and `<!-- end generated -->` lines:
    measured numbers are written by the command that measures them, never by hand."""
    lines, start, end = generated_block(path)
    write_atomic(path, "".join(lines[: start + 1] + [text.rstrip("\n") + "\n"] + lines[end:]).encode())


# ---------------------------------------------------------------------------------------------------------
# shapes


@dataclass(frozen=True)
class Heads:
    H: int  # query heads
    Hkv: int  # key/value heads
    d: int  # head_dim
    D: int  # hidden size

    @property
    def g(self) -> int:
        """Query heads per KV head."""
        return self.H // self.Hkv


def heads(config: dict) -> Heads:
    H = config["num_attention_heads"]
    return Heads(H, config["num_key_value_heads"], config.get("head_dim") or config["hidden_size"] // H,
                 config["hidden_size"])  # fmt: skip


def compared_rows(x: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """(B, S) bool: the rows a comparison looks at. Padding rows' outputs are never used by a model."""
    if attention_mask is None:
        return torch.ones(x.shape[:2], dtype=torch.bool)
    return attention_mask.bool()


# ---------------------------------------------------------------------------------------------------------
# devices


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_device(text: str | None) -> torch.device:
    """--device: cpu, cuda or cuda:N (default: cuda when available, else cpu); one line when it cannot be had."""
    text = text or default_device()
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise UserError(f"--device {text}: not a device; give cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise UserError(f"--device {text}: only cpu and cuda are supported")
    if dev.type == "cpu" and dev.index not in (None, 0):  # torch has one cpu device; cpu:1 would silently be it
        raise UserError(f"--device {text}: there is one cpu device (cpu or cpu:0); give --device cpu")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {text}: this machine has no CUDA device (or torch is a CPU build); use "
                            "--device cpu, or install a CUDA build of torch (make setup TORCH_INDEX=...)")  # fmt: skip
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"--device {text}: only {torch.cuda.device_count()} CUDA device(s) here")
    return dev
