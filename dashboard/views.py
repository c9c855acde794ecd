"""Operator dashboard views (staff only)."""

from __future__ import annotations

from django.contrib.admin.views.decorators import staff_member_required
from django.db.models import Count
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render

from tasks.models import Application, Task


@staff_member_required
def home(request: HttpRequest) -> HttpResponse:
    counts = dict(
        Task.objects.values_list("status").annotate(n=Count("id")).values_list("status", "n")
    )
    context = {"counts": counts, "applications": Application.objects.all()[:50]}
    return render(request, "dashboard/home.html", context)
