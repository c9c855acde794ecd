"""gunicorn settings for the Taskhook web process; every value can be overridden from the env.

uvicorn workers serving dashboard.runtime.asgi: the event streams are native async (an open
stream is a coroutine), everything else runs on each process's pool of GUNICORN_THREADS
threads, as gthread workers did. Two processes per core: a process's threads share one GIL, and
with one process per core a submit burst left a core idle while the other's threads queued
(docs/benchmarks.md, "Measurements behind design choices").
"""

import multiprocessing
import os

bind = os.environ.get("GUNICORN_BIND", f"127.0.0.1:{os.environ.get('PORT', '8000')}")
workers = int(os.environ.get("WEB_CONCURRENCY", 2 * multiprocessing.cpu_count()))
worker_class = "uvicorn_worker.UvicornWorker"
timeout = int(os.environ.get("GUNICORN_TIMEOUT", "120"))
graceful_timeout = 10
keepalive = 5
max_requests = int(os.environ.get("GUNICORN_MAX_REQUESTS", "10000"))
# Django is imported once in the master and workers are forked from it: a worker recycled by
# max_requests serves again at once instead of re-importing everything.
preload_app = True
max_requests_jitter = 500
accesslog = os.environ.get("GUNICORN_ACCESSLOG", None)
errorlog = "-"
