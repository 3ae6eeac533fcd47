"""The benchmark CLI (the README's main job) on a tiny CPU problem: every output it promises."""

import csv
import json

import pytest

import jax_flashmla
from jax_flashmla import bench


def test_custom_shapes_produce_table_csv_json_markdown_and_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    paths = {kind: tmp_path / f"rows.{kind}" for kind in ("csv", "json", "md", "png")}
    exit_code = bench.main(["--table", "custom", "--batch", "2", "--seqlen", "100", "300",
                            "--heads", "4", "--seqlen-q", "1", "2", "--max-calls", "2",
                            "--repeats", "1",
                            "--csv", str(paths["csv"]), "--json", str(paths["json"]),
                            "--markdown", str(paths["md"]), "--plot", str(paths["png"])])
    assert exit_code == 0
    printed = capsys.readouterr().out
    assert sum(line.startswith("| 2 | ") for line in printed.splitlines()) == 4  # a row a shape
    rows = json.loads(paths["json"].read_text())["rows"]
    assert [(r["seqlen_k"], r["seqlen_q"]) for r in rows] == [(100, 1), (100, 2), (300, 1), (300, 2)]
    assert all(r["reference_ms"] > 0 and r["reference_gbps"] > 0 for r in rows)
    with open(paths["csv"]) as handle:
        assert len(list(csv.DictReader(handle))) == 4
    assert "commit" in paths["md"].read_text()
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"


def test_standard_table_is_deepseeks_benchmark():
    shapes = bench.TABLES["standard"]
    assert len(shapes) == 16
    assert {s.batch for s in shapes} == {128}
    assert {(s.seqlen_k, s.heads_q, s.seqlen_q) for s in shapes} == {
        (k, h, q) for k in (4096, 8192) for h in (16, 32, 64, 128) for q in (1, 2)}


def test_byte_and_flop_counts_follow_the_perf_notes():
    shape = bench.Shape(batch=2, seqlen_k=10, heads_q=4, seqlen_q=2)
    assert bench.bytes_moved(shape, total_tokens=30) == (30 * 576 + 2 * 2 * 4 * 1088) * 2
    assert bench.flops(shape, total_tokens=30) == 2 * 30 * 4 * 1088 * 2


def test_table_names_the_hopper_schedule_of_each_row():
    rows = [{"batch": 128, "seqlen_k": 4096, "heads_q": h_q, "seqlen_q": 1, "fixed": False,
             "hopper_schedule": schedule, "hopper_ms": 0.25, "hopper_gbps": 2600.0,
             "hopper_tflops": 80.0}
            for h_q, schedule in ((16, "split"), (128, "seesaw"))]
    header, _, *body = bench.format_table(rows, ["hopper"]).splitlines()
    assert header.split(" | ")[4] == "hopper schedule"
    assert [line.split(" | ")[4] for line in body] == ["split", "seesaw"]


def test_call_spans_run_from_main_kernel_to_end_of_combine_and_skip_glue():
    events = [  # (name, start_ns, end_ns), out of order, one event listed twice
        ("loop_add_fusion", 130, 135),
        ("_ZN12jax_flashmla6hopper24mla_decode_seesaw_kernelILb1EEEv", 0, 100),
        ("_ZN12jax_flashmla14combine_kernelI13__nv_bfloat16Li8ELi1EEEv", 105, 125),
        ("mla_decode_portable_kernel", 140, 200),
        ("combine_pieces_kernel<__half>", 210, 230),
        ("combine_pieces_kernel<__half>", 210, 230),
        ("input_reduce_fusion", 231, 240),
    ]
    assert bench.call_spans_ns(events) == [125, 90]
    assert bench.call_spans_ns([("loop_add_fusion", 0, 5)]) == []


def test_table_shows_kernel_time_column_when_traced():
    rows = [{"batch": 1, "seqlen_k": 32768, "heads_q": 16, "seqlen_q": 1, "fixed": True,
             "hopper_ms": 0.0275, "hopper_gbps": 1370.0, "hopper_tflops": 40.0,
             "hopper_kernel_ms": kernel_ms} for kernel_ms in (0.0241, None)]
    header, _, *body = [[cell.strip() for cell in line.strip("|").split("|")]
                        for line in bench.format_table(rows, ["hopper"]).splitlines()]
    column = header.index("hopper kernel ms")
    assert [cells[column] for cells in body] == ["0.0241", "—"]


def test_traced_time_is_none_without_kernels_of_ours():
    # On the CPU the trace holds no device plane, so no call spans: the column is left out rather
    # than filled with a made-up number.
    problem = bench.make_problem(bench.Shape(2, 64, 4, 1, fixed=True))
    metadata = jax_flashmla.get_mla_metadata(problem.cache_seqlens, 4, 1)
    traced = bench.traced_time_per_call(bench.decode_fn("reference"), problem.cache_seqlens,
                                        metadata, problem.copies, calls=2)
    assert traced is None
