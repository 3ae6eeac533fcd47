"""Which of the Hopper kernel's two schedules a decode call gets: a host-side rule in the compiled
extension (csrc/hopper/launch.cu), so it is testable without a GPU."""

import pytest

import jax_flashmla
from jax_flashmla._extension import SCHEDULE_VARIABLE, hopper_schedule

pytestmark = pytest.mark.skipif(not jax_flashmla.hopper_kernel_available(),
                                reason="built without the Hopper kernel")


@pytest.mark.parametrize("batch, rows_per_kv, expected", [
    (128, 16, "split"), (128, 64, "split"), (128, 65, "seesaw"), (128, 256, "seesaw"),
    (8, 256, "split"), (9, 256, "seesaw"), (1, 128, "split")])
def test_seesaw_only_for_several_query_tiles_and_more_than_eight_sequences(
        monkeypatch, batch, rows_per_kv, expected):
    monkeypatch.delenv(SCHEDULE_VARIABLE, raising=False)
    assert hopper_schedule(batch, rows_per_kv) == expected


@pytest.mark.parametrize("forced", ["split", "seesaw"])
def test_environment_variable_forces_a_schedule_for_every_shape(monkeypatch, forced):
    monkeypatch.setenv(SCHEDULE_VARIABLE, forced)
    assert {hopper_schedule(b, rows) for b in (1, 128) for rows in (16, 256)} == {forced}


def test_unknown_environment_value_warns_and_leaves_the_choice_to_the_shape(monkeypatch):
    monkeypatch.setenv(SCHEDULE_VARIABLE, "fastest")
    with pytest.warns(UserWarning, match="JAX_FLASHMLA_HOPPER_SCHEDULE"):
        assert hopper_schedule(128, 256) == "seesaw"
    with pytest.warns(UserWarning, match="'split' or 'seesaw'"):
        assert hopper_schedule(128, 64) == "split"
