"""The twistd plugins: discovery, option parsing, packaging and a real run.

The end-to-end test starts ``twistd tunnel-server`` and ``twistd tunnel-client``
as child processes (with ``reactor.spawnProcess``, so the test's reactor keeps
serving the local origin meanwhile) and sends a public request through them.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import pytest_twisted
import treq
from hypothesis import given
from hypothesis import strategies as st
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService, IServiceMaker
from twisted.internet import reactor
from twisted.internet.utils import getProcessOutputAndValue
from twisted.plugin import getPlugins
from twisted.protocols.policies import WrappingFactory
from twisted.python import usage
from twisted.scripts.twistd import ServerOptions
from twisted.web.resource import Resource
from twisted.web.server import Site

from tunnel.admin.service import AdminService
from tunnel.client import TunnelClientService
from tunnel.koding.identifiers import TunnelKey
from tunnel.server.redisstore import RedisStore
from tunnel.server.routes import TCPPorts
from tunnel.server.rules import HostRules
from tunnel.server.sqlite import SQLiteStore
from tunnel.server.store import HostEntry
from tunnel.server.vhosts import host_key
from tunnel.tap import StartRefused
from tunnel.tap import client as client_tap
from tunnel.tap import server as server_tap

from .live import http_client
from .processes import (
    REPO_ROOT,
    TWISTD,
    Twistd,
    free_port,
    reap_all,
    spawn_client,
    spawn_twistd,
    stop,
    until_children,
)

# -- 1. discovery ------------------------------------------------------------------


def test_both_plugins_are_found_from_the_checkout():
    makers = {p.tapname: p for p in getPlugins(IServiceMaker)}
    assert "tunnel-server" in makers
    assert "tunnel-client" in makers
    # ServiceMaker imports the tap module only now, on use
    assert makers["tunnel-server"].options is server_tap.Options
    assert makers["tunnel-client"].options is client_tap.Options
    assert makers["tunnel-server"].makeService.__module__ == "tunnel.tap.server"
    assert makers["tunnel-client"].makeService.__module__ == "tunnel.tap.client"


def test_plugin_module_is_import_light():
    source = (REPO_ROOT / "twisted" / "plugins" / "tunnel_plugins.py").read_text()
    assert "import tunnel" not in source and "from tunnel" not in source
    assert not (REPO_ROOT / "twisted" / "__init__.py").exists()
    assert not (REPO_ROOT / "twisted" / "plugins" / "__init__.py").exists()


# -- 2a. tunnel-server options ----------------------------------------------------


def server_options(*argv: str) -> server_tap.Options:
    options = server_tap.Options()
    options.parseOptions(list(argv))
    return options


def test_server_listen_defaults_to_tcp_80():
    assert server_options("--vhost", "app.test=id")["listen"] == ["tcp:80:backlog=1024"]


def test_server_listen_is_repeatable_and_replaces_the_default():
    options = server_options(
        "--listen", "tcp:8080:interface=127.0.0.1", "--listen", "unix:/tmp/t.sock", "--vhost", "a=b"
    )
    assert options["listen"] == ["tcp:8080:interface=127.0.0.1", "unix:/tmp/t.sock"]


def test_server_vhost_is_repeatable():
    options = server_options("--vhost", "one.test=id1", "--vhost", "two.test:8080=id2")
    assert options["vhosts"] == {"one.test": "id1", "two.test:8080": "id2"}


def test_server_vhost_splits_on_the_first_equals_sign():
    options = server_options("--vhost", "app.test=abc==def=")
    assert options["vhosts"] == {"app.test": "abc==def="}


@pytest.mark.parametrize(
    ("value", "host"),
    [
        ("App.Example.COM=id", "app.example.com"),
        ("app.example.com.=id", "app.example.com"),
        ("App.Example.COM.:8080=id", "app.example.com:8080"),
        ("  spaced.test  =id", "spaced.test"),
        ("[::1]:8080=id", "[::1]:8080"),
    ],
)
def test_server_vhost_host_is_normalised(value, host):
    assert server_options("--vhost", value)["vhosts"] == {host: "id"}


def test_server_requires_a_vhost():
    with pytest.raises(usage.UsageError, match="--vhost"):
        server_options("--listen", "tcp:8080")


@pytest.mark.parametrize(
    "value",
    [
        "no-equals-sign",
        "=identifier-without-host",
        "  =identifier-without-host",
        "host.test=",
        "host.test:99999=id",
        "host.test:http=id",
        "[::1=id",
    ],
)
def test_server_bad_vhost_is_a_usage_error(value):
    with pytest.raises(usage.UsageError, match="^--vhost") as info:
        server_options("--vhost", value)
    message = str(info.value)
    assert "Traceback" not in message and len(message) < 200


def test_server_vhost_whose_host_normalises_to_nothing_is_a_usage_error():
    with pytest.raises(usage.UsageError, match="--vhost"):
        server_options("--vhost", ".=id")


def test_server_timeouts_are_floats():
    options = server_options("--vhost", "a=b", "--tunnel-timeout", "2.5", "--shutdown-grace", "0")
    assert options["tunnel-timeout"] == 2.5 and options["shutdown-grace"] == 0.0
    with pytest.raises(usage.UsageError):
        server_options("--vhost", "a=b", "--tunnel-timeout", "soon")


def listeners(service) -> list[StreamServerEndpointService]:
    """The public listeners among the service's children."""
    return [
        c
        for c in service
        if isinstance(c, StreamServerEndpointService) and not isinstance(c, AdminService)
    ]


def test_server_make_service():
    options = server_options(
        "--listen", "tcp:0:interface=127.0.0.1", "--listen", "tcp:0", "--vhost", "App.Test=id"
    )
    service = server_tap.makeService(options)
    assert IService.providedBy(service)
    assert len(listeners(service)) == 2  # one listener per --listen
    assert not service.running  # nothing listens until twistd starts it
    # the hosts are seeded into the routes when the service starts, as keys
    assert service.seed_hosts == {"app.test": TunnelKey.of("id")}
    assert service.server.vhosts.lookup("app.test") == (None, 0)
    service.prepare()  # what starting does first (a MemoryStore loads at once)
    route, port = service.server.vhosts.lookup("app.test")
    assert (route.key, port) == (TunnelKey.of("id"), 0)  # the server keeps the key
    assert service.routes.hosts() == [HostEntry("app.test", TunnelKey.of("id"))]


@pytest.mark.parametrize("listen", ["nonsense:1", "tcp:not-a-port"])
def test_server_make_service_with_a_bad_endpoint_is_a_usage_error(listen):
    options = server_options("--listen", listen, "--vhost", "a=b")
    with pytest.raises(StartRefused, match="^twistd tunnel-server: --listen"):
        server_tap.makeService(options)


def test_server_tcp_tunnels_and_site_options():
    options = server_options(
        *("--listen", "tcp:0:interface=127.0.0.1", "--tcp", "2223=a=b", "--tcp", "2222=ops"),
        *("--tcp-interface", "127.0.0.1", "--head-timeout", "5", "--idle-timeout", "20"),
        *("--access-log", "-", "--max-body", "1048576"),
    )
    assert options["tcp"] == {2222: "ops", 2223: "a=b"}  # split on the first '='
    service = server_tap.makeService(options)
    (listener,) = listeners(service)  # one --listen; the --tcp ports are the routes'
    site = listener.factory
    assert (site.head_timeout, site.timeOut, site.access_log) == (5.0, 20.0, "-")
    assert site.max_body == 1048576
    # the routes open the --tcp ports when the service starts, as run-time ones
    assert service.seed_ports == {2222: TunnelKey.of("ops"), 2223: TunnelKey.of("a=b")}
    listen = service.routes.listen_tcp
    assert isinstance(listen, TCPPorts)
    assert (listen.interface, listen.backlog) == ("127.0.0.1", server_tap.LISTEN_BACKLOG)
    assert listen.factory.server is service.server


def test_server_tcp_alone_is_enough_and_bad_ports_are_usage_errors():
    assert server_options("--tcp", "2222=ops")["vhosts"] == {}
    for bad in ("x=ops", "0=ops", "70000=ops", "2222", "=ops"):
        with pytest.raises(usage.UsageError, match="--tcp"):
            server_options("--tcp", bad)


VHOST_FILE = """\
# the hosts of this server
App.Localhost.=sekrit-one

  other.test:8080 =  sekrit=two==  \r
\t# indented comment
third.test=sekrit-one
"""


def test_server_vhost_file_is_read_like_vhost_flags(tmp_path):
    path = tmp_path / "vhosts"
    path.write_bytes(VHOST_FILE.encode())
    options = server_options("--vhost", "flag.test=from-flag", "--vhost-file", str(path))
    assert options["vhosts"] == {
        "flag.test": "from-flag",
        "app.localhost": "sekrit-one",
        "other.test:8080": "sekrit=two==",  # split on the first '=', stripped
        "third.test": "sekrit-one",  # several hosts may share an identifier
    }
    empty = tmp_path / "empty"
    empty.write_text("# nothing yet\n\n")
    with pytest.raises(usage.UsageError, match="at least one --vhost"):
        server_options("--vhost-file", str(empty))
    second = tmp_path / "second"
    second.write_text("app.localhost=replaced\n")
    options = server_options("--vhost-file", str(path), "--vhost-file", str(second))
    assert options["vhosts"]["app.localhost"] == "replaced"  # repeatable, the last wins


@pytest.mark.parametrize(
    ("line", "why"),
    [
        ("sekrit-without-host", "not HOST[:PORT]=IDENTIFIER"),
        ("=sekrit-without-host", "not HOST[:PORT]=IDENTIFIER"),
        ("host.test=", "no identifier"),
        ("host.test=   ", "no identifier"),
        ("host.test:99999=sekrit", "malformed host"),
        ("sek rit=sekrit", "malformed host"),
        ("sekrit-part=of=it", None),  # a host, for all the file knows: accepted
    ],
)
def test_server_vhost_file_bad_line_is_named_by_number_only(tmp_path, line, why):
    path = tmp_path / "vhosts"
    path.write_text(f"# comment\nok.test=fine\n\n{line}\n")
    if why is None:
        assert server_options("--vhost-file", str(path))["vhosts"]["sekrit-part"] == "of=it"
        return
    with pytest.raises(usage.UsageError) as info:
        server_options("--vhost-file", str(path))
    assert str(info.value) == f"--vhost-file {path}: line 4: {why}"
    assert "sekrit" not in str(info.value)


def test_server_vhost_file_that_cannot_be_read_is_a_usage_error(tmp_path):
    with pytest.raises(usage.UsageError, match="--vhost-file: No such file"):
        server_options("--vhost-file", str(tmp_path / "missing"))
    binary = tmp_path / "binary"
    binary.write_bytes(b"app.test=\xff\xfe\n")
    with pytest.raises(usage.UsageError, match="not UTF-8"):
        server_options("--vhost-file", str(binary))


_LINE = st.text(alphabet=st.sampled_from("aZ.:=#é -_\t9[]"), max_size=20)


@given(st.lists(_LINE, max_size=6))
def test_server_vhost_file_parses_any_text_or_names_a_line(tmp_path_factory, lines):
    path = tmp_path_factory.mktemp("vhosts") / "file"
    path.write_text("\n".join(lines), encoding="utf-8")
    try:
        hosts = server_tap.read_vhost_file(str(path))
    except usage.UsageError as e:
        number, _, why = str(e).removeprefix(f"--vhost-file {path}: line ").partition(": ")
        assert why in ("not HOST[:PORT]=IDENTIFIER", "no identifier", "malformed host")
        bad = lines[int(number) - 1].strip()
        assert bad and not bad.startswith("#")
        return
    for host, identifier in hosts.items():
        assert host_key(host) == host
        assert identifier and identifier == identifier.strip()
        assert any(line.strip().endswith(identifier) for line in lines)


def test_server_stream_keeping_options_reach_the_server():
    service = server_tap.makeService(
        server_options(
            "--vhost", "app.test=id", "--idle-streams", "0", "--stream-idle-timeout", "0.25"
        )
    )
    assert (service.server.max_idle_streams, service.server.stream_idle_timeout) == (0, 0.25)
    for flag, bad in (("--idle-streams", "-1"), ("--stream-idle-timeout", "0")):
        with pytest.raises(usage.UsageError, match=flag):
            server_options("--vhost", "app.test=id", flag, bad)


# -- 2b. tunnel-client options ----------------------------------------------------


# -- the registry file and the access rules --------------------------------------------


@pytest_twisted.ensureDeferred
async def test_server_db_lifts_the_need_for_a_route_on_the_command_line(tmp_path):
    options = server_options("--db", str(tmp_path / "registry.db"))
    assert options["vhosts"] == {} and options["tcp"] == {}
    service = server_tap.makeService(options)
    assert isinstance(service.routes.store, SQLiteStore)
    assert (tmp_path / "registry.db").exists()  # created and migrated at once
    await service.routes.store.close()


def test_server_unusable_db_is_a_usage_error(tmp_path):
    not_a_db = tmp_path / "notes.txt"
    not_a_db.write_text("not a database\n" * 100)
    options = server_options("--db", str(not_a_db))
    with pytest.raises(StartRefused, match="--db: .*notes.txt is not a SQLite database"):
        server_tap.makeService(options)


@pytest_twisted.ensureDeferred
async def test_server_redis_is_the_registry_with_its_password_and_prefix(tmp_path):
    password = tmp_path / "redis.password"
    password.write_text("s3cret redis password\r\n")
    options = server_options(
        "--redis", "tcp:127.0.0.1:6379", "--redis-password-file", str(password),
        "--redis-prefix", "cluster-a:",
    )  # fmt: skip
    assert options["vhosts"] == {} and options["tcp"] == {}  # Redis holds the routes
    assert options["redis-password"] == "s3cret redis password"
    service = server_tap.makeService(options)
    store = service.routes.store
    assert isinstance(store, RedisStore) and store.name == "tcp:127.0.0.1:6379"
    assert store.prefix == "cluster-a:" and store.hosts_key == "cluster-a:hosts"
    assert "s3cret" not in repr(store)
    await store.close()  # it never connected: nothing was asked of it
    assert server_options("--redis", "tcp:127.0.0.1:6379")["redis-prefix"] == "tunnel:"


def cluster_argv(tmp_path, *extra: str) -> list[str]:
    secret = tmp_path / "cluster.secret"
    if not secret.exists():
        secret.write_text("a cluster secret of some length\n")
    return [
        "--redis", "tcp:127.0.0.1:6379", "--cluster-listen", "tcp:7000:interface=127.0.0.1",
        "--cluster-advertise", "127.0.0.1:7000", "--cluster-secret-file", str(secret), *extra,
    ]  # fmt: skip


def test_server_cluster_flags_make_a_node_that_listens_for_the_others(tmp_path):
    options = server_options(*cluster_argv(tmp_path, "--node-name", "node-1.eu"))
    assert options["cluster-secret"] == b"a cluster secret of some length"
    assert options["node-name"] == "node-1.eu" and options["presence-ttl"] == 5.0
    service = server_tap.makeService(options)
    assert sorted(type(s).__name__ for s in service) == [
        "AccessGate", "ClusterService", "StreamServerEndpointService",
        "StreamServerEndpointService",
    ]  # fmt: skip
    assert service.server.cluster is not None
    default = server_options(*cluster_argv(tmp_path))["node-name"]
    assert server_tap.NODE_NAME.fullmatch(default)  # the host name's first label


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--node-name", "n"], "--node-name is for --cluster-listen"),
        (["--cluster-trust", "/"], "--cluster-trust is for --cluster-listen"),
        (["--redis", "tcp:h:1", "--cluster-listen", "tcp:7000"], "needs --cluster-advertise"),
        (["--cluster-listen", "tcp:7000"], "--cluster-listen needs --redis"),
    ],
)
def test_server_cluster_flags_alone_are_usage_errors(argv, message):
    with pytest.raises(usage.UsageError, match=message):
        server_options("--vhost", "a.test=id", *argv)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--node-name", "a b"], "--node-name 'a b': 1 to 64 letters"),
        (["--node-name", "n" * 65], "1 to 64 letters"),
        (["--cluster-advertise", "nohost"], "--cluster-advertise: 'nohost' is not HOST:PORT"),
        (["--cluster-advertise", "h:70000"], "is not HOST:PORT"),
        (["--cluster-trust", "/nonexistent-dir"], "--cluster-trust /nonexistent-dir: not a dir"),
        (["--presence-ttl", "0.5"], "--presence-ttl must be 1 second or more"),
        (["--presence-ttl", "nan"], "--presence-ttl must be 1 second or more"),
        (["--presence-ttl", "inf"], "--presence-ttl must be 1 second or more"),
    ],
)
def test_server_bad_cluster_flags_are_usage_errors(tmp_path, extra, message):
    with pytest.raises(usage.UsageError, match=message):
        server_options(*cluster_argv(tmp_path, *extra))


def test_server_a_short_cluster_secret_is_refused_unseen(tmp_path):
    (tmp_path / "cluster.secret").write_text("short-secret\n")
    with pytest.raises(usage.UsageError, match="under 16 characters") as raised:
        server_options(*cluster_argv(tmp_path))
    assert "short-secret" not in str(raised.value)


def test_server_redis_option_errors_never_show_the_password(tmp_path):
    with pytest.raises(usage.UsageError, match="--db and --redis exclude each other"):
        server_options("--redis", "tcp:127.0.0.1:6379", "--db", str(tmp_path / "r.db"))
    password = tmp_path / "password"
    password.write_text("only-for-redis\n")
    with pytest.raises(usage.UsageError, match="--redis-password-file is for --redis"):
        server_options("--vhost", "a.test=id", "--redis-password-file", str(password))
    for content in ("\n", ""):
        password.write_text(content)
        with pytest.raises(usage.UsageError, match="the first line is empty"):
            server_options("--redis", "tcp:h:1", "--redis-password-file", str(password))
    with pytest.raises(usage.UsageError, match="--redis-password-file: No such file"):
        server_options("--redis", "tcp:h:1", "--redis-password-file", str(tmp_path / "none"))
    password.write_text("x" * 5000)
    with pytest.raises(usage.UsageError, match="too long") as raised:
        server_options("--redis", "tcp:h:1", "--redis-password-file", str(password))
    assert "xxx" not in str(raised.value)
    with pytest.raises(StartRefused, match="--redis: 'nonsense:1' is not a client endpoint"):
        server_tap.makeService(server_options("--redis", "nonsense:1"))


def test_server_rule_flags_become_stored_rules_of_their_hosts(tmp_path):
    auth = tmp_path / "auth"
    auth.write_text("ops:pass word:with colon\n")
    options = server_options(
        *("--vhost", "App.Test=id", "--vhost", "b.test=id"),
        *("--allow", "app.test=10.0.0.0/8, 192.0.2.7", "--allow", "APP.test.=::1"),
        *("--rate", "app.test=2.5/10", "--rate", "b.test=3"),
        *("--basic-auth-file", f"app.test={auth}", "--trusted-proxy", "127.0.0.0/8"),
    )
    rules = {h: HostRules.from_stored(r) for h, r in options["stored-rules"].items()}
    app = rules["app.test"]
    assert [str(n) for n in app.allow] == ["10.0.0.0/8", "192.0.2.7/32", "::1/128"]
    assert (app.rate.per_second, app.rate.burst) == (2.5, 10)
    assert app.basic_auth.user == "ops"
    assert app.basic_auth.password.matches(b"pass word:with colon")
    assert "pass word" not in repr(options["stored-rules"])  # hashed at once
    assert rules["b.test"].public() == {"rate": {"per_second": 3.0, "burst": 3}}
    assert [str(n) for n in options["trusted-proxies"]] == ["127.0.0.0/8"]
    service = server_tap.makeService(options)
    assert service.seed_rules == options["stored-rules"]


def test_server_pool_flags_pool_their_hosts_and_keep_their_other_rules():
    options = server_options(
        *("--vhost", "app.test=id", "--vhost", "b.test=id", "--vhost", "c.test=id"),
        *("--pool", "APP.test.", "--rate", "app.test=3", "--pool", "b.test"),
    )
    rules = {h: HostRules.from_stored(r) for h, r in options["stored-rules"].items()}
    assert rules["app.test"].public() == {"rate": {"per_second": 3.0, "burst": 3}, "pool": True}
    assert rules["b.test"].pool and not rules["b.test"]  # no access rule
    assert "c.test" not in rules


@pytest.mark.parametrize(
    "argv, message",
    [
        (("--allow", "app.test=10.0.0.1/8"), "did you mean 10.0.0.0/8"),
        (("--allow", "other.test=10.0.0.0/8"), "rules for other.test, which no --vhost"),
        (("--rate", "app.test=fast"), "--rate: 'fast' is not PER_SECOND"),
        (("--rate", "app.test=0"), "the rules of app.test"),
        (("--allow", "bad host=10.0.0.0/8"), "--allow"),
        (("--trusted-proxy", "everyone"), "--trusted-proxy"),
        (("--basic-auth-file", "app.test=/nonexistent/auth"), "--basic-auth-file"),
        (("--pool", "other.test"), "rules for other.test, which no --vhost"),
        (("--pool", "bad host"), "--pool: malformed host name"),
    ],
)
def test_server_bad_rule_flags_are_usage_errors(argv, message):
    with pytest.raises(usage.UsageError, match=message):
        server_options("--vhost", "app.test=id", *argv)


def test_server_basic_auth_file_must_hold_user_and_password(tmp_path):
    auth = tmp_path / "auth"
    auth.write_text("just-a-password\n")
    with pytest.raises(usage.UsageError, match="not USER:PASSWORD") as raised:
        server_options("--vhost", "app.test=id", "--basic-auth-file", f"app.test={auth}")
    assert "just-a-password" not in str(raised.value)


def test_server_admin_needs_a_token_file_whose_token_it_never_shows(tmp_path):
    with pytest.raises(usage.UsageError, match="--admin needs --admin-token-file"):
        server_options("--admin", "tcp:0:interface=127.0.0.1")
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(usage.UsageError, match="--admin-token-file"):
        server_options("--admin", "tcp:0", "--admin-token-file", str(empty))
    two_lines = tmp_path / "two"
    two_lines.write_text("first-secret-line\nsecond-secret-line\n")
    with pytest.raises(usage.UsageError) as raised:
        server_options("--admin", "tcp:0", "--admin-token-file", str(two_lines))
    assert "secret" not in str(raised.value)


@pytest.mark.parametrize("flag", [("--metrics-host-labels",), ("--admin-token-file", "x")])
def test_server_admin_flags_without_admin_are_usage_errors(flag):
    with pytest.raises(usage.UsageError, match="is for --admin, which is not given"):
        server_options("--vhost", "a=b", *flag)


def test_server_admin_alone_is_enough_and_serves_metrics_of_the_public_side(tmp_path):
    token = tmp_path / "token"
    token.write_text("tok\n")
    options = server_options(
        "--listen", "tcp:0:interface=127.0.0.1",
        "--admin", "tcp:0:interface=127.0.0.1", "--admin-token-file", str(token),
        "--metrics-host-labels",
    )  # fmt: skip
    assert options["admin-token"] == b"tok" and options["vhosts"] == {}
    service = server_tap.makeService(options)
    (admin,) = [c for c in service if isinstance(c, AdminService)]
    (site,) = [c.factory for c in listeners(service)]
    assert site.events is service.server.events is not None  # one Metrics for both
    assert service.server.events.host_labels is True
    bad = server_options("--admin", "nonsense:1", "--admin-token-file", str(token))
    with pytest.raises(StartRefused, match="--admin"):
        server_tap.makeService(bad)


@pytest.fixture
def no_env_identifier(monkeypatch):
    monkeypatch.delenv(client_tap.IDENTIFIER_ENV, raising=False)


def client_options(*argv: str) -> client_tap.Options:
    options = client_tap.Options()
    options.parseOptions(list(argv))
    return options


def test_client_defaults(no_env_identifier):
    options = client_options("--server", "tcp:example.com:8080", "--identifier", "sekrit")
    assert options["server"] == "tcp:example.com:8080"
    assert options["identifier"] == "sekrit"
    assert options["local"] == "tcp:127.0.0.1:80"
    assert options["local-ports"] == {} and options["tcp-locals"] == {}
    assert not options["allow-any-local-port"]
    assert options["host-header"] == "example.com:8080"


def test_client_identifier_file_is_read_and_stripped(tmp_path, no_env_identifier):
    path = tmp_path / "ident"
    path.write_text("  sekrit=with=equals \n\n")
    options = client_options("--server", "tcp:h:1", "--identifier-file", str(path))
    assert options["identifier"] == "sekrit=with=equals"


def test_client_identifier_from_the_environment(monkeypatch):
    monkeypatch.setenv("TUNNEL_IDENTIFIER", "from-env")
    assert client_options("--server", "tcp:h:1")["identifier"] == "from-env"


@pytest.mark.parametrize(
    ("flag", "file", "env", "expected"),
    [
        (True, True, True, "from-flag"),
        (True, False, True, "from-flag"),
        (True, True, False, "from-flag"),
        (False, True, True, "from-file"),
        (False, False, True, "from-env"),
    ],
)
def test_client_identifier_precedence(tmp_path, monkeypatch, flag, file, env, expected):
    argv = ["--server", "tcp:h:1"]
    if flag:
        argv += ["--identifier", "from-flag"]
    if file:
        path = tmp_path / "ident"
        path.write_text("from-file\n")
        argv += ["--identifier-file", str(path)]
    if env:
        monkeypatch.setenv("TUNNEL_IDENTIFIER", "from-env")
    else:
        monkeypatch.delenv("TUNNEL_IDENTIFIER", raising=False)
    assert client_options(*argv)["identifier"] == expected


def test_client_requires_an_identifier(no_env_identifier):
    with pytest.raises(usage.UsageError, match="identifier is required"):
        client_options("--server", "tcp:h:1")


def test_client_empty_identifier_file_is_a_usage_error(tmp_path, no_env_identifier):
    path = tmp_path / "ident"
    path.write_text(" \n")
    with pytest.raises(usage.UsageError, match="identifier is required"):
        client_options("--server", "tcp:h:1", "--identifier-file", str(path))


def test_client_missing_identifier_file_is_a_usage_error(tmp_path, no_env_identifier):
    missing = tmp_path / "nope"
    with pytest.raises(usage.UsageError, match="--identifier-file") as info:
        client_options("--server", "tcp:h:1", "--identifier-file", str(missing))
    assert str(missing) in str(info.value)


def test_client_requires_a_server(no_env_identifier):
    with pytest.raises(usage.UsageError, match="--server"):
        client_options("--identifier", "sekrit")


@pytest.mark.parametrize("bad", ["a\nb", "a\rb", "a\0b"])
def test_client_identifier_with_line_breaks_is_a_usage_error(tmp_path, monkeypatch, bad):
    monkeypatch.delenv("TUNNEL_IDENTIFIER", raising=False)
    with pytest.raises(usage.UsageError, match="identifier must not contain"):
        client_options("--server", "tcp:h:1", "--identifier", bad)
    path = tmp_path / "ident"
    path.write_text(bad + "\n")
    with pytest.raises(usage.UsageError, match="identifier must not contain"):
        client_options("--server", "tcp:h:1", "--identifier-file", str(path))
    if "\0" in bad:
        return  # the environment cannot hold a NUL
    monkeypatch.setenv("TUNNEL_IDENTIFIER", bad)
    with pytest.raises(usage.UsageError, match="identifier must not contain"):
        client_options("--server", "tcp:h:1")


@pytest.mark.parametrize(
    ("flag", "key"), [("--local-port", "local-ports"), ("--tcp-local", "tcp-locals")]
)
def test_client_port_mappings_are_repeatable(no_env_identifier, flag, key):
    options = client_options(
        "--server", "tcp:h:1", "--identifier", "x",
        flag, "8080=tcp:127.0.0.1:3000",
        flag, " 65535 =unix:/tmp/app.sock",
        flag, "22=tcp:127.0.0.1:2222:timeout=5",
        flag, "8080=tcp:127.0.0.1:3001",
    )  # fmt: skip
    assert options[key] == {
        8080: "tcp:127.0.0.1:3001",  # the last mapping for a port wins
        65535: "unix:/tmp/app.sock",
        22: "tcp:127.0.0.1:2222:timeout=5",  # split on the first "="
    }


@pytest.mark.parametrize("flag", ["--local-port", "--tcp-local"])
@pytest.mark.parametrize(
    "value",
    [
        "8080",
        "8080=",
        "=tcp:127.0.0.1:1",
        "http=tcp:127.0.0.1:1",
        "-1=tcp:127.0.0.1:1",
        "65536=tcp:127.0.0.1:1",
        "99999999999999999999=tcp:127.0.0.1:1",
        "80.0=tcp:127.0.0.1:1",
    ],
)
def test_client_bad_port_mapping_is_a_usage_error(no_env_identifier, flag, value):
    with pytest.raises(usage.UsageError, match=f"^{flag}"):
        client_options("--server", "tcp:h:1", "--identifier", "x", flag, value)


@pytest.mark.parametrize("flag", ["--local-port", "--tcp-local"])
def test_client_non_ascii_digit_port_is_a_usage_error(no_env_identifier, flag):
    with pytest.raises(usage.UsageError, match=f"^{flag}"):
        client_options("--server", "tcp:h:1", "--identifier", "x", flag, "²=tcp:127.0.0.1:1")


def test_client_allow_any_local_port_flag(no_env_identifier):
    base = ["--server", "tcp:h:1", "--identifier", "x"]
    assert not client_options(*base)["allow-any-local-port"]
    options = client_options(*base, "--allow-any-local-port")
    assert options["allow-any-local-port"]
    service = client_tap.makeService(options)
    assert service.forwarder.endpoint_for.__self__.allow_any_port is True


@pytest.mark.parametrize(
    ("server", "host"),
    [
        ("tcp:example.com:8080", "example.com:8080"),
        ("tcp:example.com:8080:timeout=5", "example.com:8080"),
        ("tls:tunnel.example.com:443", "tunnel.example.com:443"),
        ("unix:/run/tunnel.sock", "tunnel"),
    ],
)
def test_client_host_header_is_derived_from_the_server(no_env_identifier, server, host):
    options = client_options("--server", server, "--identifier", "x")
    assert options["host-header"] == host


def test_client_host_header_from_a_keyword_endpoint(no_env_identifier):
    options = client_options("--server", "tcp:host=example.com:port=8080", "--identifier", "x")
    assert options["host-header"] == "example.com:8080"


def test_client_explicit_host_header_wins(no_env_identifier):
    options = client_options(
        "--server", "tcp:10.0.0.1:80", "--identifier", "x", "--host-header", "tunnel.example"
    )
    assert options["host-header"] == "tunnel.example"


def test_client_server_is_repeatable_with_a_host_header_each(no_env_identifier):
    options = client_options(
        "--server", "tcp:a.example:8001",
        "--server", "tls:b.example:443:trustRoots=/etc/ca",
        "--server", "unix:/run/tunnel.sock",
        "--identifier", "x",
    )  # fmt: skip
    assert options["servers"] == [
        "tcp:a.example:8001",
        "tls:b.example:443:trustRoots=/etc/ca",
        "unix:/run/tunnel.sock",
    ]
    assert options["server-hosts"] == {
        "tcp:a.example:8001": "a.example:8001",
        "tls:b.example:443:trustRoots=/etc/ca": "b.example:443",
        "unix:/run/tunnel.sock": "tunnel",
    }
    # the first server, as with one --server
    assert options["server"] == "tcp:a.example:8001"
    assert options["host-header"] == "a.example:8001"


def test_client_host_header_flag_is_sent_to_every_server(no_env_identifier):
    options = client_options(
        "--server", "tcp:10.0.0.1:80", "--server", "tcp:10.0.0.2:80",
        "--host-header", "tunnel.example", "--identifier", "x",
    )  # fmt: skip
    assert set(options["server-hosts"].values()) == {"tunnel.example"}
    assert options["host-header"] == "tunnel.example"


def test_client_same_server_twice_is_a_usage_error(no_env_identifier):
    with pytest.raises(usage.UsageError, match="--server tcp:h:1 is given twice"):
        client_options("--server", "tcp:h:1", "--server", "tcp:h:2", "--server", "tcp:h:1")


def test_client_make_service_with_several_servers(no_env_identifier):
    options = client_options(
        "--server", "tcp:a.example:8001", "--server", "tcp:b.example:8002", "--identifier", "x"
    )
    service = client_tap.makeService(options)
    assert [(str(s), s.host) for s in service.servers] == [
        ("tcp:a.example:8001", "a.example:8001"),
        ("tcp:b.example:8002", "b.example:8002"),
    ]
    assert len({id(s.endpoint) for s in service.servers}) == 2
    assert service.current_server is None  # none tried yet
    assert service.host == "a.example:8001"
    assert service.endpoint is service.servers[0].endpoint
    assert not service.running


def test_client_make_service_with_one_bad_server_of_several_is_a_usage_error(no_env_identifier):
    options = client_options("--server", "tcp:h:1", "--server", "bogus:x", "--identifier", "x")
    with pytest.raises(StartRefused, match="^twistd tunnel-client: .*bad endpoint"):
        client_tap.makeService(options)


def test_client_make_service(no_env_identifier):
    options = client_options(
        "--server", "tcp:example.com:8080", "--identifier", "sekrit",
        "--local", "tcp:127.0.0.1:3000",
        "--local-port", "8443=tcp:127.0.0.1:3443",
        "--tcp-local", "22=tcp:127.0.0.1:2222",
    )  # fmt: skip
    service = client_tap.makeService(options)
    assert isinstance(service, TunnelClientService)
    assert service.identifier == "sekrit"
    assert service.host == "example.com:8080"
    targets = service.forwarder.endpoint_for.__self__
    assert targets.default == "tcp:127.0.0.1:3000"
    assert targets.ports == {8443: "tcp:127.0.0.1:3443"}
    assert targets.tcp_ports == {22: "tcp:127.0.0.1:2222"}
    assert targets.allow_any_port is False
    assert not service.running


@pytest.mark.parametrize(
    "extra",
    [
        ["--server", "bogus:x"],
        ["--server", "tcp:example.com:http"],
        ["--server", "tcp:h:1", "--local", "nonsense:1"],
        ["--server", "tcp:h:1", "--local-port", "8080=bogus:x"],
        ["--server", "tcp:h:1", "--tcp-local", "22=bogus:x"],
    ],
)
def test_client_make_service_with_a_bad_endpoint_is_a_usage_error(no_env_identifier, extra):
    options = client_options("--identifier", "x", *extra)
    with pytest.raises(StartRefused, match="^twistd tunnel-client: .*bad endpoint"):
        client_tap.makeService(options)


# -- 2c. --help, as twistd prints it ---------------------------------------------
#
# twisted.python.usage wraps help text with textwrap at $COLUMNS (80 when unset;
# it never asks the terminal), breaks words at hyphens, keeps every whitespace
# character of a docstring as a space and appends "[default: X]" to a parameter's
# doc before wrapping.  These tests read the help the way twistd prints it.

#: option -> (what it takes, default as shown); twistd adds --help and --version
SERVER_HELP = {
    "access-log": ("PATH", "off"),
    "admin": ("ENDPOINT", "off"),
    "admin-token-file": ("PATH", None),
    "metrics-host-labels": (None, None),
    "allow": ("HOST=CIDR[,CIDR...]", None),
    "basic-auth-file": ("HOST=PATH", None),
    "pool": ("HOST", None),
    "db": ("PATH", "in memory"),
    "redis": ("ENDPOINT", None),
    "redis-password-file": ("PATH", None),
    "redis-prefix": ("PREFIX", "tunnel:"),
    "node-name": ("NAME", "the host name"),
    "cluster-listen": ("ENDPOINT", "off, one node"),
    "cluster-advertise": ("HOST:PORT", None),
    "cluster-secret-file": ("PATH", None),
    "cluster-trust": ("DIR", "TCP"),
    "presence-ttl": ("Seconds", "5.0"),
    "rate": ("HOST=PER_SECOND[/BURST]", None),
    "trusted-proxy": ("CIDR", None),
    "body-min-rate": ("BYTES", "500"),
    "body-timeout": ("Seconds", "20.0"),
    "head-timeout": ("Seconds", "30.0"),
    "idle-streams": ("COUNT", "64"),
    "idle-timeout": ("Seconds", "60.0"),
    "listen": ("ENDPOINT", "tcp:80:backlog=1024"),
    "max-body": ("BYTES", "unlimited"),
    "shutdown-grace": ("Seconds", "10.0"),
    "stream-idle-timeout": ("Seconds", "1.5"),
    "tcp": ("PORT=IDENTIFIER", None),
    "tcp-interface": ("ADDRESS", "0.0.0.0"),
    "tunnel-timeout": ("Seconds", "10.0"),
    "vhost": ("HOST[:PORT]=IDENTIFIER", None),
    "vhost-file": ("PATH", None),
}
CLIENT_HELP = {
    "allow-any-local-port": (None, None),
    "host-header": ("HOST[:PORT]", "from --server"),
    "identifier": ("IDENTIFIER", None),
    "identifier-file": ("PATH", None),
    "local": ("ENDPOINT", "tcp:127.0.0.1:80"),
    "local-port": ("PORT=ENDPOINT", None),
    "server": ("ENDPOINT", None),
    "stop-timeout": ("Seconds", "10.0"),
    "tcp-local": ("PORT=ENDPOINT", None),
}
PLUGINS = {
    "tunnel-server": (SERVER_HELP, server_tap.Options),
    "tunnel-client": (CLIENT_HELP, client_tap.Options),
}
#: 80 is what everyone gets unless they export COLUMNS
HELP_WIDTHS = [80, 100, 120, 132]

# twisted.python.usage.docMakeChunks: "  -s, --name=  doc" or "      --name=  doc"
_OPTION_ROW = re.compile(r"^  (?:-\w,|   ) --([a-z-]+)=? +(\S.*)$")


def checkout_plugins() -> list:
    """The checkout's ServiceMakers.

    getPlugins() may find an installed copy of twisted/plugins/tunnel_plugins.py
    first (a venv with the project installed), so read this checkout's file."""
    path = REPO_ROOT / "twisted" / "plugins" / "tunnel_plugins.py"
    spec = importlib.util.spec_from_file_location("_checkout_tunnel_plugins", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return [module.tunnelServer, module.tunnelClient]


def twistd_help(monkeypatch, capsys, width: int, *argv: str) -> str:
    """What ``twistd ARGV --help`` prints with COLUMNS=width."""
    monkeypatch.setenv("COLUMNS", str(width))
    monkeypatch.setattr(sys, "argv", ["twistd"])  # the synopsis names argv[0]
    others = [p for p in getPlugins(IServiceMaker) if not p.tapname.startswith("tunnel-")]
    config = ServerOptions()
    config._getPlugins = lambda interface: others + checkout_plugins()
    with pytest.raises(SystemExit) as exited:
        config.parseOptions([*argv, "--help"])
    assert exited.value.code in (None, 0)
    return capsys.readouterr().out


def option_docs(text: str) -> dict[str, str]:
    """Each option's doc, its wrapped lines joined by one space."""
    section = text.split("\nOptions:\n", 1)[1].split("\n\n", 1)[0]
    docs: dict[str, list[str]] = {}
    for line in section.splitlines():
        row = _OPTION_ROW.match(line)
        if row:
            assert row[1] not in docs, f"--{row[1]} listed twice"
            docs[row[1]] = lines = [row[2]]
        else:
            lines.append(line.strip())
    return {name: " ".join(lines) for name, lines in docs.items()}


@pytest.mark.parametrize("width", HELP_WIDTHS)
@pytest.mark.parametrize("plugin", PLUGINS)
def test_help_lists_each_option_once_with_what_it_takes_and_its_default(
    monkeypatch, capsys, plugin, width
):
    expected, _ = PLUGINS[plugin]
    docs = option_docs(twistd_help(monkeypatch, capsys, width, plugin))
    assert set(docs) == set(expected) | {"help", "version"}
    wrong = []
    for name, (takes, default) in expected.items():
        doc = docs[name]
        # the default once, in twistd's own form; no other wording of it
        shown = re.findall(r"\[?\bdefault\b[^\]]*\]?", doc, re.IGNORECASE)
        if (
            (takes and takes not in doc)
            or shown != ([f"[default: {default}]"] if default else [])
            or "  " in doc  # a docstring's line break and indentation
        ):
            wrong.append(f"--{name}: {doc}")
    assert wrong == []


@pytest.mark.parametrize("width", HELP_WIDTHS)
@pytest.mark.parametrize("plugin", PLUGINS)
def test_help_has_no_doubled_lines_and_no_odd_wrapping(monkeypatch, capsys, plugin, width):
    _, options = PLUGINS[plugin]
    text = twistd_help(monkeypatch, capsys, width, plugin)
    lines = text.splitlines()
    assert lines[0].startswith(f"Usage: twistd [options] {plugin} "), lines[0]
    printed = [line.strip() for line in lines if line.strip()]
    assert [line for line in printed if printed.count(line) > 1] == []
    for line in lines:
        assert len(line) <= width, line
        assert line == line.rstrip(), line
        assert not re.search(r"\w-$", line), f"word broken at a hyphen: {line!r}"
    # the description, once and whole
    flat = " ".join(text.split())
    assert flat.count(" ".join(options.longdesc.split())) == 1


def test_help_defaults_are_the_defaults(no_env_identifier):
    server = server_options("--vhost", "app.test=id")
    assert server["listen"] == [SERVER_HELP["listen"][1]]
    for name in ("head-timeout", "idle-timeout", "body-timeout", "body-min-rate"):
        assert str(server[name]) == SERVER_HELP[name][1]
    for name in ("idle-streams", "stream-idle-timeout"):
        assert str(server[name]) == SERVER_HELP[name][1]
    for name in ("shutdown-grace", "tcp-interface"):
        assert str(server[name]) == SERVER_HELP[name][1]
    assert str(server["tunnel-timeout"]) == SERVER_HELP["tunnel-timeout"][1]
    assert server["access-log"] is None  # "off"
    assert server["max-body"] is None  # "unlimited"
    client = client_options("--server", "tcp:example.com:8080", "--identifier", "x")
    assert client["local"] == CLIENT_HELP["local"][1]
    assert str(client["stop-timeout"]) == CLIENT_HELP["stop-timeout"][1]
    assert client["host-header"] == "example.com:8080"  # "from --server"


def test_twistd_help_lists_each_plugin_on_one_line(monkeypatch, capsys):
    lines = twistd_help(monkeypatch, capsys, 80).splitlines()
    commands = lines[lines.index("Commands:") + 1 :]
    for maker in checkout_plugins():
        rows = [i for i, line in enumerate(commands) if line.split()[:1] == [maker.tapname]]
        assert len(rows) == 1, maker.tapname
        row = rows[0]
        assert commands[row].split(None, 1)[1] == maker.description
        follows = commands[row + 1] if row + 1 < len(commands) else ""
        assert not follows.startswith("     " + " " * len(maker.tapname)), "wrapped"
    assert len({m.description.split()[0] for m in checkout_plugins()}) == 1  # same style


# -- 3. a real (non-editable) install --------------------------------------------

_IGNORE = shutil.ignore_patterns(
    ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "*.pyc", "dropin.cache",
    ".pytest_cache", ".hypothesis", ".ruff_cache", "_trial_temp", "tests", "bench",
)  # fmt: skip


def _can_build_wheels() -> bool:
    return bool(
        importlib.util.find_spec("wheel")
        or importlib.util.find_spec("setuptools.command.bdist_wheel")
    )


def _install(source: Path, target: Path) -> str:
    """Install ``source`` into ``target`` offline; returns how it was done."""
    if _can_build_wheels():
        # what `pip install .` does, minus dependencies and the network
        argv = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps"]
        argv += ["--no-build-isolation", "--no-index", "--target", str(target), str(source)]
        how = "pip install --target"
    else:
        # No `wheel` here (setuptools < 70.1 has no bdist_wheel), so pip cannot
        # build offline.  build_py copies the packages listed in setup.cfg: the
        # same payload bdist_wheel would put in the wheel.
        argv = [sys.executable, "setup.py", "--quiet", "build_py", "--build-lib", str(target)]
        how = "setup.py build_py"
    done = subprocess.run(argv, cwd=source, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{how} failed:\n{done.stdout}\n{done.stderr}"
    return how


def test_twistd_help_lists_both_plugins_after_a_real_install(tmp_path):
    source = tmp_path / "src"  # a copy, so the build leaves nothing in the checkout
    shutil.copytree(REPO_ROOT, source, ignore=_IGNORE)
    site = tmp_path / "site"
    _install(source, site)
    assert (site / "twisted" / "plugins" / "tunnel_plugins.py").is_file()
    assert (site / "tunnel" / "tap" / "server.py").is_file()
    assert not (site / "twisted" / "__init__.py").exists()
    assert not (site / "twisted" / "plugins" / "__init__.py").exists()

    run_dir = tmp_path / "elsewhere"  # the cwd is on sys.path: keep the checkout off it
    run_dir.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}

    def run(code: str, pythonpath: Path | None) -> subprocess.CompletedProcess:
        child_env = dict(env, PYTHONPATH=str(pythonpath)) if pythonpath else env
        return subprocess.run(
            [sys.executable, "-c", code],
            cwd=run_dir,
            env=child_env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    help_code = f"import sys; sys.argv = ['twistd', '--help']; {TWISTD}"
    installed = run(help_code, site)
    assert installed.returncode == 0, installed.stderr
    assert "tunnel-server" in installed.stdout
    assert "tunnel-client" in installed.stdout
    assert "Traceback" not in installed.stderr

    where = run(
        "import tunnel, twisted.plugins.tunnel_plugins as p; print(tunnel.__file__); "
        "print(p.__file__)",
        site,
    )
    assert where.returncode == 0, where.stderr
    checkout = [REPO_ROOT.resolve() / "tunnel", REPO_ROOT.resolve() / "twisted"]
    tunnel_file, plugin_file = (Path(line).resolve() for line in where.stdout.split())
    # the package comes from our install, the plugin from an installed copy
    # (ours, or the venv's own when .ci/run installed the project there):
    # never from the checkout, which a default editable install would need
    assert tunnel_file.is_relative_to(site.resolve()), where.stdout
    assert not any(plugin_file.is_relative_to(c) for c in checkout), where.stdout

    # control: without an install the plugins are not there
    venv_has_it = run("import tunnel", None).returncode == 0
    bare = run(help_code, None)
    assert bare.returncode == 0, bare.stderr
    assert ("tunnel-server" in bare.stdout) == venv_has_it


# -- 4. end to end: twistd tunnel-server + twistd tunnel-client ------------------

IDENTIFIER = "e2e-sekrit-identifier-0123456789"


class Origin(Resource):
    """The local server behind the tunnel: echoes what it was sent."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[dict[str, bytes | None]] = []

    def render_GET(self, request):
        seen = {
            "host": request.getHeader(b"host"),
            "xff": request.getHeader(b"x-forwarded-for"),
            "uri": request.uri,
        }
        self.seen.append(seen)
        request.setHeader(b"content-type", b"text/plain")
        return b"origin says hi: %s host=%s xff=%s" % (seen["uri"], seen["host"], seen["xff"])


async def public_get(port: int, path: str = "/") -> tuple[int, bytes]:
    response = await http_client().get(
        f"http://127.0.0.1:{port}{path}", headers={"Host": "app.localhost"}, timeout=5
    )
    return response.code, await treq.content(response)


async def start_server(
    processes: list[Twistd], routes: tuple[str, ...] = ("--vhost", f"App.Localhost.={IDENTIFIER}")
) -> tuple[Twistd, int]:
    """twistd tunnel-server on a free port (one retry if someone took the port),
    with ``routes`` for its hosts.

    Each child is added to ``processes`` at once, so the caller can reap it."""
    for attempt in range(2):
        port = free_port()
        server = spawn_twistd(
            "tunnel-server",
            "--listen", f"tcp:{port}:interface=127.0.0.1",
            *routes,
            "--shutdown-grace", "5",
        )  # fmt: skip
        processes.append(server)

        async def listening(port=port):
            code, body = await public_get(port)
            return (code, body) if code == 502 else None

        try:
            code, body = await until_children("the server to listen", listening, server)
        except AssertionError:
            if attempt == 0 and not server.running and "Address already in use" in server.log:
                continue
            raise
        assert body == b"no client session established\n"
        return server, port
    raise AssertionError("unreachable")


@pytest_twisted.ensureDeferred
async def test_twistd_server_and_client_end_to_end(tmp_path):
    origin = Origin()
    connections = WrappingFactory(Site(origin))  # .protocols: the live connections
    origin_port = reactor.listenTCP(0, connections, interface="127.0.0.1")
    ident_file = tmp_path / "identifier"
    ident_file.write_text(IDENTIFIER + "\n")
    processes: list[Twistd] = []
    try:
        server, port = await start_server(processes)
        client = spawn_client([port], ident_file, origin_port.getHost().port)
        processes.append(client)

        async def served():
            code, body = await public_get(port, "/ready")
            return (code, body) if code == 200 else None

        code, body = await until_children("the tunnel to come up", served, server, client)
        assert body.startswith(b"origin says hi: /ready host=app.localhost xff=")

        curl = shutil.which("curl")
        if curl is not None:
            out, err, rc = await getProcessOutputAndValue(
                curl,
                [
                    "--silent", "--show-error", "--max-time", "10", "--noproxy", "*",
                    "--header", "Host: app.localhost",
                    "--header", "X-Forwarded-For: 203.0.113.7",
                    "--write-out", "\n%{http_code}",
                    f"http://127.0.0.1:{port}/via/curl?q=1",
                ],
                env=dict(os.environ),
            )  # fmt: skip
            assert rc == 0, err
            body, _, status = out.rpartition(b"\n")
            assert status == b"200", out
            assert body == (
                b"origin says hi: /via/curl?q=1 host=app.localhost xff=203.0.113.7, 127.0.0.1"
            )
            assert origin.seen[-1]["xff"] == b"203.0.113.7, 127.0.0.1"
        else:
            code, body = await public_get(port, "/via/treq?q=1")
            assert code == 200
            assert body == b"origin says hi: /via/treq?q=1 host=app.localhost xff=127.0.0.1"
        # the origin saw the public Host and who asked
        assert origin.seen and all(s["host"] == b"app.localhost" for s in origin.seen)
        assert all(s["xff"].endswith(b"127.0.0.1") for s in origin.seen)

        # client first: it says GoAway and the server lets the session go
        await stop(client)

        async def client_gone():
            code, body = await public_get(port)
            return True if body == b"no client session established\n" else None

        await until_children("the server to notice the client left", client_gone, server)
        assert "disconnected" in server.log
        await stop(server)
        assert f"(TCP Port {port} Closed)" in server.log

        # identifiers are secrets: the logs show a redacted form only
        for p in processes:
            assert IDENTIFIER not in p.log, p.log
    finally:
        await reap_all(processes)
        await origin_port.stopListening()
        for conn in list(connections.protocols):
            conn.transport.abortConnection()
        await until_children(
            "the origin's connections to close", _none_if(lambda: connections.protocols)
        )


def _none_if(value):
    async def check():
        return None if value() else True

    return check


@pytest_twisted.ensureDeferred
async def test_twistd_server_with_a_vhost_file_keeps_identifiers_out_of_argv(tmp_path):
    """--vhost-file: the hosts of a file are served, and the server's command
    line (what ps shows) and log never hold an identifier."""
    origin = Origin()
    origin_port = reactor.listenTCP(0, Site(origin), interface="127.0.0.1")
    vhosts = tmp_path / "vhosts"
    vhosts.write_text(f"# served by the e2e client\n\nApp.Localhost.={IDENTIFIER}\n")
    ident_file = tmp_path / "identifier"
    ident_file.write_text(IDENTIFIER + "\n")
    processes: list[Twistd] = []
    try:
        server, port = await start_server(processes, ("--vhost-file", str(vhosts)))
        with open(f"/proc/{server.transport.pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
        assert b"--vhost-file" in argv and IDENTIFIER.encode() not in b" ".join(argv)
        client = spawn_client([port], ident_file, origin_port.getHost().port)
        processes.append(client)

        async def served():
            code, body = await public_get(port, "/from-file")
            return (code, body) if code == 200 else None

        code, body = await until_children("the tunnel to come up", served, server, client)
        assert body.startswith(b"origin says hi: /from-file host=app.localhost")
        await stop(client)
        await stop(server)
        for p in processes:
            assert IDENTIFIER not in p.log, p.log
    finally:
        await reap_all(processes)
        await origin_port.stopListening()
