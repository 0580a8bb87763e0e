"""What a diagnosis works on: one scenario's evidence, the answer (a stage and a hint), and the distances every
step of the diagnosis measures with."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from harness.common import compared_rows

MAX_SUSPECT_LEN = 529  # suspects are re-run on the failing float32 scenarios up to this length (float64 is slow);
# the longest such scenario is window_edge on Gemma 3 (512-key window + 17); len_1000 and longer are never re-run
EXACT = 1e-3  # a suspect this much closer than the reference is the computation itself (float32 rounding apart)


@dataclass
class Run:
    """One scenario's evidence."""

    x: torch.Tensor
    pos: torch.Tensor
    mask: torch.Tensor | None
    out: torch.Tensor  # the implementation's output (non-finite where it crashed)
    ref: torch.Tensor  # HF in the scenario's dtype
    dtype: torch.dtype
    ref64: torch.Tensor | None = None  # HF in float64

    @property
    def keep(self) -> torch.Tensor:
        return compared_rows(self.x, self.mask)

    @property
    def err(self) -> float:
        return maxdiff(self.out, self.ref, self.keep)


@dataclass
class Diagnosis:
    stage: str
    hint: str
    matched: str | None = None  # the suspect, probe or pattern that explains it


Call = Callable[[torch.Tensor, dict, torch.Tensor, torch.Tensor | None], torch.Tensor]


def maxdiff(a: torch.Tensor, b: torch.Tensor, keep: torch.Tensor) -> float:
    d = (a.double() - b.double()).abs()[keep]
    return float(torch.nan_to_num(d, nan=float("inf")).max()) if d.numel() else 0.0


def rms(a: torch.Tensor, b: torch.Tensor, keep: torch.Tensor) -> float:
    d = torch.nan_to_num((a.double() - b.double())[keep], nan=float("inf"))
    return float(d.square().mean().sqrt()) if d.numel() else 0.0


def round_to(t: torch.Tensor, to: torch.dtype) -> torch.Tensor:
    return t.to(to).to(t.dtype)
