"""Reference drift: transformers' output moved since a fixture's golden output was stored, and accepting it.

Every fixture records the versions it was made with (manifest "versions") and transformers' output on its prompt
(inputs.safetensors "golden"). `verify` compares the installed transformers' output with it (the `golden` row,
contracts/layer.py reference_rows). Under the transformers that wrote it, a disagreement is a fixture problem (exit
2, "changed after extraction"); under another, the reference moved: a drift, reported (one line above the table,
"reference_drift" in the JSON) and never a verdict: implementations are judged against the installed transformers.

`verify --accept-reference` (after a look at the drift) rewrites the goldens of the drifted fixtures with the installed
transformers' output: the golden tensor, its sha256 and the manifest's versions, through the fixture writer
(checkpoints/format.py write_fixture: atomic, so the fixture is the old one or the new one, whatever happens).
"""

from __future__ import annotations

import os
from datetime import datetime, timezone

from harness import versions
from harness.checkpoints.extract import hf_self_attn
from harness.checkpoints.format import Fixture, write_fixture
from harness.common import UserError
from harness.verify.report import is_drift

__all__ = ["accept", "check_writable", "found"]

WRITTEN = ("config.json", "inputs.safetensors")  # with attn_layer_<L>.safetensors: what write_fixture makes itself


def found(rows, fixtures: list[Fixture]) -> list[dict]:
    """One record per drifted golden row: fixture, scenario, made_with and installed ({transformers, torch}: the
    manifest's and this environment's), max_abs_err, tolerance."""
    by_name = {f.name: f for f in fixtures}
    have = versions.installed(versions.NOTED)
    out = []
    for r in rows:
        if not is_drift(r) or r.fixture not in by_name:
            continue
        made = by_name[r.fixture].manifest.get("versions") or {}
        out.append({"fixture": r.fixture, "scenario": r.scenario, "made_with": {p: made.get(p) for p in have},
                    "installed": dict(have), "max_abs_err": r.c.max_abs_err, "tolerance": r.c.tolerance})  # fmt: skip
    return out


def check_writable(fixtures: list[Fixture]) -> None:
    """--accept-reference may rewrite any of them: refused before the run if one cannot be rewritten (the writer
    makes its new copy and its lock beside the fixture's folder)."""
    for f in fixtures:
        if f.inputs is None:
            continue  # no golden: nothing to accept
        parent = f.path.parent
        if not os.access(parent, os.W_OK | os.X_OK) or not os.access(f.path, os.W_OK | os.X_OK):
            raise UserError(f"--accept-reference: cannot write in {parent} (fixture {f.name}); copy the fixture "
                            "somewhere writable and pass that folder to --fixture")  # fmt: skip


def accept(fixtures: list[Fixture], drift: list[dict], log=print) -> list:
    """Rewrite the golden of every drifted fixture with the installed transformers' output (computed as extraction
    does: HF eager in float32 on the stored hidden states); one line per fixture rewritten. Returns their paths."""
    by_name = {f.name: f for f in fixtures}
    done = []
    for name in dict.fromkeys(d["fixture"] for d in drift):
        f = by_name[name]
        golden = hf_self_attn(f.config, f.layer, f.weights, f.inputs["hidden_states"])
        old = dict(f.manifest.get("versions") or {})
        manifest = {k: v for k, v in f.manifest.items() if k not in ("files", "tensors")}
        manifest["versions"] = old | versions.installed(versions.NOTED)
        manifest["reference_accepted"] = {"replaced": {p: old.get(p) for p in versions.NOTED},
                                          "at": datetime.now(timezone.utc).isoformat(timespec="seconds")}  # fmt: skip
        try:
            extra = {fn: (f.path / fn).read_text() for fn in f.manifest["files"]
                     if fn not in WRITTEN and fn != f"attn_layer_{f.layer}.safetensors"}  # fmt: skip
            write_fixture(f.path, config=f.config, layer=f.layer, weights=f.weights, inv_freq=f.inv_freq,
                          inputs=dict(f.inputs, golden=golden), manifest=manifest, extra_files=extra)  # fmt: skip
        except (OSError, UnicodeDecodeError) as e:
            why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            raise UserError(f"--accept-reference: could not rewrite {f.path} ({why}); it is unchanged") from None
        moved = [d for d in drift if d["fixture"] == name]
        log(f"accepted the reference: rewrote {f.path}'s golden output with transformers "
            f"{moved[0]['installed'].get('transformers')}'s (it was made with "
            f"{moved[0]['made_with'].get('transformers') or 'an unrecorded version'}; max abs "
            f"{max(d['max_abs_err'] for d in moved):.2e})")  # fmt: skip
        done.append(f.path)
    return done
