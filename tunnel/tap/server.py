"""``twistd tunnel-server``: the public server as a supervised service."""

from __future__ import annotations

import math
import os
import re
import socket

from twisted.application import service
from twisted.internet.endpoints import serverFromString
from twisted.python import usage

from ..admin.auth import read_token_file
from ..server.rules import HostRules, RulesError, parse_network
from ..server.vhosts import host_key
from . import refuse_usage_errors


def _byte_count(text: str) -> int:
    if not (text.isascii() and text.isdigit()):
        raise ValueError(f"{text!r} is not a number of bytes")
    return int(text)


def _split_mapping(value: str, what: str) -> tuple[str, str]:
    key, sep, target = value.partition("=")
    if not (sep and key.strip() and target):
        raise usage.UsageError(f"--{what} wants KEY=VALUE, got {value!r}")
    return key.strip(), target


def read_vhost_file(path: str) -> dict[str, str]:
    """The ``HOST[:PORT]=IDENTIFIER`` lines of ``path`` as {normalised host: identifier}.

    Blank lines and lines that start with ``#`` are skipped; whitespace
    around a host or an identifier is not part of it.  A bad line is a
    UsageError naming its number and never its text (it may hold an
    identifier).
    """
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise usage.UsageError(f"--vhost-file: {e.strerror}: {e.filename}")
    except UnicodeDecodeError:
        raise usage.UsageError(f"--vhost-file {path}: not UTF-8 text")
    hosts: dict[str, str] = {}
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        host, sep, identifier = line.partition("=")
        identifier = identifier.strip()
        if not sep or not host.strip():
            why = "not HOST[:PORT]=IDENTIFIER"
        elif not identifier:
            why = "no identifier"
        else:
            try:
                hosts[host_key(host)] = identifier
                continue
            except ValueError:
                why = "malformed host"
        raise usage.UsageError(f"--vhost-file {path}: line {number}: {why}")
    return hosts


def read_secret_line(path: str, flag: str) -> str:
    """The first line of the file at ``path``, its line break stripped: a
    secret, so no error shows any of it."""
    try:
        with open(path, encoding="utf-8") as f:
            line = f.readline(4097)
    except OSError as e:
        raise usage.UsageError(f"{flag}: {e.strerror}: {e.filename}")
    except UnicodeDecodeError:
        raise usage.UsageError(f"{flag} {path}: not UTF-8 text")
    secret = line.rstrip("\r\n")
    if not secret:
        raise usage.UsageError(f"{flag} {path}: the first line is empty")
    if len(secret) > 4096:
        raise usage.UsageError(f"{flag} {path}: the first line is too long")
    return secret


def _twistd_owner(options: usage.Options) -> tuple[int, int] | None:
    """The (uid, gid) twistd switches to (``--uid``/``--gid``) when started as
    root: a file the server opens again after that must belong to them."""
    parent = getattr(options, "parent", None)
    if parent is None or os.getuid() != 0:
        return None
    uid, gid = parent.get("uid"), parent.get("gid")
    if uid is None and gid is None:
        return None
    return (-1 if uid is None else uid, -1 if gid is None else gid)


#: what a node's name may be (it is a Redis key part and a log word)
NODE_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")


def parse_advertised(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[IPV6]:PORT``) as (host, port); ValueError if it is not one."""
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r} is not HOST:PORT")
    return host, int(port)


#: accept queue of the --tcp listeners; Twisted's default (50) makes a burst of
#: connections wait for SYN retransmits (1 s)
LISTEN_BACKLOG = 1024
DEFAULT_LISTEN = f"tcp:80:backlog={LISTEN_BACKLOG}"


class Options(usage.Options):
    synopsis = "[options] --vhost HOST[:PORT]=IDENTIFIER"
    longdesc = (
        "Run a public tunnel server. Public requests are routed by their Host header "
        "to the tunnel client that connected with the matching identifier; give at "
        "least one --vhost, --vhost-file or --tcp, or a --db, --redis or --admin that "
        "holds or adds them. ENDPOINT is a Twisted server "
        "endpoint string, such as tcp:8080:interface=127.0.0.1 or "
        "ssl:443:privateKey=key.pem:certKey=cert.pem."
    )
    optFlags = [
        [
            "metrics-host-labels",
            None,
            "Label request metrics by host (one series per host in the registry).",
        ],
    ]
    optParameters = [
        ["tunnel-timeout", None, 10.0, "Seconds a client has to open a tunnel.", float],
        [
            "shutdown-grace",
            None,
            10.0,
            "Seconds open requests get to finish at shutdown.",
            float,
        ],
        [
            "idle-streams",
            None,
            64,
            "COUNT: the streams kept open between HTTP requests, per client and"
            " local port (keep-alive over the tunnel; 0: a new stream per request).",
            int,
        ],
        [
            "stream-idle-timeout",
            None,
            1.5,
            "Seconds a kept stream may wait for the next request"
            " (less than the local servers' own idle timeout).",
            float,
        ],
        ["tcp-interface", None, "0.0.0.0", "ADDRESS: the interface the --tcp ports listen on."],
        ["head-timeout", None, 30.0, "Seconds a public client has to send a request head.", float],
        ["idle-timeout", None, 60.0, "Seconds an idle public connection is kept open.", float],
        [
            "body-timeout",
            None,
            20.0,
            "Seconds after a request head before its body must keep the minimum rate (0: never).",
            float,
        ],
        [
            "body-min-rate",
            None,
            500,
            "BYTES: the least average rate, per second, of a public request body (0: none).",
            _byte_count,
        ],
        [
            "max-body",
            None,
            None,
            "BYTES: the largest public request body (bodies stream, none is stored)."
            " [default: unlimited]",
            _byte_count,
        ],
        [
            "db",
            None,
            None,
            "PATH: keep hosts, TCP ports and rules in this SQLite file (created if absent),"
            " so that changes made at run time survive a restart. [default: in memory]",
        ],
        [
            "redis",
            None,
            None,
            "ENDPOINT: keep hosts, TCP ports and rules in Redis there, shared live with every"
            " server node that names it (e.g. tcp:127.0.0.1:6379 or tls:redis.example:6380);"
            " not with --db.",
        ],
        [
            "redis-password-file",
            None,
            None,
            "PATH: the Redis password (one line), for --redis.",
        ],
        [
            "redis-prefix",
            None,
            "tunnel:",
            "PREFIX: the start of the registry's keys in Redis (one cluster per prefix).",
        ],
        [
            "node-name",
            None,
            None,
            "NAME: this node's name in a cluster (letters, digits, '.', '_', '-';"
            " unique per cluster). [default: the host name]",
        ],
        [
            "cluster-listen",
            None,
            None,
            "ENDPOINT: be one node of a cluster (with --redis): accept the other nodes'"
            " links there, e.g. tcp:7000:interface=10.0.0.5. [default: off, one node]",
        ],
        [
            "cluster-advertise",
            None,
            None,
            "HOST:PORT: the address of --cluster-listen that the other nodes dial.",
        ],
        [
            "cluster-trust",
            None,
            None,
            "DIR: dial the other nodes with TLS, trusting the CA certificates (PEM) in"
            " DIR for their HOST (make --cluster-listen an ssl: endpoint). [default: TCP]",
        ],
        [
            "cluster-secret-file",
            None,
            None,
            "PATH: the secret the nodes of the cluster share (one line of 16 characters"
            " or more); needed with --cluster-listen.",
        ],
        [
            "presence-ttl",
            None,
            5.0,
            "Seconds a node's record of a tunnel it holds outlives the node (it is"
            " refreshed three times as often); bounds how long a dead node's clients wait.",
            float,
        ],
        [
            "admin",
            None,
            None,
            "ENDPOINT: serve the admin API, the status page and /metrics there; keep it on"
            " a private interface, e.g. tcp:9000:interface=127.0.0.1. [default: off]",
        ],
        [
            "admin-token-file",
            None,
            None,
            "PATH: the admin API's token (one line); needed with --admin.",
        ],
        [
            "access-log",
            None,
            None,
            "PATH: log each public request there ('-': the twistd log). [default: off]",
        ],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []
        self["vhosts"] = {}
        self["tcp"] = {}
        #: host -> the rule flags' API form of its rules (see rules.HostRules.from_api)
        self["rules"] = {}
        self["trusted-proxies"] = []
        # shown as "[default: ...]" like the optParameters' defaults
        self.defaults["listen"] = DEFAULT_LISTEN

    def opt_listen(self, value: str) -> None:
        """ENDPOINT (repeatable): listen there for public and control connections."""
        self["listen"].append(value)

    def opt_vhost(self, value: str) -> None:
        """HOST[:PORT]=IDENTIFIER (repeatable): route requests for HOST[:PORT] to IDENTIFIER."""
        host, identifier = _split_mapping(value, "vhost")
        try:
            self["vhosts"][host_key(host)] = identifier
        except ValueError as e:
            raise usage.UsageError(f"--vhost: {e}")

    def opt_vhost_file(self, path: str) -> None:
        """PATH (repeatable): HOST[:PORT]=IDENTIFIER lines, as --vhost but not shown by ps."""
        self["vhosts"].update(read_vhost_file(path))

    def opt_tcp(self, value: str) -> None:
        """PORT=IDENTIFIER (repeatable): listen on PORT; tunnel its connections to that client."""
        port, identifier = _split_mapping(value, "tcp")
        if not (port.isascii() and port.isdigit() and 0 < int(port) <= 65535):
            raise usage.UsageError(f"--tcp: {port!r} is not a port number")
        self["tcp"][int(port)] = identifier

    def opt_trusted_proxy(self, value: str) -> None:
        """CIDR (repeatable): believe X-Forwarded-For from peers in this network (access rules)."""
        try:
            self["trusted-proxies"].append(parse_network(value))
        except RulesError as e:
            raise usage.UsageError(f"--trusted-proxy: {e}")

    def opt_allow(self, value: str) -> None:
        """HOST=CIDR[,CIDR...] (repeatable): serve HOST only to clients in these networks."""
        host, networks = self._host_rule(value, "allow")
        self["rules"].setdefault(host, {}).setdefault("allow", []).extend(
            n.strip() for n in networks.split(",")
        )

    def opt_rate(self, value: str) -> None:
        """HOST=PER_SECOND[/BURST] (repeatable): requests per second (and burst) per client."""
        host, rate = self._host_rule(value, "rate")
        per_second, _, burst = rate.partition("/")
        try:
            spec: dict[str, float | int] = {"per_second": float(per_second)}
            if burst:
                spec["burst"] = int(burst)
        except ValueError:
            raise usage.UsageError(f"--rate: {rate!r} is not PER_SECOND[/BURST]")
        self["rules"].setdefault(host, {})["rate"] = spec

    def opt_pool(self, value: str) -> None:
        """HOST (repeatable): several clients may hold HOST's tunnel; requests spread over them."""
        try:
            host = host_key(value)
        except ValueError as e:
            raise usage.UsageError(f"--pool: {e}")
        self["rules"].setdefault(host, {})["pool"] = True

    def opt_basic_auth_file(self, value: str) -> None:
        """HOST=PATH (repeatable): ask for the USER:PASSWORD on PATH's first line."""
        host, path = self._host_rule(value, "basic-auth-file")
        try:
            with open(path, encoding="utf-8") as f:
                line = f.readline().rstrip("\r\n")
        except OSError as e:
            raise usage.UsageError(f"--basic-auth-file: {e.strerror}: {e.filename}")
        except UnicodeDecodeError:
            raise usage.UsageError(f"--basic-auth-file {path}: not UTF-8 text")
        user, sep, password = line.partition(":")
        if not sep:
            raise usage.UsageError(f"--basic-auth-file {path}: the first line is not USER:PASSWORD")
        self["rules"].setdefault(host, {})["basic_auth"] = {"user": user, "password": password}

    def _host_rule(self, value: str, what: str) -> tuple[str, str]:
        host, rule = _split_mapping(value, what)
        try:
            return host_key(host), rule
        except ValueError as e:
            raise usage.UsageError(f"--{what}: {e}")

    def postOptions(self) -> None:
        if self["idle-streams"] < 0:
            raise usage.UsageError("--idle-streams must be 0 or more")
        if self["stream-idle-timeout"] <= 0:
            raise usage.UsageError("--stream-idle-timeout must be more than 0")
        if not self["listen"]:
            self["listen"] = [DEFAULT_LISTEN]
        if self["admin"] is not None and self["admin-token-file"] is None:
            raise usage.UsageError("--admin needs --admin-token-file PATH")
        if self["admin"] is None:
            for flag in ("admin-token-file", "metrics-host-labels"):
                if self[flag]:
                    raise usage.UsageError(f"--{flag} is for --admin, which is not given")
        if self["admin-token-file"] is not None:
            try:
                self["admin-token"] = read_token_file(self["admin-token-file"])
            except ValueError as e:  # never shows the token
                raise usage.UsageError(f"--admin-token-file: {e}")
        self._redis_options()
        self._cluster_options()
        self["stored-rules"] = {}
        for host, api_rules in self["rules"].items():
            if host not in self["vhosts"]:
                raise usage.UsageError(f"rules for {host}, which no --vhost or --vhost-file names")
            try:
                # hashes a password: the file's text is not kept
                self["stored-rules"][host] = HostRules.from_api(api_rules).stored()
            except RulesError as e:
                raise usage.UsageError(f"the rules of {host}: {e}")
        if self.routes_required() and not self["vhosts"] and not self["tcp"]:
            raise usage.UsageError(
                "at least one --vhost HOST=IDENTIFIER, --vhost-file PATH"
                " or --tcp PORT=IDENTIFIER is required (or --db, --redis or --admin)"
            )

    def _redis_options(self) -> None:
        if self["redis"] is not None and self["db"] is not None:
            raise usage.UsageError("--db and --redis exclude each other: one registry, one place")
        self["redis-password"] = None
        if self["redis-password-file"] is None:
            return
        if self["redis"] is None:
            raise usage.UsageError("--redis-password-file is for --redis, which is not given")
        # the password itself is never shown
        path = self["redis-password-file"]
        self["redis-password"] = read_secret_line(path, "--redis-password-file")

    def _cluster_options(self) -> None:
        flags = ("cluster-advertise", "cluster-secret-file", "cluster-trust", "node-name")
        if self["cluster-listen"] is None:
            for flag in flags:
                if self[flag] is not None:
                    raise usage.UsageError(f"--{flag} is for --cluster-listen, which is not given")
            return
        if self["redis"] is None:
            raise usage.UsageError("--cluster-listen needs --redis: the nodes meet there")
        for flag in ("cluster-advertise", "cluster-secret-file"):
            if self[flag] is None:
                raise usage.UsageError(f"--cluster-listen needs --{flag}")
        if self["node-name"] is None:
            self["node-name"] = socket.gethostname().split(".")[0] or "node"
        if not NODE_NAME.fullmatch(self["node-name"]):
            raise usage.UsageError(
                f"--node-name {self['node-name']!r}: 1 to 64 letters, digits, '.', '_' or '-'"
            )
        try:
            parse_advertised(self["cluster-advertise"])
        except ValueError as e:
            raise usage.UsageError(f"--cluster-advertise: {e}")
        secret = read_secret_line(self["cluster-secret-file"], "--cluster-secret-file")
        if len(secret) < 16:
            raise usage.UsageError("--cluster-secret-file: the secret is under 16 characters")
        self["cluster-secret"] = secret.encode("utf-8")
        trust = self["cluster-trust"]
        if trust is not None and not os.path.isdir(trust):
            raise usage.UsageError(f"--cluster-trust {trust}: not a directory")
        if not math.isfinite(self["presence-ttl"]) or self["presence-ttl"] < 1:
            raise usage.UsageError("--presence-ttl must be 1 second or more")

    def routes_required(self) -> bool:
        """Whether the command line must name a host or a port: yes while it
        is the only source of routes (a stored registry, or an admin API that
        adds them at run time, is another)."""
        return self["db"] is None and self["redis"] is None and self["admin"] is None


@refuse_usage_errors("tunnel-server")
def makeService(options: Options) -> service.IService:
    from twisted.internet import reactor

    from ..yamux.sizing import keep_freed_memory

    # process-wide, so the program's to set: large transfer pieces reuse freed
    # memory instead of faulting fresh pages in (tunnel/yamux/sizing.py)
    keep_freed_memory()

    from ..koding.identifiers import TunnelKey
    from ..server import TunnelResource, TunnelServer, TunnelServerService, TunnelSite
    from ..server.access import AccessGate
    from ..server.redisstore import RedisStore
    from ..server.routes import Routes, TCPPorts
    from ..server.sqlite import SQLiteStore
    from ..server.store import MemoryStore, RegistryStore, StoreError

    server = TunnelServer(
        tunnel_timeout=options["tunnel-timeout"],
        max_idle_streams=options["idle-streams"],
        stream_idle_timeout=options["stream-idle-timeout"],
    )
    # --tcp ports are opened by the routes, as ports added at run time are
    tcp_ports = TCPPorts(
        server, interface=options["tcp-interface"], backlog=LISTEN_BACKLOG, reactor=reactor
    )
    store: RegistryStore
    if options["redis"] is not None:
        try:
            # connects when the routes load: an unreachable Redis fails the start
            store = RedisStore.from_string(
                options["redis"],
                reactor=reactor,
                password=options["redis-password"],
                prefix=options["redis-prefix"],
            )
        except ValueError as e:
            raise usage.UsageError(f"--redis: {e}")
    elif options["db"] is None:
        store = MemoryStore()
    else:
        try:
            # checked and migrated now: an unusable file stops twistd with the error
            store = SQLiteStore.open_now(options["db"], owner=_twistd_owner(options))
        except StoreError as e:
            raise usage.UsageError(f"--db: {e}")
    routes = Routes(server, store, listen_tcp=tcp_ports)
    top = TunnelServerService(
        server,
        options["shutdown-grace"],
        routes=routes,
        # the service keeps keys: the identifiers stay with the options
        seed_hosts={host: TunnelKey.of(i) for host, i in options["vhosts"].items()},
        seed_ports={port: TunnelKey.of(i) for port, i in options["tcp"].items()},
        seed_rules=options["stored-rules"],
    )
    metrics = None
    if options["admin"] is not None:
        from ..admin.service import AdminService
        from ..server.metrics import Metrics

        # what /metrics shows: the server and its public side report to it
        metrics = Metrics(server, host_labels=bool(options["metrics-host-labels"]))
        server.events = metrics
        try:
            admin_endpoint = serverFromString(reactor, options["admin"])
        except (ValueError, TypeError, KeyError) as e:
            raise usage.UsageError(f"--admin {options['admin']!r}: {e}")
        # a child: it starts with the listeners, once the routes are loaded
        AdminService(
            admin_endpoint, options["admin-token"], routes, server, metrics
        ).setServiceParent(top)
    gate = AccessGate(reactor, trusted_proxies=options["trusted-proxies"])
    gate.setServiceParent(top)  # its password-checking threads stop with the server
    site = TunnelSite(
        TunnelResource(server, gate=gate),
        head_timeout=options["head-timeout"],
        idle_timeout=options["idle-timeout"],
        access_log=options["access-log"],
        max_body=options["max-body"],
        body_timeout=options["body-timeout"],
        body_min_rate=options["body-min-rate"],
        events=metrics,
    )
    if options["cluster-listen"] is not None:
        _join_cluster(top, server, options, reactor)
    for description in options["listen"]:
        try:
            endpoint = serverFromString(reactor, description)
        except (ValueError, TypeError, KeyError) as e:
            raise usage.UsageError(f"--listen {description!r}: {e}")
        top.listen(endpoint, site)
    return top


def _join_cluster(top: service.MultiService, server, options: Options, reactor) -> None:
    """Make ``server`` one node of the cluster that meets in ``--redis``."""
    from twisted.internet.endpoints import clientFromString

    from ..server.cluster import Cluster, ClusterService
    from ..server.clusterlink import ClusterLinks, default_dial
    from ..server.presence import Presence
    from ..server.redislink import RedisLink

    try:
        listen = serverFromString(reactor, options["cluster-listen"])
    except (ValueError, TypeError, KeyError) as e:
        raise usage.UsageError(f"--cluster-listen {options['cluster-listen']!r}: {e}")
    # presence has a connection of its own: its refreshes never queue behind
    # the registry's changes
    link = RedisLink(
        clientFromString(reactor, options["redis"]),
        name=f"{options['redis']} (presence)",
        password=options["redis-password"],
        clock=reactor,
    )
    joined: list[Cluster] = []  # the cluster, once made: presence tells it of lost records
    presence = Presence(
        link,
        node=options["node-name"],
        address=options["cluster-advertise"],
        prefix=options["redis-prefix"],
        ttl=options["presence-ttl"],
        clock=reactor,
        on_lost=lambda key: joined[0].lost(key),
    )
    links = ClusterLinks(
        name=options["node-name"],
        secret=options["cluster-secret"],
        local=server,
        reactor=reactor,
        dial=default_dial(reactor, 5.0, trust_roots=options["cluster-trust"]),
    )
    cluster = Cluster(server, presence, links)
    joined.append(cluster)
    ClusterService(cluster, on_stop=link.close).setServiceParent(top)
    top.listen(listen, links.listening_factory())
