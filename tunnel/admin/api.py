"""The admin API: JSON over HTTP, routed by klein, over the server's Routes.

Every route works on the live server: a change goes through ``Routes``
(which stores it and applies it at once) and a listing reads the registry
and the connected clients as they are now.  Identifiers come in (a PUT's
``"identifier"``) and never go out: a tunnel is named by its fingerprint
in every answer and log line.

Routes (all JSON, ``application/json``; errors ``{"error": "message"}``)::

    GET    /api/hosts                 {"hosts": [HOST, ...]}
    GET    /api/hosts/{host}          HOST, or 404
    PUT    /api/hosts/{host}          {"identifier": "...", "rules": {...}}: 201 new / 200 replaced
    DELETE /api/hosts/{host}          204, or 404
    GET    /api/tcp                   {"ports": [PORT, ...]}
    PUT    /api/tcp/{port}            {"identifier": "..."}: 201 / 200; 409 if it cannot listen
    DELETE /api/tcp/{port}            204, or 404
    GET    /api/tunnels               {"tunnels": [TUNNEL, ...]}
    DELETE /api/tunnels/{fingerprint} 200 with the TUNNEL it was; 404; 409 if ambiguous

    HOST   = {"host", "tunnel": fingerprint, "connected": bool, "rules": public rules}
    PORT   = {"port", "tunnel": fingerprint, "connected": bool}
    TUNNEL = {"fingerprint", "remote", "connected_since" (ISO 8601 UTC),
              "connected_since_epoch", "ready", "streams_open", "requests",
              "bytes_in", "bytes_out", "hosts": [host, ...], "ports": [port, ...]}

``DELETE /api/tunnels/{fingerprint}`` takes 4 to 64 hex digits: the
beginning of a tunnel key, like an abbreviated git commit.  The 8 digits of
a listing name one tunnel unless two keys share them; more digits then tell
them apart; if the digits given still match more than one connected tunnel,
nothing is disconnected and the answer is 409 naming the candidates.

Status codes: 400 for a body that is not a JSON object, unknown or missing
fields, wrong types, or a host, port or fingerprint that does not parse;
404 unknown; 405 wrong method; 409 conflict (a port that cannot be bound,
an ambiguous fingerprint); 413 body too large (``service.AdminSite``); 415
a body that is not sent as ``application/json``; 503 a change the
registry's store could not make (nothing changed), or asked of a server
that is stopping; 504 a change the store did not answer in time (it may
have been made: a shared store's feed tells).

The same app serves the status page (``status``) at ``/``.  Who may call
it is decided in front of it (``auth.TokenGuard``).
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from klein import Klein
from twisted.internet.defer import Deferred, DeferredLock
from twisted.internet.error import CannotListenError
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from ..koding.identifiers import TunnelKey
from ..server.registry import ClientConnection, TunnelServer
from ..server.routes import Routes, RoutesStopped
from ..server.rules import HostRules, RulesError
from ..server.store import HostEntry, PortEntry, StoreError, StoreOutcomeUnknown
from ..server.vhosts import host_key
from . import status

#: the fields a PUT body may hold
HOST_FIELDS = frozenset({"identifier", "rules"})
PORT_FIELDS = frozenset({"identifier"})
#: the longest identifier taken (the client sends it in a request header)
MAX_IDENTIFIER = 1024
#: fewest hex digits that may name a tunnel to disconnect
MIN_FINGERPRINT_DIGITS = 4

_PORT = re.compile(r"[0-9]{1,5}")
_HEX = re.compile(rf"[0-9a-fA-F]{{{MIN_FINGERPRINT_DIGITS},64}}")

#: headers on every answer: nothing cached, sniffed, framed or referred
SECURITY_HEADERS = {
    b"cache-control": b"no-store",
    b"x-content-type-options": b"nosniff",
    b"x-frame-options": b"DENY",
    b"referrer-policy": b"no-referrer",
}
#: the status page loads its own script and style sheet, nothing else
CONTENT_SECURITY_POLICY = (
    b"default-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


class ApiError(Exception):
    """An answer other than success: its status and a message safe to show."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class AdminAPI:
    """The admin routes over a server's ``Routes`` and its ``TunnelServer``.

    :param routes: the registry facade (``tunnel.server.routes.Routes``):
        what it is given takes effect at once and is stored.
    :param server: the ``TunnelServer``, for the connected clients.
    :param reactor: ``now`` is read from it, and a password is
        hashed in its thread pool.
    :param hash_rules: turns a PUT's ``"rules"`` into ``HostRules`` (a
        Deferred; RulesError for bad rules); by default ``HostRules.from_api``
        in the reactor's thread pool (it hashes a password with scrypt).

    Changes (PUT, DELETE) are made one at a time, in the order their
    requests arrived: each takes its place in a FIFO when it arrives, and
    its password is hashed once its turn has come.  Otherwise a PUT with a
    password, hashed for tens of milliseconds, would be stored after a PUT
    or DELETE of the same host that came after it.
    """

    app = Klein()
    log = Logger()

    def __init__(
        self,
        routes: Routes,
        server: TunnelServer,
        *,
        reactor: Any = None,
        hash_rules: Callable[[Any], Deferred[HostRules]] | None = None,
    ) -> None:
        self.routes = routes
        self.server = server
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.hash_rules = hash_rules if hash_rules is not None else self._hash_in_threads
        #: the changes asked, in arrival order (one at a time)
        self._changes = DeferredLock()
        #: host -> (the entry, its rules' public form): parsing stored rules
        #: costs some 50 us a host, and the status page lists them every 2 s
        self._public: dict[str, tuple[HostEntry, dict[str, Any]]] = {}

    def resource(self) -> IResource:
        """The app as a (leaf) Resource; put ``auth.TokenGuard`` in front of it."""
        return self.app.resource()

    # -- what the routes show ----------------------------------------------------

    def _connected(self, key: TunnelKey) -> bool:
        connection = self.server.connection(key)
        return connection is not None and bool(connection.ready)

    def host_json(self, entry: HostEntry) -> dict[str, Any]:
        """A host entry as the API shows it (the rules without their secrets)."""
        return {
            "host": entry.host,
            "tunnel": entry.key.fingerprint,
            "connected": self._connected(entry.key),
            "rules": self._public_rules(entry),
        }

    def _public_rules(self, entry: HostEntry) -> dict[str, Any]:
        cached = self._public.get(entry.host)
        if cached is not None and cached[0] is entry:  # Routes replace an entry to change it
            return cached[1]
        public = HostRules.from_stored(entry.rules).public()
        self._public[entry.host] = (entry, public)
        return public

    def port_json(self, entry: PortEntry) -> dict[str, Any]:
        return {
            "port": entry.port,
            "tunnel": entry.key.fingerprint,
            "connected": self._connected(entry.key),
        }

    def tunnels_json(self) -> list[dict[str, Any]]:
        """Every connected client, with the hosts and ports that point at it."""
        hosts: dict[TunnelKey, list[str]] = {}
        for entry in self.routes.hosts():
            hosts.setdefault(entry.key, []).append(entry.host)
        ports: dict[TunnelKey, list[int]] = {}
        for entry in self.routes.ports():
            ports.setdefault(entry.key, []).append(entry.port)
        out = [
            self._tunnel_json(c, hosts.get(c.key, []), ports.get(c.key, []))
            for c in self.server.connections()
        ]
        out.sort(key=lambda t: (t["fingerprint"], t["connected_since_epoch"]))
        return out

    def _tunnel_json(
        self, connection: ClientConnection, hosts: list[str], ports: list[int]
    ) -> dict[str, Any]:
        stats = connection.stats()
        since = float(stats.connected_since)
        return {
            "fingerprint": stats.fingerprint,
            "remote": str(stats.remote),
            "connected_since": iso_utc(since),
            "connected_since_epoch": since,
            "ready": bool(connection.ready),
            "streams_open": stats.streams_open,
            "requests": stats.requests,
            "bytes_in": stats.bytes_in,
            "bytes_out": stats.bytes_out,
            "hosts": sorted(hosts),
            "ports": sorted(ports),
        }

    def hosts_json(self) -> list[dict[str, Any]]:
        entries = self.routes.hosts()
        if len(self._public) > len(entries):  # hosts were removed: forget their rules
            current = {e.host for e in entries}
            self._public = {h: v for h, v in self._public.items() if h in current}
        return [self.host_json(e) for e in sorted(entries, key=lambda e: e.host)]

    def ports_json(self) -> list[dict[str, Any]]:
        return [self.port_json(e) for e in sorted(self.routes.ports(), key=lambda e: e.port)]

    def snapshot(self) -> dict[str, Any]:
        """Everything the status page shows, as of now."""
        tunnels = self.tunnels_json()
        # sums over the clients connected now, shown as such (``status``)
        totals = {
            "clients": sum(1 for t in tunnels if t["ready"]),
            "requests": sum(t["requests"] for t in tunnels),
            "bytes_in": sum(t["bytes_in"] for t in tunnels),
            "bytes_out": sum(t["bytes_out"] for t in tunnels),
            "streams_open": sum(t["streams_open"] for t in tunnels),
        }
        hosts = self.hosts_json()
        ports = self.ports_json()
        totals["hosts"] = len(hosts)
        totals["ports"] = len(ports)
        return {
            "now": iso_utc(self.reactor.seconds()),
            "hosts": hosts,
            "ports": ports,
            "tunnels": tunnels,
            "totals": totals,
            "cluster": self.cluster_json(),
        }

    def _hash_in_threads(self, data: Any) -> Deferred[HostRules]:
        # off the reactor thread: a password is hashed with scrypt (tens of ms)
        pool = self.reactor.getThreadPool()
        return deferToThreadPool(self.reactor, pool, HostRules.from_api, data)

    async def _change(self, change: Callable[[], Any]) -> Any:
        """Make ``change`` (a function returning a Deferred or a coroutine)
        once the changes asked before it are made, and return what it gave;
        a 503 if it could not be stored (then nothing changed,
        ``RegistryStore``'s promise).

        Its place in the queue is taken now, when the request arrives.  A
        client that goes away does not cancel the change (klein cancels the
        handler): a change half made would leave what is stored and what is
        served apart.  It completes, unanswered.
        """

        def run() -> Deferred:
            made = change()
            return made if isinstance(made, Deferred) else Deferred.fromCoroutine(made)

        try:
            return await uncancellable(self._changes.run(run))
        except StoreOutcomeUnknown as e:
            # not "not stored": the store may have made it (its feed tells)
            self.log.warn("admin: a change got no answer from the store: {why}", why=str(e))
            raise ApiError(504, f"the store did not answer in time: {e}")
        except StoreError as e:
            self.log.warn("admin: a change was not stored: {why}", why=str(e))
            raise ApiError(503, f"the change was not stored: {e}")
        except RoutesStopped:
            raise ApiError(503, "the server is stopping: no more changes")

    # -- hosts -------------------------------------------------------------------

    @app.route("/api/hosts", methods=["GET"])
    def list_hosts(self, request: IRequest) -> bytes:
        return json_answer(request, 200, {"hosts": self.hosts_json()})

    @app.route("/api/hosts/<host>", methods=["GET"])
    def show_host(self, request: IRequest, host: str) -> bytes:
        entry = self._host_entry(host)
        if entry is None:
            raise ApiError(404, f"no such host: {_shown(host)}")
        return json_answer(request, 200, self.host_json(entry))

    @app.route("/api/hosts/<host>", methods=["PUT"])
    async def put_host(self, request: IRequest, host: str) -> bytes:
        name = _host_name(host)  # a host that does not parse: 400 before any hashing
        body = read_object(request, allowed=HOST_FIELDS)
        identifier = identifier_field(body)
        created, entry = await self._change(
            lambda: self._put_host(name, identifier, body.get("rules"))
        )
        if entry is None:  # removed at once by someone else (not through this API)
            raise ApiError(409, f"{_shown(host)} was removed while it was being stored")
        self.log.info(
            "admin: host {host} {what}, served by tunnel {tunnel}",
            host=entry.host,
            what="added" if created else "replaced",
            tunnel=entry.key.fingerprint,
        )
        return json_answer(request, 201 if created else 200, self.host_json(entry))

    async def _put_host(
        self, name: str, identifier: str, rules_data: Any
    ) -> tuple[bool, HostEntry | None]:
        """Hash the rules and store the host (its turn has come); whether it
        is new, and its entry as this change left it."""
        try:
            rules = await self.hash_rules(rules_data)
        except RulesError as e:
            raise ApiError(400, str(e))
        try:
            created = await self.routes.put_host(name, identifier, rules.stored())
        except ValueError as e:
            raise ApiError(400, str(e))
        return created, self.routes.host(name)

    @app.route("/api/hosts/<host>", methods=["DELETE"])
    async def delete_host(self, request: IRequest, host: str) -> bytes:
        # asked of the store even when the host is not served: a stored host
        # left out at start (its rules did not load) can still be removed
        name = _host_name(host)
        if not await self._change(lambda: self.routes.delete_host(name)):
            raise ApiError(404, f"no such host: {_shown(host)}")
        self.log.info("admin: host {host} removed", host=name)
        return empty_answer(request)

    def _host_entry(self, host: str) -> HostEntry | None:
        return self.routes.host(_host_name(host))

    # -- TCP ports -----------------------------------------------------------------

    @app.route("/api/tcp", methods=["GET"])
    def list_ports(self, request: IRequest) -> bytes:
        return json_answer(request, 200, {"ports": self.ports_json()})

    @app.route("/api/tcp/<port>", methods=["PUT"])
    async def put_port(self, request: IRequest, port: str) -> bytes:
        number = port_number(port)
        body = read_object(request, allowed=PORT_FIELDS)
        identifier = identifier_field(body)
        try:
            created, entry = await self._change(lambda: self._put_port(number, identifier))
        except CannotListenError as e:
            raise ApiError(409, f"cannot listen on TCP port {number}: {_listen_reason(e)}")
        if entry is None:
            raise ApiError(409, f"TCP port {number} was removed while it was being stored")
        self.log.info(
            "admin: TCP port {port} {what}, carried by tunnel {tunnel}",
            port=number,
            what="opened" if created else "replaced",
            tunnel=entry.key.fingerprint,
        )
        return json_answer(request, 201 if created else 200, self.port_json(entry))

    async def _put_port(self, number: int, identifier: str) -> tuple[bool, PortEntry | None]:
        created = await self.routes.put_port(number, identifier)
        return created, self._port_entry(number)

    @app.route("/api/tcp/<port>", methods=["DELETE"])
    async def delete_port(self, request: IRequest, port: str) -> bytes:
        number = port_number(port)
        if not await self._change(lambda: self.routes.delete_port(number)):
            raise ApiError(404, f"no such TCP port: {number}")
        self.log.info("admin: TCP port {port} closed", port=number)
        return empty_answer(request)

    def _port_entry(self, number: int) -> PortEntry | None:
        for entry in self.routes.ports():
            if entry.port == number:
                return entry
        return None

    # -- tunnels -------------------------------------------------------------------

    @app.route("/api/tunnels", methods=["GET"])
    def list_tunnels(self, request: IRequest) -> bytes:
        return json_answer(request, 200, {"tunnels": self.tunnels_json()})

    @app.route("/api/tunnels/<fingerprint>", methods=["DELETE"])
    def kick_tunnel(self, request: IRequest, fingerprint: str) -> bytes:
        if not _HEX.fullmatch(fingerprint):
            raise ApiError(
                400,
                f"a tunnel is named by {MIN_FINGERPRINT_DIGITS} to 64 hex digits"
                " of its key (its fingerprint)",
            )
        prefix = fingerprint.lower()
        # a pooled tunnel's clients share one key: kicking it kicks them all
        matches = {c.key for c in self.server.connections() if c.key.hex().startswith(prefix)}
        if not matches:
            raise ApiError(404, f"no connected tunnel {prefix}")
        if len(matches) > 1:
            names = ", ".join(sorted(k.fingerprint for k in matches))
            raise ApiError(
                409, f"{prefix} names {len(matches)} tunnels ({names}): give more hex digits"
            )
        (key,) = matches
        before = self.tunnels_json()
        shown = next(t for t in before if t["fingerprint"] == key.fingerprint)
        if not self.server.disconnect(key):
            raise ApiError(404, f"no connected tunnel {prefix}")
        self.log.info("admin: tunnel {tunnel} disconnected", tunnel=key.fingerprint)
        return json_answer(request, 200, shown)

    # -- the cluster -------------------------------------------------------------------

    @app.route("/api/cluster", methods=["GET"])
    def cluster(self, request: IRequest) -> bytes:
        view = self.cluster_json()
        if view is None:
            raise ApiError(404, "this server is not a node of a cluster (--cluster-listen)")
        return json_answer(request, 200, view)

    def cluster_json(self) -> dict[str, Any] | None:
        """This node's view of its cluster (None if it is not a node of one):
        its name, the tunnels it holds, what it forwarded, its links."""
        cluster = self.server.cluster
        if cluster is None:
            return None
        stats = cluster.stats()
        links = [
            {
                "peer": link.peer,
                "state": link.state.value,
                "streams": link.streams,
                "dialed_by": link.dialed_by,
                "address": link.address,
            }
            for link in sorted(stats.links, key=lambda link: (link.peer, link.dialed_by))
        ]
        return {
            "node": stats.node,
            "tunnels_held": stats.tunnels_held,
            "forwarded": stats.forwarded,
            "links": links,
        }

    # -- the status page -------------------------------------------------------------

    @app.route("/", methods=["GET"])
    def status_page(self, request: IRequest) -> bytes:
        return page_answer(request, b"text/html; charset=utf-8", status.page(self.snapshot()))

    @app.route("/status.js", methods=["GET"])
    def status_script(self, request: IRequest) -> bytes:
        return page_answer(request, b"text/javascript; charset=utf-8", status.SCRIPT)

    @app.route("/status.css", methods=["GET"])
    def status_style(self, request: IRequest) -> bytes:
        return page_answer(request, b"text/css; charset=utf-8", status.STYLE)

    @app.route("/status.svg", methods=["GET"])
    def status_icon(self, request: IRequest) -> bytes:
        return page_answer(request, b"image/svg+xml", status.ICON)

    # -- errors ----------------------------------------------------------------------

    @app.handle_errors(ApiError)
    def api_error(self, request: IRequest, failure: Failure) -> bytes:
        error = failure.value
        return json_answer(request, error.code, {"error": error.message})

    @app.handle_errors(HTTPException)
    def routing_error(self, request: IRequest, failure: Failure) -> bytes:
        error = failure.value
        if isinstance(error, MethodNotAllowed) and error.valid_methods:
            allowed = ", ".join(sorted(error.valid_methods))
            request.responseHeaders.setRawHeaders(b"allow", [allowed.encode("ascii")])
            message = f"{request.method.decode('latin-1')} is not allowed here (allowed: {allowed})"
        else:
            message = {404: "no such route"}.get(error.code, error.name.lower())
        return json_answer(request, error.code or 500, {"error": message})

    @app.handle_errors(Exception)
    def internal_error(self, request: IRequest, failure: Failure) -> bytes:
        self.log.failure(
            "admin request {method} {path} failed",
            failure,
            method=request.method,
            path=request.path,
        )
        return json_answer(request, 500, {"error": "internal error (see the server's log)"})


# -- requests and answers -----------------------------------------------------------------


def uncancellable(d: Deferred) -> Deferred:
    """A Deferred with ``d``'s result whose cancelling leaves ``d`` running."""
    out: Deferred = Deferred(lambda _: None)  # cancel() then fails ``out`` alone

    def passed(result: Any) -> None:
        if not out.called:
            (out.errback if isinstance(result, Failure) else out.callback)(result)
        elif isinstance(result, Failure) and not result.check(ApiError):
            AdminAPI.log.failure("admin: a change failed after its client left", result)

    d.addBoth(passed)
    return out


def _host_name(host: str) -> str:
    """``host`` normalised as the registry keeps it; a 400 if it is not a host."""
    try:
        return host_key(host)
    except ValueError as e:
        raise ApiError(400, str(e))


def _shown(text: str, limit: int = 100) -> str:
    """Operator input, cut short for an error message."""
    return text if len(text) <= limit else text[:limit] + "..."


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in pairs:
        if name in out:
            raise ValueError(f"the field {name!r:.40} appears twice")
        out[name] = value
    return out


def read_object(request: IRequest, *, allowed: frozenset[str]) -> dict[str, Any]:
    """The request's body: a JSON object holding no field outside ``allowed``."""
    content_type = request.getHeader(b"content-type") or b""
    if content_type.split(b";", 1)[0].strip().lower() != b"application/json":
        raise ApiError(415, "send the body as application/json")
    data = request.content.read()
    try:
        document = json.loads(data, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except json.JSONDecodeError as e:
        raise ApiError(400, f"malformed JSON: {e.msg} (line {e.lineno}, column {e.colno})")
    except UnicodeDecodeError:
        raise ApiError(400, "malformed JSON: not UTF-8")
    except RecursionError:
        raise ApiError(400, "malformed JSON: nested too deeply")
    except ValueError as e:  # from the hooks above
        raise ApiError(400, f"malformed JSON: {e}")
    if not isinstance(document, dict):
        raise ApiError(400, "the body must be a JSON object")
    unknown = sorted(set(document) - allowed)
    if unknown:
        shown = ", ".join(repr(name[:40]) for name in unknown[:5])
        raise ApiError(400, f"unknown field(s): {shown} (allowed: {', '.join(sorted(allowed))})")
    return document


def identifier_field(body: Mapping[str, Any]) -> str:
    """The body's ``identifier``: a non-empty string a client can send
    (no white space, no control character)."""
    if "identifier" not in body:
        raise ApiError(400, "the field 'identifier' is required")
    identifier = body["identifier"]
    if not isinstance(identifier, str):
        raise ApiError(400, "'identifier' must be a string")
    if not identifier:
        raise ApiError(400, "'identifier' must not be empty")
    if len(identifier) > MAX_IDENTIFIER:
        raise ApiError(400, f"'identifier' is longer than {MAX_IDENTIFIER} characters")
    if any(c.isspace() or unicodedata.category(c) == "Cc" for c in identifier):
        # a client sends it in a header: twisted.web strips what surrounds a
        # header value, tunnel-admin and the client strip an identifier file;
        # such an identifier could be stored but never claimed
        raise ApiError(400, "'identifier' must not hold white space or control characters")
    return identifier


def port_number(text: str) -> int:
    """A TCP port from the path: 1 to 65535, in decimal digits."""
    if not _PORT.fullmatch(text) or not 0 < int(text) <= 65535:
        raise ApiError(400, f"{text[:20]!r} is not a TCP port (1 to 65535)")
    return int(text)


def _listen_reason(error: CannotListenError) -> str:
    socket_error = error.socketError
    reason = getattr(socket_error, "strerror", None) or str(socket_error)
    return reason


def iso_utc(epoch: float) -> str:
    """``2025-01-02T03:04:05Z``: a time as ISO 8601 in UTC, to the second."""
    moment = datetime.fromtimestamp(epoch, UTC).replace(microsecond=0)
    return moment.isoformat().replace("+00:00", "Z")


def _common_headers(request: IRequest) -> None:
    for name, value in SECURITY_HEADERS.items():
        request.responseHeaders.setRawHeaders(name, [value])


def json_answer(request: IRequest, code: int, document: Any) -> bytes:
    """Answer ``code`` with ``document`` as JSON."""
    body = json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    request.setResponseCode(code)
    _common_headers(request)
    request.responseHeaders.setRawHeaders(b"content-type", [b"application/json"])
    request.responseHeaders.setRawHeaders(b"content-length", [b"%d" % len(body)])
    return body


def empty_answer(request: IRequest) -> bytes:
    """Answer 204 No Content."""
    request.setResponseCode(204)
    _common_headers(request)
    return b""


def page_answer(request: IRequest, content_type: bytes, body: bytes) -> bytes:
    """Answer 200 with a part of the status page."""
    request.setResponseCode(200)
    _common_headers(request)
    request.responseHeaders.setRawHeaders(b"content-type", [content_type])
    request.responseHeaders.setRawHeaders(b"content-security-policy", [CONTENT_SECURITY_POLICY])
    request.responseHeaders.setRawHeaders(b"content-length", [b"%d" % len(body)])
    return body
