"""The raw RQ baseline's job: does nothing, so the figure is RQ's own overhead."""


def noop() -> None:
    return None
