"""Live task events: what happens to a task as it happens (README: Live events).

- `catalog`: the event names, and the webhook event kinds a submit may ask for.
- `stream`: the event log, one Redis stream per task, and the wake-up channel readers wait on.
- `tokens`: short-lived tokens bound to one task, for browsers that must not hold the API key.
- `publishing`: what the worker, the submit path and the finish paths publish.
"""
