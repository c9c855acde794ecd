"""The dashboard's batch pages (dashboard/ui/batches.py): the Batches list (filters, keyset
pages, the items' counts from one grouped query whatever the rows), one batch's page (header,
items by index, paged and filtered, 404), its actions as real bulk operations (retry the failed
items, cancel the batch: operators only, CSRF, audited), and the task page's link to its batch."""

from __future__ import annotations

import json
import re
import uuid
from datetime import timedelta
from html.parser import HTMLParser
from urllib.parse import urljoin

import pytest
from django.contrib.auth.models import User
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from tasks.models import AuditEntry, Batch, BulkOperation, Task
from tasks.statuses import FINISHED
from tasks.upkeep import bulk
from tests.conftest import Client, clean_redis

pytestmark = pytest.mark.django_db


@pytest.fixture
def app(make_app):
    return make_app("echo")


def every_fourth_fails(inputs, ctx):
    """A runner for batches with mixed results (the browser test's): item n % 4 == 3 fails."""
    if inputs["n"] % 4 == 3:
        raise ValueError(f"item {inputs['n']}: no answer from the model")
    return {"answer": inputs["n"] * 2}


def make_batch(app, statuses: list[str], *, age: float = 0, **fields) -> Batch:
    """A batch whose items have `statuses` in index order, its stored status in step."""
    now = timezone.now()
    running = any(status not in FINISHED for status in statuses)
    batch = Batch.objects.create(
        application=app.application, total=len(statuses), created_at=now - timedelta(seconds=age),
        status=Batch.Status.RUNNING if running else Batch.Status.FINISHED,
        finished_at=None if running else now, **fields,
    )  # fmt: skip
    Task.objects.bulk_create(
        Task(application=app.application, inputs={"n": index}, batch=batch, batch_index=index,
             status=status, error="boom" if status == "failed" else "",
             finished_at=now if status in FINISHED else None)
        for index, status in enumerate(statuses)
    )  # fmt: skip
    return batch


def htmx(client: Client, url: str, method: str = "get", **data):
    return getattr(client, method)(url, data, HTTP_HX_REQUEST="true")


def listed_batches(html: str) -> list[str]:
    return re.findall(r'<tr data-batch="([0-9a-f-]+)"', html)


def listed_indexes(html: str) -> list[int]:
    return [int(index) for index in re.findall(r'data-index="(\d+)"', html)]


def row_counts(html: str, batch: Batch) -> dict[str, int]:
    row = html.split(f'<tr data-batch="{batch.id}"', 1)[1].split("</tr>", 1)[0]
    return {name: int(n) for name, n in re.findall(r'data-count="(\w+)">(\d+)<', row)}


# --- the Batches page -----------------------------------------------------------------------------


def test_the_batches_page_lists_newest_first_and_filters(operator, make_app):
    one, two = make_app("echo"), make_app("echo")
    old = make_batch(one, ["succeeded", "failed"], age=30)
    middle = make_batch(two, ["pending", "running"], age=20)
    new = make_batch(one, ["cancelled"], age=10, cancel_requested=True)
    Batch.objects.filter(pk=new.pk).update(status="cancelled")
    html = operator.get("/batches/").content.decode()
    assert listed_batches(html) == [str(new.id), str(middle.id), str(old.id)]
    assert f'href="/batches/{old.id}/"' in html
    assert 'href="/batches/" aria-current="page">Batches</a>' in html  # the nav entry
    by_app = operator.get(f"/batches/?application={one.application.id}").content.decode()
    assert listed_batches(by_app) == [str(new.id), str(old.id)]
    for status, expected in (("running", [middle]), ("finished", [old]), ("cancelled", [new])):
        page = operator.get(f"/batches/?status={status}").content.decode()
        assert listed_batches(page) == [str(batch.id) for batch in expected], status
    both = operator.get(f"/batches/?application={one.application.id}&status=running")
    assert listed_batches(both.content.decode()) == []
    # A bad value is shown as a filter error and ignored, not a crash.
    assert listed_batches(operator.get("/batches/?status=nope").content.decode()) == listed_batches(
        html
    )
    partial = htmx(operator, "/batches/?status=running").content.decode()
    assert partial.startswith('<div id="batches"') and "<html" not in partial


def test_each_row_counts_its_items_and_shows_their_progress(operator, app):
    batch = make_batch(app, ["succeeded"] * 3 + ["failed"] * 2 + ["running", "pending"] * 2)
    html = operator.get("/batches/").content.decode()
    assert row_counts(html, batch) == {"pending": 2, "running": 2, "succeeded": 3, "failed": 2,
                                       "cancelled": 0}  # fmt: skip
    row = html.split(f'<tr data-batch="{batch.id}"', 1)[1].split("</tr>", 1)[0]
    assert '<progress max="9" value="5">55%</progress>' in row
    # A running batch on the page: the list refreshes itself; with none it does not poll.
    assert 'hx-trigger="every 10s' in html
    Batch.objects.filter(pk=batch.pk).update(status="finished")
    assert "hx-trigger=" not in htmx(operator, "/batches/").content.decode()


def test_the_counts_of_a_page_are_one_grouped_query_whatever_its_rows(operator, app):
    def queries() -> list[str]:
        with CaptureQueriesContext(connection) as captured:
            response = operator.get("/batches/")
        assert response.status_code == 200
        return [query["sql"] for query in captured.captured_queries]

    make_batch(app, ["succeeded", "failed", "pending"])
    few = queries()
    for n in range(12):
        make_batch(app, ["running", "failed", "succeeded"][: n % 3 + 1], age=n + 1)
    many = queries()
    assert len(listed_batches(operator.get("/batches/").content.decode())) == 13
    assert len(many) == len(few), many
    on_tasks = [sql for sql in many if '"tasks_task"' in sql]
    assert len(on_tasks) == 1 and "GROUP BY" in on_tasks[0], on_tasks


def test_the_batches_page_is_keyset_paged(operator, make_app):
    app, other = make_app("echo"), make_app("echo")
    ours = [make_batch(app, ["pending"], age=n) for n in range(55)]
    make_batch(other, ["pending"], age=0.5)
    first = operator.get(f"/batches/?application={app.application.id}").content.decode()
    assert listed_batches(first) == [str(batch.id) for batch in ours[:50]]
    link = re.search(r'id="next-page"', first) and re.search(r'href="(\?[^"]*cursor=[^"]+)"', first)
    assert link, first[-2000:]
    next_url = urljoin("/batches/", link.group(1).replace("&amp;", "&"))
    assert f"application={app.application.id}" in next_url  # the filter is kept
    second = operator.get(next_url).content.decode()
    assert listed_batches(second) == [str(batch.id) for batch in ours[50:]]
    assert 'id="next-page"' not in second and "« newest" in second


# --- one batch ---------------------------------------------------------------------------------


def test_the_batch_page_shows_the_batch_and_its_items_in_index_order(operator, app):
    statuses = ["succeeded", "failed", "pending", "running", "cancelled", "succeeded"]
    batch = make_batch(app, statuses, priority="high", callback_url="https://hooks.example/b",
                       metadata={"dept": "finance"})  # fmt: skip
    html = operator.get(f"/batches/{batch.id}/").content.decode()
    assert f"Batch <code>{batch.id}</code>" in html and "app-echo" in html
    assert "<dd>high</dd>" in html and "<code>https://hooks.example/b</code>" in html
    assert json.loads(html.split('<pre id="batch-metadata">')[1].split("</pre>")[0].replace(
        "&quot;", '"')) == {"dept": "finance"}  # fmt: skip
    assert '<progress max="6" value="4">66%</progress>' in html
    counts = html.split('id="batch-counts">')[1].split("</dd>")[0]
    assert re.findall(r'data-count="(\w+)">\w+ (\d+)<', counts) == [
        ("pending", "1"), ("running", "1"), ("succeeded", "2"), ("failed", "1"), ("cancelled", "1")
    ]  # fmt: skip
    assert listed_indexes(html) == list(range(6))
    items = list(Task.objects.filter(batch=batch).order_by("batch_index"))
    for item in items:
        # Items share their ids' first digits (time-ordered): the random end tells them apart.
        assert f'<a href="/tasks/{item.id}/"><code>…{str(item.id)[-8:]}</code></a>' in html
    failed = operator.get(f"/batches/{batch.id}/?status=failed").content.decode()
    assert listed_indexes(failed) == [1]
    assert 'data-status="failed" aria-current="page"' in failed
    partial = htmx(operator, f"/batches/{batch.id}/?status=failed").content.decode()
    assert partial.startswith('<section id="batch-live"') and listed_indexes(partial) == [1]
    assert 'hx-trigger="every 5s' in partial  # it still runs: the part refreshes itself


def test_a_batchs_items_are_keyset_paged_by_index(operator, app):
    statuses = ["failed" if index % 3 == 0 else "succeeded" for index in range(230)]
    batch = make_batch(app, statuses)
    seen: list[list[int]] = []
    url = f"/batches/{batch.id}/"
    while url:
        html = operator.get(url).content.decode()
        seen.append(listed_indexes(html))
        link = re.search(r'href="(\?[^"]*)"[^>]*id="next-page"', html)
        url = urljoin(f"/batches/{batch.id}/", link.group(1).replace("&amp;", "&")) if link else ""
    assert seen == [list(range(100)), list(range(100, 200)), list(range(200, 230))]
    failed = operator.get(f"/batches/{batch.id}/?status=failed").content.decode()
    assert listed_indexes(failed) == list(range(0, 230, 3))
    assert "hx-trigger=" not in failed  # every item finished: nothing polls
    after = operator.get(f"/batches/{batch.id}/?status=failed&after=150").content.decode()
    assert listed_indexes(after) == list(range(153, 230, 3))


def test_an_unknown_batch_is_404(operator):
    missing = uuid.uuid4()
    assert operator.get(f"/batches/{missing}/").status_code == 404
    for action in ("retry", "cancel"):
        assert operator.post(f"/batches/{missing}/{action}").status_code == 404
    assert operator.get("/batches/not-a-uuid/").status_code == 404
    assert BulkOperation.objects.count() == 0 and AuditEntry.objects.count() == 0


# --- actions -----------------------------------------------------------------------------------


def test_retry_failed_items_is_a_bulk_retry_of_the_batchs_failed_items(operator, app):
    batch = make_batch(app, ["failed", "succeeded", "failed", "cancelled", "failed"])
    other = make_batch(app, ["failed"])
    alone = Task.objects.create(application=app.application, inputs={}, status="failed")
    response = htmx(operator, f"/batches/{batch.id}/retry", "post", status="failed")
    html = response.content.decode()
    assert response.status_code == 200 and html.startswith('<section id="batch-live"')
    assert 'id="operations" hx-swap-oob="true"' in html and "3 failed item(s)" in html
    assert "Retry the failed items of batch" in html
    operation = BulkOperation.objects.get()
    assert operation.kind == "retry" and operation.status == "queued"
    assert (operation.filters["batch"], operation.filters["status"]) == (str(batch.id), "failed")
    entry = AuditEntry.objects.get(action="batch.retry")
    assert (entry.username, entry.target_type, entry.target_id) == ("operator", "batch",
                                                                    str(batch.id))  # fmt: skip
    assert entry.detail == {"operation": operation.pk, "failed": 3}
    done = bulk.run(operation_id=operation.pk)
    assert (done.status, done.processed, done.affected) == ("done", 3, 3)
    runs = dict(Task.objects.filter(batch=batch).values_list("batch_index", "run"))
    assert runs == {0: 2, 1: 1, 2: 2, 3: 1, 4: 2}  # the cancelled item is not retried
    assert set(Task.objects.filter(batch=batch, run=2).values_list("status", flat=True)) == {
        "pending"
    }
    assert Task.objects.get(batch=other).run == 1 and Task.objects.get(pk=alone.pk).run == 1
    # The batch runs again, and its page says so.
    page = operator.get(f"/batches/{batch.id}/").content.decode()
    assert '<span class="badge big running" id="batch-status">running</span>' in page
    progress = operator.get(f"/bulk/{operation.pk}/").content.decode()
    assert "Retry the failed items of batch" in progress and "3 done" in progress


def test_a_large_batchs_failed_items_are_retried_in_index_pages(operator, app):
    batch = make_batch(app, ["failed", "succeeded"] * 205)
    htmx(operator, f"/batches/{batch.id}/retry", "post")
    done = bulk.run(operation_id=BulkOperation.objects.get().pk)
    assert (done.processed, done.affected) == (205, 205)
    assert Task.objects.filter(batch=batch, run=2).count() == 205
    assert not Task.objects.filter(batch=batch, run=2, batch_index__in=range(1, 410, 2)).exists()


def test_nothing_to_retry_or_cancel_starts_nothing(operator, app):
    batch = make_batch(app, ["succeeded", "cancelled"])
    page = operator.get(f"/batches/{batch.id}/").content.decode()
    assert "Retry failed items" not in page and "Cancel batch" not in page
    retry = htmx(operator, f"/batches/{batch.id}/retry", "post").content.decode()
    assert "No item of this batch has failed." in retry
    cancel = htmx(operator, f"/batches/{batch.id}/cancel", "post").content.decode()
    assert "Every item of this batch has finished." in cancel
    assert BulkOperation.objects.count() == 0 and AuditEntry.objects.count() == 0


@pytest.fixture
def _clean(private_queues, transactional_db, settings):
    # The rows are committed: a session worker on the maintenance queue (another file's, in
    # this process) would run the operation before the test does.
    settings.MAINTENANCE_QUEUE = "maintenance-batches-test"
    clean_redis()
    yield
    clean_redis()


def test_cancel_batch_cancels_every_unfinished_item_in_the_background(operator, app, _clean):
    response = Client().post(
        f"/api/applications/{app.application.id}/batches",
        json.dumps({"items": [{"inputs": {"n": n}} for n in range(8)]}),
        content_type="application/json", HTTP_AUTHORIZATION=f"Bearer {app.api_key}",
    )  # fmt: skip
    batch = Batch.objects.get(pk=response.json()["batch_id"])
    items = Task.objects.filter(batch=batch)
    items.filter(batch_index=0).update(status="succeeded", finished_at=timezone.now())
    items.filter(batch_index=1).update(status="running", started_at=timezone.now())
    page = operator.get(f"/batches/{batch.id}/").content.decode()
    assert "Retry failed items" not in page and "Cancel batch</button>" in page
    # Without JavaScript: the form posts and the batch page follows.
    response = operator.post(f"/batches/{batch.id}/cancel")
    assert response.status_code == 302 and response["Location"] == f"/batches/{batch.id}/"
    operation = BulkOperation.objects.get()
    assert operation.kind == "cancel_batch" and operation.filters["batch"] == str(batch.id)
    entry = AuditEntry.objects.get(action="batch.cancel")
    assert entry.target_type == "batch" and entry.target_id == str(batch.id)
    assert entry.detail == {"operation": operation.pk, "unfinished": 7}
    assert items.filter(status="cancelled").count() == 0  # nothing before the job runs
    done = bulk.run(operation_id=operation.pk)
    assert (done.status, done.processed, done.affected) == ("done", 8, 7)
    assert dict(items.values_list("batch_index", "status")) == {0: "succeeded", **{
        index: "cancelled" for index in range(1, 8)}}  # fmt: skip
    page = operator.get(f"/batches/{batch.id}/").content.decode()
    assert '<span class="badge big cancelled" id="batch-status">cancelled</span>' in page
    assert "Cancel batch <a" in page and "7 done" in page  # the operation's progress
    audit = operator.get("/audit/?target_type=batch").content.decode()
    assert f'href="/batches/{batch.id}/"' in audit and "batch.cancel" in audit


def test_the_actions_need_the_operate_permission_and_csrf(viewer, app):
    batch = make_batch(app, ["failed", "pending"])
    for action in ("retry", "cancel"):
        assert viewer.post(f"/batches/{batch.id}/{action}").status_code == 403
    assert "Retry failed items" not in viewer.get(f"/batches/{batch.id}/").content.decode()
    user = User.objects.create_superuser("root", "root@example.com", "pw-root-123")
    strict = Client(enforce_csrf_checks=True)
    strict.force_login(user)
    for action in ("retry", "cancel"):
        assert strict.post(f"/batches/{batch.id}/{action}").status_code == 403
        assert strict.get(f"/batches/{batch.id}/{action}").status_code == 405
    assert BulkOperation.objects.count() == 0 and AuditEntry.objects.count() == 0


# --- the task page, links ----------------------------------------------------------------------


def test_an_items_task_page_links_its_batch(viewer, app):
    batch = make_batch(app, ["succeeded"] * 8)
    item = Task.objects.get(batch=batch, batch_index=7)
    html = viewer.get(f"/tasks/{item.id}/").content.decode()
    assert (f'<dd id="task-batch"><a href="/batches/{batch.id}/">Batch <code>{str(batch.id)[:8]}'
            "</code> · item 7</a></dd>") in html  # fmt: skip
    alone = Task.objects.create(application=app.application, inputs={})
    assert 'id="task-batch"' not in viewer.get(f"/tasks/{alone.id}/").content.decode()


class _HxGets(HTMLParser):
    def __init__(self):
        super().__init__()
        self.found: list[dict] = []

    def handle_starttag(self, tag, attrs):
        attributes = {name: value or "" for name, value in attrs}
        if "hx-get" in attributes:
            self.found.append({"tag": tag, **attributes})


def test_every_hx_get_has_its_href_and_answers_with_its_target(operator, app):
    batch = make_batch(app, ["failed", "pending"] * 60)
    for n in range(52):
        make_batch(app, ["running"], age=n + 1)
    checked = 0
    for url in ("/batches/", f"/batches/{batch.id}/", f"/batches/{batch.id}/?status=failed"):
        parser = _HxGets()
        parser.feed(operator.get(url).content.decode())
        for attrs in parser.found:
            target = urljoin(url, attrs["hx-get"])
            swapped = htmx(operator, target).content.decode()
            expected = attrs["id"] if attrs["tag"] in ("div", "section") else attrs["hx-target"][1:]
            assert re.match(rf'\s*<\w+ id="{expected}"', swapped), (url, attrs, swapped[:200])
            assert attrs["hx-swap"] == "outerHTML", attrs
            if attrs["tag"] == "a":
                assert attrs["href"] == attrs["hx-get"], attrs
            elif attrs["tag"] == "form":
                assert attrs["method"] == "get" and attrs["action"] == attrs["hx-get"], attrs
            checked += 1
    assert checked >= 12


@pytest.mark.django_db(transaction=True)
def test_the_batch_page_shows_its_batch_finished_delivery(operator, app, receiver, private_queues):
    from tasks.batches import completion
    from tasks.delivery import batch_callbacks

    clean_redis()
    batch = make_batch(app, ["succeeded", "failed"], callback_url=receiver.url)
    Batch.objects.filter(pk=batch.pk).update(status=Batch.Status.RUNNING, finished_at=None)
    assert completion.settle(batch_id=batch.pk)
    receiver.respond(503, body=b"busy")
    assert batch_callbacks.deliver(batch_id=batch.pk, completion=1, attempt=1) == "retrying"
    html = operator.get(f"/batches/{batch.id}/").content.decode()
    shown = html.split('id="batch-callback">')[1].split("</dd>")[0]
    assert '<span class="badge cb-pending">pending</span> · 1 attempt' in shown and "next" in shown
    assert re.findall(r'<td class="num">(1\.1)</td>.*?<td class="num">(\d+)</td>', shown) == [
        ("1.1", "503")
    ]
    assert 'hx-trigger="every 5s' in html  # still delivering: the part refreshes itself
    assert batch_callbacks.deliver(batch_id=batch.pk, completion=1, attempt=2) == "delivered"
    html = operator.get(f"/batches/{batch.id}/").content.decode()
    assert '<span class="badge cb-delivered">delivered</span> · 2 attempts' in html
    assert 'hx-trigger="every 5s' not in html
    clean_redis()
