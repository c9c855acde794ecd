"""Scheduling: which waiting task run starts next, and when a waiting client can expect it.

- `lanes`: the priority lanes (an RQ queue each, taken highest first) and the aging guard that
  keeps normal and low work from starving.
- `fairness`: the per-key cap (`max_concurrency_per_key`), whose overflow waits without an RQ
  job, so it holds no worker and blocks no other key.
- `estimates`: a waiting task's place in the queue and its ETA, from counters (no scan).

The per-application cap (`max_concurrency`) stays RQ's own concurrency limit
(tasks.plumbing.queueing). Deadlines are tasks.execution.deadlines.
"""
