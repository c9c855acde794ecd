from django.db import migrations, models


class Migration(migrations.Migration):
    """The runner's help text names the openai and dify runners (no database change)."""

    dependencies = [
        ("tasks", "0018_destination_health"),
    ]

    operations = [
        migrations.AlterField(
            model_name="application",
            name="runner",
            field=models.CharField(
                help_text="echo, sleep, fail, http, openai, dify, or a dotted path to "
                "run(inputs, ctx)",
                max_length=255,
            ),
        ),
    ]
