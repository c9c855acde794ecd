"""Helpers for the few hand-written statements on the hot paths (submit, start, succeed, claim
and record of a delivery).

The ORM has no UPDATE ... RETURNING and compiles each query anew, which on the worker's and the
delivery's hot paths cost more than the statement itself. What a raw cursor returns is converted
here exactly as the ORM would convert it for the model field (SQLite hands back datetimes as
text, JSON as a string).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from django.db import connection
from django.db.models import Field, Model


def quote(name: str) -> str:
    return connection.ops.quote_name(name)


@functools.cache
def _converters(field: Field) -> tuple[Any, tuple[Callable, ...]]:
    column = field.get_col(field.model._meta.db_table)
    found = (*connection.ops.get_db_converters(column), *column.get_db_converters(connection))
    return column, found


def from_db(field: Field, value: Any) -> Any:
    """A value as a raw cursor returned it for `field`, as the ORM would have loaded it."""
    column, converters = _converters(field)
    for convert in converters:
        value = convert(value, column, connection)
    return value


@functools.cache
def _insert_statement(model: type[Model]) -> tuple[str, tuple[Field, ...]]:
    fields = tuple(field for field in model._meta.concrete_fields
                   if not getattr(field, "db_returning", False))  # fmt: skip
    columns = ", ".join(quote(field.column) for field in fields)
    placeholders = ", ".join(["%s"] * len(fields))
    # Identifiers come from the model; every value is a parameter.
    return f"INSERT INTO {quote(model._meta.db_table)} ({columns}) VALUES ({placeholders})", fields  # noqa: S608


def insert(instance: Model) -> None:
    """`instance.save(force_insert=True)` without the ORM's per-call SQL compilation.

    The statement is built once per model; values go through each field's own pre_save and
    get_db_prep_save, as in save(). No model signals are sent (the project has no receivers),
    and a database-generated primary key (AutoField) is not read back.
    """
    sql, fields = _insert_statement(type(instance))
    params = [field.get_db_prep_save(field.pre_save(instance, True), connection)
              for field in fields]  # fmt: skip
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
    instance._state.adding = False
    instance._state.db = connection.alias


def update(model: type[Model], *, where: dict[str, Any], values: dict[str, Any]) -> int:
    """`model.objects.filter(**where).update(**values)` for equality filters, without the ORM's
    per-call SQL compilation; returns the number of rows changed."""
    meta = model._meta
    assignments, params = [], []
    for name, value in values.items():
        field = meta.get_field(name)
        assignments.append(f"{quote(field.column)} = %s")
        params.append(field.get_db_prep_save(value, connection))
    conditions = []
    for name, value in where.items():
        field = meta.get_field(name)
        conditions.append(f"{quote(field.column)} = %s")
        params.append(field.get_db_prep_value(value, connection))
    sql = (f"UPDATE {quote(meta.db_table)} SET {', '.join(assignments)} "  # noqa: S608
           f"WHERE {' AND '.join(conditions)}")  # fmt: skip
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.rowcount
