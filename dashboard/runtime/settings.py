"""Django settings for Taskhook, read from the environment (django-environ; `.env` supported)."""

from pathlib import Path
from urllib.parse import urlsplit

import environ
from django.core.exceptions import ImproperlyConfigured
from django.utils.csp import CSP

BASE_DIR = Path(__file__).resolve().parents[2]
VAR_DIR = BASE_DIR / "var"

env = environ.Env()
environ.Env.read_env(BASE_DIR / ".env", overwrite=False)

DEBUG = env.bool("DEBUG", default=False)

# No production default for the secret: a deployment that forgot it must not start.
SECRET_KEY = env.str("SECRET_KEY", default="")
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured(
            "SECRET_KEY is not set. Set SECRET_KEY in the environment or .env "
            "(or DEBUG=true for local development)."
        )
    SECRET_KEY = "insecure-development-key-only-used-with-DEBUG-true"  # noqa: S105

ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", default=["127.0.0.1", "localhost"])
CSRF_TRUSTED_ORIGINS = env.list("CSRF_TRUSTED_ORIGINS", default=[])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django_htmx",
    "django_rq",
    "tasks",
    "dashboard",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    # Serves static/ (htmx, css) from gunicorn too: the dashboard needs no CDN or extra server.
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django.middleware.csp.ContentSecurityPolicyMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
    "dashboard.ui.zones.OperatorTimeZoneMiddleware",
]
# The JSON API (/api/) authenticates by API key and sets no cookies, so its requests skip the
# browser layers above (sessions, CSRF, auth, messages, framing, CSP, htmx), which did nothing
# for an API request but cost CPU on every submit (docs/benchmarks.md). dashboard.runtime.wsgi
# routes /api/ through a second Django handler built with this list.
API_MIDDLEWARE = ["django.middleware.security.SecurityMiddleware"]

ROOT_URLCONF = "dashboard.runtime.urls"
WSGI_APPLICATION = "dashboard.runtime.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "dashboard.ui.zones.zone_context",
            ],
        },
    },
]

# --- Database: SQLite under var/ by default, PostgreSQL in production ---------------------------
DATABASES = {
    "default": env.db_url("DATABASE_URL", default=f"sqlite:///{VAR_DIR / 'taskhook.sqlite3'}")
}
_db = DATABASES["default"]
# Persistent connections on every backend: opening one per request costs a submit on SQLite a
# connect, the PRAGMAs below and Django's function registrations (docs/benchmarks.md).
_db.setdefault("CONN_MAX_AGE", env.int("CONN_MAX_AGE", default=60))
if _db["ENGINE"] == "django.db.backends.sqlite3":
    # WAL lets the web process read while a worker writes; IMMEDIATE avoids lock-upgrade deadlocks.
    _db["OPTIONS"] = {
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        "transaction_mode": "IMMEDIATE",
        "timeout": 20,
    }
    # The same backend, its write transactions waiting for the lock by polling (see there).
    _db["ENGINE"] = "dashboard.runtime.sqlite3"
    # A file (not :memory:) so that worker processes started by tests see the same database.
    _db["TEST"] = {"NAME": env.str("TEST_DATABASE_NAME", default=str(VAR_DIR / "test.sqlite3"))}
else:
    if env.str("TEST_DATABASE_NAME", default=""):  # parallel test runs on one server
        _db["TEST"] = {"NAME": env.str("TEST_DATABASE_NAME")}
    _db.setdefault("CONN_HEALTH_CHECKS", True)
    if _db["ENGINE"] == "django.db.backends.postgresql":
        # The same backend, with health checks only for connections idle a while (see there).
        _db["ENGINE"] = "dashboard.runtime.postgresql"
HEALTH_CHECK_IDLE_SECONDS = env.float("HEALTH_CHECK_IDLE_SECONDS", default=1.0)
# PostgreSQL: the hot statements (submit, start, finish, delivery) are prepared once per
# connection. Turn off behind a pooler in transaction mode without prepared-statement support
# (PgBouncer < 1.21, or max_prepared_statements = 0).
DATABASE_PREPARED_STATEMENTS = env.bool("DATABASE_PREPARED_STATEMENTS", default=True)

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Redis / RQ ---------------------------------------------------------------------------------
# Unset: the embedded Redis (dashboard/runtime/embedded_redis.py) that `make run` and `make test`
# start.
EMBEDDED_REDIS_SOCKET = env.path("EMBEDDED_REDIS_SOCKET", default=VAR_DIR / "redis.sock")
REDIS_URL = env.str("REDIS_URL", default=f"unix://{EMBEDDED_REDIS_SOCKET}")

# Redis Sentinel: REDIS_SENTINELS=host1:26379,host2:26379 and REDIS_SENTINEL_MASTER=mymaster
# (REDIS_URL then only supplies the database number and password, if any).
REDIS_SENTINELS = [
    (host, int(port))
    for host, _, port in (item.rpartition(":") for item in env.list("REDIS_SENTINELS", default=[]))
]
REDIS_SENTINEL_MASTER = env.str("REDIS_SENTINEL_MASTER", default="mymaster")

# The queue names are fixed: the Procfile and every process command spell them out.
from dashboard.runtime.processes import CALLBACK_QUEUE, MAINTENANCE_QUEUE, TASK_QUEUE  # noqa: E402
from tasks.plumbing.lane_names import task_lanes  # noqa: E402

_redis_url = urlsplit(REDIS_URL)
REDIS_DB = int(_redis_url.path.strip("/") or 0) if _redis_url.scheme.startswith("redis") else 0
REDIS_PASSWORD = _redis_url.password
_rq_connection = (
    {"SENTINELS": REDIS_SENTINELS, "MASTER_NAME": REDIS_SENTINEL_MASTER, "DB": REDIS_DB,
     "PASSWORD": REDIS_PASSWORD}
    if REDIS_SENTINELS
    else {"URL": REDIS_URL}
)  # fmt: skip
RQ_QUEUES = {
    name: {**_rq_connection, "DEFAULT_TIMEOUT": 600}
    for name in (*task_lanes(TASK_QUEUE), CALLBACK_QUEUE, MAINTENANCE_QUEUE)
}
RQ_SHOW_ADMIN_LINK = False

# --- Taskhook behaviour -------------------------------------------------------------------------
# Scheduling (tasks.scheduling): a normal or low task waiting longer than this is served next,
# so no lane starves; the drain rate behind queue ETAs is measured over this many seconds.
PRIORITY_AGING_SECONDS = env.int("PRIORITY_AGING_SECONDS", default=300)
ETA_WINDOW_SECONDS = env.int("ETA_WINDOW_SECONDS", default=180)
BLOCKING_TIMEOUT = env.float("BLOCKING_TIMEOUT", default=30.0)
# Blocking submits waiting at once per web process, and per API key within it (tasks.api.blocking):
# by default half of a gunicorn process's threads, so the other half always serves.
# Threads per web process that serve everything but the event streams (dashboard.runtime.asgi).
WEB_THREADS = env.int("WEB_THREADS", default=env.int("GUNICORN_THREADS", default=8))
_web_threads = WEB_THREADS
BLOCKING_MAX_WAITS = env.int("BLOCKING_MAX_WAITS", default=max(1, _web_threads // 2))
BLOCKING_MAX_WAITS_PER_KEY = env.int(
    "BLOCKING_MAX_WAITS_PER_KEY", default=max(1, _web_threads // 4)
)
MAX_BODY_BYTES = env.int("MAX_BODY_BYTES", default=1024 * 1024)
DATA_UPLOAD_MAX_MEMORY_SIZE = MAX_BODY_BYTES
# A batch's body (tasks.batches): up to 10,000 items, read by the batch view itself.
BATCH_MAX_BODY_BYTES = env.int("BATCH_MAX_BODY_BYTES", default=32 * 1024 * 1024)
# A batch sent as NDJSON (tasks.batches.ingest.MAX_NDJSON_ITEMS): read a line at a time.
BATCH_NDJSON_MAX_BODY_BYTES = env.int("BATCH_NDJSON_MAX_BODY_BYTES", default=256 * 1024 * 1024)
# Runs of one batch queued or running at once when its application sets no
# max_concurrency_per_key (tasks.scheduling.fairness); the rest wait in the batch's line.
BATCH_CONCURRENCY = env.int("BATCH_CONCURRENCY", default=8)
IDEMPOTENCY_WINDOW_HOURS = 24
CALLBACK_ALLOW_PRIVATE_NETWORKS = env.bool("CALLBACK_ALLOW_PRIVATE_NETWORKS", default=False)
# A callback host's name lookup, at submit and at each delivery attempt.
CALLBACK_DNS_TIMEOUT = env.float("CALLBACK_DNS_TIMEOUT", default=2.0)
# Connecting to a receiver; the whole attempt stays bounded by the callback timeout.
CALLBACK_CONNECT_TIMEOUT = env.float("CALLBACK_CONNECT_TIMEOUT", default=3.0)
# A CA bundle (PEM) that receivers' certificates are checked against instead of the system's.
CALLBACK_CA_BUNDLE = env.str("CALLBACK_CA_BUNDLE", default="")
# Deliveries one callback worker (tasks.execution.worker.TaskhookDeliveryWorker) makes at once,
# one thread and one database connection each.
CALLBACK_CONCURRENCY = env.int("CALLBACK_CONCURRENCY", default=8)
CLEANUP_INTERVAL = env.int("CLEANUP_INTERVAL", default=600)
RECONCILE_INTERVAL = env.int("RECONCILE_INTERVAL", default=30)
# History for the charts (tasks.telemetry.rollups): how often the cron process rolls the recent
# minutes up, and how long minute and hour rows are kept.
ROLLUP_INTERVAL = env.int("ROLLUP_INTERVAL", default=30)
ROLLUP_MINUTE_HOURS = env.int("ROLLUP_MINUTE_HOURS", default=48)
ROLLUP_HOUR_DAYS = env.int("ROLLUP_HOUR_DAYS", default=35)
METRICS_TOKEN = env.str("METRICS_TOKEN", default="")
# Without a token /metrics answers only in DEBUG, unless it is declared public on purpose.
METRICS_PUBLIC = env.bool("METRICS_PUBLIC", default=False)
# Seconds a web process reuses one scrape's figures (each scrape counts the task table).
METRICS_CACHE_SECONDS = env.float("METRICS_CACHE_SECONDS", default=5.0)
QUEUE_BACKLOG_THRESHOLD = env.int("QUEUE_BACKLOG_THRESHOLD", default=1000)
# A queue paused longer than this raises an alert on the Overview (tasks.execution.pausing).
QUEUE_PAUSE_ALERT_SECONDS = env.int("QUEUE_PAUSE_ALERT_SECONDS", default=600)
# Seconds a web process may reuse an API key lookup (and a worker an application's settings).
AUTH_CACHE_SECONDS = env.float("AUTH_CACHE_SECONDS", default=5.0)
# A Taskhook worker refreshes its liveness key every second; a killed one is lost after TTL s.
WORKER_ALIVE_TTL = env.int("WORKER_ALIVE_TTL", default=30)

# Live task events (tasks.events): a task's event stream is kept for replay this long after its
# last event (retention removes it with its task if that comes first), at most this many events.
EVENTS_TTL_HOURS = env.int("EVENTS_TTL_HOURS", default=24)
EVENTS_MAX_PER_TASK = env.int("EVENTS_MAX_PER_TASK", default=10_000)
# How long the token in a submit answer's stream_url stays valid.
STREAM_TOKEN_SECONDS = env.int("STREAM_TOKEN_SECONDS", default=3600)
# An open event stream is ended after this long (the client resumes with Last-Event-ID), so a
# web process can restart or drain without holding streams forever.
STREAM_MAX_SECONDS = env.int("STREAM_MAX_SECONDS", default=600)
STREAM_KEEPALIVE_SECONDS = env.float("STREAM_KEEPALIVE_SECONDS", default=15.0)

# --- Auth, static, i18n -------------------------------------------------------------------------
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "dashboard:home"
LOGOUT_REDIRECT_URL = "login"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
# WhiteNoise serves straight from static/ (no collectstatic step); set STATIC_ROOT to collect.
STATIC_ROOT = env.str("STATIC_ROOT", default=None)
WHITENOISE_USE_FINDERS = True

# --- Production hardening (on whenever DEBUG is off) --------------------------------------------
if not DEBUG:
    # Behind a TLS-terminating proxy that sets X-Forwarded-Proto. Probes from inside the
    # network may use plain HTTP.
    SESSION_COOKIE_SECURE = env.bool("SESSION_COOKIE_SECURE", default=True)
    CSRF_COOKIE_SECURE = env.bool("CSRF_COOKIE_SECURE", default=True)
    SECURE_SSL_REDIRECT = env.bool("SECURE_SSL_REDIRECT", default=True)
    SECURE_REDIRECT_EXEMPT = [r"^healthz$", r"^readyz$", r"^metrics$"]
    SECURE_HSTS_SECONDS = env.int("SECURE_HSTS_SECONDS", default=31536000)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = env.bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", default=True)
    SECURE_HSTS_PRELOAD = env.bool("SECURE_HSTS_PRELOAD", default=False)
    # Submitting a domain to the browsers' HSTS preload list is the domain owner's call.
    SILENCED_SYSTEM_CHECKS = [] if SECURE_HSTS_PRELOAD else ["security.W021"]
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SESSION_COOKIE_HTTPONLY = True
# Strict CSP: the dashboard has no inline script or style (htmx is told not to inject its
# indicator styles), so everything comes from 'self'. django-rq's pages get a relaxed policy
# of their own (dashboard/runtime/urls.py) because their templates carry inline scripts.
SECURE_CSP = {
    "default-src": [CSP.SELF],
    "script-src": [CSP.SELF],
    "style-src": [CSP.SELF],
    "img-src": [CSP.SELF, "data:"],
    "connect-src": [CSP.SELF],
    "form-action": [CSP.SELF],
    "frame-ancestors": [CSP.NONE],
    "base-uri": [CSP.SELF],
    "object-src": [CSP.NONE],
}
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
X_FRAME_OPTIONS = "DENY"

# RQ logs a line per job at INFO; WARNING keeps worker logs to what needs attention (our own
# "task succeeded/failed" lines come from the tasks.* loggers at LOG_LEVEL).
RQ_LOG_LEVEL = env.str("RQ_LOG_LEVEL", default="WARNING").upper()

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "text": {
            "()": "dashboard.runtime.logging.TextFormatter",
            "format": "%(asctime)s %(levelname)s %(name)s %(message)s",
        },
        "json": {"()": "dashboard.runtime.logging.JsonFormatter"},
    },
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            "formatter": "json" if env.str("LOG_FORMAT", default="text") == "json" else "text",
        }
    },
    "root": {"handlers": ["console"], "level": env.str("LOG_LEVEL", default="INFO")},
    "loggers": {
        "django.db.backends": {"level": "WARNING"},
        "rq.worker": {"level": RQ_LOG_LEVEL},
    },
}
