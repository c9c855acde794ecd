from django.contrib.auth import views as auth_views
from django.urls import include, path

from . import health

urlpatterns = [
    path("api/", include("tasks.urls")),
    path("healthz", health.healthz, name="healthz"),
    path("readyz", health.readyz, name="readyz"),
    path("metrics", health.metrics, name="metrics"),
    path("accounts/login/", auth_views.LoginView.as_view(), name="login"),
    path("accounts/logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("django-rq/", include("django_rq.urls")),
    path("", include("dashboard.ui_urls")),
]
