"""tasks.api.blocking.wait_slot: the per-process and per-key caps on blocking submits."""

from __future__ import annotations

from contextlib import ExitStack

import pytest

from tasks.api import blocking


@pytest.fixture(autouse=True)
def caps(settings):
    assert blocking._waiting == 0 and not blocking._waiting_by_key  # nothing leaked in
    settings.BLOCKING_MAX_WAITS = 3
    settings.BLOCKING_MAX_WAITS_PER_KEY = 2
    yield
    assert blocking._waiting == 0 and not blocking._waiting_by_key  # nothing leaked out


def hold(stack: ExitStack, key_id: int) -> bool:
    return stack.enter_context(blocking.wait_slot(key_id=key_id))


def test_per_key_cap():
    with ExitStack() as stack:
        assert [hold(stack, 1) for _ in range(3)] == [True, True, False]
        assert blocking._waiting == 2 and blocking._waiting_by_key[1] == 2
        assert hold(stack, 2) is True  # another key still may


def test_per_process_cap():
    with ExitStack() as stack:
        assert [hold(stack, key) for key in (1, 2, 3, 4)] == [True, True, True, False]
        assert blocking._waiting == 3
    with ExitStack() as stack:
        assert hold(stack, 4) is True  # all released


def test_refused_requests_take_nothing():
    with ExitStack() as stack:
        hold(stack, 1), hold(stack, 1)
        for _ in range(5):
            with blocking.wait_slot(key_id=1) as granted:
                assert granted is False
        assert blocking._waiting == 2 and blocking._waiting_by_key[1] == 2


def test_slots_are_released_on_exception():
    for _ in range(5):
        with pytest.raises(RuntimeError), blocking.wait_slot(key_id=7) as granted:
            assert granted is True
            raise RuntimeError("the wait failed")
    assert blocking._waiting == 0 and 7 not in blocking._waiting_by_key


def test_release_frees_the_slot_for_the_next_request():
    with blocking.wait_slot(key_id=1) as first, blocking.wait_slot(key_id=1) as second:
        assert first and second
        with blocking.wait_slot(key_id=1) as third:
            assert not third
    with blocking.wait_slot(key_id=1) as again:
        assert again


def test_zero_caps_refuse_everything(settings):
    settings.BLOCKING_MAX_WAITS_PER_KEY = 0
    with blocking.wait_slot(key_id=1) as granted:
        assert granted is False
