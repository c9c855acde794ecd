"""SSRF guard for callback URLs: the one parser and the one address check, used at submit time
and again at every delivery attempt.

Only http(s) URLs with a host are accepted, parsed by urllib3's own parser (the one the delivery
client uses), so the host that is checked is the host that is connected to; a URL with a
backslash, whitespace or a control character is refused outright, since parsers disagree on
those. The host is resolved (with its own short timeout) and every address it resolves to must
be public: loopback, private, link-local (which includes the 169.254.169.254 cloud metadata
address), multicast, reserved and unspecified addresses are refused, unless
`CALLBACK_ALLOW_PRIVATE_NETWORKS` is true (local development, tests against 127.0.0.1).

Delivery resolves once per attempt (`checked_target`) and connects to one of the addresses it
checked, never to the name: a DNS answer that changes between the check and the connect (DNS
rebinding) cannot move the POST to another address.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import socket
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

from django.conf import settings
from urllib3.exceptions import LocationParseError
from urllib3.util import parse_url

MAX_URL_LENGTH = 2048
# Whitespace, controls (C0, DEL, C1) and the backslash: parsers split such URLs differently.
_REFUSED_CHARACTERS = re.compile(r"[\s\x00-\x1f\x7f-\x9f\\]")
DEFAULT_PORTS = {"http": 80, "https": 443}


class UnsafeCallbackUrl(ValueError):
    pass


@dataclass(frozen=True)
class CallbackUrl:
    scheme: str
    host: str  # without IPv6 brackets, lower case, IDNA-encoded
    port: int
    request_uri: str  # path and query, as sent on the request line
    host_header: str  # what the receiver sees in Host


@dataclass(frozen=True)
class Target:
    url: CallbackUrl
    addresses: tuple[str, ...]  # checked addresses to connect to, in resolver order


def parse_callback_url(url: str) -> CallbackUrl:
    """The one parse of a callback URL; raises UnsafeCallbackUrl with a sentence to act on."""
    if len(url) > MAX_URL_LENGTH:
        raise UnsafeCallbackUrl(f"callback_url must be at most {MAX_URL_LENGTH} characters.")
    bad = _REFUSED_CHARACTERS.search(url)
    if bad:
        raise UnsafeCallbackUrl(
            f"callback_url must not contain {bad.group()!r} (whitespace, control characters "
            "and backslashes are refused)."
        )
    try:
        parts = parse_url(url)
    except (LocationParseError, ValueError) as exc:
        raise UnsafeCallbackUrl(f"callback_url is not a valid URL: {exc}") from None
    scheme = (parts.scheme or "").lower()
    if scheme not in DEFAULT_PORTS or not url.lower().startswith(f"{scheme}://"):
        raise UnsafeCallbackUrl("callback_url must be an absolute http or https URL.")
    if not parts.host:
        raise UnsafeCallbackUrl("callback_url must have a host.")
    authority = url.split("://", 1)[1].split("/", 1)[0].split("?", 1)[0].split("#", 1)[0]
    if parts.auth or "@" in authority:  # urllib3 drops an empty user part ("http://@host/")
        raise UnsafeCallbackUrl("callback_url must not carry credentials.")
    if parts.port == 0:  # urllib3 would read it as "no port" and deliver to the default one
        raise UnsafeCallbackUrl("callback_url port must be between 1 and 65535.")
    host = parts.host.strip("[]").lower()
    port = parts.port or DEFAULT_PORTS[scheme]
    shown_host = f"[{host}]" if ":" in host else host
    host_header = shown_host if port == DEFAULT_PORTS[scheme] else f"{shown_host}:{port}"
    return CallbackUrl(scheme, host, port, parts.request_uri, host_header)


def _refusal(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    checks = (
        ("unspecified", address.is_unspecified),
        ("loopback", address.is_loopback),
        ("link-local", address.is_link_local),
        ("private", address.is_private),
        ("multicast", address.is_multicast),
        ("reserved", address.is_reserved),
        ("non-global", not address.is_global),
    )
    for name, hit in checks:
        if hit:
            return name
    return None


@functools.cache
def _resolver_pool() -> ThreadPoolExecutor:
    # getaddrinfo has no timeout of its own; a lookup that hangs keeps one of these threads,
    # never the request or the delivery that asked.
    return ThreadPoolExecutor(max_workers=4, thread_name_prefix="resolve")


def resolve(host: str, port: int) -> list[str]:
    """Every address `host` resolves to, in the resolver's order (a literal IP is itself)."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        return [host]
    lookup = _resolver_pool().submit(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM)
    timeout = settings.CALLBACK_DNS_TIMEOUT
    try:
        infos = lookup.result(timeout=timeout)
    except FutureTimeout:
        raise UnsafeCallbackUrl(
            f"callback_url host {host!r} did not resolve within {timeout:g} s"
        ) from None
    except (OSError, UnicodeError) as exc:
        raise UnsafeCallbackUrl(f"callback_url host {host!r} does not resolve") from exc
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def checked_target(url: str, *, allow_private: bool | None = None) -> Target:
    """Parse, resolve once and check every address; the Target is what may be connected to."""
    if allow_private is None:
        allow_private = settings.CALLBACK_ALLOW_PRIVATE_NETWORKS
    parsed = parse_callback_url(url)
    addresses = resolve(parsed.host, parsed.port)
    if not allow_private:
        for raw in addresses:
            address = ipaddress.ip_address(raw.split("%", 1)[0])
            reason = _refusal(address)
            if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
                address = address.ipv4_mapped  # name the address that was checked
            if reason:
                raise UnsafeCallbackUrl(
                    f"callback_url host {parsed.host!r} resolves to a {reason} address "
                    f"({address}), which is refused (set CALLBACK_ALLOW_PRIVATE_NETWORKS=true to "
                    "allow it)."
                )
    return Target(parsed, tuple(addresses))


def check_callback_url(url: str, *, allow_private: bool | None = None) -> None:
    """Submit-time check: raise UnsafeCallbackUrl with a sentence a client can act on. Where
    private networks are allowed the host is not looked up (delivery resolves it anyway)."""
    if allow_private is None:
        allow_private = settings.CALLBACK_ALLOW_PRIVATE_NETWORKS
    if allow_private:
        parse_callback_url(url)
    else:
        checked_target(url, allow_private=False)
