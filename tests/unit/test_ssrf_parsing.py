"""tasks.delivery.ssrf: the one URL parse and the address check, on literal IPs only (no DNS)."""

from __future__ import annotations

import ipaddress
import socket

import pytest

from tasks.delivery import ssrf


@pytest.fixture(autouse=True)
def no_dns(monkeypatch):
    """Literal IPs never reach the resolver; a lookup here would be a bug in the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"unexpected DNS lookup {args!r}")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.mark.parametrize(
    ("url", "scheme", "host", "port", "request_uri", "host_header"),
    [
        ("HTTP://Hooks.Example.COM/Path?Q=1#frag", "http", "hooks.example.com", 80, "/Path?Q=1",
         "hooks.example.com"),
        ("https://example.com", "https", "example.com", 443, "/", "example.com"),
        ("https://example.com:443/x", "https", "example.com", 443, "/x", "example.com"),
        ("http://example.com:80/x", "http", "example.com", 80, "/x", "example.com"),
        ("http://example.com:443/x", "http", "example.com", 443, "/x", "example.com:443"),
        ("https://example.com:80/x", "https", "example.com", 80, "/x", "example.com:80"),
        ("http://example.com:8080/a/b?c=d&e=%20f", "http", "example.com", 8080,
         "/a/b?c=d&e=%20f", "example.com:8080"),
        ("http://example.com?only=query", "http", "example.com", 80, "/?only=query",
         "example.com"),
        ("http://[::1]:9000/hook", "http", "::1", 9000, "/hook", "[::1]:9000"),
        ("https://[2001:DB8::A]/hook", "https", "2001:db8::a", 443, "/hook", "[2001:db8::a]"),
        ("http://[2001:db8::1]:80/", "http", "2001:db8::1", 80, "/", "[2001:db8::1]"),
        ("http://93.184.216.34:8443/h", "http", "93.184.216.34", 8443, "/h",
         "93.184.216.34:8443"),
    ],
)  # fmt: skip
def test_parse_callback_url(url, scheme, host, port, request_uri, host_header):
    parsed = ssrf.parse_callback_url(url)
    assert parsed == ssrf.CallbackUrl(scheme, host, port, request_uri, host_header)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://example.com\\@evil.example/", "must not contain '\\\\'"),
        ("http://example.com/a b", "must not contain ' '"),
        ("http://example.com/a\tb", "must not contain '\\t'"),
        ("http://example.com/\r\nX-Injected: 1", "must not contain '\\r'"),
        ("http://example.com/\nx", "must not contain '\\n'"),
        ("http://example.com/\x00", "must not contain '\\x00'"),
        ("http://example.com/\x7f", "must not contain '\\x7f'"),
        ("http://example.com/\x85", "must not contain '\\x85'"),
        ("http://example.com/\x9f", "must not contain '\\x9f'"),
        ("http://example.com/\u00a0", "must not contain '\\xa0'"),  # NBSP is whitespace too
        ("http://example.com/" + "a" * 2048, "at most 2048 characters"),
        ("http://user:pass@example.com/", "must not carry credentials"),
        ("http://user@example.com/", "must not carry credentials"),
        ("http://@example.com/", "must not carry credentials"),
        ("http://:@example.com/", "must not carry credentials"),
        ("ftp://example.com/", "absolute http or https URL"),
        ("file:///etc/passwd", "absolute http or https URL"),
        ("javascript://example.com/", "absolute http or https URL"),
        ("gopher://example.com/", "absolute http or https URL"),
        ("//example.com/hook", "absolute http or https URL"),
        ("example.com/hook", "absolute http or https URL"),
        ("http:/x", "absolute http or https URL"),
        ("http:x", "absolute http or https URL"),
        ("http://", "must have a host"),
        ("http:///path", "must have a host"),
        ("http://example.com:99999/", "not a valid URL"),
        ("http://[::1/", "not a valid URL"),
    ],
)
def test_parse_callback_url_refusals(url, message):
    with pytest.raises(ssrf.UnsafeCallbackUrl) as info:
        ssrf.parse_callback_url(url)
    assert message in str(info.value)


def test_length_limit_edge():
    base = "http://example.com/"
    ok = base + "a" * (ssrf.MAX_URL_LENGTH - len(base))
    assert len(ok) == 2048
    assert ssrf.parse_callback_url(ok).request_uri == ok[len("http://example.com") :]
    with pytest.raises(ssrf.UnsafeCallbackUrl, match="at most 2048"):
        ssrf.parse_callback_url(ok + "a")


def test_unsafe_callback_url_is_a_value_error():
    assert issubclass(ssrf.UnsafeCallbackUrl, ValueError)


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("127.0.0.1", "loopback"),
        ("127.8.0.1", "loopback"),
        ("::1", "loopback"),
        ("10.1.2.3", "private"),
        ("172.16.0.5", "private"),
        ("172.31.255.255", "private"),
        ("192.168.1.1", "private"),
        ("fc00::1", "private"),
        ("fd12:3456::1", "private"),
        ("169.254.169.254", "link-local"),  # cloud metadata
        ("fe80::1", "link-local"),
        ("100.64.0.1", "non-global"),  # CGNAT (shared address space)
        ("100.127.255.254", "non-global"),
        ("224.0.0.1", "multicast"),
        ("239.255.255.250", "multicast"),
        ("ff02::1", "multicast"),
        ("::ffff:127.0.0.1", "loopback"),  # IPv4-mapped: checked as the IPv4 address
        ("::ffff:10.0.0.7", "private"),
        ("::ffff:169.254.169.254", "link-local"),
        ("::ffff:100.64.0.1", "non-global"),
    ],
)
def test_refusal_reasons(address, reason):
    assert ssrf._refusal(ipaddress.ip_address(address)) == reason


@pytest.mark.parametrize(
    "address", ["0.0.0.0", "::", "240.0.0.1", "255.255.255.255", "192.0.2.1", "198.18.0.1"]
)
def test_other_non_public_ipv4_is_refused(address):
    assert ssrf._refusal(ipaddress.ip_address(address)) is not None


@pytest.mark.parametrize(
    "address", ["93.184.216.34", "8.8.8.8", "1.1.1.1", "2606:4700::1111", "::ffff:8.8.8.8"]
)
def test_public_addresses_pass(address):
    assert ssrf._refusal(ipaddress.ip_address(address)) is None


@pytest.mark.parametrize(
    ("url", "reason", "shown"),
    [
        ("http://127.0.0.1:9000/hook", "loopback", "127.0.0.1"),
        ("http://10.0.0.1/hook", "private", "10.0.0.1"),
        ("http://169.254.169.254/latest/meta-data", "link-local", "169.254.169.254"),
        ("http://100.64.0.1/hook", "non-global", "100.64.0.1"),
        ("http://224.0.0.1/hook", "multicast", "224.0.0.1"),
        ("http://[::1]/hook", "loopback", "::1"),
        ("http://[::ffff:127.0.0.1]/hook", "loopback", "127.0.0.1"),
        ("http://[fe80::1]:8080/hook", "link-local", "fe80::1"),
    ],
)
def test_checked_target_refuses_non_public_literals(url, reason, shown):
    with pytest.raises(ssrf.UnsafeCallbackUrl) as info:
        ssrf.checked_target(url, allow_private=False)
    assert f"resolves to a {reason} address ({shown})" in str(info.value)
    assert "CALLBACK_ALLOW_PRIVATE_NETWORKS" in str(info.value)
    target = ssrf.checked_target(url, allow_private=True)  # the local-development switch
    assert target.addresses == (ssrf.parse_callback_url(url).host,)


def test_checked_target_of_a_public_literal_is_that_address():
    target = ssrf.checked_target("https://[2606:4700::1111]:8443/h?x=1", allow_private=False)
    assert target.addresses == ("2606:4700::1111",)
    assert target.url.host_header == "[2606:4700::1111]:8443"
    assert target.url.request_uri == "/h?x=1"


def test_checked_target_follows_the_setting_when_not_told(settings):
    settings.CALLBACK_ALLOW_PRIVATE_NETWORKS = False
    with pytest.raises(ssrf.UnsafeCallbackUrl, match="loopback"):
        ssrf.checked_target("http://127.0.0.1/")
    settings.CALLBACK_ALLOW_PRIVATE_NETWORKS = True
    assert ssrf.checked_target("http://127.0.0.1/").addresses == ("127.0.0.1",)


def test_check_callback_url_with_private_allowed_only_parses():
    ssrf.check_callback_url("http://10.0.0.1/", allow_private=True)
    with pytest.raises(ssrf.UnsafeCallbackUrl, match="credentials"):
        ssrf.check_callback_url("http://u@10.0.0.1/", allow_private=True)
    with pytest.raises(ssrf.UnsafeCallbackUrl, match="private"):
        ssrf.check_callback_url("http://10.0.0.1/", allow_private=False)


@pytest.mark.parametrize("address", ["0.0.0.0", "::"])
def test_unspecified_addresses_are_named_so(address):
    assert ssrf._refusal(ipaddress.ip_address(address)) == "unspecified"


def test_port_zero_is_refused_not_read_as_the_default_port():
    with pytest.raises(ssrf.UnsafeCallbackUrl, match="port"):
        ssrf.parse_callback_url("http://example.com:0/hook")
