"""Outbound HTTP to URLs that API callers chose: reference images, LoRA files and webhooks.

A caller-supplied URL must not turn the server into a proxy into its own network. Every request made here

* speaks http or https only;
* resolves the host name once, checks every address it connects to, and connects to exactly that address
  (the original ``Host`` header and TLS server name are kept), so a DNS answer cannot change between the
  check and the connection;
* refuses loopback, private (RFC 1918, ``fc00::/7``), link-local (``169.254.0.0/16`` with the cloud metadata
  address, ``fe80::/10``), multicast, unspecified, reserved and shared (CGNAT ``100.64.0.0/10``) addresses,
  also written as IPv4-mapped, 6to4 or NAT64 IPv6 addresses, unless the operator allowed them
  (``--fetch-allow`` / ``FLUXSERVE_FETCH_ALLOW``, e.g. ``10.0.0.0/8`` or ``10.1.2.3:8080``);
* checks every redirect hop the same way;
* has a connect timeout, a deadline for the whole download (not per read) and a byte cap.

Refused addresses all get one message, whatever listens there; connection failures to allowed hosts say
"could not connect" without telling a refused port from a silent one.

Downloads and image decoding run on their own bounded thread pool (``run_blocking``), so slow downloads
cannot hold up unrelated API requests.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import httpx

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
T = TypeVar("T")

MAX_REDIRECTS = 5
WEBHOOK_RESPONSE_BYTES = 1024**2  # a webhook receiver's answer is read, but not more of it than this
REFUSED_MESSAGE = ("the URL points to an address this server does not fetch from (loopback, private, "
                   "link-local or otherwise internal); operators can allow it with --fetch-allow")
_DEFAULT_PORTS = {"http": 80, "https": 443}
_SHARED = ipaddress.ip_network("100.64.0.0/10")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class FetchError(Exception):
    """A download that failed or was refused; ``message`` is safe to show to the caller."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class AddressRefused(httpx.ConnectError):
    """The URL's host resolves only to addresses this server does not connect to."""

    def __init__(self) -> None:
        super().__init__(REFUSED_MESSAGE)


@dataclass(frozen=True)
class AllowRule:
    """An operator's exception to the refusal: a network, optionally limited to one port."""

    network: IPNetwork
    port: int | None = None

    def matches(self, address: IPAddress, port: int) -> bool:
        return address.version == self.network.version and address in self.network and (
            self.port is None or self.port == port)


def parse_allow(text: str) -> tuple[AllowRule, ...]:
    """``"10.0.0.0/8, 192.168.1.5:8080, [fd00::/8]:443"`` as rules; raises ``ValueError`` naming a bad entry."""
    rules = []
    for entry in (part.strip() for part in (text or "").split(",")):
        if not entry:
            continue
        address, port = entry, None
        if entry.startswith("["):
            address, _, rest = entry[1:].partition("]")
            if rest:
                if not rest.startswith(":"):
                    raise ValueError(f"fetch allow list: {entry!r} is not CIDR, CIDR:PORT or [IPv6-CIDR]:PORT")
                port = rest[1:]
        elif entry.count(":") == 1:
            address, port = entry.split(":")
        try:
            network = ipaddress.ip_network(address, strict=False)
            port_number = int(port) if port is not None else None
        except ValueError:
            raise ValueError(f"fetch allow list: {entry!r} is not CIDR, CIDR:PORT or [IPv6-CIDR]:PORT") from None
        if port_number is not None and not 0 < port_number < 65536:
            raise ValueError(f"fetch allow list: {entry!r} has an invalid port")
        rules.append(AllowRule(network, port_number))
    return tuple(rules)


@dataclass(frozen=True)
class FetchPolicy:
    """Limits for outbound requests; ``FetchPolicy.from_settings(settings)`` reads them from the settings."""

    allow: tuple[AllowRule, ...] = ()
    connect_timeout_s: float = 10.0
    deadline_s: float = 60.0  # a whole reference image download, redirects included
    lora_deadline_s: float = 3600.0  # a whole LoRA download
    max_reference_bytes: int = 50 * 1024**2
    max_lora_bytes: int = 16 * 1024**3
    workers: int = 16  # threads that download and decode references
    decode_slots: int = 4  # reference images decoded at once

    @classmethod
    def from_settings(cls, settings: Any) -> FetchPolicy:
        return cls(
            allow=parse_allow(settings.fetch_allow),
            connect_timeout_s=float(settings.fetch_connect_timeout),
            deadline_s=float(settings.fetch_deadline),
            lora_deadline_s=float(settings.fetch_lora_deadline),
            max_reference_bytes=int(float(settings.fetch_max_reference_mb) * 1024**2),
            max_lora_bytes=int(float(settings.fetch_max_lora_mb) * 1024**2),
            workers=max(1, int(settings.fetch_workers)),
            decode_slots=max(1, int(settings.fetch_decode_slots)),
        )

    def allowed(self, address: IPAddress, port: int) -> bool:
        """Whether a connection to ``address:port`` is allowed: public addresses always, others when listed."""
        return any(rule.matches(address, port) for rule in self.allow) or not is_internal(address)


_policy = FetchPolicy()
_policy_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None


def configure(policy: FetchPolicy) -> FetchPolicy:
    """Make ``policy`` the process's policy (the server and the CLI call this at start); returns the previous
    one."""
    global _policy, _pool
    with _policy_lock:
        previous, _policy = _policy, policy
        if _pool is not None and previous.workers != policy.workers:
            _pool.shutdown(wait=False)
            _pool = None
    return previous


def current() -> FetchPolicy:
    return _policy


def is_internal(address: IPAddress) -> bool:
    """Loopback, private, link-local, multicast, unspecified, reserved or shared addresses, also when an IPv6
    address embeds such an IPv4 address."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is None and address in _NAT64:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None:
            return is_internal(embedded)
        if address.teredo is not None:
            return True
    return (address.is_loopback or address.is_private or address.is_link_local or address.is_multicast
            or address.is_unspecified or address.is_reserved or not address.is_global
            or (isinstance(address, ipaddress.IPv4Address) and address in _SHARED)
            or (isinstance(address, ipaddress.IPv6Address) and address.is_site_local))


def resolve_allowed(host: str, port: int, policy: FetchPolicy | None = None) -> IPAddress:
    """The first address of ``host`` that ``policy`` allows; ``AddressRefused`` when there is none."""
    policy = policy or _policy
    try:
        candidates = [ipaddress.ip_address(host.strip("[]"))]
    except ValueError:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError):
            raise httpx.ConnectError(f"could not resolve the host name {host!r}") from None
        candidates = []
        for info in infos:
            try:
                candidates.append(ipaddress.ip_address(str(info[4][0]).split("%")[0]))
            except ValueError:
                continue
    for address in candidates:
        if policy.allowed(address, port):
            return address
    raise AddressRefused()


class GuardedTransport(httpx.BaseTransport):
    """An httpx transport that resolves the host, checks the address and connects to that address, keeping
    the ``Host`` header and the TLS server name; used with ``follow_redirects`` every hop is checked.
    ``deadline_s`` bounds each request with its whole response, ``max_response_bytes`` the response body."""

    _MAX_TLS_POOLS = 32

    def __init__(self, policy: FetchPolicy | None = None, *, deadline_s: float | None = None,
                 max_response_bytes: int | None = None, **transport_options: Any):
        self._policy = policy
        self._deadline_s = deadline_s
        self._max_response_bytes = max_response_bytes
        self._options = transport_options
        self._plain = httpx.HTTPTransport(**transport_options)
        # connections are pooled by the address connected to; a TLS connection verified for one host name
        # must not serve another name on the same address, so each name has its own pool
        self._tls: dict[str, httpx.HTTPTransport] = {}
        self._lock = threading.Lock()

    def _inner(self, scheme: str, host: str) -> httpx.HTTPTransport:
        if scheme != "https":
            return self._plain
        with self._lock:
            transport = self._tls.pop(host, None)
            if transport is None:
                transport = httpx.HTTPTransport(**self._options)
                if len(self._tls) >= self._MAX_TLS_POOLS:
                    self._tls.pop(next(iter(self._tls))).close()
            self._tls[host] = transport  # most recently used last
            return transport

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        if url.scheme not in _DEFAULT_PORTS:
            raise httpx.UnsupportedProtocol("only http and https URLs are fetched")
        port = url.port or _DEFAULT_PORTS[url.scheme]
        address = resolve_allowed(url.host, port, self._policy)
        extensions = dict(request.extensions)  # shares the timeout dict: a caller may shorten reads later
        if url.scheme == "https":
            extensions.setdefault("sni_hostname", url.host)
        deadline = None
        if self._deadline_s is not None:
            deadline = time.monotonic() + self._deadline_s
            extensions["timeout"] = {name: self._deadline_s if value is None else min(value, self._deadline_s)
                                     for name, value in dict(extensions.get("timeout") or {}).items()}
        pinned = httpx.Request(request.method, url.copy_with(host=str(address)), headers=request.headers,
                               stream=request.stream, extensions=extensions)
        try:
            response = self._inner(url.scheme, url.host).handle_request(pinned)
        except (httpx.ConnectError, httpx.ConnectTimeout):
            raise httpx.ConnectError(f"could not connect to {url.host}") from None
        if deadline is None and self._max_response_bytes is None:
            return response
        limited = _LimitedStream(response.stream, deadline, extensions.get("timeout"), self._max_response_bytes)
        return httpx.Response(response.status_code, headers=response.headers, stream=limited,
                              extensions=response.extensions)

    def close(self) -> None:
        with self._lock:
            transports, self._tls = [self._plain, *self._tls.values()], {}
        for transport in transports:
            transport.close()


class _LimitedStream(httpx.SyncByteStream):
    """A response body that ends in an ``httpx`` error past its deadline or its byte cap."""

    def __init__(self, stream: Any, deadline: float | None, timeouts: Any, max_bytes: int | None):
        self._stream, self._deadline, self._timeouts, self._max_bytes = stream, deadline, timeouts, max_bytes

    def __iter__(self) -> Iterator[bytes]:
        received = 0
        chunks = iter(self._stream)
        while True:
            if self._deadline is not None:
                remaining = self._deadline - time.monotonic()
                if remaining <= 0:
                    raise httpx.ReadTimeout("the response did not finish in time")
                if isinstance(self._timeouts, dict):
                    self._timeouts["read"] = remaining
            try:
                chunk = next(chunks)
            except StopIteration:
                return
            received += len(chunk)
            if self._max_bytes is not None and received > self._max_bytes:
                raise httpx.ReadError("the response is too large")
            yield chunk

    def close(self) -> None:
        close = getattr(self._stream, "close", None)
        if close is not None:
            close()


def client(policy: FetchPolicy | None = None, *, verify: Any = True, deadline_s: float | None = None,
           max_response_bytes: int | None = None, **options: Any) -> httpx.Client:
    """An ``httpx.Client`` whose every connection (redirects included) goes through the address check;
    ``verify`` (TLS verification: True or an ``ssl.SSLContext``), ``deadline_s`` (per request, response
    included) and ``max_response_bytes`` go to the transport."""
    return httpx.Client(transport=GuardedTransport(policy, verify=verify, deadline_s=deadline_s,
                                                   max_response_bytes=max_response_bytes), **options)


@contextmanager
def open_stream(url: str, *, max_bytes: int, deadline_s: float, policy: FetchPolicy | None = None,
                headers: dict[str, str] | None = None) -> Iterator[Iterator[bytes]]:
    """GET ``url`` and yield an iterator over its body, all within ``deadline_s`` and ``max_bytes``; every
    failure is a ``FetchError`` whose message names no internal detail."""
    policy = policy or _policy
    if not isinstance(url, str) or urlsplit_scheme(url) not in _DEFAULT_PORTS:
        raise FetchError("must be an http(s) URL")
    deadline = time.monotonic() + deadline_s
    with client(policy, follow_redirects=False) as http:
        try:
            request = http.build_request("GET", url, headers=headers)
        except httpx.InvalidURL:
            raise FetchError("is not a valid URL") from None
        response = None
        try:
            for _ in range(MAX_REDIRECTS + 1):
                request.extensions["timeout"] = _timeout(policy, deadline)
                response = http.send(request, stream=True)
                if not (response.is_redirect and response.next_request is not None):
                    break
                request = response.next_request
                response.close()
            else:
                raise FetchError(f"more than {MAX_REDIRECTS} redirects")
            if response.status_code != 200:
                raise FetchError(f"the server answered HTTP {response.status_code}")
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > max_bytes:
                raise FetchError(f"the file is larger than {_size(max_bytes)}")
            yield _body(response, deadline, deadline_s, max_bytes)
        except AddressRefused:
            raise FetchError(REFUSED_MESSAGE) from None
        except httpx.TimeoutException:
            raise FetchError(f"the download did not finish within {deadline_s:g} s") from None
        except httpx.UnsupportedProtocol:
            raise FetchError("a redirect pointed to a URL that is not http(s)") from None
        except httpx.ConnectError as exc:
            raise FetchError(str(exc) if str(exc).startswith("could not") else "could not connect") from None
        except httpx.HTTPError:
            raise FetchError("the download failed") from None
        finally:
            if response is not None:
                response.close()


def download(url: str, *, max_bytes: int, deadline_s: float, policy: FetchPolicy | None = None,
             headers: dict[str, str] | None = None) -> bytes:
    """The whole body of ``url`` (see ``open_stream``)."""
    with open_stream(url, max_bytes=max_bytes, deadline_s=deadline_s, policy=policy, headers=headers) as body:
        return b"".join(body)


def webhook_client(timeout_s: float, policy: FetchPolicy | None = None) -> httpx.Client:
    """A client for webhook deliveries: no redirects, ``timeout_s`` for each delivery as a whole (a receiver
    that answers slowly cannot hold a sender thread longer), a capped answer."""
    return client(policy, timeout=timeout_s, follow_redirects=False, deadline_s=timeout_s,
                  max_response_bytes=WEBHOOK_RESPONSE_BYTES)


def post_json(url: str, body: Any, *, timeout_s: float, headers: dict[str, str] | None = None,
              policy: FetchPolicy | None = None) -> httpx.Response:
    """POST ``body`` as JSON like a webhook delivery (see ``webhook_client``)."""
    with webhook_client(timeout_s, policy) as http:
        return http.post(url, json=body, headers=headers)


async def run_blocking(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run ``fn`` on the download pool (not the server's default thread pool)."""
    return await asyncio.get_running_loop().run_in_executor(_get_pool(), partial(fn, *args, **kwargs))


def _get_pool() -> ThreadPoolExecutor:
    global _pool
    with _policy_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(_policy.workers, thread_name_prefix="fetch")
        return _pool


def _body(response: httpx.Response, deadline: float, deadline_s: float, max_bytes: int) -> Iterator[bytes]:
    timeouts = response.request.extensions.get("timeout")
    received = 0
    chunks = response.iter_bytes()
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise FetchError(f"the download did not finish within {deadline_s:g} s")
        if isinstance(timeouts, dict):
            timeouts["read"] = remaining  # the next read may wait only until the deadline
        try:
            chunk = next(chunks)
        except StopIteration:
            return
        except httpx.TimeoutException:
            raise FetchError(f"the download did not finish within {deadline_s:g} s") from None
        except httpx.HTTPError:
            raise FetchError("the download failed") from None
        received += len(chunk)
        if received > max_bytes:
            raise FetchError(f"the file is larger than {_size(max_bytes)}")
        yield chunk


def _timeout(policy: FetchPolicy, deadline: float) -> dict[str, float]:
    remaining = max(0.001, deadline - time.monotonic())
    return httpx.Timeout(remaining, connect=min(policy.connect_timeout_s, remaining)).as_dict()


def urlsplit_scheme(url: str) -> str:
    return url.strip().split(":", 1)[0].lower() if ":" in url else ""


def _size(n: int) -> str:
    return f"{n / 1024**3:g} GiB" if n >= 1024**3 else f"{n / 1024**2:g} MiB"
