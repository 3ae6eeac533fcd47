"""tools/sass_lines.py: the join of Nsight Compute's per-instruction samples with nvdisasm's line
table, on a small hand-written kernel listing (no nvcc or GPU needed)."""

import csv
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "tools"))
import sass_lines  # noqa: E402  (needs the path above)

LISTING = """
//--------------------- .text._Z6helperv --------------------------
.text._Z6helperv:
        /*0000*/                   EXIT ;
//--------------------- .text._Z6kernelv --------------------------
.text._Z6kernelv:
	//## File "/src/k.cu", line 10
        /*0000*/                   LDC R1, c[0x0][0x28] ;
	//## File "/src/util.h", line 3 inlined at "/src/k.cu", line 12
	//## File "/src/k.cu", line 12
        /*0010*/                   BAR.SYNC.DEFER_BLOCKING 0x3, 0x100 ;
        /*0020*/               @!P0 BRA `(.L_x_1) ;
	//## File "/src/k.cu", line 20
        /*0030*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ, !UPT ;
        /*0040*/                   EXIT ;
"""

SOURCE = "\n".join(["// line"] * 9 + ["__global__ void kernel() {"] + ["  body();"] * 15) + "\n"


def write_csv(path, rows):
    header = ["Address", "Source", sass_lines.TOTAL_COLUMN, "stall_barrier", "stall_wait",
              "stall_barrier (Not Issued)"]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["Kernel Name", "kernel()"])
        writer.writerow(header)
        for i, (sass, total, barrier, wait) in enumerate(rows):
            writer.writerow([hex(0x7F00 + 16 * i), sass, total, barrier, wait, 0])


def test_parse_line_table_keeps_each_instructions_inlined_chain_until_the_next_line_comment():
    functions = sass_lines.parse_line_table(LISTING)
    assert [f.name for f in functions] == ["_Z6helperv", "_Z6kernelv"]
    kernel = functions[1]
    assert kernel.opcodes == ["LDC", "BAR.SYNC.DEFER_BLOCKING", "BRA", "HGMMA.64x64x16.F32.BF16",
                              "EXIT"]
    assert kernel.chains[1] == [("util.h", 3), ("k.cu", 12)]
    assert kernel.chains[2] == kernel.chains[1]  # no comment of its own: same lines as before
    assert kernel.chains[4] == [("k.cu", 20)]


def test_samples_are_charged_to_kernel_lines_and_regions_with_the_unlisted_reason(tmp_path):
    write_csv(tmp_path / "s.csv", [
        ("      LDC R1, c[0x0][0x28]", 1, 0, 1),
        ("      BAR.SYNC.DEFER_BLOCKING 0x3, 0x100", 0, 0, 0),
        ("@!P0  BRA 0x7f80", 40, 30, 10),
        ("      HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ, !UPT", 60, 0, 5),
        ("      EXIT", 0, 0, 0),
    ])
    opcodes, samples = sass_lines.read_samples(str(tmp_path / "s.csv"))
    kernel = sass_lines.parse_line_table(LISTING)[1]
    assert opcodes == kernel.opcodes
    assert samples[3]["warpgroup_arrive"] == 55  # 60 sampled, 5 under a listed reason
    source = tmp_path / "k.cu"
    source.write_text(SOURCE)
    text = sass_lines.report(kernel, samples, source, body_from=10,
                             regions={"first": (11, 15), "second": (16, 25)}, top=5)
    lines = text.splitlines()
    assert lines[0].startswith("== first: 39.6% of all samples")
    assert lines[1].split()[:2] == ["12", "100.0%"]
    assert "barrier:75.0" in lines[1] and "wait:25.0" in lines[1]
    assert lines[2].startswith("== second: 59.4% of all samples")
    assert "warpgroup_arrive:91.7" in lines[3]
    assert lines[4].startswith("== other: 1.0% of all samples")
