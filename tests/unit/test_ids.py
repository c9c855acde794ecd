"""Time-ordered task ids (tasks.plumbing.ids)."""

from __future__ import annotations

import time
import uuid

from tasks.plumbing.ids import uuid7, uuid7_many


def test_a_uuid7_is_a_version_7_rfc_uuid_carrying_its_millisecond():
    before = time.time_ns() // 1_000_000
    value = uuid7()
    after = time.time_ns() // 1_000_000
    assert value.version == 7 and value.variant == uuid.RFC_4122
    assert before <= value.int >> 80 <= after


def test_ids_of_later_milliseconds_sort_after_earlier_ones():
    earlier = uuid7_many(50, now_ms=1_700_000_000_000)
    later = uuid7_many(50, now_ms=1_700_000_000_001)
    assert max(earlier) < min(later)
    assert str(max(earlier)) < str(min(later))  # as text too (SQLite stores the hex)


def test_ids_of_one_millisecond_are_distinct_and_random_past_the_time():
    ids = uuid7_many(10_000, now_ms=1_700_000_000_000)
    assert len(set(ids)) == 10_000
    assert all(i.version == 7 and i.variant == uuid.RFC_4122 for i in ids)
    # 74 random bits: the low 62 differ between any two of them almost surely.
    assert len({i.int & ((1 << 62) - 1) for i in ids}) == 10_000
    assert len({(i.int >> 64) & 0xFFF for i in ids}) > 3_000  # rand_a is random too
