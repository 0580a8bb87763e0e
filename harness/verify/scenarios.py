"""The scenario matrix: identical inputs for the implementation and the reference, each isolating something.

Every scenario is deterministic (seeded) and builds (x, position_ids, attention_mask) for a fixture. Masks are
always explicit (the reference is run with an explicit causal + padding mask).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from harness.checkpoints.format import Fixture


@dataclass(frozen=True)
class Scenario:
    name: str
    isolates: str  # what a failure here (and a pass elsewhere) points at
    build: Callable[[Fixture, torch.dtype], tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]
    dtype: torch.dtype = torch.float32
    quick: bool = True  # part of --quick
    probe: bool = False  # used by the diagnosis (reported, but named as a probe)
    tags: frozenset = frozenset()  # what the diagnosis reads off it: "positions" (not 0..S-1), "large_scores"
    sizes: tuple = ()  # ((key, value), ...) of SIZE_KEYS over every scenario run with this one (with_sizes)
    applies: Callable[[dict], bool] | None = None  # run only on layers whose config this accepts (None: every one)


def hidden(f: Fixture, B: int, S: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    """Inputs with the statistics of a layer's input: RMS-normalised Gaussian rows, a few outlier channels
    (taken from the fixture's real prompt input when it has one)."""
    D = f.config["hidden_size"]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, S, D, generator=g)
    if f.inputs is not None:  # borrow the real per-channel scale (outlier channels included)
        x = x * f.inputs["hidden_states"][0].std(dim=0).clamp(min=1e-3)
    return x * scale


def contiguous(B: int, S: int) -> torch.Tensor:
    return torch.arange(S).expand(B, S)  # (B, S)


def _simple(S: int, seed: int, scale: float = 1.0):
    return lambda f, dt: (hidden(f, 1, S, seed, scale).to(dt), contiguous(1, S), None)


def _left_padding(f, dt):
    """Batch 3: no padding, 12 padding tokens, and a row that is all padding but its last token."""
    B, S = 3, 48
    mask = torch.ones(B, S, dtype=torch.long)
    mask[1, :12] = 0
    mask[2, :-1] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # positions count real tokens, as generate() does
    return hidden(f, B, S, 11).to(dt), pos, mask


def _packed(f, dt):
    """Packed documents: positions restart at 0 (the mask stays causal over the whole row)."""
    pos = torch.cat([torch.arange(40), torch.arange(24), torch.arange(32)])[None]
    return hidden(f, 1, pos.shape[1], 12).to(dt), pos, None


def _sparse(f, dt):
    """Sorted random positions over the whole context: unequal, long distances (a constant offset would
    change nothing, RoPE being relative); this is where frequency bugs show."""
    S = 96
    top = max(int(f.config.get("max_position_embeddings") or 131072), 4 * S)  # a tiny context still gets 96 positions
    g = torch.Generator().manual_seed(13)
    pos = torch.sort(torch.randperm(top, generator=g)[:S]).values[None]
    pos[0, 0] = 0
    return hidden(f, 1, S, 13).to(dt), pos, None


def _rope_stress(f, dt):
    """Long, unequal distances with large scores (inputs x4): where rotary tables kept in half precision show (a
    bfloat16 cos/sin table errs in proportion to the score it rotates), beyond what float32 rounding does."""
    S = 64
    top = max(int(f.config.get("max_position_embeddings") or 131072), 4 * S)
    g = torch.Generator().manual_seed(15)
    pos = torch.sort(torch.randperm(top, generator=g)[:S]).values[None]
    return hidden(f, 1, S, 15, 4.0).to(dt), pos, None


def _beyond_context(f, dt):
    """Positions past the context the model was trained on (max_position_embeddings, and a rope type's
    original_max_position_embeddings below it): where dynamic scaling recomputes its frequencies (transformers
    does it from the longest position it sees) and where scaled frequencies matter most."""
    S = 64
    top = int(f.config.get("max_position_embeddings") or 131072)
    g = torch.Generator().manual_seed(16)
    pos = torch.sort(top + torch.randperm(max(top, 4 * S), generator=g)[:S]).values[None]  # (1, S), all >= top
    return hidden(f, 1, S, 16).to(dt), pos, None


def _prompt(f, dt):
    x = f.inputs["hidden_states"]
    return x.to(dt), contiguous(1, x.shape[1]), None


def _window_edge(f, dt):
    """Across the window: W + 17 tokens, so the first W queries see every earlier key and the last 17 see only
    their W (a sliding layer), or every key all the same (a full layer of a model with sliding ones)."""
    S = int(f.config["sliding_window"]) + 17
    return hidden(f, 1, S, 17).to(dt), contiguous(1, S), None


def _softcap_bend(f, dt):
    """Scores where the cap bends them (inputs x4: scores of the order of attn_logit_softcapping, where
    cap tanh(s / cap) is neither linear nor flat)."""
    return hidden(f, 1, 48, 18, 4.0).to(dt), contiguous(1, 48), None


def windowed(config: dict) -> bool:
    return bool(config.get("sliding_window"))


def capped(config: dict) -> bool:
    return bool(config.get("attn_logit_softcapping"))


def _zero_positions(f, dt):
    """Every position 0: RoPE becomes the identity, so only non-RoPE stages can differ."""
    S = 24
    return hidden(f, 1, S, 14).to(dt), torch.zeros(1, S, dtype=torch.long), None


SCENARIOS: list[Scenario] = [
    Scenario(
        "one_token",
        "projections, head layout, GQA mapping, o_proj (a single token attends only to itself)",
        _simple(1, 1),
    ),
    Scenario("short", "the whole layer on 16 tokens", _simple(16, 2)),
    Scenario(
        "len_257", "a length that is not a multiple of any block (tiling remainder)", _simple(257, 3), quick=False
    ),
    Scenario("len_1000", "a longer non-multiple length", _simple(1000, 4), quick=False),
    Scenario("long_2048", "a long sequence (float32 accumulation over 2048 keys)", _simple(2048, 5), quick=False),
    Scenario("left_padding", "padding mask: batch 3, left padding, a row almost all padding", _left_padding,
             tags=frozenset({"positions"})),
    Scenario("packed", "restarting positions (packed documents)", _packed, quick=False, tags=frozenset({"positions"})),
    Scenario("sparse_positions", "RoPE frequencies: unequal long distances over the whole context", _sparse,
             tags=frozenset({"positions"})),
    Scenario("rope_stress", "RoPE precision: long unequal distances and scores x16 (inputs x4)", _rope_stress,
             tags=frozenset({"positions", "large_scores"})),
    Scenario("beyond_context", "positions past max_position_embeddings: dynamic scaling, scaled frequencies",
             _beyond_context, tags=frozenset({"positions"})),
    Scenario("prompt", "the fixture's real prompt input", _prompt),
    Scenario("scaled_x50", "softmax stability: inputs x50, scores in the thousands", _simple(64, 6, 50.0), quick=False,
             tags=frozenset({"large_scores"})),
    Scenario("window_edge", "the sliding window: W + 17 tokens, the last queries' earliest keys outside it (models "
             "with sliding_window: sliding layers windowed, full ones not)", _window_edge, applies=windowed),
    Scenario("softcap_bend", "the logit softcap: scores where cap tanh(s / cap) bends (inputs x4)", _softcap_bend,
             applies=capped),
    Scenario("bfloat16", "half precision (bf16): float32 softmax and accumulation", _simple(32, 7), torch.bfloat16),
    Scenario("float16", "half precision (fp16)", _simple(32, 8), torch.float16, quick=False),
    Scenario("zero_positions", "probe: RoPE off (all positions 0)", _zero_positions, probe=True,
             tags=frozenset({"positions"})),
]

BY_NAME = {s.name: s for s in SCENARIOS}


def tagged(tag: str) -> set[str]:
    return {s.name for s in SCENARIOS if tag in s.tags}


# What a kernel run in Triton's interpreter (a CPU) gets beyond the quick set: every kind of case, nothing long.
INTERPRETER_EXTRA = {"len_257", "packed", "scaled_x50", "float16"}


def select(fixture: Fixture, dtypes: set[torch.dtype], quick: bool, interpreted: bool = False) -> list[Scenario]:
    out = []
    for s in SCENARIOS:
        if s.dtype not in dtypes or (quick and not s.quick):
            continue
        if interpreted and not (s.quick or s.name in INTERPRETER_EXTRA):
            continue
        if s.name == "prompt" and fixture.inputs is None:
            continue
        if s.applies is not None and not s.applies(fixture.layer_config):
            continue  # a family's scenario (its window, its cap) on a layer without the field
        if s.name == "long_2048" and fixture.config["hidden_size"] < 1024:
            continue  # long runs on the Llama shapes; smaller models get len_1000
        out.append(s)
    return out


# ---------------------------------------------------------------------------------------------------------
# sizes: what a module's build(config, weights) is told, so that it can size caches and rotary tables

SIZE_KEYS = ("max_batch_size", "max_seq_len", "max_position")  # config keys (names exact: the module contract's)


def input_sizes(x: torch.Tensor, pos: torch.Tensor) -> dict[str, int]:
    top = int(pos.max()) if pos.numel() else 0
    return {"max_batch_size": x.shape[0], "max_seq_len": x.shape[1], "max_position": top}


def covering(*many: dict) -> dict[str, int]:
    """The sizes that cover all of these."""
    return {k: max(int(m.get(k, 0)) for m in many) for k in SIZE_KEYS}


def sizes(fixture: Fixture, scenarios: list[Scenario]) -> dict[str, int]:
    """The largest batch, length and position id over these scenarios' inputs (built here: they are seeded)."""
    return covering(*(input_sizes(x, pos) for x, pos, _ in (s.build(fixture, torch.float32) for s in scenarios)))


def with_sizes(scenarios: list[Scenario], sized: dict[str, int]) -> list[Scenario]:
    return [replace(s, sizes=tuple(sized.items())) for s in scenarios]
