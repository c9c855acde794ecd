"""Read-side queries, every one indexed and bounded, fast at millions of rows: the API's poll,
the dashboard's lists, Redis statistics and the alert policy."""
