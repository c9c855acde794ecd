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
from typing import Any, NamedTuple

from django.conf import settings
from django.db import connection, transaction
from django.db.models import Field, Model


def quote(name: str) -> str:
    return connection.ops.quote_name(name)


def quote_column(field: Field) -> str:
    """`field`'s column, quoted; every concrete field (one stored in its model's table) has one."""
    assert field.column is not None, f"{field} has no column"
    return quote(field.column)


def get_field(model: type[Model], name: str) -> Field:
    """`model._meta.get_field(name)` for one of the model's own fields, never a reverse relation
    (which has no column)."""
    field = model._meta.get_field(name)
    assert isinstance(field, Field), f"{model.__name__}.{name} is a reverse relation"
    return field


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
def columns(model: type[Model], names: tuple[str, ...]) -> tuple[tuple[Field, ...], str]:
    """The named fields in the model's own order, and their quoted columns for a SELECT or a
    RETURNING list (`instance` needs that order)."""
    wanted = {model._meta.get_field(name) for name in names}
    fields = tuple(field for field in model._meta.concrete_fields if field in wanted)
    return fields, ", ".join(quote_column(field) for field in fields)


def instance[M: Model](model: type[M], fields: tuple[Field, ...], row: tuple) -> M:
    """A model instance from a raw row holding `fields` (from `columns`), as the ORM would load
    it: the other fields are deferred and read from the database if ever accessed."""
    values = [from_db(field, value) for field, value in zip(fields, row, strict=False)]
    return model.from_db(connection.alias, [field.attname for field in fields], values)


class Statement(NamedTuple):
    sql: str
    params: list[Any]


@functools.cache
def _insert_sql(model: type[Model]) -> tuple[str, tuple[Field, ...]]:
    fields = tuple(field for field in model._meta.concrete_fields
                   if not getattr(field, "db_returning", False))  # fmt: skip
    columns = ", ".join(quote_column(field) for field in fields)
    placeholders = ", ".join(["%s"] * len(fields))
    # Identifiers come from the model; every value is a parameter.
    return f"INSERT INTO {quote(model._meta.db_table)} ({columns}) VALUES ({placeholders})", fields  # noqa: S608


def insert_statement(instance: Model) -> Statement:
    """The INSERT that `instance.save(force_insert=True)` would run, built once per model; values
    go through each field's own pre_save and get_db_prep_save, as in save(). A database-generated
    primary key (AutoField) is left to the database and not read back."""
    sql, fields = _insert_sql(type(instance))
    params = [field.get_db_prep_save(field.pre_save(instance, True), connection)
              for field in fields]  # fmt: skip
    return Statement(sql, params)


def update_statement(
    model: type[Model], *, where: dict[str, Any], values: dict[str, Any]
) -> Statement:
    """`model.objects.filter(**where).update(**values)` for filters of equality, or of
    membership when the filter's value is a tuple (`status__in`)."""
    shape = tuple((name, len(v) if isinstance(v, tuple) else None) for name, v in where.items())
    sql, fields = _update_sql(model, tuple(values), shape)
    assigned, matched = fields[: len(values)], fields[len(values) :]
    params = [field.get_db_prep_save(value, connection)
              for field, value in zip(assigned, values.values(), strict=True)]  # fmt: skip
    for field, value in zip(matched, where.values(), strict=True):
        for one in value if isinstance(value, tuple) else (value,):
            params.append(field.get_db_prep_value(one, connection))
    return Statement(sql, params)


@functools.cache
def _update_sql(
    model: type[Model], assigned: tuple[str, ...], matched: tuple[tuple[str, int | None], ...]
) -> tuple[str, tuple[Field, ...]]:
    meta = model._meta
    fields = tuple(get_field(model, name) for name in (*assigned, *(name for name, _ in matched)))
    assignments = ", ".join(f"{quote_column(field)} = %s" for field in fields[: len(assigned)])
    conditions = " AND ".join(
        f"{quote_column(field)} = %s"
        if count is None
        else f"{quote_column(field)} IN ({', '.join(['%s'] * count)})"
        for field, (_, count) in zip(fields[len(assigned) :], matched, strict=True)
    )
    return f"UPDATE {quote(meta.db_table)} SET {assignments} WHERE {conditions}", fields  # noqa: S608


def cursor():
    """Where the hot statements run: on PostgreSQL a cursor that prepares them once per
    connection (unless DATABASE_PREPARED_STATEMENTS is off, e.g. behind a transaction-mode
    pooler that cannot keep them), elsewhere Django's own."""
    if settings.DATABASE_PREPARED_STATEMENTS and hasattr(connection, "prepared_cursor"):
        return connection.prepared_cursor()
    return connection.cursor()


def execute(statement: Statement) -> int:
    """Run one statement; returns the number of rows it changed."""
    with cursor() as db:
        db.execute(statement.sql, statement.params)
        return db.rowcount


def fetchone(statement: Statement) -> tuple | None:
    """Run one statement (a SELECT or a write with RETURNING); its first row or None."""
    with cursor() as db:
        db.execute(statement.sql, statement.params)
        return db.fetchone()


def execute_together(first: Statement, then: Statement) -> int:
    """Two writes in one commit; returns the rows `then` changed. On PostgreSQL one round trip:
    `first` runs as a data-modifying CTE of `then`, so the two must not touch the same rows.
    Elsewhere (SQLite, where a transaction costs no round trips) in a transaction."""
    if connection.vendor == "postgresql":
        return execute(Statement(f"WITH first AS ({first.sql}) {then.sql}",
                                 [*first.params, *then.params]))  # fmt: skip
    with transaction.atomic():
        execute(first)
        return execute(then)


def insert(instance: Model) -> None:
    """`instance.save(force_insert=True)` without the ORM's per-call SQL compilation. No model
    signals are sent (the project has no receivers)."""
    execute(insert_statement(instance))
    instance._state.adding = False
    instance._state.db = connection.alias
