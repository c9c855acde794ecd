"""Synthetic load: N finished/failed/pending tasks with callback attempts, by bulk insert.

    python manage.py seed_tasks 1000000 --days 30 --apps 5

For measuring the dashboard at scale (see bench/dashboard.py); never run it on production data.
"""

from __future__ import annotations

import random
import time
import uuid
from datetime import timedelta

from django.core.management.base import BaseCommand, CommandError
from django.db import connection, transaction
from django.utils import timezone

from tasks import audit
from tasks.applications import create_application
from tasks.models import Application, CallbackAttempt, Task

STATUSES = [("succeeded", 0.86), ("failed", 0.1), ("cancelled", 0.02), ("pending", 0.01),
            ("running", 0.01)]  # fmt: skip


class Command(BaseCommand):
    help = "Bulk-insert N synthetic tasks (with callback attempts) for load testing."

    def add_arguments(self, parser):
        parser.add_argument("count", type=int)
        parser.add_argument("--apps", type=int, default=5, help="spread over this many apps")
        parser.add_argument("--days", type=float, default=30, help="created over the last N days")
        parser.add_argument("--batch", type=int, default=5000)
        parser.add_argument("--seed", type=int, default=7)

    def handle(self, *args, **options):
        count, batch = options["count"], options["batch"]
        if count < 1 or batch < 1:
            raise CommandError("count and --batch must be positive")
        rng = random.Random(options["seed"])
        apps = list(Application.objects.filter(name__startswith="seed-")[: options["apps"]])
        while len(apps) < options["apps"]:
            apps.append(create_application(name=f"seed-{len(apps) + 1}", runner="echo").application)
        now = timezone.now()
        span = options["days"] * 86400
        statuses, weights = zip(*STATUSES, strict=True)
        started = time.monotonic()
        made = 0
        while made < count:
            size = min(batch, count - made)
            tasks, attempts = [], []
            for _ in range(size):
                created = now - timedelta(seconds=rng.random() * span)
                status = rng.choices(statuses, weights)[0]
                finished = status in ("succeeded", "failed", "cancelled")
                has_callback = rng.random() < 0.5 and status in ("succeeded", "failed")
                callback_status = "none"
                if has_callback:
                    callback_status = "failed" if rng.random() < 0.05 else "delivered"
                task = Task(
                    id=uuid.uuid4(),
                    application=rng.choice(apps),
                    status=status,
                    inputs={"query": f"question {made}", "n": made},
                    output={"answer": "synthetic"} if status == "succeeded" else None,
                    error="upstream answered HTTP 500" if status == "failed" else "",
                    user=f"customer_{rng.randrange(50_000):05d}",
                    created_at=created,
                    started_at=created + timedelta(seconds=1) if status != "pending" else None,
                    finished_at=created + timedelta(seconds=3) if finished else None,
                    progress=100 if finished else 0,
                    callback_url="https://client.example/hook" if has_callback else "",
                    callback_status=callback_status,
                    callback_attempts=1 if has_callback else 0,
                    callback_last_status_code=(500 if callback_status == "failed" else 200)
                    if has_callback
                    else None,
                )
                tasks.append(task)
                if has_callback:
                    attempts.append(
                        CallbackAttempt(
                            task_id=task.id, run=1, number=1, trigger="auto",
                            started_at=created + timedelta(seconds=4), url=task.callback_url,
                            status_code=task.callback_last_status_code, duration_ms=42,
                            delivered=callback_status == "delivered",
                        )
                    )  # fmt: skip
                made += 1
            with transaction.atomic():
                Task.objects.bulk_create(tasks, batch_size=batch)
                CallbackAttempt.objects.bulk_create(attempts, batch_size=batch)
            if made % (batch * 20) == 0 or made == count:
                rate = made / (time.monotonic() - started)
                self.stdout.write(f"{made} tasks ({rate:.0f}/s)")
        # Planner statistics for what was just loaded: until autovacuum gets to it, PostgreSQL
        # would plan against the old row counts (a sequential scan over the attempts for the
        # last hour instead of the index) and a benchmark would measure the wrong plan.
        with connection.cursor() as cursor:
            for model in (Task, CallbackAttempt):
                cursor.execute(f"ANALYZE {connection.ops.quote_name(model._meta.db_table)}")
        names = [app.name for app in apps]
        audit.record_command(command="seed_tasks", action="seed.tasks", target_type="seed",
                             detail={"tasks": count, "applications": names})  # fmt: skip
        self.stdout.write(f"seeded {count} tasks over {len(apps)} applications")
