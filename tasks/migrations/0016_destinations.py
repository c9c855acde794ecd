import django.db.models.deletion
import django.utils.timezone
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("tasks", "0015_endpoints"),
    ]

    operations = [
        migrations.CreateModel(
            name="Destination",
            fields=[
                (
                    "id",
                    models.BigAutoField(
                        auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                    ),
                ),
                (
                    "kind",
                    models.CharField(
                        choices=[
                            ("redis", "Redis Stream"),
                            ("amqp", "RabbitMQ"),
                            ("nats", "NATS JetStream"),
                        ],
                        max_length=8,
                    ),
                ),
                ("url", models.CharField(max_length=2048)),
                ("enabled", models.BooleanField(default=True)),
                ("created_at", models.DateTimeField(default=django.utils.timezone.now)),
                ("consecutive_failures", models.PositiveIntegerField(default=0)),
                ("last_success_at", models.DateTimeField(blank=True, null=True)),
                ("last_failure_at", models.DateTimeField(blank=True, null=True)),
                (
                    "application",
                    models.ForeignKey(
                        on_delete=django.db.models.deletion.CASCADE,
                        related_name="destinations",
                        to="tasks.application",
                    ),
                ),
            ],
            options={
                "ordering": ["application", "id"],
            },
        ),
        migrations.CreateModel(
            name="DestinationAttempt",
            fields=[
                (
                    "id",
                    models.BigAutoField(
                        auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                    ),
                ),
                ("run", models.PositiveIntegerField()),
                ("number", models.PositiveIntegerField()),
                (
                    "trigger",
                    models.CharField(
                        choices=[("auto", "Auto"), ("manual", "Manual")], max_length=8
                    ),
                ),
                ("started_at", models.DateTimeField()),
                ("delivered", models.BooleanField(default=False)),
                ("error", models.TextField(blank=True, default="")),
                ("duration_ms", models.PositiveIntegerField(default=0)),
                ("next_attempt_at", models.DateTimeField(blank=True, null=True)),
                (
                    "batch",
                    models.ForeignKey(
                        blank=True,
                        null=True,
                        on_delete=django.db.models.deletion.CASCADE,
                        related_name="destination_attempts",
                        to="tasks.batch",
                    ),
                ),
                (
                    "destination",
                    models.ForeignKey(
                        on_delete=django.db.models.deletion.CASCADE,
                        related_name="attempts",
                        to="tasks.destination",
                    ),
                ),
                (
                    "task",
                    models.ForeignKey(
                        blank=True,
                        null=True,
                        on_delete=django.db.models.deletion.CASCADE,
                        related_name="destination_attempts",
                        to="tasks.task",
                    ),
                ),
            ],
            options={
                "ordering": ["destination", "started_at", "id"],
                "indexes": [
                    models.Index(fields=["task", "run"], name="dest_attempt_task_idx"),
                    models.Index(fields=["next_attempt_at"], name="dest_attempt_next_idx"),
                ],
            },
        ),
    ]
