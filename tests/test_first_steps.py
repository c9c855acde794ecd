"""README "First steps", run as written: `make run` in a fresh copy of the tree, then the block's
other commands in `bash -e` with nothing but PATH and HOME in the environment, in the copy's
directory, as a user would paste them into a second terminal."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import time

import psutil
import redis
from rq import Worker

from tests.conftest import BASE_DIR, wait_for
from tests.makerun import MakeRun, free_port

README = BASE_DIR / "README.md"


def first_steps_block() -> str:
    """The first ```sh block under "## First steps"."""
    text = README.read_text()
    section = text.split("\n## First steps\n", 1)[1].split("\n## ", 1)[0]
    found = re.search(r"```sh\n(.*?)\n```", section, re.S)
    assert found, "no ```sh block under ## First steps"
    return found.group(1)


def test_the_block_starts_with_make_run_and_needs_no_jq_or_prompt():
    lines = first_steps_block().splitlines()
    assert lines[0].startswith("make run")
    rest = "\n".join(lines[1:])
    assert "jq" not in rest.split()  # the system may not have it
    assert "createsuperuser" not in rest  # it prompts for a password: after the block
    assert "127.0.0.1:8000" in rest and "127.0.0.1:9000" in rest  # what the test rewrites


def test_first_steps_work_literally(tmp_path):
    lines = first_steps_block().splitlines()
    script = "\n".join(lines[1:])  # `make run` itself is MakeRun.start() below
    # The README uses make run's default port 8000 and 9000 for the receiver. The run here
    # listens on a free port (MakeRun starts `make run PORT=<port>`) and so does the receiver,
    # so that parallel runs and a developer's own stack do not collide: both are rewritten.
    receiver_port = free_port()
    run = MakeRun(tmp_path)  # no Taskhook variables, as in a fresh shell
    script = script.replace("127.0.0.1:8000", f"127.0.0.1:{run.port}")
    script = script.replace("--port 9000", f"--port {receiver_port}")
    script = script.replace("127.0.0.1:9000", f"127.0.0.1:{receiver_port}")
    assert "8000" not in script and "9000" not in script
    output_path = tmp_path / "first-steps.out"
    shell = None
    run.start()
    try:
        run.wait_ready(timeout=120)
        assert "Created .env from .env.example" in run.log()
        assert (run.root / ".env").exists()
        _wait_for_workers(run, count=4)  # a user types the commands after the stack is up
        with output_path.open("wb") as output:
            shell = subprocess.Popen(
                ["bash", "-e", "-c", script],
                cwd=run.root,
                env={"PATH": os.environ["PATH"], "HOME": os.environ["HOME"]},
                stdout=output,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # the backgrounded receiver stays in this group
            )
            code = shell.wait(timeout=180)
        text = output_path.read_text(errors="replace")
        assert code == 0, f"the First steps block failed ({code}):\n{text}\n{run.log()[-3000:]}"

        def json_lines(prefix: str) -> list[dict]:
            found = output_path.read_text(errors="replace").splitlines()
            return [json.loads(line) for line in found if line.startswith(prefix)]

        # The receiver printed the callback: it arrived, and its signature checked out.
        events = wait_for(lambda: json_lines('{"event"'), timeout=30, interval=0.2)
        (event,) = events
        assert (event["event"], event["status"], event["output"]) == (
            "task.finished", "succeeded", {"query": "hello"})  # fmt: skip
        (poll,) = json_lines('{"task_id"')
        assert poll["task_id"] == event["task_id"]
        assert (poll["status"], poll["output"]) == ("succeeded", {"query": "hello"})
        assert poll["callback"]["url"] == f"http://127.0.0.1:{receiver_port}/hooks/taskhook"
        assert "Taskhook webhook receiver" in text  # the readiness curl reached it
        # The event stream, served by make run's web process, ended with the same result.
        assert "\nevent: task.finished\n" in text
        (streamed,) = [json.loads(line[len("data: "):]) for line in text.splitlines()
                       if line.startswith("data: ")]  # fmt: skip
        assert streamed == event
    finally:
        if shell is not None:
            _stop_group(shell.pid)
        run.stop()


def _wait_for_workers(run: MakeRun, *, count: int) -> None:
    connection = redis.Redis(unix_socket_path=str(run.root / "var" / "redis.sock"))
    try:
        wait_for(lambda: len(Worker.all(connection=connection)) >= count, timeout=60, interval=0.2)
    finally:
        connection.close()


def _stop_group(pgid: int) -> None:
    """The block's shell has exited; its backgrounded receiver is still in the group."""
    members = [p for p in psutil.process_iter() if _pgid(p) == pgid]
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    _, alive = psutil.wait_procs(members, timeout=10)
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.kill()
    time.sleep(0.1)


def _pgid(process: psutil.Process) -> int | None:
    try:
        return os.getpgid(process.pid)
    except (ProcessLookupError, PermissionError):
        return None
