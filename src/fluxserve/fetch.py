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
* has a connect timeout, one deadline for the whole exchange (resolving, connecting, redirects, headers and
  body: ``fluxserve.deadline``), not a timeout per read, and a byte cap.

Refused addresses all get one message, whatever listens there; connection failures to allowed hosts say
"could not connect" without telling a refused port from a silent one.

The API's downloads run on their own thread pool (``run_blocking``), never the server's default one, shared
fairly between API keys (``fluxserve.fair_pool``: a key holds at most its share of the slots); work that
needs no network (data URIs, this server's own files) runs on a second, small pool and never waits behind a
download.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import threading
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import httpx

from fluxserve.deadline import Deadline
from fluxserve.fair_pool import FairPool

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
T = TypeVar("T")

MAX_REDIRECTS = 5
WEBHOOK_RESPONSE_BYTES = 1024**2  # a webhook receiver's answer is read, but not more of it than this
REFUSED_MESSAGE = ("the URL points to an address this server does not fetch from (loopback, private, "
                   "link-local or otherwise internal); operators can allow it with --fetch-allow")
DEADLINE = "fluxserve.deadline"  # request extension: the Deadline of the exchange a request belongs to
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
    """Limits for outbound requests; ``FetchPolicy.from_settings(settings)`` reads them from the settings.
    Each deadline bounds one whole exchange of its kind, redirects included."""

    allow: tuple[AllowRule, ...] = ()
    connect_timeout_s: float = 10.0
    deadline_s: float = 60.0  # a reference image
    lora_deadline_s: float = 3600.0  # a LoRA file (up to 16 GiB)
    dataset_deadline_s: float = 600.0  # a training dataset archive (up to 1 GiB: 1.7 MB/s at least)
    max_reference_bytes: int = 50 * 1024**2
    max_lora_bytes: int = 16 * 1024**3
    workers: int = 16  # threads that download (and decode) references and datasets at submit
    key_slots: int = 0  # of those, how many one API key may hold at once (0: a quarter of them, at least 1)
    decode_slots: int = 4  # reference images decoded at once; also the threads for work without network

    @classmethod
    def from_settings(cls, settings: Any) -> FetchPolicy:
        return cls(
            allow=parse_allow(settings.fetch_allow),
            connect_timeout_s=float(settings.fetch_connect_timeout),
            deadline_s=float(settings.fetch_deadline),
            lora_deadline_s=float(settings.fetch_lora_deadline),
            dataset_deadline_s=float(settings.fetch_dataset_deadline),
            max_reference_bytes=int(float(settings.fetch_max_reference_mb) * 1024**2),
            max_lora_bytes=int(float(settings.fetch_max_lora_mb) * 1024**2),
            workers=max(1, int(settings.fetch_workers)),
            key_slots=max(0, int(settings.fetch_key_slots)),
            decode_slots=max(1, int(settings.fetch_decode_slots)),
        )

    @property
    def slots_per_key(self) -> int:
        """How many download threads one API key may hold at once."""
        return min(self.workers, self.key_slots or max(1, self.workers // 4))

    def allowed(self, address: IPAddress, port: int) -> bool:
        """Whether a connection to ``address:port`` is allowed: public addresses always, others when listed."""
        return any(rule.matches(address, port) for rule in self.allow) or not is_internal(address)


_policy = FetchPolicy()
_policy_lock = threading.Lock()
_pools: tuple[FairPool, FairPool] | None = None  # (downloads, work without network)


def configure(policy: FetchPolicy) -> FetchPolicy:
    """Make ``policy`` the process's policy (the server and the CLI call this at start); returns the previous
    one."""
    global _policy, _pools
    with _policy_lock:
        previous, _policy = _policy, policy
        sizes = (policy.workers, policy.slots_per_key, policy.decode_slots)
        if _pools is not None and sizes != (previous.workers, previous.slots_per_key, previous.decode_slots):
            for pool in _pools:
                pool.shutdown()
            _pools = None
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


def resolve_allowed(host: str, port: int, policy: FetchPolicy | None = None,
                    timeout_s: float | None = None) -> IPAddress:
    """The first address of ``host`` that ``policy`` allows; ``AddressRefused`` when there is none. A name
    that does not resolve within ``timeout_s`` is an ``httpx.ConnectTimeout``."""
    policy = policy or _policy
    try:
        candidates = [ipaddress.ip_address(host.strip("[]"))]
    except ValueError:
        candidates = []
        for info in _getaddrinfo(host, port, timeout_s):
            try:
                candidates.append(ipaddress.ip_address(str(info[4][0]).split("%")[0]))
            except ValueError:
                continue
    for address in candidates:
        if policy.allowed(address, port):
            return address
    raise AddressRefused()


def _getaddrinfo(host: str, port: int, timeout_s: float | None) -> list[tuple]:
    """``socket.getaddrinfo``, given up after ``timeout_s`` (the system resolver has no timeout of its own to
    set: it runs on a daemon thread that finishes, unwaited for, when the resolver gives up)."""
    outcome: dict[str, Any] = {}

    def resolve() -> None:
        try:
            outcome["infos"] = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError):
            outcome["error"] = True

    if timeout_s is None:
        resolve()
    else:
        thread = threading.Thread(target=resolve, name="fetch-resolve", daemon=True)
        thread.start()
        thread.join(max(0.0, timeout_s))
        if thread.is_alive():
            raise httpx.ConnectTimeout(f"could not resolve the host name {host!r} in time")
    if "infos" not in outcome:
        raise httpx.ConnectError(f"could not resolve the host name {host!r}")
    return outcome["infos"]


class GuardedTransport(httpx.BaseTransport):
    """An httpx transport that resolves the host, checks the address and connects to that address, keeping
    the ``Host`` header and the TLS server name; used with ``follow_redirects`` every hop is checked.

    ``deadline_s`` bounds each request with its whole response, connect to last byte (a ``Deadline`` in the
    request's ``DEADLINE`` extension, which redirects inherit, bounds all hops together instead);
    ``max_response_bytes`` caps the response body. Connections are never reused: each request connects
    afresh, so every connection a deadline bounds is one it watched from its start (and a TLS connection
    verified for one host name never serves another)."""

    def __init__(self, policy: FetchPolicy | None = None, *, deadline_s: float | None = None,
                 max_response_bytes: int | None = None, **transport_options: Any):
        self._policy = policy
        self._deadline_s = deadline_s
        self._max_response_bytes = max_response_bytes
        self._inner = httpx.HTTPTransport(limits=httpx.Limits(max_keepalive_connections=0), **transport_options)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        if url.scheme not in _DEFAULT_PORTS:
            raise httpx.UnsupportedProtocol("only http and https URLs are fetched")
        deadline: Deadline | None = request.extensions.get(DEADLINE)
        if deadline is None and self._deadline_s is not None:
            deadline = request.extensions[DEADLINE] = Deadline(self._deadline_s)  # redirects share it
        timeouts = dict(request.extensions.get("timeout") or {})
        if deadline is not None:  # no single operation may outlast the deadline either
            remaining = max(0.001, deadline.remaining())
            timeouts = {name: remaining if value is None else min(value, remaining)
                        for name, value in timeouts.items()}
        port = url.port or _DEFAULT_PORTS[url.scheme]
        try:
            address = resolve_allowed(url.host, port, self._policy, timeouts.get("connect"))
        except httpx.ConnectTimeout:
            raise (_expired(deadline) if deadline is not None and deadline.expired else
                   httpx.ConnectError(f"could not connect to {url.host}")) from None
        extensions = {name: value for name, value in request.extensions.items() if name != DEADLINE}
        extensions["timeout"] = timeouts
        if url.scheme == "https":
            extensions.setdefault("sni_hostname", url.host)
        watched: list[int] = []
        if deadline is not None:
            extensions["trace"] = _watching(deadline, watched, extensions.get("trace"))
        pinned = httpx.Request(request.method, url.copy_with(host=str(address)), headers=request.headers,
                               stream=request.stream, extensions=extensions)
        try:
            response = self._inner.handle_request(pinned)
        except httpx.TransportError as exc:
            _release(deadline, watched)
            if deadline is not None and deadline.expired:
                raise _expired(deadline) from None
            if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)):
                raise httpx.ConnectError(f"could not connect to {url.host}") from None
            raise
        if deadline is None and self._max_response_bytes is None:
            return response
        guarded = _GuardedStream(response.stream, deadline, self._max_response_bytes,
                                 lambda: _release(deadline, watched))
        return httpx.Response(response.status_code, headers=response.headers, stream=guarded,
                              extensions=response.extensions)

    def close(self) -> None:
        self._inner.close()


def _watching(deadline: Deadline, watched: list[int], chained: Callable[..., Any] | None) -> Callable[..., Any]:
    """An httpcore ``trace`` callback that watches each connection as soon as its TCP connect completes
    (the TLS handshake that follows is watched too)."""

    def trace(event: str, info: dict[str, Any]) -> None:
        if event == "connection.connect_tcp.complete":
            sock = info["return_value"].get_extra_info("socket")
            if sock is not None:
                watched.append(deadline.watch(sock))
        if chained is not None:
            chained(event, info)

    return trace


def _release(deadline: Deadline | None, watched: list[int]) -> None:
    while deadline is not None and watched:
        deadline.release(watched.pop())


def _expired(deadline: Deadline) -> httpx.ReadTimeout:
    return httpx.ReadTimeout(f"the exchange did not finish within {deadline.seconds:g} s")


class _GuardedStream(httpx.SyncByteStream):
    """A response body that ends in ``httpx.ReadTimeout`` once its exchange's deadline has passed, in
    ``httpx.ReadError`` past its byte cap; closing it ends the watch on its connection."""

    def __init__(self, stream: Any, deadline: Deadline | None, max_bytes: int | None,
                 release: Callable[[], None]):
        self._stream, self._deadline, self._max_bytes, self._release = stream, deadline, max_bytes, release

    def __iter__(self) -> Iterator[bytes]:
        received = 0
        try:
            for chunk in self._stream:
                if self._deadline is not None and self._deadline.expired:
                    raise _expired(self._deadline)
                received += len(chunk)
                if self._max_bytes is not None and received > self._max_bytes:
                    raise httpx.ReadError("the response is too large")
                yield chunk
        except httpx.TransportError:
            if self._deadline is not None and self._deadline.expired:
                raise _expired(self._deadline) from None
            raise

    def close(self) -> None:
        try:
            close = getattr(self._stream, "close", None)
            if close is not None:
                close()
        finally:
            self._release()


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
    """GET ``url`` and yield an iterator over its body, the whole exchange (resolving, connecting, every
    redirect, the headers and the last byte of the body) within ``deadline_s``, at most ``max_bytes``; every
    failure is a ``FetchError`` whose message names no internal detail."""
    policy = policy or _policy
    if not isinstance(url, str) or urlsplit_scheme(url) not in _DEFAULT_PORTS:
        raise FetchError("must be an http(s) URL")
    deadline = Deadline(deadline_s)
    late = f"the download did not finish within {deadline_s:g} s"
    with client(policy, follow_redirects=False,
                timeout=httpx.Timeout(deadline_s, connect=policy.connect_timeout_s)) as http:
        try:
            request = http.build_request("GET", url, headers=headers)
        except httpx.InvalidURL:
            raise FetchError("is not a valid URL") from None
        response = None
        try:
            for _ in range(MAX_REDIRECTS + 1):
                request.extensions[DEADLINE] = deadline
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
            if declared.isascii() and declared.isdigit() and int(declared) > max_bytes:  # int("²") fails
                raise FetchError(f"the file is larger than {_size(max_bytes)}")
            yield _body(response, late, max_bytes)
        except AddressRefused:
            raise FetchError(REFUSED_MESSAGE) from None
        except httpx.TimeoutException:
            raise FetchError(late) from None
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
    """A client for webhook deliveries: no redirects, ``timeout_s`` for each delivery as a whole, connect to
    the answer's last byte (a receiver that answers slowly, headers included, cannot hold a sender thread
    longer), a capped answer."""
    return client(policy, timeout=timeout_s, follow_redirects=False, deadline_s=timeout_s,
                  max_response_bytes=WEBHOOK_RESPONSE_BYTES)


def _body(response: httpx.Response, late: str, max_bytes: int) -> Iterator[bytes]:
    """The body's chunks (the transport ends them at the deadline), at most ``max_bytes`` of them."""
    received = 0
    chunks = response.iter_bytes()
    while True:
        try:
            chunk = next(chunks)
        except StopIteration:
            return
        except httpx.TimeoutException:
            raise FetchError(late) from None
        except httpx.HTTPError:
            raise FetchError("the download failed") from None
        received += len(chunk)
        if received > max_bytes:
            raise FetchError(f"the file is larger than {_size(max_bytes)}")
        yield chunk


async def run_blocking(fn: Callable[..., T], *args: Any, tenant: Hashable = None, network: bool = True,
                       **kwargs: Any) -> T:
    """Run ``fn(*args, **kwargs)`` off the event loop and off the server's default thread pool, for ``tenant``
    (the caller's API key id; None without keys). ``network``: it downloads callers' URLs, and runs on the
    download pool, at most ``slots_per_key`` of one tenant's calls at once; otherwise (data URIs, this
    server's own files) on the pool of ``decode_slots`` threads, which downloads never occupy."""
    downloads, local = _get_pools()
    pool = downloads if network else local
    return await asyncio.wrap_future(pool.submit(tenant, partial(fn, *args, **kwargs)))


def _get_pools() -> tuple[FairPool, FairPool]:
    global _pools
    with _policy_lock:
        if _pools is None:
            _pools = (FairPool(_policy.workers, _policy.slots_per_key, "fetch"),
                      FairPool(_policy.decode_slots, _policy.decode_slots, "fetch-local"))
        return _pools


def urlsplit_scheme(url: str) -> str:
    return url.strip().split(":", 1)[0].lower() if ":" in url else ""


def _size(n: int) -> str:
    return f"{n / 1024**3:g} GiB" if n >= 1024**3 else f"{n / 1024**2:g} MiB"
