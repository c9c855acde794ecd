import django.core.validators
import django.db.models.deletion
import django.utils.timezone
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("tasks", "0014_signing_keys"),
    ]

    operations = [
        migrations.AddField(
            model_name="application",
            name="circuit_failures",
            field=models.PositiveIntegerField(
                default=20,
                validators=[
                    django.core.validators.MinValueValidator(1),
                    django.core.validators.MaxValueValidator(10000),
                ],
            ),
        ),
        migrations.AddField(
            model_name="application",
            name="disable_after_hours",
            field=models.PositiveIntegerField(
                default=120,
                validators=[
                    django.core.validators.MinValueValidator(1),
                    django.core.validators.MaxValueValidator(8760),
                ],
            ),
        ),
        migrations.AlterField(
            model_name="bulkoperation",
            name="kind",
            field=models.CharField(
                choices=[
                    ("retry", "Retry"),
                    ("redeliver", "Redeliver"),
                    ("run_now", "Run Now"),
                    ("deliver_now", "Deliver Now"),
                    ("discard", "Discard"),
                    ("delete", "Delete"),
                    ("cancel_batch", "Cancel batch"),
                    ("recover", "Recover"),
                ],
                max_length=16,
            ),
        ),
        migrations.CreateModel(
            name="Endpoint",
            fields=[
                (
                    "id",
                    models.BigAutoField(
                        auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                    ),
                ),
                ("origin", models.CharField(max_length=300)),
                ("consecutive_failures", models.PositiveIntegerField(default=0)),
                ("last_success_at", models.DateTimeField(blank=True, null=True)),
                ("last_failure_at", models.DateTimeField(blank=True, null=True)),
                ("failing_since", models.DateTimeField(blank=True, null=True)),
                (
                    "circuit",
                    models.CharField(
                        choices=[
                            ("closed", "Closed"),
                            ("open", "Open"),
                            ("half_open", "Half-open"),
                        ],
                        default="closed",
                        max_length=9,
                    ),
                ),
                ("circuit_changed_at", models.DateTimeField(blank=True, null=True)),
                ("next_probe_at", models.DateTimeField(blank=True, null=True)),
                ("probe_interval_seconds", models.PositiveIntegerField(default=0)),
                ("disabled_at", models.DateTimeField(blank=True, null=True)),
                ("created_at", models.DateTimeField(default=django.utils.timezone.now)),
                (
                    "application",
                    models.ForeignKey(
                        on_delete=django.db.models.deletion.CASCADE,
                        related_name="+",
                        to="tasks.application",
                    ),
                ),
            ],
            options={
                "ordering": ["application", "origin"],
                "indexes": [
                    models.Index(
                        condition=models.Q(("failing_since__isnull", False)),
                        fields=["failing_since"],
                        name="endpoint_failing_part_idx",
                    )
                ],
                "constraints": [
                    models.UniqueConstraint(
                        fields=("application", "origin"), name="endpoint_unique"
                    )
                ],
            },
        ),
        migrations.AddField(
            model_name="callbackattempt",
            name="endpoint",
            field=models.ForeignKey(
                blank=True,
                db_index=False,
                null=True,
                on_delete=django.db.models.deletion.SET_NULL,
                related_name="attempts",
                to="tasks.endpoint",
            ),
        ),
        migrations.AddIndex(
            model_name="callbackattempt",
            index=models.Index(fields=["endpoint", "-started_at"], name="endpoint_attempt_idx"),
        ),
    ]
