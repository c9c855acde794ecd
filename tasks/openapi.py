"""The OpenAPI 3.1 document of the client API, served from docs/openapi.json as written.

`make test` (tests/test_openapi.py) fuzzes a live server against it with schemathesis, so the
document and the server cannot drift apart unnoticed.
"""

from __future__ import annotations

import functools
from pathlib import Path

from django.conf import settings
from django.http import HttpRequest, HttpResponse

from .api import api_view

DOCUMENT_PATH = Path(settings.BASE_DIR) / "docs" / "openapi.json"


@functools.cache
def document_bytes() -> bytes:
    """The file's bytes, read once per process."""
    return DOCUMENT_PATH.read_bytes()


@api_view("GET")
def openapi_document(request: HttpRequest) -> HttpResponse:
    """No API key needed: the document holds nothing secret."""
    return HttpResponse(document_bytes(), content_type="application/json")
