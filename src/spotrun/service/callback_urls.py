"""Which callback URLs a job may name, and how a delivery reaches only the address it
checked: public destinations on the standard ports (unless the operator allows private
ones), resolved once and pinned; the signature a receiver verifies.

The submit checks (the service) and the deliverer (the HTTP server's callbacks) share this,
so a URL refused at submit is refused again before each delivery by the same code.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import re
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

ALLOW_PRIVATE_ENV = "SPOTRUN_CALLBACK_ALLOW_PRIVATE"
MAX_URL_LENGTH = 2000


class CallbackRefused(ValueError):
    """A callback URL may not be used; the message says why, in one line."""


class CallbackForbidden(CallbackRefused):
    """A well-formed callback URL (one :data:`URL_PATTERN` matches) whose destination is
    refused: a port other than 80 and 443, a name that does not resolve, or an address
    that is not public."""


# The form of every callback URL the server takes, as a regular expression that JSON
# Schema, ECMA and Python read alike (it is the API document's ``pattern``):
# http(s), a host (a name of RFC 3986's reg-name characters or a bracketed IPv6 address),
# an optional port in 0-65535, then anything without spaces or control characters.
_H16 = "[0-9A-Fa-f]{1,4}"
_IPV6 = "|".join((
    f"({_H16}:){{7}}{_H16}", f"({_H16}:){{1,7}}:", f"({_H16}:){{1,6}}:{_H16}",
    *(f"({_H16}:){{1,{n}}}(:{_H16}){{1,{7 - n}}}" for n in (5, 4, 3, 2)),
    f"{_H16}:(:{_H16}){{1,6}}", f":((:{_H16}){{1,7}}|:)",
    # An IPv4 address in IPv6 (::a.b.c.d, ::ffff:a.b.c.d): judged as the IPv4 one.
    r"::([Ff]{4}:)?(25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"
    r"(\.(25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])){3}"))
_PORT = "6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[0-5]?[0-9]{1,4}"
URL_PATTERN = (rf"^[Hh][Tt][Tt][Pp][Ss]?://(\[({_IPV6})\]|[A-Za-z0-9._~!$&'()*+,;=%-]+)"
               rf"(:({_PORT}))?([/?#][^\x00-\x20\x7f]*)?$")
_URL_RE = re.compile(URL_PATTERN)


def allow_private_from_env() -> bool:
    return os.environ.get(ALLOW_PRIVATE_ENV, "").strip().lower() in ("1", "true", "yes")


def redact_url(url: str) -> str:
    """The URL without credentials, query or fragment (they may hold secrets)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        port = f":{parts.port}" if parts.port else ""
        return f"{parts.scheme}://{host}{port}{parts.path}"
    except ValueError:
        return "<unparseable URL>"


# IPv6 addresses that carry an IPv4 one, which the IPv4 checks would have to judge:
# IPv4-compatible (deprecated), NAT64 (well-known and local-use), 6to4 and Teredo.
_EMBEDS_IPV4 = tuple(ipaddress.ip_network(n) for n in (
    "::/96", "64:ff9b::/96", "64:ff9b:1::/48", "2002::/16", "2001::/32"))
STANDARD_PORTS = {"http": 80, "https": 443}


def _why_not_public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        elif any(ip in net for net in _EMBEDS_IPV4):
            return "an IPv6 address that embeds an IPv4 one (NAT64, 6to4, Teredo)"
    if ip.is_loopback:
        return "a loopback address"
    if ip.is_link_local:
        return "a link-local address (where cloud metadata services live)"
    if ip.is_unspecified:
        return "an unspecified address"
    if ip.is_multicast:
        return "a multicast address"
    if ip.is_private:
        return "a private address"
    if not ip.is_global:
        return "a reserved address"
    return None


def resolve(host: str, port: int) -> list[str]:
    """The addresses of ``host`` (the system's resolver), for one delivery."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]).split("%", 1)[0] for info in infos})


def _addresses(host: str, port: int) -> list[str]:
    try:
        return [str(ipaddress.ip_address(host))]
    except ValueError:
        pass
    try:
        return resolve(host, port)
    except (OSError, UnicodeError):
        raise CallbackForbidden(f"cannot resolve host {host!r}") from None


@dataclass(frozen=True)
class Target:
    """Where one delivery goes: the URL's name, and the one address checked for it."""

    scheme: str
    host: str
    port: int
    address: str
    path: str

    def url(self) -> str:
        """The URL with the checked address in place of the name."""
        addr = f"[{self.address}]" if ":" in self.address else self.address
        return f"{self.scheme}://{addr}:{self.port}{self.path}"

    def host_header(self) -> str:
        name = f"[{self.host}]" if ":" in self.host else self.host
        default = STANDARD_PORTS[self.scheme] == self.port
        return name if default else f"{name}:{self.port}"


def check_callback_url(url: str, *, allow_private: bool) -> Target:
    """The place a callback URL reaches, or :class:`CallbackRefused` saying why not.

    Refuses a URL that :data:`URL_PATTERN` does not match, and (with
    :class:`CallbackForbidden`) one whose name does not resolve and, unless
    ``allow_private``, a non-standard port or a name with any non-public address.
    Resolves the name once (blocking DNS); the caller connects to ``Target.address``,
    never to the name again.
    """
    if len(url) > MAX_URL_LENGTH:
        raise CallbackRefused(f"longer than {MAX_URL_LENGTH} characters")
    if any(ord(c) < 33 or ord(c) == 127 for c in url):
        raise CallbackRefused("contains spaces or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise CallbackRefused(f"not a valid URL ({exc})") from None
    if parts.scheme not in STANDARD_PORTS:
        raise CallbackRefused("must start with http:// or https://")
    host = parts.hostname
    if not host:
        raise CallbackRefused("has no host")
    if parts.username is not None or parts.password is not None:
        raise CallbackRefused("must not carry a user name or password")
    if not _URL_RE.fullmatch(url):
        # The checks above name the usual mistakes; this is the rest of the documented form.
        raise CallbackRefused("is not of the form http(s)://host[:port][/path], with a "
                              "host name of letters, digits and -._~!$&'()*+,;=% or a "
                              "bracketed IPv6 address")
    port = port or STANDARD_PORTS[parts.scheme]
    if not allow_private and port not in STANDARD_PORTS.values():
        raise CallbackForbidden(f"uses port {port}: callbacks go to ports 80 and 443 unless "
                              f"the operator sets {ALLOW_PRIVATE_ENV}=1")
    path = parts.path or "/"
    if parts.query:
        path += f"?{parts.query}"
    addresses = _addresses(host, port)
    if not addresses:
        raise CallbackForbidden(f"cannot resolve host {host!r}")
    if not allow_private:
        literal = addresses == [host]
        for addr in addresses:
            why = _why_not_public(ipaddress.ip_address(addr))
            if why is not None:
                # The addresses a name resolved to stay out of the answer: they would
                # make the server a scanner of what its network's names point at.
                raise CallbackForbidden(
                    f"{host} {'is' if literal else 'resolves to'} {why}; callbacks to "
                    f"loopback, private and link-local addresses are refused unless the "
                    f"operator sets {ALLOW_PRIVATE_ENV}=1")
    return Target(parts.scheme, host, port, addresses[0], path)


def signature(secret: str, timestamp: int, body: bytes) -> str:
    """The value of ``X-Spotrun-Signature`` for ``body`` sent at ``timestamp``."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"
