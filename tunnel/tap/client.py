"""``twistd tunnel-client``: keep a tunnel up and serve local servers through it."""

from __future__ import annotations

import os

from twisted.application import service
from twisted.internet.endpoints import clientFromString
from twisted.python import usage

from . import refuse_usage_errors

IDENTIFIER_ENV = "TUNNEL_IDENTIFIER"


def _port(text: str, what: str) -> int:
    if not (text.isascii() and text.isdigit()) or not 0 <= int(text) <= 65535:
        raise usage.UsageError(f"--{what}: {text!r} is not a port number")
    return int(text)


class Options(usage.Options):
    synopsis = "[options] --server ENDPOINT [--server ...]"
    longdesc = (
        "Connect to a tunnel server and serve its public requests from local servers. "
        "ENDPOINT is a Twisted client endpoint string: tcp:HOST:PORT or tls:HOST:PORT "
        "for the server (tls: checks the server's certificate; add trustRoots=DIR for "
        "a private CA), tcp:127.0.0.1:8000 for a local server. Given several servers, "
        "the client tries them in a random order and moves to another when its "
        "server dies, refuses it or cannot be reached. The identifier is a "
        f"required secret: keep it out of argv with the {IDENTIFIER_ENV} environment "
        "variable or --identifier-file (--identifier shows in the process list)."
    )
    optParameters = [
        ["identifier", None, None, "IDENTIFIER: the secret to register as (visible in ps)."],
        ["identifier-file", None, None, "PATH: a file holding the identifier."],
        ["local", None, "tcp:127.0.0.1:80", "ENDPOINT: where HTTP and WebSocket requests go."],
        [
            "host-header",
            None,
            None,
            "HOST[:PORT]: the Host header of the CONNECT request, to every server. "
            "[default: from --server]",
        ],
        ["stop-timeout", None, 10.0, "Seconds open tunnels get to finish at shutdown.", float],
    ]
    optFlags = [
        [
            "allow-any-local-port",
            None,
            "Dial 127.0.0.1:<port of the public Host header> like the Go client "
            "(lets whoever sends a public request pick the local port).",
        ],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["local-ports"] = {}
        self["tcp-locals"] = {}
        #: every --server, in order; "server" is the first, "host-header" its Host
        self["servers"] = []
        self["server"] = None
        #: each server -> the Host header of its CONNECT (set by postOptions)
        self["server-hosts"] = {}

    def opt_server(self, value: str) -> None:
        """ENDPOINT (required, repeatable: the client fails over): a tunnel server."""
        if value in self["servers"]:
            raise usage.UsageError(f"--server {value} is given twice")
        self["servers"].append(value)

    def opt_local_port(self, value: str) -> None:
        """PORT=ENDPOINT (repeatable): where requests to Host port PORT go."""
        port, sep, endpoint = value.partition("=")
        if not (sep and endpoint):
            raise usage.UsageError(f"--local-port wants PORT=ENDPOINT, got {value!r}")
        self["local-ports"][_port(port.strip(), "local-port")] = endpoint

    def opt_tcp_local(self, value: str) -> None:
        """PORT=ENDPOINT (repeatable): where TCP tunnels of server port PORT connect."""
        port, sep, endpoint = value.partition("=")
        if not (sep and endpoint):
            raise usage.UsageError(f"--tcp-local wants PORT=ENDPOINT, got {value!r}")
        self["tcp-locals"][_port(port.strip(), "tcp-local")] = endpoint

    def postOptions(self) -> None:
        if not self["servers"]:
            raise usage.UsageError("--server ENDPOINT is required")
        identifier = self["identifier"]
        if identifier is None and self["identifier-file"]:
            try:
                with open(self["identifier-file"], encoding="utf-8") as f:
                    identifier = f.read().strip()
            except OSError as e:
                raise usage.UsageError(f"--identifier-file: {e.strerror}: {e.filename}")
        if identifier is None:
            identifier = os.environ.get(IDENTIFIER_ENV)
        if not identifier:
            raise usage.UsageError(
                f"an identifier is required (--identifier, --identifier-file or ${IDENTIFIER_ENV})"
            )
        if any(c in identifier for c in "\r\n\0"):
            raise usage.UsageError("the identifier must not contain CR, LF or NUL")
        self["identifier"] = identifier
        explicit = self["host-header"]
        self["server-hosts"] = {s: explicit or host_from_endpoint(s) for s in self["servers"]}
        self["server"] = self["servers"][0]
        self["host-header"] = self["server-hosts"][self["server"]]


def host_from_endpoint(description: str) -> str:
    """``tcp:example.com:80`` -> ``example.com:80`` (Go sends the dialled address).

    Keyword forms (``tcp:host=example.com:port=80``) work too.
    """
    kind, _, rest = description.partition(":")
    if kind not in ("tcp", "tls", "ssl"):
        return "tunnel"
    positional = []
    keywords = {}
    for part in rest.split(":"):
        key, sep, value = part.partition("=")
        if sep:
            keywords[key] = value
        else:
            positional.append(part)
    host = keywords.get("host") or (positional[0] if positional else None)
    port = keywords.get("port") or (positional[1] if len(positional) > 1 else None)
    if host and port:
        return f"{host}:{port}"
    return "tunnel"


@refuse_usage_errors("tunnel-client")
def makeService(options: Options) -> service.IService:
    from twisted.internet import reactor

    from ..yamux.sizing import keep_freed_memory

    # process-wide, so the program's to set: large transfer pieces reuse freed
    # memory instead of faulting fresh pages in (tunnel/yamux/sizing.py)
    keep_freed_memory()

    from ..client import LocalForwarder, LocalTargets, Server, TunnelClientService

    try:
        servers = [
            Server(clientFromString(reactor, description), host, name=description)
            for description, host in options["server-hosts"].items()
        ]
        for description in [
            options["local"],
            *options["local-ports"].values(),
            *options["tcp-locals"].values(),
        ]:
            clientFromString(reactor, description)
    except (ValueError, TypeError, KeyError) as e:
        raise usage.UsageError(f"bad endpoint: {e}")
    targets = LocalTargets(
        reactor,
        default=options["local"],
        ports=options["local-ports"],
        tcp_ports=options["tcp-locals"],
        allow_any_port=bool(options["allow-any-local-port"]),
    )
    return TunnelClientService(
        servers,
        options["identifier"],
        LocalForwarder(targets.endpoint_for),
        stop_timeout=options["stop-timeout"],
    )
