"""The mutation suite: classic attention bugs, each a plug-in that is correct except for one realistic mistake.

`python -m harness mutants` runs the harness (the same pipeline as `verify`) on every mutant and scores it: a
mutant is caught when some check fails, and diagnosed when the verdict names the stage the bug is in.

Each mutant is the textbook pipeline below with one step swapped for the way people actually get it wrong:

    1. projection   q, k, v = x W^T, split into heads (view + transpose), RoPE tables at position_ids, rotate q, k
    2. scores       each query head against its KV head (repeat_interleave), q k^T / sqrt(head_dim), float32
    3. mask/softmax causal + padding (1 = token), softmax over the keys, fully masked rows -> 0
    4. aggregation  probabilities @ v, merge heads, o_proj
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from impl import masks, rope
from impl.decode import KVCache, step
from impl.gqa import repeat_kv
from impl.projection import heads, merge_heads, output, rope_tables, split_heads

# ---------------------------------------------------------------------------------------------------------
# the correct pipeline, one replaceable function per step


def rotate_qk(q, k, v, cos, sin):
    return rope.apply_half(q.float(), cos, sin).to(q.dtype), rope.apply_half(k.float(), cos, sin).to(k.dtype), v


def scores_scaled(q, k, d):
    return (q @ k.transpose(-2, -1)).float() * d**-0.5  # (B, H, Sq, Sk)


def allowed_keys(S, attention_mask):
    return masks.build(S, S, attention_mask)  # (B|1, 1, S, S)


def aggregate(probs, v):
    return probs.to(v.dtype) @ v  # (B, H, S, d)


@dataclass(frozen=True)
class Steps:
    split: Callable = split_heads  # (B, S, n*d) -> (B, n, S, d)
    tables: Callable = rope_tables  # (config, position_ids) -> cos, sin (B, S, d)
    rotate: Callable = rotate_qk  # (q, k, v, cos, sin) -> q, k, v
    expand: Callable = repeat_kv  # (k, g) -> (B, H, S, d)
    scores: Callable = scores_scaled  # (q, k, d) -> (B, H, S, S) float32
    allowed: Callable = allowed_keys  # (S, attention_mask) -> bool, True = may attend
    softmax: Callable = masks.masked_softmax  # (scores, allowed) -> probabilities
    aggregate: Callable = aggregate  # (probs, v) -> (B, H, S, d)
    core: Callable | None = None  # replaces 2-3-aggregate (tiled mutants): (q, k, v, attention_mask) -> ctx
    output: Callable = output  # (ctx, weights) -> (B, S, D)


def pipeline(steps: Steps, x, w, *, config, position_ids, attention_mask=None):
    H, Hkv, d = heads(config)
    S = x.shape[1]
    # 1. projection
    q = steps.split(x @ w["q_proj"].T, H, d)  # (B, H, S, d)
    k = steps.split(x @ w["k_proj"].T, Hkv, d)  # (B, Hkv, S, d)
    v = steps.split(x @ w["v_proj"].T, Hkv, d)  # (B, Hkv, S, d)
    cos, sin = steps.tables(config, position_ids)  # (B, S, d)
    q, k, v = steps.rotate(q, k, v, cos, sin)
    if steps.core is not None:
        return steps.output(steps.core(q, k, v, attention_mask), w)
    # 2. scores
    k, v = steps.expand(k, H // Hkv), steps.expand(v, H // Hkv)  # (B, H, S, d)
    s = steps.scores(q, k, d)  # (B, H, S, S)
    # 3. mask and softmax
    p = steps.softmax(s, steps.allowed(S, attention_mask))  # (B, H, S, S)
    # 4. aggregation
    return steps.output(steps.aggregate(p, v), w)  # (B, S, D)


# ---------------------------------------------------------------------------------------------------------
# the bugs, as written by someone in a hurry


def split_no_transpose(t, n, d):
    B, S, _ = t.shape
    return t.view(B, n, S, d)  # the transpose forgotten: each "head" is a slab of the flat buffer


def rotate_interleaved(q, k, v, cos, sin):  # GPT-J / Meta pairing on HF-ordered (half-split) weights
    return _rot(q, cos, sin, rope.apply_interleaved), _rot(k, cos, sin, rope.apply_interleaved), v


def _rot(x, cos, sin, apply=rope.apply_half):
    return apply(x.float(), cos, sin).to(x.dtype)


def rotate_wrong_sign(q, k, v, cos, sin):
    def backwards(x, c, s):
        x1, x2 = x.chunk(2, dim=-1)
        return x * c[:, None] + torch.cat((x2, -x1), dim=-1) * s[:, None]  # cat(x2, -x1) instead of cat(-x2, x1)

    return _rot(q, cos, sin, backwards), _rot(k, cos, sin, backwards), v


def rotate_q_only(q, k, v, cos, sin):
    return _rot(q, cos, sin), k, v


def rotate_v_too(q, k, v, cos, sin):
    return _rot(q, cos, sin), _rot(k, cos, sin), _rot(v, cos, sin)


def tables_arange(config, position_ids):
    B, S = position_ids.shape
    return rope_tables(config, torch.arange(S).expand(B, S))  # "positions are just 0..S-1"


def tables_no_llama3(config, position_ids):
    rp = config["rope_parameters"]
    plain = {**config, "rope_parameters": {"rope_type": "default", "rope_theta": rp["rope_theta"]}}
    return rope_tables(plain, position_ids)  # theta only: the llama3 rescaling of long wavelengths skipped


def tables_factor8(config, position_ids):
    rp = config["rope_parameters"]
    if rp.get("rope_type") == "llama3":
        config = {**config, "rope_parameters": {**rp, "factor": 8.0}}  # hard-coded 8, as in Meta's reference code
    return rope_tables(config, position_ids)


def tables_bf16_angles(config, position_ids):
    inv, scaling = rope.inv_freq(config)
    ang = position_ids.to(torch.bfloat16)[..., None] * inv.to(torch.bfloat16)  # (B, S, d/2) in bfloat16
    emb = torch.cat((ang, ang), dim=-1).float()  # (B, S, d)
    return emb.cos() * scaling, emb.sin() * scaling


def expand_tiled(k, g):
    return k.repeat(1, g, 1, 1)  # (B, g*Hkv, S, d): query head h gets KV head h % Hkv, not h // g


def scores_unscaled(q, k, d):
    return (q @ k.transpose(-2, -1)).float()


def scores_hidden_scale(q, k, d):
    D = q.shape[1] * d  # hidden_size = H * d
    return (q @ k.transpose(-2, -1)).float() / D**0.5


def aggregate_scaled(probs, v):
    return (probs * v.shape[-1] ** -0.5).to(v.dtype) @ v  # the 1/sqrt(d) landed on the probabilities


def softmax_over_queries(scores, allowed):
    s = scores.masked_fill(~allowed, float("-inf"))
    e = torch.exp(s - s.amax(dim=-2, keepdim=True).clamp(min=-1e30))
    return e / e.sum(dim=-2, keepdim=True).clamp(min=1e-30)  # dim=-2: normalised over the queries


def softmax_half(scores, allowed):
    p = masks.masked_softmax(scores.half(), allowed)  # "fp16 is enough for probabilities" (mixed-precision habit)
    return p.to(scores.dtype)


def softmax_nan_rows(scores, allowed):
    return torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)  # an all -inf row -> NaN


def allowed_no_causal(S, attention_mask):
    m = torch.ones(1, 1, S, S, dtype=torch.bool)
    return m & masks.padding(attention_mask) if attention_mask is not None else m


def allowed_strict(S, attention_mask):
    m = torch.ones(S, S, dtype=torch.bool).tril(-1)[None, None]  # tril(-1): each token hidden from itself
    return m & masks.padding(attention_mask) if attention_mask is not None else m


def allowed_sees_next(S, attention_mask):
    m = torch.ones(S, S, dtype=torch.bool).tril(1)[None, None]  # tril(1): one future token visible
    return m & masks.padding(attention_mask) if attention_mask is not None else m


def allowed_no_padding(S, attention_mask):
    return masks.causal(S, S)[None, None]  # attention_mask never used


def allowed_padding_inverted(S, attention_mask):
    m = masks.causal(S, S)[None, None]
    return m & (attention_mask == 0)[:, None, None, :] if attention_mask is not None else m  # 1 read as "masked"


def output_transposed(ctx, w):
    return merge_heads(ctx) @ w["o_proj"]  # nn.Linear stores [out, in]: this needs .T


def flash(q, k, v, attention_mask=None, *, bug: str, block: int = 128):
    """A FlashAttention-2 forward (square blocks, causal) with one of its classic bugs."""
    B, H, S, d = q.shape
    g = H // k.shape[1]
    k, v = repeat_kv(k, g), repeat_kv(v, g)  # (B, H, S, d)
    keep = attention_mask.bool()[:, None, None, :] if attention_mask is not None else None  # (B, 1, 1, S)
    out = torch.zeros_like(q, dtype=torch.float32)  # (B, H, S, d)
    n = S // block if bug == "drop_last_block" else -(-S // block)  # floor division loses the partial block
    for bi in range(n):
        i0, i1 = bi * block, min((bi + 1) * block, S)
        m = torch.full((B, H, i1 - i0, 1), float("-inf"))
        l = torch.zeros(B, H, i1 - i0, 1)
        acc = torch.zeros(B, H, i1 - i0, d)
        for bj in range(bi + 1):  # causal: key blocks up to the diagonal
            j0, j1 = bj * block, min((bj + 1) * block, S)
            s = (q[:, :, i0:i1] @ k[:, :, j0:j1].transpose(-2, -1)).float() * d**-0.5  # (B, H, bq, bk)
            if bj == bi:
                i = torch.arange(i0, i1)[:, None]
                j = torch.arange(j0, j1)[None, :]
                future = (j - j0 > i) if bug == "diag_mask" else (j > i)  # local key index vs global query index
                s = s.masked_fill(future, float("-inf"))
            if keep is not None:
                s = s.masked_fill(~keep[..., j0:j1], float("-inf"))
            m_new = torch.maximum(m, s.amax(-1, keepdim=True))
            safe = torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new))
            p = torch.exp(s - safe)
            alpha = torch.exp(m - safe)
            l = l * alpha + p.sum(-1, keepdim=True)
            acc = (acc if bug == "no_rescale" else acc * alpha) + p @ v[:, :, j0:j1].float()  # eq. 6 forgotten
            m = m_new
        out[:, :, i0:i1] = acc / torch.where(l > 0, l, torch.ones_like(l))
    return out.to(q.dtype)


def decode_wrong_position(x, w, *, config, position_ids, attention_mask=None):
    """Prefill all but the last token, then decode it with the KV cache, at position = tokens in the cache."""
    from impl.naive import core

    S = x.shape[1]
    cache = KVCache()
    first = []
    if S > 1:
        first = [step(core, x[:, :-1], w, config=config, position_ids=position_ids[:, :-1], cache=cache,
                      attention_mask=None if attention_mask is None else attention_mask[:, :-1])]  # fmt: skip
    pos = torch.full_like(position_ids[:, -1:], cache.length())  # should be position_ids[:, -1:]
    last = step(core, x[:, -1:], w, config=config, position_ids=pos, cache=cache, attention_mask=attention_mask)
    return torch.cat(first + [last], dim=1)


def _plugin(steps: Steps):
    def fn(x, weights, *, config, position_ids, attention_mask=None):
        return pipeline(steps, x, weights, config=config, position_ids=position_ids, attention_mask=attention_mask)

    return fn


# ---------------------------------------------------------------------------------------------------------
# the catalog


@dataclass(frozen=True)
class Mutant:
    name: str
    stage: str  # the stage the harness should name (harness.diagnose.STAGES)
    bug: str  # the mistake, in one line
    fn: Callable = field(repr=False)


def _m(name, stage, bug, **changes):
    return Mutant(name, stage, bug, _plugin(replace(Steps(), **changes)))


MUTANTS = [
    _m("scale_missing", "scale", "scores not divided by sqrt(head_dim)", scores=scores_unscaled),
    _m("scale_hidden_size", "scale", "scores divided by sqrt(hidden_size), not sqrt(head_dim)",
       scores=scores_hidden_scale),
    _m("scale_after_softmax", "scale", "the 1/sqrt(d) scale applied to the probabilities", scores=scores_unscaled,
       aggregate=aggregate_scaled),
    _m("softmax_wrong_dim", "softmax", "softmax over dim=-2 (the queries)", softmax=softmax_over_queries),
    _m("softmax_low_precision", "softmax", "scores cast to float16 for the softmax", softmax=softmax_half),
    _m("causal_missing", "causal_mask", "no causal mask", allowed=allowed_no_causal),
    _m("causal_excludes_self", "causal_mask", "tril(-1): a token cannot see itself", allowed=allowed_strict),
    _m("causal_sees_next", "causal_mask", "tril(1): each token sees the next one", allowed=allowed_sees_next),
    _m("padding_ignored", "padding_mask", "attention_mask never applied", allowed=allowed_no_padding),
    _m("padding_inverted", "padding_mask", "attention_mask read as 1 = masked", allowed=allowed_padding_inverted),
    _m("masked_rows_nan", "nonfinite", "torch.softmax over an all -inf row gives NaN", softmax=softmax_nan_rows),
    _m("gqa_repeat", "gqa", "K/V heads expanded with repeat (tiling), not repeat_interleave", expand=expand_tiled),
    _m("head_split_no_transpose", "head_layout", "view(B, H, S, d) without the transpose", split=split_no_transpose),
    _m("rope_interleaved", "rope", "interleaved RoPE pairs on HF-ordered weights", rotate=rotate_interleaved),
    _m("rope_wrong_sign", "rope", "rotate_half as cat(x2, -x1)", rotate=rotate_wrong_sign),
    _m("rope_q_only", "rope", "RoPE applied to q only", rotate=rotate_q_only),
    _m("rope_on_v", "rope", "RoPE applied to v as well", rotate=rotate_v_too),
    _m("positions_ignored", "rope", "arange(S) instead of position_ids", tables=tables_arange),
    _m("llama3_missing", "rope_frequencies", "llama3 frequency scaling skipped", tables=tables_no_llama3),
    _m("llama3_factor_8", "rope_frequencies", "llama3 scaling with factor 8 (Meta's hard-coded value), not 32",
       tables=tables_factor8),
    _m("angles_bf16", "rope_frequencies", "position * inv_freq computed in bfloat16", tables=tables_bf16_angles),
    _m("o_proj_transposed", "output_projection", "ctx @ o_proj instead of ctx @ o_proj.T", output=output_transposed),
    _m("tiled_no_rescale", "tiling", "accumulator not rescaled when the running max grows",
       core=lambda q, k, v, m: flash(q, k, v, m, bug="no_rescale")),
    _m("tiled_drops_last_block", "tiling", "S // block blocks: the last partial block dropped",
       core=lambda q, k, v, m: flash(q, k, v, m, bug="drop_last_block")),
    _m("tiled_diagonal_mask", "tiling", "diagonal tile masked with the tile-local key index",
       core=lambda q, k, v, m: flash(q, k, v, m, bug="diag_mask")),
    Mutant("decode_wrong_position", "rope", "the decoded token placed at position len(cache), not position_ids",
           decode_wrong_position),
]  # fmt: skip
MUTANTS_BY_NAME = {m.name: m for m in MUTANTS}
# Real weights first (fast, GQA 9/3), then Llama-3.2-1B's exact config (llama3 RoPE scaling, 32/8 heads).
DEFAULT_FIXTURES = ["smollm2-135m", "llama-3.2-1b-synthetic"]


# ---------------------------------------------------------------------------------------------------------
# the suite: the harness on every mutant


@dataclass
class Result:
    mutant: str
    caught: bool
    stage: str | None  # the stage the harness named (None when not caught)
    expected: str
    caught_by: list[str]  # fixture/scenario checks that failed
    hint: str | None = None

    @property
    def diagnosed(self) -> bool:
        return self.caught and self.stage == self.expected


def run_mutants(fixtures, mutants=MUTANTS, log=print, cache=None) -> list[Result]:
    """Verify every mutant (all scenarios, all dtypes) on the first fixture, then the ones not yet caught on the
    next (escalation: the big Llama-shaped fixture is only needed for what the small real one cannot show). A
    mutant is caught when any check fails; its stage is the verdict of the fixture that caught it."""
    from harness.verify import DTYPES, verify

    found: dict[str, Result] = {}
    cache = {} if cache is None else cache
    for f in fixtures:
        todo = [m for m in mutants if m.name not in found]
        if not todo:
            break
        t0 = time.perf_counter()
        rows, verdicts = verify([f], [(m.name, m.fn) for m in todo], set(DTYPES.values()), quick=False,
                                log=lambda *_: None, cache=cache)  # fmt: skip
        for v in verdicts:
            if not v["passed"]:
                m = MUTANTS_BY_NAME.get(v["impl"]) or next(x for x in mutants if x.name == v["impl"])
                by = [f"{r.fixture}/{r.scenario}" for r in rows if r.impl == m.name and not r.passed]
                found[m.name] = Result(m.name, True, v["stage"], m.stage, by, v["hint"])
        log(f"  {f.name}: {len(todo)} mutants verified, {sum(m.name in found for m in todo)} caught, "
            f"{time.perf_counter() - t0:.0f} s")  # fmt: skip
    return [found.get(m.name) or Result(m.name, False, None, m.stage, []) for m in mutants]


def report(results: list[Result], log=print) -> None:
    """The table and the score."""
    w = max(len(r.mutant) for r in results)
    log(f"{'mutant':{w}s}  caught  {'stage named':17s} {'expected':17s}  caught by (failing checks)")
    for r in results:
        named = r.stage or "-"
        mark = "ok" if r.diagnosed else ("WRONG" if r.caught else "")
        by = ", ".join(sorted({b.split("/", 1)[1] for b in r.caught_by}))
        log(f"{r.mutant:{w}s}  {'yes' if r.caught else 'NO':6s}  {named:17s} {r.expected:17s}  {mark:5s} {by}")
    n, c, d = len(results), sum(r.caught for r in results), sum(r.diagnosed for r in results)
    log(f"\ncaught {c}/{n} ({100 * c / n:.0f}%), stage right {d}/{n} ({100 * d / n:.0f}%)")


def main(argv=None) -> int:
    from harness.errors import Parser, UserError
    from harness.output import write_json
    from harness.verify import resolve_fixtures

    p = Parser(prog="python -m harness mutants", description="Score the harness on the catalog of classic bugs.")
    p.add_argument("--fixture", action="append", help="fixture name or path (repeatable; default: all)")
    p.add_argument("--mutant", action="append", help="run only this mutant (repeatable; default: all)")
    p.add_argument("--json", help="write the results as JSON to this path")
    a = p.parse_args(argv)
    unknown = [n for n in a.mutant or [] if n not in MUTANTS_BY_NAME]
    if unknown:
        raise UserError(f"unknown mutant '{unknown[0]}'; see the catalog in harness/mutants.py (MUTANTS)")
    mutants = [MUTANTS_BY_NAME[n] for n in a.mutant] if a.mutant else MUTANTS
    fixtures = resolve_fixtures(a.fixture or DEFAULT_FIXTURES)
    t0 = time.perf_counter()
    results = run_mutants(fixtures, mutants)
    report(results)
    seconds = time.perf_counter() - t0
    print(f"{len(mutants)} mutants, fixtures {', '.join(f.name for f in fixtures)}: {seconds:.0f} s")
    if a.json:
        write_json(
            a.json,
            {
                "total": len(results),
                "caught": sum(r.caught for r in results),
                "diagnosed": sum(r.diagnosed for r in results),
                "rows": [{"mutant": r.mutant, "caught": r.caught, "stage": r.stage, "expected": r.expected,
                          "bug": MUTANTS_BY_NAME[r.mutant].bug, "caught_by": r.caught_by} for r in results],
                "seconds": round(seconds, 1),
            },
        )  # fmt: skip
    return 0 if all(r.caught for r in results) else 1
