"""tools/call_breakdown.py: a traced call is split into main kernel, gap and combine right (no GPU
needed)."""

import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import call_breakdown  # noqa: E402  (needs the path above)


def test_breakdown_splits_each_call_into_main_gap_and_combine():
    # Call 1: main 0-100 µs, combine 102-110; call 2: main 120-210, combine 211-215. Times in ns,
    # out of order; the chaining fusion between the calls is not ours and is left out.
    events = [("combine_kernel", 211_000, 215_000), ("mla_decode_seesaw_kernel", 0, 100_000),
              ("loop_add_fusion", 111_000, 119_000),
              ("mla_decode_seesaw_kernel", 120_000, 210_000), ("combine_kernel", 102_000, 110_000)]
    parts = call_breakdown.breakdown(events)
    assert parts["main"] == pytest.approx(95.0)      # median of 100 and 90 µs
    assert parts["gap"] == pytest.approx(1.5)        # median of 2 and 1
    assert parts["combine"] == pytest.approx(6.0)    # median of 8 and 4
    assert parts["call"] == pytest.approx(102.5)     # median of 110 and 95


def test_a_call_without_combine_is_its_main_kernel():
    parts = call_breakdown.breakdown([("mla_decode_hopper_kernel", 0, 50_000)])
    assert parts == {"main": 50.0, "gap": 0.0, "combine": 0.0, "call": 50.0}
