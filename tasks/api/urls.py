from django.urls import path, re_path

from tasks.api import openapi, views

app_name = "api"

urlpatterns = [
    path("applications/<str:app_id>/generate", views.generate, name="generate"),
    path("tasks/<str:task_id>", views.task_detail, name="task"),
    path("tasks/<str:task_id>/cancel", views.task_cancel, name="task-cancel"),
    # Served by the ASGI event stream (tasks.api.events, routed in dashboard.runtime.asgi);
    # this entry names the URL, and answers a WSGI-only server with a clear error.
    path("tasks/<str:task_id>/events", views.events_need_asgi, name="task-events"),
    path("applications/<str:app_id>/batches", views.batch_submit, name="batches"),
    path("batches/<str:batch_id>", views.batch_detail, name="batch"),
    path("batches/<str:batch_id>/results", views.batch_results, name="batch-results"),
    path("batches/<str:batch_id>/cancel", views.batch_cancel, name="batch-cancel"),
    path("batches/<str:batch_id>/events", views.events_need_asgi, name="batch-events"),
    path("openapi.json", openapi.openapi_document, name="openapi"),
    # Anything else under /api/ answers the JSON error shape, never an HTML page.
    re_path(r"^(?P<rest>.*)$", views.not_found),
]
