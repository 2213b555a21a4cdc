"""Memory, one name per reading: what the notebooks call as `memory.<name>`, gathered from the
three modules that hold it, each one idea:

- `memory_readings`: what memory holds — peak and resident memory of this process (CPU), the
  caching allocator's and the driver's views (GPU), live tensor bytes op by op, the bytes a model
  holds, the allocator's timeline and what was live at a peak, by operation;
- `memory_search`: what fits — the out-of-memory-safe search (`largest_fitting`) and the largest
  batch at each context beside the formula's (`search_frontier`);
- `memory_timing`: the time memory costs — functions timed in turn with their peaks, page
  faults, and copy bandwidth (alone and beside compute).

Each reading a notebook needs is one call that works on a CPU and a GPU alike, so the notebook's
cells hold the idea and not the device plumbing. The formulas of what serving needs are in
`helpers.shapes` (and written out in notebook 02)."""

from __future__ import annotations

from helpers.memory_readings import (
    AllocationPeak,
    LiveTensorBytes,
    PeakMemory,
    allocator_timeline,
    allocator_view,
    device_memory,
    freed_blocks_returned,
    gpu_memory,
    in_use_bytes,
    live_at_peak,
    param_count,
    peak_added_bytes,
    peak_rss_bytes,
    readable,
    reconcile,
    release_freed_memory,
    reset_peak_rss,
    rss_bytes,
    runtime_bytes,
    tensor_bytes,
    weight_bytes,
)
from helpers.memory_search import (
    BudgetExceeded,
    SearchResult,
    fits,
    largest_fitting,
    search_frontier,
)
from helpers.memory_timing import (
    bandwidth_at,
    copy_beside_compute,
    copy_sweep,
    first_touch_cost,
    minor_faults,
    peak_and_time,
    time_interleaved,
)

__all__ = [
    "AllocationPeak",
    "BudgetExceeded",
    "LiveTensorBytes",
    "PeakMemory",
    "SearchResult",
    "allocator_timeline",
    "allocator_view",
    "bandwidth_at",
    "copy_beside_compute",
    "copy_sweep",
    "device_memory",
    "first_touch_cost",
    "fits",
    "freed_blocks_returned",
    "gpu_memory",
    "in_use_bytes",
    "largest_fitting",
    "live_at_peak",
    "minor_faults",
    "param_count",
    "peak_added_bytes",
    "peak_and_time",
    "peak_rss_bytes",
    "readable",
    "reconcile",
    "release_freed_memory",
    "reset_peak_rss",
    "rss_bytes",
    "runtime_bytes",
    "search_frontier",
    "tensor_bytes",
    "time_interleaved",
    "weight_bytes",
]
