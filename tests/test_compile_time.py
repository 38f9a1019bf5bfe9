"""benchmarks/compile_time.py: one line of figures for the step it names."""

from __future__ import annotations

import re

from benchmarks.compile_time import measure

LINE = re.compile(
    r"model=baseline step=eval preset=test nodes=16 batch=8 trace_s=(?P<trace>[0-9.]+) lower_s=[0-9.]+ "
    r"compile_s=(?P<compile>[0-9.]+) hlo_lines=(?P<lines>\d+)"
)


def test_one_line_of_figures_for_the_step():
    match = LINE.fullmatch(measure("test", "baseline", "eval", 16))
    assert match is not None
    # the eval step of a GAT and the robust chain is hundreds of HLO lines at the very least
    assert int(match["lines"]) > 500
    assert float(match["trace"]) > 0
