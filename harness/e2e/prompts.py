"""The prompts of an e2e run and how they become one batch: the defaults or a file, the chat template, then one
left-padded batch (as batched serving runs them) with its padding mask and position ids."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from harness.common import UserError

DEFAULT_PROMPTS = (
    "What is the capital of France?",
    "Explain in a few sentences why the sky is blue.",
    "Summarize the following text in one sentence.\n\n"
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris. It is named after the engineer "
    "Gustave Eiffel, whose company built it from 1887 to 1889 as the centrepiece of the 1889 World's Fair. At first "
    "criticised by some of France's leading artists, it has become a global icon of France. It is 330 metres tall.",
)


def read_prompts(path: str | None) -> list[str]:
    """--prompts FILE: a JSON list of strings, or plain text with one prompt per line (blank lines skipped)."""
    if path is None:
        return list(DEFAULT_PROMPTS)
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--prompts {path}: no such file; give a text file with one prompt per line, or a JSON list")
    try:
        text = p.read_text(encoding="utf-8", errors="replace")
    except OSError as e:  # no permission, an I/O error
        raise UserError(f"--prompts {path}: cannot read it ({e.strerror}); give a readable text file") from None
    if p.suffix == ".json":
        try:
            prompts = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"--prompts {path}: not valid JSON ({e.msg} at line {e.lineno}); fix the file") from None
        if not isinstance(prompts, list) or not all(isinstance(s, str) for s in prompts):
            raise UserError(f"--prompts {path}: expected a JSON list of strings")
    else:
        prompts = [line.strip() for line in text.splitlines()]
    prompts = [s for s in prompts if s.strip()]
    if not prompts:
        raise UserError(f"--prompts {path}: no prompts in it; write one prompt per line")
    return prompts


def encode_prompt(tokenizer, prompt: str) -> torch.Tensor:
    """The chat template when the tokenizer has one (instruct models), else the raw text with BOS: (S,)."""
    if getattr(tokenizer, "chat_template", None):
        enc = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        return enc["input_ids"][0]
    return tokenizer(prompt, return_tensors="pt")["input_ids"][0]


def left_pad(rows: list[torch.Tensor], pad: int):
    """-> ids (B, S), mask (B, S) 1 = token, 0 = padding, positions (B, S) counting real tokens only."""
    B, S = len(rows), max(len(r) for r in rows)
    ids = torch.full((B, S), pad)  # (B, S)
    mask = torch.zeros(B, S, dtype=torch.long)  # (B, S)
    for b, r in enumerate(rows):
        ids[b, S - len(r) :], mask[b, S - len(r) :] = r, 1
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def batch(tokenizer, prompts: list[str]):
    """Every prompt encoded, then one left-padded batch: ids, mask, positions (B, S), on the CPU."""
    rows = [encode_prompt(tokenizer, p) for p in prompts]
    return left_pad(rows, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
