"""Can a configuration run here? Its tensor peak is first computed by running it on the meta device (no data, no
memory): above the free memory, or projected past the time budget, it is not run, and its computed bytes are
reported, labelled as computed. A backward configuration also needs its forward's state (the tensors saved for the
backward), computed the same way. The Triton kernel cannot launch on the meta device: its bytes come from the
closed form of its block schedule, and on a CPU, where it runs in Triton's interpreter, one call is planned only if
its projected interpreter time fits the interpreter's own budget.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from harness.bench.cases import INTERPRETED, Shape, make_case, pairs, triton_alloc, triton_traffic
from harness.bench.meter import CPU, human, meminfo, meter_call

# Not planned on the meta device: sdpa is one fused kernel on CPU but decomposes on meta (an S x S prediction
# for a call that needs O(S d)); the tiled layer reads position values (rope tables). Both need O(S d) memory.
NO_PREDICT = {"sdpa", "hf_sdpa", "layer_hf", "layer_tiled"}
TRAFFIC_CLOSED_FORM = "closed form of the kernel's block schedule (validated against the count)"
TRAFFIC_COUNTED = "counted: Triton interpreter, global loads/stores"


@dataclass
class Computed:
    """What a configuration costs, computed without running it (or without running it for real)."""

    tensor_peak: int
    traffic: int
    ops: int | None
    peak_method: str
    traffic_method: str
    held: int = 0  # backward: bytes of the forward's state, alive during the call
    kernel_calls: int = 0  # Triton: global load/store instructions, what the interpreter's time follows


def predict(name: str, s: Shape, n: int, cfg: dict, direction: str = "forward", window: int | None = None
            ) -> Computed | None:
    """Shapes only, no data and no memory: the meta-device run under the meter (tensor peak, traffic, the
    forward's state for a backward case), or the Triton kernel's closed form."""
    if name in INTERPRETED:
        t = triton_traffic(s, n, window)
        return Computed(triton_alloc(s, n), t["load_bytes"] + t["store_bytes"], None,
                        "computed: the kernel's outputs (out, lse), its only allocations", TRAFFIC_CLOSED_FORM,
                        kernel_calls=t["load_calls"] + t["store_calls"])  # fmt: skip
    if name in NO_PREDICT:
        return None
    case = make_case(name, s, n, cfg, device="meta", direction=direction, window=window)
    m, out = meter_call(case.fn)
    del out
    return Computed(m.tensor_peak, m.traffic, m.ops, "computed: tensor bytes of a meta-device run",
                    "computed: aten op boundaries, meta-device run", held=case.held)  # fmt: skip


def free_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return meminfo("MemAvailable") or 0


def plan(name: str, s: Shape, n: int, cfg: dict, last: tuple[int, float] | None, *, calls: int, max_s: float,
         mem_fraction: float, direction: str = "forward", device: torch.device = CPU,
         interpreted: bool = False, max_interpreted_s: float = 0.0, window: int | None = None
         ) -> tuple[str, Computed | None]:
    """(why it cannot run here or "", the computed costs when there are). Memory: the computed tensor peak (plus
    a backward's forward state) against the free memory; time: the last measured (seq, seconds) of this
    implementation and direction scaled as O(n^2) for `calls` calls, or, interpreted, scaled by the kernel's
    load/store count for one call, against the smaller of max_s and max_interpreted_s. A windowed
    configuration (window: keys each query sees) is scaled by its (query, key) pairs instead of n^2."""
    pred = predict(name, s, n, cfg, direction, window)
    free = free_memory(device)
    if pred is not None and pred.tensor_peak + pred.held > mem_fraction * free:
        need = f"{human(pred.tensor_peak + pred.held)} of tensors (computed"
        need += f": {human(pred.held)} forward state + {human(pred.tensor_peak)} backward)" if pred.held else ")"
        return f"needs {need}, {human(free)} free: cannot run on this machine", pred
    if last is None:
        return "", pred
    n0, t0 = last
    if interpreted:
        projected = t0 * pred.kernel_calls / predict(name, s, n0, cfg, window=window).kernel_calls
        limit = min(max_s, max_interpreted_s)
        if projected > limit:
            return (f"interpreted (no GPU): projected {projected:.0f} s for one call > {limit:g} s "
                    "(--max-interpreted-s, --max-config-s)"), pred  # fmt: skip
        return "", pred
    projected = t0 * pairs(n, window) / pairs(n0, window) * calls
    if projected > max_s:
        return f"projected {projected:.0f} s for {calls} calls > --max-config-s {max_s:g}", pred
    return "", pred
