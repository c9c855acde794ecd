from django.core.management.base import BaseCommand

from tasks.upkeep.reconciler import reconcile


class Command(BaseCommand):
    help = (
        "Run the reconciler once: re-enqueue orphaned tasks, recover lost ones, "
        "reschedule callbacks."
    )

    def handle(self, *args, **options):
        report = reconcile()
        if report.skipped:
            self.stdout.write("another reconcile pass is running; skipped.")
            return
        self.stdout.write(
            f"requeued {len(report.requeued)}, failed lost {len(report.lost)}, "
            f"re-run {len(report.rerun)}, callbacks rescheduled {len(report.callbacks_rescheduled)}"
        )
