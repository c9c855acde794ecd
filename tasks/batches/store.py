"""Storing a batch's items. On PostgreSQL one `COPY ... FROM STDIN (FORMAT BINARY)` streams every
row: no INSERT statement to parse and plan per chunk, no parameter list per row, the rows sent
as one stream, each value in its type's binary form.
Elsewhere (SQLite, where a statement costs no round trip) one prepared INSERT run for many rows
(executemany), INSERT_CHUNK at a time.

The values are what `save()` and bulk_create send: each concrete field's pre_save, then its
get_db_prep_save (a JSON field's becomes psycopg's Jsonb, which COPY writes as jsonb).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import uuid
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from typing import Any

from django.db import connection, connections, models
from django.db.models import Field
from psycopg.types.json import Jsonb

from tasks import jsonsafety
from tasks.models import Task
from tasks.plumbing import rawsql

INSERT_CHUNK = 500  # rows per INSERT off PostgreSQL (SQLite's bound on a statement's parameters)


@dataclass
class Prepared:
    """A chunk's rows as the database takes them (`prepare`), built before the transaction
    that inserts them, so the write lock (SQLite's: one for the whole database) is held only
    while the rows are written."""

    tasks: list[Task]
    rows: list[list[Any]]


def prepare(tasks: list[Task], *, own: Collection[str] | None = None) -> Prepared:
    """`own`: the attnames whose values differ from row to row (submission.ITEM_OWN_FIELDS for
    rows built by new_tasks); every other column is prepared once, from the first row. None:
    found by looking at every row's values."""
    db = connections[connection.alias]  # the backend: every field's preparation reads it
    return Prepared(tasks, list(_rows(tasks, _fields(), db, own)) if tasks else [])


def insert_items(tasks: list[Task] | Prepared) -> None:
    """Insert `tasks` (unsaved, their primary keys set; or their prepared rows) as bulk_create
    would, in the caller's transaction; a unique constraint's violation raises Django's
    IntegrityError."""
    prepared = tasks if isinstance(tasks, Prepared) else prepare(tasks)
    if not prepared.rows:
        return
    with rows_writer() as write:
        write(prepared)


@contextlib.contextmanager
def rows_writer() -> Iterator[Callable[[Prepared], None]]:
    """A writer of prepared chunks, in the caller's transaction. On PostgreSQL one COPY takes
    every chunk written: its rows go out while the next chunk is built, so the server stores
    one chunk while this process prepares the next, and the statement ends once. Elsewhere each
    chunk is inserted when written."""
    fields = _fields()
    db = connections[connection.alias]
    table = rawsql.quote(Task._meta.db_table)
    columns = ", ".join(rawsql.quote_column(field) for field in fields)
    written: list[Prepared] = []
    with db.cursor() as cursor, db.wrap_database_errors:
        if db.vendor == "postgresql":
            # Django's cursor wraps psycopg's, whose `copy` it does not expose.
            # Identifiers come from the model; the rows are data on the stream.
            # Binary: psycopg formats each value in about half the time of the text format.
            statement = f"COPY {table} ({columns}) FROM STDIN (FORMAT BINARY)"
            with cursor.cursor.copy(statement) as copy:
                copy.set_types([_column_type(field, db) for field in fields])

                def write_copy(prepared: Prepared) -> None:
                    for row in prepared.rows:
                        copy.write_row(row)
                    written.append(prepared)

                yield write_copy
        else:
            marks = ", ".join(["%s"] * len(fields))
            statement = f"INSERT INTO {table} ({columns}) VALUES ({marks})"  # noqa: S608

            def write_insert(prepared: Prepared) -> None:
                rows = iter(prepared.rows)
                while chunk := list(itertools.islice(rows, INSERT_CHUNK)):
                    cursor.executemany(statement, chunk)
                written.append(prepared)

            yield write_insert
    for prepared in written:  # stored: what the ORM marks on a saved instance
        for task in prepared.tasks:
            task._state.adding = False
            task._state.db = db.alias


def _rows(
    tasks: list[Task], fields: tuple[Field, ...], db, own_names: Collection[str] | None
) -> Iterator[list[Any]]:
    """Each task's column values. A batch's items share most of theirs (application, status,
    timestamps, the batch's own fields): a column whose value is the very object the first task
    holds in every task is prepared once, and a row is a copy of the first's with its own few
    columns prepared."""
    first = tasks[0]
    template: list[Any] = []
    own: list[tuple[int, str, Callable[[Any], Any]]] = []  # (position, attname, preparer)
    for position, field in enumerate(fields):
        template.append(field.get_db_prep_save(field.pre_save(first, True), db))
        name = field.attname
        if own_names is None:
            raw = getattr(first, name)
            varies = any(task.__dict__.get(name, raw) is not raw for task in tasks)
        else:
            varies = name in own_names
        if varies:
            own.append((position, name, _preparer(field, db)))
    for task in tasks:
        row = template.copy()
        values = task.__dict__
        for position, name, prepare_value in own:
            row[position] = prepare_value(values[name])
        yield row


# Fields whose value of this Python type the database takes as it is: get_db_prep_save returns
# it unchanged (a str for a CharField, ...), so a row's own columns skip Django's four calls.
_PLAIN_TYPES: dict[type[Field], type] = {
    models.CharField: str, models.TextField: str, models.BooleanField: bool,
    models.IntegerField: int, models.PositiveIntegerField: int, models.BigIntegerField: int,
}  # fmt: skip


def _preparer(field: Field, db) -> Callable[[Any], Any]:
    """A row's value of `field` as the database takes it: what save() sends (pre_save, then
    get_db_prep_save) for a field without auto values, quicker for the common values."""
    if getattr(field, "auto_now", False) or getattr(field, "auto_now_add", False):
        raise ValueError(f"{field.name}: an auto time is the first row's, not a row's own")
    prep = field.get_db_prep_save
    plain = _PLAIN_TYPES.get(type(field))
    if plain is None and type(field) is models.UUIDField and db.features.has_native_uuid_field:
        plain = uuid.UUID
    if plain is None and type(field) is models.JSONField and field.encoder is None:
        return _json_preparer(prep, db)
    if plain is None and type(field) is models.DateTimeField:

        def prepare_time(value: Any) -> Any:
            return None if value is None else prep(value, db)

        return prepare_time
    if plain is None:
        return functools.partial(prep, connection=db)

    def prepare_plain(value: Any) -> Any:
        return value if value is None or type(value) is plain else prep(value, db)

    return prepare_plain


def _column_type(field: Field, db) -> str:
    """The column's type as psycopg names it for a binary COPY (varchar(16): varchar)."""
    db_type = field.db_type(db)
    if db_type is None:
        raise ValueError(f"{field.name} has no column type")
    return db_type.split("(", 1)[0]


def _json_preparer(prep: Callable[..., Any], db) -> Callable[[Any], Any]:
    """A JSON column's value (a decoded request's: dicts, lists, str keys) as adapt_json_value
    makes it, its JSON by jsonsafety.dumps_bytes; None and the rest by Django."""
    postgresql = db.vendor == "postgresql"

    def prepare_json(value: Any) -> Any:
        if type(value) is not dict and type(value) is not list:
            return prep(value, db)
        if postgresql:
            return Jsonb(value, dumps=jsonsafety.dumps_bytes)
        return jsonsafety.dumps_bytes(value).decode()

    return prepare_json


@functools.cache
def _fields() -> tuple[Field, ...]:
    return tuple(field for field in Task._meta.concrete_fields
                 if not getattr(field, "db_returning", False))  # fmt: skip
