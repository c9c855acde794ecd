from django.core.management.base import BaseCommand

from tasks import audit
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
        if report.corrections or report.promoted:  # audited only when it changed something
            audit.record_command(command="reconcile", action="reconcile.corrections",
                                 target_type="reconciler",
                                 detail={"requeued": len(report.requeued),
                                         "lost": len(report.lost), "rerun": len(report.rerun),
                                         "callbacks_rescheduled":
                                             len(report.callbacks_rescheduled),
                                         "promoted": report.promoted})  # fmt: skip
        self.stdout.write(
            f"requeued {len(report.requeued)}, failed lost {len(report.lost)}, "
            f"re-run {len(report.rerun)}, callbacks rescheduled {len(report.callbacks_rescheduled)}"
        )
