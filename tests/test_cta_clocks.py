"""tools/cta_clocks.py: the instrumentation still fits both Hopper kernels as committed, and the
report reads the balance and a piece's cost off the records right (no GPU needed)."""

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import cta_clocks  # noqa: E402  (needs the path above)


def test_instrumenting_adds_the_clocks_to_both_kernels_once(tmp_path):
    # Fails (RuntimeError) after an edit of a kernel that the rewrites no longer match: update the
    # patterns in tools/cta_clocks.py then.
    cta_clocks.instrument(tmp_path / "copy")
    for name in cta_clocks.KERNELS:
        text = (tmp_path / "copy" / "csrc" / "hopper" / name).read_text()
        assert text.startswith("#include <cstdio>\n")
        for marker in ("clock_start = clock_now();", "++clock_pieces;",
                       "g_clock_pieces[clock_cta] = clock_pieces;", "print_clocks_kernel<<<"):
            assert text.count(marker) == 1, (name, marker)
    original = (ROOT / "csrc" / "hopper" / "decode_seesaw.cu").read_text()
    assert "clock_now" not in original  # the repository itself is left alone


def records(start_us, pieces):
    """One call's lines: per CTA, its start and (sequence, first token, end token, end µs)."""
    lines = []
    for index, (start, cta_pieces) in enumerate(zip(start_us, pieces)):
        text = " ".join(f"{s}:{lo}:{hi}:{int(end * 1000)}" for s, lo, hi, end in cta_pieces)
        lines.append(f"CTA 1 {index} {40 + index} {len(cta_pieces)} {int(start * 1000)} {text}")
    return lines


def test_report_gives_span_tail_idle_share_and_piece_cost():
    # A piece costs 1 µs a page + 3 µs, 2 µs more as its CTA's first; odd page counts cost nothing.
    # CTA 0 (from 0): 10 pages -> 15, 5 pages -> 23, 2 pages -> 28. CTA 1 (from 1): 3 pages
    # (tokens 64-255) -> 9, 7 pages -> 19.
    call = records([0, 1], [[(0, 0, 640, 15), (1, 0, 320, 23), (2, 0, 128, 28)],
                            [(3, 64, 256, 9), (4, 0, 448, 19)]])
    calls = cta_clocks.parse(["noise"] + call + call)
    assert len(calls) == 2 and calls[1][1].pieces[0] == (3, 64, 256, 9000)
    text = cta_clocks.report(calls)
    assert "seesaw, 2 CTAs; span per call (µs): 28.0, median 28.0" in text
    assert "mean 23.5, min 19.0" in text and "max 28.0; idle share at the tail 16.1%" in text
    assert "1000 ns a page, 3000 ns a piece (= 3.0 pages)" in text
    assert "2000 ns more for a CTA's first piece" in text
    assert text.splitlines()[-1].startswith("  late CTA 0 (SM 40, start 0.0): s0[0:10]@15.0")
