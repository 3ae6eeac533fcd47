"""tools/seesaw_timeline.py and its patch: the patch still fits the seesaw kernel as committed, and
the report reads a pair's events and a sequence boundary right (no GPU needed)."""

import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import seesaw_timeline  # noqa: E402  (needs the path above)


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(),
                    reason="needs git and a git checkout")
def test_the_timeline_patch_applies_to_the_committed_kernel():
    # Fails after an edit of decode_seesaw.cu that the patch's context no longer matches: refresh
    # the patch then (the tool's docstring says how).
    result = subprocess.run(["git", "apply", "--check", "tools/seesaw_timeline.patch"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def stamps(pair, first, values):
    """A pair's record lines: events 0.. as given, the rest unset (-1)."""
    padded = values + [-1] * (56 - len(values))
    lines = [f"TIMELINE pair {pair} {first[0]} {first[1]}"]
    for chunk in range(0, 56, 14):
        chunk_text = " ".join(map(str, padded[chunk:chunk + 14]))
        lines.append(f"TIMELINE events {pair} {chunk} {chunk_text}")
    return lines


def test_report_gives_the_pair_period_event_offsets_and_boundary_cost():
    # Sequence 3 has pairs 0-3 (tops 1000 apart, warpgroup 0 arrives at A 200 cycles into each),
    # sequence 4 starts 5000 cycles after the top of pair 3, its Q ready 4500 cycles after it.
    lines = ["unrelated output"]
    for q in range(4):
        lines += stamps(q, (3, 2 * q), [1000 * q, 1000 * q + 200])
    boundary = stamps(4, (4, 0), [3000 + 5000])
    boundary_events = boundary[1:]
    last = boundary_events[3].split()
    last[4 + (54 - 42)] = str(3000 + 4500)  # event 54 (wg0 Q ready) sits in the chunk from 42
    boundary_events[3] = " ".join(last)
    lines += [boundary[0], *boundary_events]
    lines += stamps(5, (4, 2), [3000 + 5000 + 1000])
    calls = seesaw_timeline.parse(lines)
    assert len(calls) == 1 and len(calls[0]) == 6
    assert calls[0][4].events[54] == 7500
    text = seesaw_timeline.report(calls[0])
    assert "period median 1000 cycles" in text
    assert "200  wg0 A" in text
    assert "pair 4 (sequence 4): +4000 cycles over a pair" in text
    assert "wg0 Q ready 4500" in text


def test_a_new_call_starts_a_new_list_of_pairs():
    lines = stamps(0, (0, 0), [0]) + stamps(1, (0, 2), [900]) + stamps(0, (0, 0), [0])
    assert [len(call) for call in seesaw_timeline.parse(lines)] == [2, 1]
