from django.urls import path, re_path

from . import api, openapi

app_name = "api"

urlpatterns = [
    path("applications/<str:app_id>/generate", api.generate, name="generate"),
    path("tasks/<str:task_id>", api.task_detail, name="task"),
    path("tasks/<str:task_id>/cancel", api.task_cancel, name="task-cancel"),
    path("openapi.json", openapi.openapi_document, name="openapi"),
    # Anything else under /api/ answers the JSON error shape, never an HTML page.
    re_path(r"^(?P<rest>.*)$", api.not_found),
]
