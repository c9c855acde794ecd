"""Python client for Taskhook's API (docs/api.md) and its signed callbacks (docs/callbacks.md).

- `Taskhook` (blocking) and `AsyncTaskhook` (asyncio): submit, run, get, wait, stream, cancel,
  submit_batch, get_batch, batch_results, stream_batch, cancel_batch, jwks, public_keys.
- `TaskhookError` and its subclasses, with the API's `code`, `message`, `field` and `status`.
- `verify_webhook`: the `webhook-signature` (`v1` HMAC, `v1a` Ed25519) and
  `X-Dify-Signature-V1` checks, with the timestamp tolerance.
"""

from taskhook_client._async import AsyncTaskhook
from taskhook_client._sync import Taskhook
from taskhook_client.errors import (
    Conflict,
    ConnectionFailed,
    InvalidRequest,
    NotFound,
    RateLimited,
    TaskhookError,
    Unauthorized,
    Unavailable,
    WaitTimeout,
    WebhookVerificationError,
)
from taskhook_client.models import (
    Batch,
    BatchAccepted,
    BatchItem,
    BatchResult,
    Event,
    Task,
    TaskAccepted,
)
from taskhook_client.webhooks import JWKS_PATH, fetch_jwks, load_public_keys, verify_webhook

__version__ = "0.1.0"
__all__ = [
    "JWKS_PATH",
    "AsyncTaskhook",
    "Batch",
    "BatchAccepted",
    "BatchItem",
    "BatchResult",
    "Conflict",
    "ConnectionFailed",
    "Event",
    "InvalidRequest",
    "NotFound",
    "RateLimited",
    "Task",
    "TaskAccepted",
    "Taskhook",
    "TaskhookError",
    "Unauthorized",
    "Unavailable",
    "WaitTimeout",
    "WebhookVerificationError",
    "fetch_jwks",
    "load_public_keys",
    "verify_webhook",
]
