"""`verify --plot DIR`: where the error sits, for every failing or imprecise (fixture, implementation).

For the scenario where the implementation is furthest from float64 (relative to transformers' own distance):
    left   |impl - ref64| by query position and head, log colour scale. A layer's output mixes the heads through
           o_proj, so its error is carried back to the heads' context by o_proj's least-squares inverse
    right  the largest error at each query position, the implementation's beside transformers' own (its float32
           rounding), log scale: a flat line at transformers' level is rounding, a line that climbs is a bug
titled with the diagnosis. One PNG per pair: DIR/<fixture>__<impl>.png.
"""

from __future__ import annotations

import io
import re
import textwrap
from pathlib import Path

import torch

from harness.common import heads, write_atomic


def draw_all(folder: Path, verdicts, runs: dict, fixtures: dict) -> list[Path]:
    out = []
    for v in verdicts:
        if (v.passed and not v.imprecise) or v.stage in ("crash", "timeout", "contract"):
            continue
        evidence = runs.get((v.fixture, v.impl)) or {}
        if not evidence:
            continue
        path = Path(folder) / (re.sub(r"[^A-Za-z0-9._-]+", "_", f"{v.fixture}__{v.impl}").strip("_") + ".png")
        write_atomic(path, draw(v, evidence, fixtures.get(v.fixture)))
        out.append(path)
    return out


def per_head(err: torch.Tensor, fixture) -> torch.Tensor:
    """A layer's output error (B, S, D) -> (S, H): each head's share, through o_proj's least-squares inverse."""
    h = heads(fixture.config)
    wo = fixture.weights["o_proj"].double()  # (D, H*d): out = ctx @ wo.T
    ctx = torch.linalg.lstsq(wo, err[0].double().T).solution.T  # (S, H*d)
    return ctx.view(ctx.shape[0], h.H, h.d).abs().amax(-1)  # (S, H)


def _worst(evidence: dict, v):
    """The scenario to draw: a failing or imprecise one where the implementation is furthest from float64."""
    names = [n for n in v.failing if n in evidence] or list(evidence)
    return max(names, key=lambda n: _ratio(evidence[n]))


def _ratio(r) -> float:
    ref64 = r.ref64 if hasattr(r, "ref64") else r.c.ref64
    ref = r.ref if hasattr(r, "ref") else r.c.ref
    e = (r.out.double() - ref64).abs().nan_to_num(float("inf")).max()
    h = (ref.double() - ref64).abs().max()
    return float(e / (h + 1e-30))


def draw(v, evidence: dict, fixture) -> bytes:
    import matplotlib  # lazy: matplotlib is slow to import, and only --plot draws

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: after the backend is chosen
    from matplotlib.colors import LogNorm  # lazy: as above

    name = _worst(evidence, v)
    r = evidence[name]
    if hasattr(r, "c") and r.out.dim() == 3:  # a varlen kernel: (total_q, H, d), the packed rows as positions
        err = (r.out.double() - r.c.ref64).abs().amax(-1)  # (total_q, H)
        own = (r.c.ref.double() - r.c.ref64).abs().amax(-1).amax(-1)  # (total_q,)
    elif hasattr(r, "c"):  # a kernel (core, paged): (B, H, Sq, d) outputs, the heads are there already
        err = (r.out.double() - r.c.ref64).abs()[0].amax(-1).T  # (Sq, H)
        own = (r.c.ref.double() - r.c.ref64).abs()[0].amax(-1).amax(0)  # (Sq,)
    else:
        e = torch.nan_to_num(r.out.double() - r.ref64, nan=float("inf"))[:1]  # (1, S, D), the first sequence
        err = per_head(e, fixture) if fixture is not None else e[0].abs()  # (S, H)
        own = (r.ref.double() - r.ref64).abs()[0].amax(-1)  # (S,)
    err = err.clamp(min=1e-12).nan_to_num(1e30)
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [1.3, 1]})
    im = a.imshow(err.T.numpy(), aspect="auto", cmap="magma", norm=LogNorm(vmin=max(float(err.min()), 1e-10),
                  vmax=max(float(err.max()), 1e-9)), interpolation="nearest")  # fmt: skip
    a.set_xlabel("query position")
    a.set_ylabel("head")
    a.set_title(f"|impl - float64| by position and head ({name})", fontsize=9)
    fig.colorbar(im, ax=a, fraction=0.04)
    b.semilogy(err.amax(-1).numpy(), label="this implementation", lw=1.2)
    b.semilogy(own.clamp(min=1e-12).numpy(), label="transformers, same dtype", lw=1.0, alpha=0.8)
    b.set_xlabel("query position")
    b.set_ylabel("max |error| vs float64")
    b.legend(fontsize=8)
    b.grid(True, alpha=0.3)
    verdict = "PASS* (imprecise)" if v.passed else "FAIL"
    title = f"{v.fixture} / {v.impl}: {verdict}, stage {v.stage}: {v.hint}"
    fig.suptitle("\n".join(textwrap.wrap(title, 150)), fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()
