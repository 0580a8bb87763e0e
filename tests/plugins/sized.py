"""Plug-ins that hold the harness to the sizes it announces (config keys max_batch_size, max_seq_len, max_position:
the largest batch, length and position id of the run): every call beyond them raises, and with $SIZED_LOG set,
every call appends {"who": the plug-in, "told": sizes, "got": its own} as a JSON line (tests/test_module_sizes.py)."""

import json
import os

from harness.bugs.catalog import pick
from impl import naive

KEYS = ("max_batch_size", "max_seq_len", "max_position")


def held(who: str, told: dict, x, position_ids) -> None:
    got = {"max_batch_size": x.shape[0], "max_seq_len": x.shape[1], "max_position": int(position_ids.max())}
    log = os.environ.get("SIZED_LOG")
    if log:
        with open(log, "a") as f:
            f.write(json.dumps({"who": who, "told": told, "got": got}) + "\n")
    over = {k: (got[k], told[k]) for k in KEYS if got[k] > told[k]}
    if over:
        raise ValueError(f"a call beyond the announced sizes (got, told): {over}")


def sized(who: str, fn):
    """A module factory around a layer function: build() reads the sizes (a missing key is a KeyError), the layer
    checks every call against them."""

    def build(config, weights):
        told = {k: config[k] for k in KEYS}

        def layer(x, position_ids, attention_mask=None):
            held(who, told, x, position_ids)
            return fn(x, weights, config=config, position_ids=position_ids, attention_mask=attention_mask)

        return layer

    return build


build = sized("build", naive.attention)  # correct: passes
build_pv_fp16 = sized("build_pv_fp16", pick("pv_fp16_accumulator").layer())  # imprecise: diagnosed


def attention(x, weights, *, config, position_ids, attention_mask=None):
    """The layer contract's config carries the same keys."""
    held("attention", {k: config[k] for k in KEYS}, x, position_ids)
    return naive.attention(x, weights, config=config, position_ids=position_ids, attention_mask=attention_mask)
