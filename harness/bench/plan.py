"""Can a configuration run here? Its tensor peak is first computed by running it on the meta device (no data, no
memory): above the free RAM, or projected past the time budget, it is not run, and its computed bytes are
reported, labelled as computed.
"""

from __future__ import annotations

from harness.bench.cases import Shape, make_case
from harness.bench.meter import Meter, _meminfo, human, meter_call

# Not planned on the meta device: sdpa is one fused kernel on CPU but decomposes on meta (an S x S prediction
# for a call that needs O(S d)); the tiled layer reads position values (rope tables). Both need O(S d) memory.
NO_PREDICT = {"sdpa", "hf_sdpa", "layer_hf", "layer_tiled"}


def predict(name: str, s: Shape, n: int, cfg: dict) -> Meter:
    """Run on the meta device: shapes only, no data and no memory. Gives tensor peak and traffic."""
    m, out = meter_call(make_case(name, s, n, cfg, device="meta").fn)
    del out
    return m


def plan(name: str, s: Shape, n: int, cfg: dict, last: tuple[int, float] | None, *, calls: int, max_s: float,
         mem_fraction: float) -> tuple[str, Meter | None]:
    """(why it cannot run here or "", the meta-device count when there is one). Memory: the computed tensor peak
    against the free RAM; time: the last measured (seq, median) of this implementation scaled as O(n^2)."""
    pred = None if name in NO_PREDICT else predict(name, s, n, cfg)
    free = _meminfo("MemAvailable") or 0
    if pred is not None and pred.tensor_peak > mem_fraction * free:
        why = f"needs {human(pred.tensor_peak)} of tensors (computed), {human(free)} free: cannot run on this machine"
        return why, pred
    if last is not None:
        n0, t0 = last
        projected = t0 * (n / n0) ** 2 * calls
        if projected > max_s:
            return f"projected {projected:.0f} s for {calls} calls > --max-config-s {max_s:g}", pred
    return "", pred
