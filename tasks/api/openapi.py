"""The OpenAPI 3.1 document of the client API, served from docs/openapi.json as written, except
that `info.version` is always the installed package's version (pyproject.toml's, written once);
the copy in the file is kept equal to it by tests/test_dashboard_views.py.

`make test` (tests/test_openapi.py) fuzzes a live server against it with schemathesis, so the
document and the server cannot drift apart unnoticed.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
from pathlib import Path

from django.conf import settings
from django.http import HttpRequest, HttpResponse

from tasks.api.views import api_view

DOCUMENT_PATH = Path(settings.BASE_DIR) / "docs" / "openapi.json"


@functools.cache
def document_bytes() -> bytes:
    """The file, with the package's version, as the file is laid out; built once per process."""
    document = json.loads(DOCUMENT_PATH.read_text(encoding="utf-8"))
    document["info"]["version"] = importlib.metadata.version("taskhook")
    return (json.dumps(document, indent=2, ensure_ascii=False) + "\n").encode()


@api_view("GET")
def openapi_document(request: HttpRequest) -> HttpResponse:
    """No API key needed: the document holds nothing secret."""
    return HttpResponse(document_bytes(), content_type="application/json")
