"""A Llama attention module in the style of gpt-fast's `Attention` (one fused wqkv projection, a precomputed
rotary table, RoPE on interleaved channel pairs as in Meta's checkpoints), verified through the module contract:

    attention-verify verify --module docs/examples/fused_qkv_module.py:build --weights-layout meta

`build(config, weights)` is called once per fixture and dtype; `--weights-layout meta` hands it q/k rows in Meta's
interleaved order, which is what this module's pairing expects (with HF's order it fails, stage rope). config
carries the run's sizes, max_batch_size, max_seq_len and max_position (the largest position id): the rotary table
is sized by the last (a guess falls short: beyond_context reaches 2 x max_position_embeddings).
TABLE_DTYPE = torch.bfloat16 reproduces a real precision bug: a rotary table kept in bfloat16.
"""

import torch
import torch.nn.functional as F
from torch import nn

TABLE_DTYPE = torch.float32
MAX_POSITIONS = 1 << 17  # where no size is given (e2e gives none: it runs this module on its own prompts)


def rotary_table(n: int, d: int, theta: float, dtype=TABLE_DTYPE) -> torch.Tensor:
    """(n, d/2, 2): cos and sin of position * theta^(-2i/d), for the positions 0..n-1."""
    freqs = 1.0 / (theta ** (torch.arange(0, d, 2).float() / d))
    angles = torch.outer(torch.arange(n, dtype=torch.float32), freqs)  # (n, d/2)
    return torch.stack([angles.cos(), angles.sin()], dim=-1).to(dtype)  # (n, d/2, 2)


def rotate(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """x (B, S, H, d) rotated pair by pair: channels (2i, 2i+1) by the angle of table (B, S, d/2, 2)."""
    xp = x.float().unflatten(-1, (-1, 2))  # (B, S, H, d/2, 2)
    t = table[:, :, None].float()  # (B, S, 1, d/2, 2)
    out = torch.stack([xp[..., 0] * t[..., 0] - xp[..., 1] * t[..., 1],
                       xp[..., 1] * t[..., 0] + xp[..., 0] * t[..., 1]], dim=-1)  # fmt: skip
    return out.flatten(-2).type_as(x)  # (B, S, H, d)


class Attention(nn.Module):
    def __init__(self, config: dict, weights: dict):
        super().__init__()
        self.n_head, self.n_kv = config["num_attention_heads"], config["num_key_value_heads"]
        self.head_dim, self.dim = config["head_dim"], config["hidden_size"]
        wqkv = torch.cat([weights["q_proj"], weights["k_proj"], weights["v_proj"]])  # (H*d + 2*Hkv*d, D)
        self.wqkv = nn.Linear(self.dim, wqkv.shape[0], bias=False, dtype=wqkv.dtype)
        self.wo = nn.Linear(self.n_head * self.head_dim, self.dim, bias=False, dtype=wqkv.dtype)
        self.wqkv.weight.data.copy_(wqkv)
        self.wo.weight.data.copy_(weights["o_proj"])
        theta = config["rope_parameters"]["rope_theta"]  # default rope only: no scaling here
        rows = config.get("max_position", MAX_POSITIONS - 1) + 1  # position ids 0..max_position
        self.register_buffer("table", rotary_table(rows, self.head_dim, theta), persistent=False)

    def forward(self, x, position_ids, attention_mask=None):
        B, S, _ = x.shape
        kv = self.n_kv * self.head_dim
        q, k, v = self.wqkv(x).split([self.n_head * self.head_dim, kv, kv], dim=-1)
        q = rotate(q.view(B, S, self.n_head, self.head_dim), self.table[position_ids])
        k = rotate(k.view(B, S, self.n_kv, self.head_dim), self.table[position_ids])
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.view(B, S, self.n_kv, self.head_dim).transpose(1, 2)
        g = self.n_head // self.n_kv
        k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)  # (B, H, S, d)
        mask = torch.ones(S, S, dtype=torch.bool, device=x.device).tril()[None, None]
        if attention_mask is not None:
            mask = mask & attention_mask.bool()[:, None, None, :]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = torch.nan_to_num(y)  # rows with no key at all (padding) give NaN in SDPA; they are never used
        return self.wo(y.transpose(1, 2).reshape(B, S, -1))


def build(config: dict, weights: dict) -> nn.Module:
    return Attention(config, weights).eval()
