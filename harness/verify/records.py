"""What a check leaves behind: one row per (target, implementation, case, check), one verdict per (target,
implementation). The JSON of `verify` is made of these."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from harness.verify.compare import Comparison


@dataclass
class Row:
    """One comparison. target: a fixture's name, or `kernels` for the kernel matrix."""

    fixture: str
    impl: str
    scenario: str
    dtype: str
    seconds: float
    c: Comparison
    check: str = "forward"  # "forward"; "lse" for a kernel's log-sum-exp; "grad_x", ... for gradients
    error: str | None = None  # why there is no output (a fault)
    device: str = "cpu"
    skipped: str | None = None  # why the scenario was not run (a keyword the code does not take): never a pass

    @property
    def passed(self) -> bool:
        return self.c.passed and self.skipped is None

    def json(self) -> dict:
        return {"fixture": self.fixture, "impl": self.impl, "scenario": self.scenario, "dtype": self.dtype,
                "check": self.check, **asdict(self.c), "error": self.error, "device": self.device,
                "seconds": self.seconds, "skipped": self.skipped}  # fmt: skip


@dataclass
class Verdict:
    """One (target, implementation): passed, or the first broken stage with a hint."""

    fixture: str
    impl: str
    contract: str
    passed: bool
    stage: str | None = None
    hint: str | None = None
    matched: str | None = None
    failing: list[str] = field(default_factory=list)
    error: str | None = None  # a fault's traceback or message
    device: str = "cpu"
    backend: str | None = None  # for sdpa: the backend that actually ran
    imprecise: bool = False  # passes the gate, but some check is far less precise than transformers
    precision_ratio: float = 0.0  # the largest over its checks (1 = as precise as transformers)
    bit_exact: bool = False  # every float32 forward row exactly transformers' eager output (a note: report.py)
    skipped: list[dict] = field(default_factory=list)  # [{"scenario", "why"}]: not run; a failure under --strict
    comm: dict | None = None  # a ring kernel's bytes per rank and comm_ratio (contracts/ring.py)

    def json(self) -> dict:
        return asdict(self)


def dtype_name(t) -> str:
    return str(t).removeprefix("torch.")
