from functools import wraps

from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.core.exceptions import ImproperlyConfigured, PermissionDenied
from django.urls import include, path
from django.utils.csp import CSP
from django.views.decorators.csp import csp_override
from django_rq import urls as rq_urls

from dashboard.runtime import health
from dashboard.ui.access import is_operator
from tasks.api import jwks

# django-rq's templates use inline scripts and styles: they get a policy that allows those,
# every other page keeps the strict SECURE_CSP.
RQ_PAGES_CSP: dict[str, list[str]] = {
    "default-src": [CSP.SELF],
    "script-src": [CSP.SELF, CSP.UNSAFE_INLINE],
    "style-src": [CSP.SELF, CSP.UNSAFE_INLINE],
    "img-src": [CSP.SELF, "data:"],
    "frame-ancestors": [CSP.NONE],
}
# django-rq's own check is only `is_staff`, which viewers have: its pages that change anything
# (and their confirmation pages) are for operators, the rest stay readable by viewers.
RQ_ACTION_VIEWS = {
    "delete_failed_jobs", "clear", "requeue_all", "delete_job", "requeue_job", "enqueue_job",
    "stop_job", "confirm_action", "actions",
}  # fmt: skip
_missing = RQ_ACTION_VIEWS - {getattr(p, "name", None) for p in rq_urls.urlpatterns}
if _missing:  # a django-rq upgrade renamed them: fail loudly rather than leave them open
    raise ImproperlyConfigured(f"django-rq action views not found: {sorted(_missing)}")


def _operators_only(view):
    @wraps(view)
    def wrapper(request, *args, **kwargs):
        if not is_operator(request.user):
            raise PermissionDenied("This action needs the operate permission.")
        return view(request, *args, **kwargs)

    return wrapper


for pattern in rq_urls.urlpatterns:
    if getattr(pattern, "name", None) in RQ_ACTION_VIEWS:
        pattern.callback = _operators_only(pattern.callback)
    pattern.callback = csp_override(RQ_PAGES_CSP)(pattern.callback)

urlpatterns = [
    path("api/", include("tasks.api.urls")),
    path(".well-known/taskhook/jwks.json", jwks.jwks, name="jwks"),
    path("healthz", health.healthz, name="healthz"),
    path("readyz", health.readyz, name="readyz"),
    path("metrics", health.metrics, name="metrics"),
    path("accounts/login/", auth_views.LoginView.as_view(), name="login"),
    path("accounts/logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("django-rq/", include("django_rq.urls")),
    path("admin/", admin.site.urls),
    path("", include("dashboard.ui.urls")),
]
