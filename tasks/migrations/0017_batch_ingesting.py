from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("tasks", "0016_destinations"),
    ]

    operations = [
        migrations.AddField(
            model_name="batch",
            name="ingesting",
            field=models.BooleanField(default=False),
        ),
        migrations.AddIndex(
            model_name="batch",
            index=models.Index(
                condition=models.Q(("ingesting", True)),
                fields=["created_at"],
                name="batch_ingesting_part_idx",
            ),
        ),
    ]
