"""``debug=profiler_torch``: Lightning's PyTorch profiler that also prints the top operators by self time.

Lightning's :class:`~lightning.pytorch.profilers.PyTorchProfiler` records a few scheduled steps of
each stage (wait 1, warm up 1, record 3), writes a trace per stage into ``dirpath``
(``*.pt.trace.json``: open it in Perfetto UI, https://ui.perfetto.dev, or ``chrome://tracing``)
and its operator table by total time into ``<stage>-<filename>.txt``. This subclass prints the
``top`` operators by self time (device time on a GPU, else CPU time) when each stage ends and
adds that table to the file.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.profilers import PyTorchProfiler
from lightning.pytorch.utilities import rank_zero_only

__all__ = ["TorchProfiler", "top_operators"]


def top_operators(events: Any, top: int, on_gpu: bool) -> str:
    """The ``top`` operators of a profiler's events by self time, as torch's table."""
    key = "self_device_time_total" if on_gpu else "self_cpu_time_total"
    return events.key_averages().table(sort_by=key, row_limit=top)


class TorchProfiler(PyTorchProfiler):
    """:class:`PyTorchProfiler` printing the ``top`` operators by self time at the end of each stage."""

    def __init__(self, top: int = 10, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.top = top

    def summary(self) -> str:
        text = super().summary()  # stops the profiler and keeps its events; the table by total time
        if not self.function_events:
            return text
        on_gpu = any(getattr(a, "name", "") == "CUDA" for a in self._profiler_kwargs.get("activities") or [])
        stage = getattr(self._stage, "value", self._stage) or "run"
        top = (f"Top {self.top} operators by self time ({stage}, the profiled steps):\n"
               f"{top_operators(self.function_events, self.top, on_gpu)}")
        if rank_zero_only.rank == 0:
            print(f"\n{top}trace and tables in {self.dirpath}", flush=True)
        return f"{text}\n\n{top}"
