"""What every pipeline shares: user errors (one line, exit 2), the argument parser, atomic writes, head sizes.

- `UserError`: bad input. Its message is one line naming the problem and the fix; `run_cli` prints it as
  `error: ...` on stderr and returns 2, never a traceback.
- `Parser`: argparse whose usage errors are one line and exit 2 too; `many(...)` declares an option that takes
  several values and accumulates them: `--impl a --impl b` == `--impl a b` (== `--impl a,b` where commas split).
- `write_atomic` / `write_json`: a temporary file renamed into place, so a reader never sees half a file.
- `FIXTURES_DIR` and the folders beside it: where fixtures are (a checkout's fixtures/, or an installed copy's
  package data and user cache); harness/checkpoints/store.py resolves names over them.
- `heads(config)`: the head sizes every pipeline reads off a config; `compared_rows(x, mask)`: the rows a
  comparison looks at (real tokens, never padding).
"""

from __future__ import annotations

import argparse
import json
import os
import re
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
    """nargs='+' that extends across repeats (argparse's own keeps only the last), optionally splitting commas."""

    def __init__(self, *args, split: bool = False, **kwargs):
        self.split = split
        super().__init__(*args, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        items = list(getattr(namespace, self.dest, None) or [])
        for v in values:
            parts = [p.strip() for p in v.split(",")] if self.split and isinstance(v, str) else [v]
            items += [p for p in parts if p != ""]
        setattr(namespace, self.dest, items)


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit code 2 like every other bad input."""

    def error(self, message: str):  # noqa: D401 - argparse API
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)

    def many(self, *flags: str, split: bool = False, **kwargs):
        """An option that takes several values and accumulates them over repeats; split=True also splits commas."""
        return self.add_argument(*flags, nargs="+", action=_Accumulate, split=split, **kwargs)


def run_cli(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Run a CLI entry point: UserError -> one line on stderr and exit 2."""
    try:
        return main(argv)
    except UserError as e:
        print(f"error: {redact(one_line(str(e)))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written", file=sys.stderr)
        return 130


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
    symlink, a FIFO or a device is refused, never replaced)."""
    path = Path(path)
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        mode = None
    if mode is not None and not stat.S_ISREG(mode):
        raise UserError(f"{path}: exists and is not a regular file; give the path of a regular file to write")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, doc) -> None:
    write_atomic(path, (json.dumps(doc, indent=1) + "\n").encode())


def update_generated(path: Path, text: str) -> None:
    """Replace what lies between a docs page's `<!-- generated by: ... -->` and `<!-- end generated -->` lines:
    measured numbers are written by the command that measures them, never by hand."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines(keepends=True)
        start = next(i for i, ln in enumerate(lines) if ln.startswith("<!-- generated by:"))
        end = next(i for i, ln in enumerate(lines) if i > start and ln.startswith("<!-- end generated -->"))
    except (OSError, StopIteration):
        raise UserError(f"{path}: no '<!-- generated by: ... -->' ... '<!-- end generated -->' block to fill; "
                        "give the docs page that has one") from None  # fmt: skip
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
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {text}: this machine has no CUDA device (or torch is a CPU build); use "
                            "--device cpu, or install a CUDA build of torch (make setup TORCH_INDEX=...)")  # fmt: skip
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"--device {text}: only {torch.cuda.device_count()} CUDA device(s) here")
    return dev
