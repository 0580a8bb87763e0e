"""`python -m harness plot-attention`: one layer's attention probabilities for a real prompt, ours beside HF's.

model in -> prompt -> the hidden states entering layer L's self_attn (captured from the unmodified model)
-> HF: LlamaAttention (eager) returns its probabilities
-> ours: naive's stage-3 probabilities, or tiled's rebuilt from its log-sum-exp, exp(scale q k^T - lse) (the
   layer's scale and window: Gemma 3's query_pre_attn_scalar and sliding layers): tiled never stores them, so this
   also shows that its softmax normaliser is right
-> a grid: one column per head; rows ours, HF, |ours - HF|; tokens on both axes -> PNG (docs/attention.png)
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import torch

from harness.checkpoints.validate import MAX_HEADS, output_path
from harness.common import DOCS, ROOT, Parser, UserError, write_atomic
from harness.e2e.model import DEFAULT_MODEL, load_model
from harness.e2e.swap import attn_params
from harness.reference.family import layer_config
from impl import naive, tiled
from impl.gqa import groups, repeat_kv
from impl.layer import keywords
from impl.masks import build
from impl.projection import project_qkv

DEFAULT_OUT = DOCS / "attention.png"
DEFAULT_PROMPT = "The Eiffel Tower is in Paris, and the Colosseum is in Rome."
IMPLS = ("naive", "tiled")
MAX_LAYER = (1 << 16) - 1  # as extract --layer; the model's own count is checked once it is loaded


@torch.inference_mode()
def layer_input(model, ids: torch.Tensor, layer: int):
    """Run the unmodified model; capture what layer `layer`'s self_attn receives and HF's probabilities."""
    seen = {}

    def hook(module, args, kwargs, out):
        seen["x"], seen["pos"], seen["probs"] = kwargs["hidden_states"], kwargs["position_ids"], out[1]

    attn = model.layers[layer].self_attn
    handle = attn.register_forward_hook(hook, with_kwargs=True)
    try:
        pos = torch.arange(ids.shape[1])[None]  # (1, S)
        model.lm(input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=pos, use_cache=False)
    finally:
        handle.remove()
    weights = {n: w.detach() for n, w in attn_params(attn, layer_config(model.config, layer)).items()}
    return seen["x"], seen["pos"], weights, seen["probs"]  # (1, S, D), (1, S), dict, (1, H, S, S)


@torch.inference_mode()
def our_probs(impl: str, x, pos, weights, config) -> torch.Tensor:
    """(1, H, S, S) attention probabilities from our implementation; config: the layer's (layer_config)."""
    if impl == "naive":
        _, stages = naive.attention(x, weights, config=config, position_ids=pos, return_intermediates=True)
        return stages["probs"]
    q, k, v = project_qkv(x, weights, config, pos)  # (1, H, S, d), (1, Hkv, S, d) x2
    kw = keywords(config, weights)  # scale, window where the layer has them (no family here has softcap, sinks)
    _, lse = tiled.flash_forward(q, k, v, **kw)  # lse (1, H, S)
    k = repeat_kv(k, groups(q.shape[1], k.shape[1]))  # (1, H, S, d)
    scores = (q @ k.transpose(-2, -1)).float() * kw.get("scale", q.shape[-1] ** -0.5)  # (1, H, S, S)
    allowed = build(q.shape[2], k.shape[2], window=kw.get("window"))  # (1, 1, S, S)
    return torch.where(allowed, torch.exp(scores - lse[..., None]), 0.0)  # softmax = exp(s - logsumexp(s))


def token_labels(tokenizer, ids: torch.Tensor) -> list[str]:
    return [repr(tokenizer.decode([int(i)]))[1:-1] or "·" for i in ids[0]]


def draw(ours, ref, labels: list[str], heads: list[int], title: str):
    import matplotlib  # lazy: slow to import, only the picture needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: after the backend is chosen
    from matplotlib.colors import PowerNorm  # lazy: slow to import

    diff = (ours - ref).abs()
    S, n = len(labels), len(heads)
    cell = max(2.2, 0.16 * S)
    fig, axes = plt.subplots(3, n, figsize=(cell * n + 1.5, cell * 3 + 1.2), squeeze=False)
    dmax = float(diff[0, heads].max()) or 1e-12
    rows = (("ours", ours, "viridis", PowerNorm(0.5, 0, 1)), ("HF", ref, "viridis", PowerNorm(0.5, 0, 1)),
            ("|ours - HF|", diff, "magma", PowerNorm(1.0, 0, dmax)))  # fmt: skip
    for r, (name, t, cmap, norm) in enumerate(rows):
        for c, h in enumerate(heads):
            ax = axes[r][c]
            im = ax.imshow(t[0, h].float().numpy(), cmap=cmap, norm=norm, interpolation="nearest")
            ax.set_xticks(range(S), labels if r == 2 else [], rotation=90, fontsize=6)
            ax.set_yticks(range(S), labels if c == 0 else [], fontsize=6)
            if r == 0:
                ax.set_title(f"head {h}", fontsize=9)
            if c == 0:
                ax.set_ylabel(f"{name}\nquery", fontsize=9)
            if r == 2:
                ax.set_xlabel("key", fontsize=8)
        fig.colorbar(im, ax=list(axes[r]), fraction=0.01, pad=0.01)
    fig.suptitle(f"{title}\nmax |ours - HF| = {dmax:.1e}; colour: sqrt(p) for probabilities, linear for the difference")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue(), dmax


def _heads(text: str) -> list[int]:
    """--heads: comma-separated head indices, checked as the option is read (the model's count, once loaded)."""
    try:
        heads = [int(h) for h in text.split(",")]
    except ValueError:
        heads = []
    if not heads or not all(0 <= h < MAX_HEADS for h in heads):
        raise UserError(f"--heads {text}: give comma-separated head indices, e.g. 0,1,2")
    return heads


def main(argv=None) -> int:
    p = Parser(
        prog="attention-verify plot",
        description="Draw one layer's attention probabilities for a real prompt: ours, HF's, and their difference.",
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help="smollm2-135m (default), gemma3-270m, "
                   "hf:OWNER/NAME[@REV], or a directory")
    p.add_argument("--impl", default="tiled", choices=IMPLS, help="whose probabilities (default tiled, via its lse)")
    p.number("--layer", lo=0, hi=MAX_LAYER, kind=int, default=0, help="the layer (default 0)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--heads", type=_heads, help="comma-separated head indices (default: all, at most 12)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"PNG path (default {DEFAULT_OUT.relative_to(ROOT)})")
    a = p.parse_args(argv)
    if not a.prompt.strip():
        raise UserError("--prompt is empty; give a sentence")
    if a.out.suffix.lower() != ".png":
        raise UserError(f"--out {a.out}: expected a .png path")
    output_path(a.out, "--out")

    model = load_model(a.model)
    L, H = model.config["num_hidden_layers"], model.config["num_attention_heads"]
    if not 0 <= a.layer < L:
        raise UserError(f"--layer {a.layer}: {model.name} has layers 0..{L - 1}")
    heads = list(range(min(H, 12)))
    if a.heads:
        heads = a.heads
        if not all(0 <= h < H for h in heads):
            raise UserError(f"--heads {','.join(map(str, heads))}: {model.name} has heads 0..{H - 1}")
    ids = model.tokenizer(a.prompt, return_tensors="pt")["input_ids"]  # (1, S)
    if ids.shape[1] > 64:
        raise UserError(f"--prompt has {ids.shape[1]} tokens; at most 64 keep the token labels readable")

    x, pos, weights, ref = layer_input(model, ids, a.layer)
    ours = our_probs(a.impl, x, pos, weights, layer_config(model.config, a.layer))
    title = f"{model.name}, layer {a.layer}: attention probabilities, {a.impl} vs transformers (eager), float32"
    png, dmax = draw(ours, ref, token_labels(model.tokenizer, ids), heads, title)
    write_atomic(a.out, png)
    worst = float((ours - ref).abs().max())
    ok = math.isfinite(worst) and worst <= 1e-4
    print(f"wrote {a.out} ({ids.shape[1]} tokens, heads {heads[0]}..{heads[-1]} of {H}); "
          f"max |ours - HF| over all heads {worst:.1e} {'OK' if ok else 'NOT OK'}")  # fmt: skip
    return 0 if ok else 1
