"""gunicorn settings for the Taskhook web process; every value can be overridden from the env.

gthread workers: blocking submits wait on Redis for up to the blocking timeout, so each process
serves many requests at once with threads rather than one per process. Two processes per core:
a process's threads share one GIL, and with one process per core a submit burst left a core idle
while the other's threads queued (docs/benchmarks.md, "Measurements behind design choices").
"""

import multiprocessing
import os

bind = os.environ.get("GUNICORN_BIND", f"127.0.0.1:{os.environ.get('PORT', '8000')}")
workers = int(os.environ.get("WEB_CONCURRENCY", 2 * multiprocessing.cpu_count()))
worker_class = "gthread"
threads = int(os.environ.get("GUNICORN_THREADS", "8"))
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
