"""A local webhook receiver for trying Taskhook out (README "First steps").

    python manage.py webhookreceiver --port 9000 --secret "$WEBHOOK_SECRET"

Listens on 127.0.0.1, verifies each POST as a receiver should (the Standard Webhooks signature
with the `standardwebhooks` library, which also refuses timestamps more than 5 minutes off),
prints each verified callback body as one JSON line on stdout and answers 200; a bad or missing
signature is answered 400 and reported on stderr. A GET answers 200, so a script can wait for it.
"""

from __future__ import annotations

import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from django.core.management.base import BaseCommand, CommandError
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

MAX_BODY_BYTES = 16 * 1024 * 1024


class Command(BaseCommand):
    help = (
        "Receive callbacks on 127.0.0.1: verify the signature, print each callback as one JSON "
        "line, answer 200 (400 on a bad signature)."
    )

    def add_arguments(self, parser):
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=9000)
        parser.add_argument(
            "--secret",
            default=os.environ.get("TASKHOOK_WEBHOOK_SECRET", ""),
            help="the application's whsec_ secret (default: $TASKHOOK_WEBHOOK_SECRET)",
        )

    def handle(self, *args, **options):
        if not options["secret"]:
            raise CommandError("--secret: give the application's webhook secret (whsec_…)")
        try:
            verifier = Webhook(options["secret"])
        except Exception as exc:  # the library raises bare errors for a malformed secret
            raise CommandError(f"--secret: not a webhook secret (whsec_…): {exc}") from exc
        lock = threading.Lock()
        command = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as Taskhook's delivery client uses

            def do_GET(self) -> None:
                self._answer(200, b"Taskhook webhook receiver: POST callbacks here.\n")

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if length > MAX_BODY_BYTES:
                    self.close_connection = True
                    self._answer(413, b"too large\n")
                    return
                body = self.rfile.read(length)
                try:
                    verifier.verify(body, dict(self.headers.items()))
                except (WebhookVerificationError, ValueError) as exc:
                    with lock:
                        command.stderr.write(
                            f"refused {self.path} (webhook-id "
                            f"{self.headers.get('webhook-id', '-')}): bad signature: {exc}"
                        )
                    self._answer(400, b"bad signature\n")
                    return
                with lock:  # one whole line per callback, even with deliveries in parallel
                    command.stdout.write(body.decode(errors="replace"))
                    command.stdout.flush()
                self._answer(200, b"ok\n")

            def _answer(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "text/plain; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format, *args) -> None:
                pass  # the callbacks themselves are the output

        try:
            server = ThreadingHTTPServer((options["host"], options["port"]), Handler)
        except OSError as exc:
            raise CommandError(
                f"cannot listen on {options['host']}:{options['port']}: {exc}"
            ) from exc
        server.daemon_threads = True
        self.stderr.write(
            f"webhook receiver on http://{options['host']}:{options['port']}/ "
            "(prints each verified callback; Ctrl-C stops)"
        )
        self.stderr.flush()
        try:
            server.serve_forever(poll_interval=0.2)
        except KeyboardInterrupt:
            pass
        finally:
            server.server_close()
