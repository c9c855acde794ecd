"""Protocol-faithful fake upstreams (OpenAI-compatible, Dify) for the runner tests."""
