from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path
from django.utils.csp import CSP
from django.views.decorators.csp import csp_override
from django_rq import urls as rq_urls

from . import health

# django-rq's templates use inline scripts and styles: they get a policy that allows those,
# every other page keeps the strict SECURE_CSP.
RQ_PAGES_CSP = {
    "default-src": [CSP.SELF],
    "script-src": [CSP.SELF, CSP.UNSAFE_INLINE],
    "style-src": [CSP.SELF, CSP.UNSAFE_INLINE],
    "img-src": [CSP.SELF, "data:"],
    "frame-ancestors": [CSP.NONE],
}
for pattern in rq_urls.urlpatterns:
    pattern.callback = csp_override(RQ_PAGES_CSP)(pattern.callback)

urlpatterns = [
    path("api/", include("tasks.urls")),
    path("healthz", health.healthz, name="healthz"),
    path("readyz", health.readyz, name="readyz"),
    path("metrics", health.metrics, name="metrics"),
    path("accounts/login/", auth_views.LoginView.as_view(), name="login"),
    path("accounts/logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("django-rq/", include("django_rq.urls")),
    path("admin/", admin.site.urls),
    path("", include("dashboard.ui_urls")),
]
