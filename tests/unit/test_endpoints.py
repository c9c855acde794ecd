"""tasks.delivery.endpoints: per-endpoint slots and the parked queue, against the real Redis.
Expiry is tested by writing scores in the past, never by sleeping."""

from __future__ import annotations

import time
import uuid

import pytest
import redis

from tasks.delivery import endpoints
from tasks.plumbing.queueing import redis_client


@pytest.fixture
def app_id():
    """A fresh application id; its endpoints' keys are removed afterwards."""
    value = str(uuid.uuid4())
    yield value
    client = redis_client()
    for key in client.scan_iter(f"taskhook:endpoint:{value}|*"):
        client.delete(key)  # slots, waiting line and circuit
    for member in client.smembers(endpoints.WAITING_INDEX_KEY):
        if member.decode().startswith(f"{value}|"):
            client.srem(endpoints.WAITING_INDEX_KEY, member)


def parked(n: int) -> endpoints.ParkedDelivery:
    return endpoints.ParkedDelivery(f"task-{n}", 1, "auto", n, f"cb-task-{n}-1-a{n}")


def slots(endpoint: str) -> dict[str, float]:
    key = endpoints.SLOTS_KEY.format(endpoint=endpoint)
    return {m.decode(): s for m, s in redis_client().zrange(key, 0, -1, withscores=True)}


@pytest.mark.parametrize(
    ("url", "origin"),
    [
        ("https://Hooks.Example.com/a?b=1", "https://hooks.example.com:443"),
        ("http://hooks.example.com/other/path", "http://hooks.example.com:80"),
        ("http://hooks.example.com:8080/x", "http://hooks.example.com:8080"),
        ("http://[::1]:9000/hook", "http://::1:9000"),
        ("http://u@hooks.example.com/", "invalid"),
        ("ftp://hooks.example.com/", "invalid"),
        ("", "invalid"),
    ],
)
def test_endpoint_of(url, origin):
    app = uuid.UUID("12345678-1234-5678-1234-567812345678")
    assert endpoints.endpoint_of(application_id=app, callback_url=url) == f"{app}|{origin}"


def test_same_origin_shares_an_endpoint_other_apps_do_not():
    a, b = uuid.uuid4(), uuid.uuid4()
    one = endpoints.endpoint_of(application_id=a, callback_url="https://h.example/x")
    two = endpoints.endpoint_of(application_id=a, callback_url="https://h.example:443/y?z")
    assert one == two
    assert one != endpoints.endpoint_of(application_id=b, callback_url="https://h.example/x")


def test_parked_delivery_round_trip():
    delivery = endpoints.ParkedDelivery("t", 3, "manual", None, "cb-t-3-mabc")
    assert delivery.encode() == '["t",3,"manual",null,"cb-t-3-mabc"]'
    assert endpoints.ParkedDelivery.decode(delivery.encode().encode()) == delivery


def test_acquire_park_release_in_order_with_dedupe(app_id):
    endpoint = f"{app_id}|https://h.example:443"
    take = {"endpoint": endpoint, "cap": 2, "hold_seconds": 10}
    assert endpoints.acquire_or_park(job_id="j1", parked=parked(1), **take)
    assert endpoints.acquire_or_park(job_id="j2", parked=parked(2), **take)
    assert set(slots(endpoint)) == {"j1", "j2"}
    before = time.time()
    assert all(before + 10 < score <= before + 10 + endpoints.SLOT_MARGIN_SECONDS + 1
               for score in slots(endpoint).values())  # fmt: skip
    assert not endpoints.acquire_or_park(job_id="j3", parked=parked(3), **take)
    assert not endpoints.acquire_or_park(job_id="j4", parked=parked(4), **take)
    # The same delivery parking again keeps its first place (ZADD NX), not a new one.
    assert not endpoints.acquire_or_park(job_id="j3-again", parked=parked(3), **take)
    # A job that already holds a slot keeps it even at the cap (a retried job).
    assert endpoints.acquire_or_park(job_id="j1", parked=parked(1), **take)
    assert set(slots(endpoint)) == {"j1", "j2"}
    assert endpoints.is_parked(endpoint=endpoint, parked=parked(3))
    assert not endpoints.is_parked(endpoint=endpoint, parked=parked(1))
    assert endpoints.waiting_count(application_id=app_id) == 2
    assert endpoint in endpoints.endpoints_with_waiting()

    assert endpoints.release(endpoint=endpoint, cap=2, job_id="j1") == [parked(3)]
    assert endpoints.release(endpoint=endpoint, cap=2, job_id="j2") == [parked(4)]
    assert endpoints.waiting_count(application_id=app_id) == 0
    assert endpoint not in endpoints.endpoints_with_waiting()  # index cleaned up
    assert endpoints.release(endpoint=endpoint, cap=2, job_id="nobody") == []


def test_release_promotes_as_many_as_fit(app_id):
    endpoint = f"{app_id}|http://h.example:80"
    take = {"endpoint": endpoint, "cap": 1, "hold_seconds": 10}
    assert endpoints.acquire_or_park(job_id="j0", parked=parked(0), **take)
    for n in (1, 2, 3):
        assert not endpoints.acquire_or_park(job_id=f"j{n}", parked=parked(n), **take)
    # The cap was raised to 3: releasing j0 frees 3 places, the oldest two... all three fit.
    assert endpoints.release(endpoint=endpoint, cap=3, job_id="j0") == [parked(1), parked(2),
                                                                          parked(3)]  # fmt: skip
    assert endpoints.waiting_count(application_id=app_id) == 0


def test_expired_slots_are_freed_on_acquire(app_id):
    endpoint = f"{app_id}|http://h.example:80"
    key = endpoints.SLOTS_KEY.format(endpoint=endpoint)
    redis_client().zadd(key, {"dead-1": time.time() - 1, "dead-2": time.time() - 100})
    take = {"endpoint": endpoint, "cap": 2, "hold_seconds": 10}
    assert endpoints.acquire_or_park(job_id="j1", parked=parked(1), **take)
    assert endpoints.acquire_or_park(job_id="j2", parked=parked(2), **take)
    assert set(slots(endpoint)) == {"j1", "j2"}


def test_a_live_slot_is_kept_and_an_expired_one_promotes_on_release(app_id):
    endpoint = f"{app_id}|http://h.example:80"
    key = endpoints.SLOTS_KEY.format(endpoint=endpoint)
    redis_client().zadd(key, {"live": time.time() + 60})
    take = {"endpoint": endpoint, "cap": 1, "hold_seconds": 10}
    assert not endpoints.acquire_or_park(job_id="j1", parked=parked(1), **take)
    assert endpoints.release(endpoint=endpoint, cap=1) == []  # still held
    redis_client().zadd(key, {"live": time.time() - 1})  # its worker died long ago
    assert endpoints.release(endpoint=endpoint, cap=1) == [parked(1)]  # reconciler's call
    assert slots(endpoint) == {}


def test_waiting_count_is_per_application(app_id):
    other = str(uuid.uuid4())
    try:
        for app, origin, n in [(app_id, "http://a:80", 1), (app_id, "http://b:80", 2),
                               (other, "http://a:80", 3)]:  # fmt: skip
            endpoint = f"{app}|{origin}"
            take = {"endpoint": endpoint, "cap": 1, "hold_seconds": 10}
            endpoints.acquire_or_park(job_id=f"holder-{n}", parked=parked(100 + n), **take)
            assert not endpoints.acquire_or_park(job_id=f"j{n}", parked=parked(n), **take)
        assert not endpoints.acquire_or_park(
            endpoint=f"{app_id}|http://b:80", cap=1, job_id="j4", parked=parked(4), hold_seconds=10
        )
        assert endpoints.waiting_count(application_id=app_id) == 3
        assert endpoints.waiting_count(application_id=other) == 1
        assert endpoints.waiting_count(application_id=uuid.uuid4()) == 0
    finally:
        client = redis_client()
        for key in client.scan_iter(f"taskhook:endpoint:{other}|*"):
            client.delete(key)
        client.srem(endpoints.WAITING_INDEX_KEY, f"{other}|http://a:80")


def test_no_cap_takes_every_delivery_but_an_open_circuit_still_parks(app_id):
    endpoint = f"{app_id}|https://h.example:443"
    take = {"endpoint": endpoint, "cap": 0, "hold_seconds": 10}
    for n in range(20):
        taken = endpoints.acquire_or_park(job_id=f"j{n}", parked=parked(n), **take)
        assert taken == endpoints.TAKEN
    endpoints.set_circuit(endpoint=endpoint, circuit="open")
    assert endpoints.acquire_or_park(job_id="j99", parked=parked(99), **take) == endpoints.PARKED
    assert endpoints.release(endpoint=endpoint, cap=0, job_id="j0") == []  # none while open
    endpoints.set_circuit(endpoint=endpoint, circuit=None)
    assert endpoints.release(endpoint=endpoint, cap=0, job_id="j1") == [parked(99)]


def test_half_open_lets_one_probe_through_and_disabled_refuses(app_id):
    endpoint = f"{app_id}|https://h.example:443"
    take = {"endpoint": endpoint, "cap": 4, "hold_seconds": 10}
    endpoints.set_circuit(endpoint=endpoint, circuit="open")
    assert endpoints.acquire_or_park(job_id="j1", parked=parked(1), **take) == endpoints.PARKED
    assert endpoints.oldest_parked(endpoint=endpoint) == parked(1)
    endpoints.set_circuit(endpoint=endpoint, circuit="half")
    assert endpoints.acquire_or_park(job_id="j1-p1", parked=parked(1), **take) == endpoints.TAKEN
    assert endpoints.circuit_of(endpoint=endpoint) == "probe:j1-p1"
    assert not endpoints.is_parked(endpoint=endpoint, parked=parked(1))  # the probe left the line
    assert endpoints.acquire_or_park(job_id="j2", parked=parked(2), **take) == endpoints.PARKED
    endpoints.set_circuit(endpoint=endpoint, circuit="open", only_if_missing=True)
    assert endpoints.circuit_of(endpoint=endpoint) == "probe:j1-p1"  # a probe's claim stays
    endpoints.set_circuit(endpoint=endpoint, circuit="disabled")
    assert endpoints.acquire_or_park(job_id="j3", parked=parked(3), **take) == endpoints.REFUSED
    assert endpoints.release(endpoint=endpoint, cap=4, job_id="j1-p1") == [parked(2)]


def test_redis_down_lets_deliveries_through(monkeypatch):
    class Down:
        def __getattr__(self, name):
            def fail(*args, **kwargs):
                raise redis.ConnectionError("down")

            return fail

    monkeypatch.setattr(endpoints, "redis_client", Down)
    assert endpoints.acquire_or_park(endpoint="x|y", cap=1, job_id="j", hold_seconds=1,
                                     parked=parked(1))  # fmt: skip
    assert endpoints.release(endpoint="x|y", cap=1, job_id="j") == []
    assert endpoints.endpoints_with_waiting() == []
    assert endpoints.is_parked(endpoint="x|y", parked=parked(1)) is False
