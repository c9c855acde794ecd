from django.urls import path, re_path

from tasks.api import openapi, views

app_name = "api"

urlpatterns = [
    path("applications/<str:app_id>/generate", views.generate, name="generate"),
    path("tasks/<str:task_id>", views.task_detail, name="task"),
    path("tasks/<str:task_id>/cancel", views.task_cancel, name="task-cancel"),
    path("openapi.json", openapi.openapi_document, name="openapi"),
    # Anything else under /api/ answers the JSON error shape, never an HTML page.
    re_path(r"^(?P<rest>.*)$", views.not_found),
]
