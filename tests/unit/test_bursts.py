"""tasks.plumbing.bursts: inside a burst the collector is off and threads switch often; both
are put back after it (after an error too), counted across overlapping bursts, and a collector
that was off before stays off."""

from __future__ import annotations

import gc
import sys
import threading

import pytest

from tasks.plumbing import bursts


@pytest.fixture(autouse=True)
def settings_restored():
    interval = sys.getswitchinterval()
    gc.enable()
    yield
    gc.enable()
    sys.setswitchinterval(interval)


def test_inside_a_burst_and_after_it_even_after_an_error():
    before = sys.getswitchinterval()
    with bursts.burst():
        assert not gc.isenabled()
        assert sys.getswitchinterval() == pytest.approx(bursts.BURST_SWITCH_SECONDS)
    assert gc.isenabled() and sys.getswitchinterval() == before
    with pytest.raises(RuntimeError), bursts.burst():
        raise RuntimeError
    assert gc.isenabled() and sys.getswitchinterval() == before


def test_overlapping_bursts_end_with_the_last():
    entered, leave_first = threading.Event(), threading.Event()

    def first() -> None:
        with bursts.burst():
            entered.set()
            leave_first.wait(5)

    thread = threading.Thread(target=first)
    thread.start()
    entered.wait(5)
    with bursts.burst():
        leave_first.set()
        thread.join(5)
        assert not gc.isenabled()  # the first ended; this one still holds the burst
        assert sys.getswitchinterval() == pytest.approx(bursts.BURST_SWITCH_SECONDS)
    assert gc.isenabled()


def test_a_collector_off_before_stays_off():
    gc.disable()
    with bursts.burst():
        pass
    assert not gc.isenabled()


def test_during_makes_a_function_a_burst():
    @bursts.during
    def look() -> tuple[bool, float]:
        return gc.isenabled(), sys.getswitchinterval()

    assert look() == (False, pytest.approx(bursts.BURST_SWITCH_SECONDS))
    assert gc.isenabled()
