"""Which of the Hopper kernel's two schedules a decode call gets: a host-side rule in the compiled
extension (csrc/hopper/launch.cu), so it is testable without a GPU."""

import pytest

import jax_flashmla
from jax_flashmla._extension import SCHEDULE_VARIABLE, hopper_schedule

pytestmark = pytest.mark.skipif(not jax_flashmla.hopper_kernel_available(),
                                reason="built without the Hopper kernel")


# (batch, rows per KV head, block-table columns, pool pages, partitions) -> schedule
@pytest.mark.parametrize("call, expected", [
    ((128, 16, 128, 8192, 132), "split"),     # one query tile: memory-bound, split S
    ((128, 64, 128, 8192, 132), "split"),
    ((128, 65, 128, 8192, 66), "seesaw"),     # two tiles, ~124 pages per partition
    ((128, 256, 128, 8192, 33), "seesaw"),
    ((8, 128, 512, 4096, 66), "seesaw"),      # b = 8, s_k 32768: 62 pages per partition
    ((1, 128, 64, 64, 66), "split"),          # b = 1, s_k 4096: about one page per partition
    ((1, 128, 512, 264, 66), "seesaw"),       # the bound is 264 pages: exactly 4 per partition
    ((1, 128, 512, 263, 66), "split"),        # ... the pool is the tighter bound
    ((1, 128, 263, 4096, 66), "split"),       # ... the block table is
])
def test_seesaw_for_several_query_tiles_once_partitions_walk_four_pages(monkeypatch, call,
                                                                        expected):
    monkeypatch.delenv(SCHEDULE_VARIABLE, raising=False)
    assert hopper_schedule(*call) == expected


@pytest.mark.parametrize("forced", ["split", "seesaw"])
def test_environment_variable_forces_a_schedule_for_every_shape(monkeypatch, forced):
    monkeypatch.setenv(SCHEDULE_VARIABLE, forced)
    calls = [(b, rows, 512, 65536, 66) for b in (1, 128) for rows in (16, 256)]
    calls.append((1, 256, 1, 1, 132))
    assert {hopper_schedule(*call) for call in calls} == {forced}


def test_unknown_environment_value_warns_and_leaves_the_choice_to_the_shape(monkeypatch):
    monkeypatch.setenv(SCHEDULE_VARIABLE, "fastest")
    with pytest.warns(UserWarning, match="JAX_FLASHMLA_HOPPER_SCHEDULE"):
        assert hopper_schedule(128, 256, 128, 8192, 33) == "seesaw"
    with pytest.warns(UserWarning, match="'split' or 'seesaw'"):
        assert hopper_schedule(128, 64, 128, 8192, 132) == "split"
