"""Batches: many tasks in one request (README: Batches). Each item is an ordinary task, linked
to its batch by `Task.batch` / `batch_index`.

- `ingest`: validating a batch whole, then storing and enqueuing its items;
- `follow`: a batch's counts, status and results;
- `control`: cancelling a batch.
"""
