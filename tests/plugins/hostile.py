"""Careless and hostile plug-ins, as users write them: each must become its named verdict (tests/test_boundary.py),
and none may change what another implementation is judged on."""

import os
import sys
import time

import torch

from impl import naive

attention = naive.attention  # an innocent one, for order-independence checks


def exits_zero(x, weights, **kw):
    sys.exit(0)


def os_exit(x, weights, **kw):
    os._exit(0)


def hangs(x, weights, **kw):
    time.sleep(10_000)


def raises(x, weights, **kw):
    raise RuntimeError("the kernel was not compiled for this shape")


def edits_inputs(x, weights, *, config, position_ids, attention_mask=None):
    out = naive.attention(x, weights, config=config, position_ids=position_ids, attention_mask=attention_mask)
    x.mul_(2)
    weights["q_proj"].zero_()
    position_ids.zero_()
    if attention_mask is not None:
        attention_mask.fill_(1)
    return out


def default_float64(x, weights, **kw):
    torch.set_default_dtype(torch.float64)
    return naive.attention(x, weights, **kw)


def patches_the_judge(x, weights, **kw):
    import harness.verify.compare as compare

    compare.compare = lambda *a, **k: None  # only in its own process
    return naive.attention(x, weights, **kw) * 2


def float64_output(x, weights, **kw):
    return naive.attention(x.double(), {k: v.double() for k, v in weights.items()}, **kw)


def wrong_shape(x, weights, **kw):
    return naive.attention(x, weights, **kw)[:, :1]


def meta_tensor(x, weights, **kw):
    return torch.empty(x.shape, device="meta")


def sparse_tensor(x, weights, **kw):
    return naive.attention(x, weights, **kw).to_sparse()


def not_a_tensor(x, weights, **kw):
    return naive.attention(x, weights, **kw).tolist()


def prints(x, weights, **kw):
    print("debug output on stdout " * 50)
    return naive.attention(x, weights, **kw)


def looks_itself_up(x, weights, **kw):
    return sys.modules[__name__].attention(x, weights, **kw)  # what torch.compile's tracing does
