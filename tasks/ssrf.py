"""SSRF guard for callback URLs: the one check used at submit time and again at delivery time.

Only http(s) URLs with a host are accepted. The host is resolved and every address it resolves to
must be public: loopback, private, link-local (which includes the 169.254.169.254 cloud metadata
address), multicast, reserved and unspecified addresses are refused, unless
`CALLBACK_ALLOW_PRIVATE_NETWORKS` is true (local development, tests against 127.0.0.1).
Checking again at delivery covers DNS that changed between submit and delivery.
"""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit

from django.conf import settings

MAX_URL_LENGTH = 2048


class UnsafeCallbackUrl(ValueError):
    pass


def _refusal(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    checks = (
        ("loopback", address.is_loopback),
        ("link-local", address.is_link_local),
        ("private", address.is_private),
        ("multicast", address.is_multicast),
        ("unspecified", address.is_unspecified),
        ("reserved", address.is_reserved),
        ("non-global", not address.is_global),
    )
    for name, hit in checks:
        if hit:
            return name
    return None


def resolve(host: str, port: int) -> list[str]:
    """Every address `host` resolves to (a literal IP resolves to itself)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise UnsafeCallbackUrl(f"callback_url host {host!r} does not resolve") from exc
    return sorted({info[4][0] for info in infos})


def check_callback_url(url: str, *, allow_private: bool | None = None) -> None:
    """Raise UnsafeCallbackUrl with a sentence a client can act on, or return if the URL is fine."""
    if allow_private is None:
        allow_private = settings.CALLBACK_ALLOW_PRIVATE_NETWORKS
    if len(url) > MAX_URL_LENGTH:
        raise UnsafeCallbackUrl(f"callback_url must be at most {MAX_URL_LENGTH} characters.")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UnsafeCallbackUrl(f"callback_url is not a valid URL: {exc}") from exc
    if parts.scheme not in ("http", "https"):
        raise UnsafeCallbackUrl("callback_url must be an absolute http or https URL.")
    host = parts.hostname
    if not host:
        raise UnsafeCallbackUrl("callback_url must have a host.")
    if parts.username or parts.password:
        raise UnsafeCallbackUrl("callback_url must not carry credentials.")
    if allow_private:
        return
    port = port or (443 if parts.scheme == "https" else 80)
    for raw in resolve(host, port):
        address = ipaddress.ip_address(raw.split("%", 1)[0])
        reason = _refusal(address)
        if reason:
            raise UnsafeCallbackUrl(
                f"callback_url host {host!r} resolves to a {reason} address ({address}), which is "
                "refused (set CALLBACK_ALLOW_PRIVATE_NETWORKS=true to allow it)."
            )
