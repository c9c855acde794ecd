from django.urls import path

from dashboard.ui import (
    audit_log,
    batches,
    control,
    destinations,
    endpoints,
    failures,
    history,
    views,
    work,
)  # fmt: skip

app_name = "dashboard"

urlpatterns = [
    path("", views.overview, name="home"),
    path("alerts/act", views.alert_action, name="alert-action"),
    path("tasks/", views.task_list, name="tasks"),
    path("tasks/retry", views.tasks_retry, name="tasks-retry"),
    path("tasks/<uuid:task_id>/", views.task_detail, name="task"),
    path("tasks/<uuid:task_id>/retry", views.task_retry, name="task-retry"),
    path("tasks/<uuid:task_id>/redeliver", views.task_redeliver, name="task-redeliver"),
    path("tasks/<uuid:task_id>/cancel", views.task_cancel, name="task-cancel"),
    path("batches/", batches.batch_list, name="batches"),
    path("batches/<uuid:batch_id>/", batches.batch_detail, name="batch"),
    path("batches/<uuid:batch_id>/retry", batches.batch_retry, name="batch-retry"),
    path("batches/<uuid:batch_id>/cancel", batches.batch_cancel, name="batch-cancel"),
    path("work/", work.work_page, name="work"),
    path("work/act", work.work_act, name="work-act"),
    path("callbacks/failed/", views.failed_callbacks, name="failed-callbacks"),
    path("callbacks/redeliver", views.callbacks_redeliver, name="callbacks-redeliver"),
    path("bulk/<int:operation_id>/", views.bulk_progress, name="bulk"),
    path("endpoints/", endpoints.endpoint_list, name="endpoints"),
    path("endpoints/recover", endpoints.endpoints_recover, name="endpoints-recover"),
    path("endpoints/<int:endpoint_id>/", endpoints.endpoint_detail, name="endpoint"),
    path(
        "endpoints/<int:endpoint_id>/re-enable",
        endpoints.endpoint_reenable,
        name="endpoint-reenable",
    ),
    path("destinations/", destinations.destination_list, name="destinations"),
    path("destinations/recover", destinations.destinations_recover, name="destinations-recover"),
    path(
        "destinations/<int:destination_id>/",
        destinations.destination_detail,
        name="destination",
    ),
    path(
        "destinations/<int:destination_id>/re-enable",
        destinations.destination_reenable,
        name="destination-reenable",
    ),
    path("failures/", failures.failure_list, name="failures"),
    path("failures/act", failures.failures_act, name="failures-act"),
    path("applications/", views.application_list, name="applications"),
    path("applications/<uuid:app_id>/", views.application_detail, name="application"),
    path(
        "applications/<uuid:app_id>/rotate-<str:what>",
        views.application_rotate,
        name="application-rotate",
    ),
    path(
        "applications/<uuid:app_id>/keys/<int:key_id>/revoke",
        views.api_key_revoke,
        name="api-key-revoke",
    ),
    path(
        "applications/<uuid:app_id>/cleanup", views.application_cleanup, name="application-cleanup"
    ),
    path("workers/", control.workers_page, name="workers"),
    path("workers/stop", control.worker_stop, name="worker-stop"),
    path("queues/pause", control.queue_pause, name="queue-pause"),
    path("audit/", audit_log.audit_log, name="audit"),
    path("history/", history.history, name="history"),
    path("time-zone/", views.time_zone, name="time-zone"),
    # Browsers ask for it on every page whatever the page links; answer instead of a 404 each.
    path("favicon.ico", views.favicon, name="favicon"),
]
