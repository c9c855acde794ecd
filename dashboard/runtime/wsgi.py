"""The WSGI callable gunicorn serves (dashboard.runtime.handlers.RoutingHandler)."""

from __future__ import annotations

import os

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "dashboard.runtime.settings")
django.setup(set_prefix=False)

from dashboard.runtime.handlers import RoutingHandler  # noqa: E402 (needs the apps loaded)

application = RoutingHandler()
