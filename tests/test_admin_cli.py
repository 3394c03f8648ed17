"""tunnel-admin against the real admin API (tests/test_admin_api.py's AdminEnv):
``command()`` in-process on the test reactor, tables and --json, errors and
exit codes; and one run of the installed console script as a child process."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import socket
import sys
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.interfaces import IHostnameResolver, IHostResolution
from twisted.internet.utils import getProcessOutputAndValue
from twisted.web.resource import Resource
from twisted.web.server import Site
from zope.interface import directlyProvides, implementer, providedBy

from tunnel.admin.cli import command
from tunnel.koding.identifiers import TunnelKey

from .admin_env import HOST, IDENT, TOKEN, AdminEnv

REPO_ROOT = Path(__file__).resolve().parents[1]
FP = TunnelKey.of(IDENT).fingerprint


class Cli:
    """Runs tunnel-admin command lines against one AdminEnv."""

    def __init__(self, env: AdminEnv, tmp: Path) -> None:
        self.env = env
        self.tmp = tmp
        self.token_file = tmp / "token"
        self.token_file.write_bytes(TOKEN + b"\n")
        self.token_file.chmod(0o600)  # else every command warns (see test_a_shared_token_file)
        self.ident_file = tmp / "identifier"
        self.ident_file.write_text(IDENT + "\n")

    async def __call__(self, *argv: str, stdin: str = "", environ=None, url=None):
        out, err = io.StringIO(), io.StringIO()
        base = ["--url", url or self.env.url]
        if environ is None:
            base += ["--token-file", str(self.token_file)]
        code = await command(
            reactor,
            [*base, *argv],
            out,
            err,
            stdin=io.StringIO(stdin),
            environ=environ or {},
        )
        return code, out.getvalue(), err.getvalue()

    async def ok(self, *argv: str, **kw) -> str:
        code, out, err = await self(*argv, **kw)
        assert (code, err) == (0, ""), (argv, code, err)
        return out


@pytest_twisted.async_yield_fixture
async def cli(tmp_path):
    env = await AdminEnv().start()
    try:
        yield Cli(env, tmp_path)
    finally:
        await env.stop()


def columns(table: str) -> list[list[str]]:
    return [re.split(r"\s{2,}", line.strip()) for line in table.splitlines()]


@pytest_twisted.ensureDeferred
async def test_hosts_add_list_show_rm(cli):
    rules = cli.tmp / "rules.json"
    rules.write_text(json.dumps({"allow": ["127.0.0.0/8"], "rate": {"per_second": 50}}))
    out = await cli.ok("hosts", "add", HOST, "--identifier-file", str(cli.ident_file))
    assert out == f"added {HOST}: tunnel {FP} (not connected), rules: -\n"
    out = await cli.ok(
        "hosts", "add", HOST, "--identifier-file", str(cli.ident_file), "--rules-file", str(rules)
    )
    assert out == (
        f"replaced {HOST}: tunnel {FP} (not connected),"
        " rules: allow 127.0.0.0/8; rate 50/s, burst 50\n"
    )
    # an identifier from standard input, for a second host
    out = await cli.ok("hosts", "add", "b.localhost", "--identifier-file", "-", stdin=IDENT)
    assert out.startswith(f"added b.localhost: tunnel {FP}")
    await cli.env.connect(IDENT)

    table = await cli.ok("hosts", "list")
    assert columns(table) == [
        ["HOST", "TUNNEL", "CONNECTED", "RULES"],
        [HOST, FP, "yes", "allow 127.0.0.0/8; rate 50/s, burst 50"],
        ["b.localhost", FP, "yes", "-"],
    ]
    lines = table.splitlines()
    assert {line.index(FP) for line in lines[1:]} == {lines[0].index("TUNNEL")}  # aligned
    listed = json.loads(await cli.ok("--json", "hosts", "list"))
    assert listed == (await cli.env.call("GET", "/api/hosts"))[1]

    assert await cli.ok("hosts", "show", "APP.localhost") == (
        f"host:       {HOST}\ntunnel:     {FP}\nconnected:  yes\n"
        "rules:      allow 127.0.0.0/8; rate 50/s, burst 50\n"
    )
    shown = json.loads(await cli.ok("hosts", "show", HOST, "--json"))  # options after, too
    assert shown["host"] == HOST and shown["rules"]["rate"] == {"per_second": 50, "burst": 50}

    assert await cli.ok("hosts", "rm", HOST) == f"removed {HOST}\n"
    assert await cli.ok("--json", "hosts", "rm", "b.localhost") == ""
    assert await cli.ok("hosts", "list") == "no host is configured\n"
    assert await cli("hosts", "rm", HOST) == (
        1,
        "",
        f"tunnel-admin: no such host: {HOST} (HTTP 404)\n",
    )


@pytest_twisted.ensureDeferred
async def test_tunnels_list_and_kick(cli):
    assert await cli.ok("tunnels", "list") == "no client is connected\n"
    await cli.ok("hosts", "add", HOST, "--identifier-file", str(cli.ident_file))
    await cli.env.connect(IDENT)
    assert (await cli.env.public("/bytes?n=3000"))[0] == 200

    table = columns(await cli.ok("tunnels", "list"))
    headings = ["TUNNEL", "REMOTE", "SINCE", "REQUESTS", "IN", "OUT", "STREAMS", "SERVES"]
    assert table[0] == headings
    row = dict(zip(headings, table[1], strict=True))
    assert row["TUNNEL"] == FP and row["REMOTE"].startswith("127.0.0.1:")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", row["SINCE"])
    assert row["REQUESTS"] == "1" and row["SERVES"] == HOST
    assert re.fullmatch(r"\d\.\d KiB", row["IN"])  # 3000 bytes and their headers
    (listed,) = json.loads(await cli.ok("tunnels", "list", "--json"))["tunnels"]
    assert listed["fingerprint"] == FP and listed["requests"] == 1

    out = await cli.ok("tunnels", "kick", FP)
    assert out.startswith(f"disconnected tunnel {FP} (from 127.0.0.1:")
    code, out, err = await cli("tunnels", "kick", "zz")
    assert code == 1 and err.startswith("tunnel-admin: a tunnel is named by 4 to 64 hex digits")


@pytest_twisted.ensureDeferred
async def test_tcp_add_list_rm(cli):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = await cli.ok("tcp", "add", str(port), "--identifier-file", str(cli.ident_file))
    assert out == f"opened TCP port {port}: tunnel {FP} (not connected)\n"
    assert columns(await cli.ok("tcp", "list")) == [
        ["PORT", "TUNNEL", "CONNECTED"],
        [str(port), FP, "no"],
    ]
    assert json.loads(await cli.ok("--json", "tcp", "list")) == {
        "ports": [{"port": port, "tunnel": FP, "connected": False}]
    }
    assert await cli.ok("tcp", "rm", str(port)) == f"closed TCP port {port}\n"
    assert await cli.ok("tcp", "list") == "no TCP port is configured\n"
    code, _, err = await cli("tcp", "add", "0", "--identifier-file", str(cli.ident_file))
    assert (code, err) == (1, "tunnel-admin: '0' is not a TCP port (1 to 65535) (HTTP 400)\n")


@pytest_twisted.ensureDeferred
async def test_the_token_from_the_environment_and_token_errors(cli):
    environ = {"TUNNEL_ADMIN_TOKEN": TOKEN.decode()}
    assert await cli.ok("hosts", "list", environ=environ) == "no host is configured\n"
    code, out, err = await cli("hosts", "list", environ={"TUNNEL_ADMIN_TOKEN": "wrong"})
    assert (code, out) == (1, "")
    assert err == (
        "tunnel-admin: the admin token is required"
        " (Authorization: Bearer TOKEN, or Basic) (HTTP 401)\n"
    )
    code, _, err = await cli("hosts", "list", environ={"OTHER": "x"})
    assert (code, err) == (
        2,
        "tunnel-admin: the admin token is required: --token-file PATH or $TUNNEL_ADMIN_TOKEN\n",
    )
    empty = cli.tmp / "empty"
    empty.write_text("\n")
    code, _, err = await cli("--token-file", str(empty), "hosts", "list", environ={"X": ""})
    assert (code, err) == (2, f"tunnel-admin: the token in {str(empty)!r} is empty\n")


@pytest_twisted.ensureDeferred
async def test_a_shared_token_file_works_with_a_warning(cli):
    cli.token_file.chmod(0o640)
    code, out, err = await cli("hosts", "list")
    assert (code, out) == (0, "no host is configured\n")
    assert err == (
        f"tunnel-admin: warning: the token file {str(cli.token_file)!r} is open to other"
        " users (mode 0640); anyone who reads it controls the server: chmod 600 it\n"
    )
    assert TOKEN.decode() not in err


@pytest_twisted.ensureDeferred
async def test_usage_errors_exit_2_with_one_line(cli):
    missing = str(cli.tmp / "missing")
    cases = [
        (("frobnicate",), "invalid choice: 'frobnicate'"),
        (("hosts",), "the following arguments are required: ACTION"),
        (("hosts", "add", HOST), "the following arguments are required: --identifier-file"),
        (("hosts", "add", HOST, "--identifier-file", missing), "--identifier-file: cannot read"),
        (("tcp", "add", "7000", "--identifier-file", "-"), "--identifier-file: '-' holds no"),
        (("--url", "ftp://x", "hosts", "list"), "--url must be an http:// or https:// URL"),
        (("--url", "http://127.0.0.1:abc", "hosts", "list"), "is not a URL: expected integer"),
        (("--url", "http://[::1", "hosts", "list"), "'http://[::1' is not a URL: invalid host"),
        (("--url", "http://:9000", "hosts", "list"), "'http://:9000' names no host"),
        (("--url", "http://a b", "hosts", "list"), "'http://a b' names no host"),
        (("--url", "http://h:70000", "hosts", "list"), "the port must be from 1 to 65535"),
        (("--timeout", "soon", "hosts", "list"), "argument --timeout: 'soon' is not a number"),
        (("hosts", "list", "--timeout", "0"), "argument --timeout: '0' is not between 0 and"),
    ]
    bad_rules = cli.tmp / "rules.json"
    bad_rules.write_text("[1]")
    cases.append(
        (
            (
                "hosts",
                "add",
                HOST,
                "--identifier-file",
                str(cli.ident_file),
                "--rules-file",
                str(bad_rules),
            ),
            "--rules-file: ",
        )
    )
    for argv, message in cases:
        code, out, err = await cli(*argv)
        assert code == 2, argv
        assert err.startswith("tunnel-admin: ") and message in err, (argv, err)
        assert err.count("\n") == 1, err
    code, out, err = await cli("--help")
    assert code == 0 and out.startswith("usage: tunnel-admin") and "hosts" in out


@pytest_twisted.ensureDeferred
async def test_an_unreachable_server_is_one_line(cli):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    code, out, err = await cli("hosts", "list", url=f"http://127.0.0.1:{port}")
    assert (code, out) == (1, "")
    assert err == f"tunnel-admin: cannot connect to http://127.0.0.1:{port}: connection refused\n"
    # an HTTP server that is not the admin API
    code, out, err = await cli("hosts", "list", url=cli.env.tunnel.url)
    assert code == 1 and err.count("\n") == 1 and err.startswith("tunnel-admin: ")


@implementer(IHostResolution)
class Resolution:
    def __init__(self, name: str) -> None:
        self.name = name

    def cancel(self) -> None:
        pass


@implementer(IHostnameResolver)
class NoAddresses:
    """A resolver for which no host name has an address."""

    def resolveHostName(self, receiver, hostName, portNumber=0, addressTypes=None, **kw):
        receiver.resolutionBegan(Resolution(hostName))
        receiver.resolutionComplete()
        return receiver


class Unresolving:
    """The running reactor, except that no host name resolves: a failed DNS
    lookup without asking any DNS server."""

    def __init__(self, real) -> None:
        self._real = real
        directlyProvides(self, providedBy(real))
        self.nameResolver = NoAddresses()

    def __getattr__(self, name: str):
        return getattr(self._real, name)


@pytest_twisted.ensureDeferred
async def test_an_unknown_host_name_is_one_line(tmp_path):
    token = tmp_path / "token"
    token.write_bytes(TOKEN)
    token.chmod(0o600)
    out, err = io.StringIO(), io.StringIO()
    argv = ["--url", "http://admin.invalid:9000", "--token-file", str(token), "hosts", "list"]
    code = await command(Unresolving(reactor), argv, out, err, environ={})
    assert (code, out.getvalue()) == (1, "")
    assert err.getvalue() == (
        "tunnel-admin: cannot connect to http://admin.invalid:9000: unknown host name\n"
    )


class Answers(Resource):
    """An endpoint that answers every request 200 with the JSON it is given."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.document: object = {}

    def render(self, request) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(self.document).encode()


@pytest_twisted.ensureDeferred
async def test_an_answer_without_what_the_command_reads_is_one_line(cli):
    answers = Answers()
    port = reactor.listenTCP(0, Site(answers), interface="127.0.0.1")
    url = f"http://127.0.0.1:{port.getHost().port}"
    try:
        cases = [
            ({}, ("hosts", "list"), "no field 'hosts'"),
            ({"hosts": [{"host": "a"}]}, ("hosts", "list"), "no field 'tunnel'"),
            ({"tunnels": [{}]}, ("tunnels", "list"), "no field 'fingerprint'"),
            ({"ports": 7}, ("tcp", "list"), "'int' object is not iterable"),
            ([], ("hosts", "show", HOST), "list indices must be integers"),
            ("text", ("tunnels", "kick", "abcd"), "string indices must be integers"),
        ]
        for document, argv, what in cases:
            answers.document = document
            code, out, err = await cli(*argv, url=url)
            assert (code, out) == (1, ""), argv
            prefix = f"tunnel-admin: {url} gave an answer tunnel-admin does not understand ("
            assert err.startswith(prefix + what) and err.endswith(")\n"), (argv, err)
            assert err.count("\n") == 1, err
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_refusal_in_text_is_shown_as_it_is(cli):
    big = cli.tmp / "big-identifier"
    big.write_text("x" * 70_000)
    code, out, err = await cli("hosts", "add", HOST, "--identifier-file", str(big))
    assert (code, out) == (1, "")
    assert err == "tunnel-admin: the request body is larger than 65536 bytes (HTTP 413)\n"


def _console_script() -> str | None:
    here = Path(sys.executable).parent / "tunnel-admin"
    return str(here) if here.exists() else shutil.which("tunnel-admin")


@pytest_twisted.ensureDeferred
async def test_the_installed_console_script(cli):
    script = _console_script()
    if script is None:
        pytest.skip("the tunnel-admin console script is not installed (pip install .)")
    await cli.ok("hosts", "add", HOST, "--identifier-file", str(cli.ident_file))
    environ = {k: v for k, v in os.environ.items() if not k.startswith("TUNNEL_")}
    # the checkout's code, as tests/processes.py runs twistd
    environ["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(REPO_ROOT), environ.get("PYTHONPATH")])
    )
    environ["TUNNEL_ADMIN_TOKEN"] = TOKEN.decode()
    environ["TUNNEL_ADMIN_URL"] = cli.env.url
    out, err, code = await getProcessOutputAndValue(
        script, ["hosts", "list"], env=environ, path=str(REPO_ROOT)
    )
    assert (code, err) == (0, b""), err
    assert columns(out.decode()) == [
        ["HOST", "TUNNEL", "CONNECTED", "RULES"],
        [HOST, FP, "no", "-"],
    ]
    out, err, code = await getProcessOutputAndValue(
        script, ["hosts", "show", "nowhere.localhost"], env=environ, path=str(REPO_ROOT)
    )
    assert (code, out) == (1, b"")
    assert err == b"tunnel-admin: no such host: nowhere.localhost (HTTP 404)\n"


@pytest_twisted.ensureDeferred
async def test_a_pooled_host_lists_and_kicks_every_client(cli):
    rules = cli.tmp / "rules.json"
    rules.write_text(json.dumps({"rate": {"per_second": 50}}))
    out = await cli.ok("hosts", "add", HOST, "--identifier-file", str(cli.ident_file), "--pool")
    assert out == f"added {HOST}: tunnel {FP} (not connected), rules: pool: yes\n"
    # --pool joins the rules of a file
    out = await cli.ok(
        "hosts",
        "add",
        HOST,
        "--identifier-file",
        str(cli.ident_file),
        "--rules-file",
        str(rules),
        "--pool",
    )
    assert out.endswith("rules: rate 50/s, burst 50; pool: yes\n")
    assert cli.env.routes.host(HOST).rules == {
        "rate": {"per_second": 50, "burst": 50},
        "pool": True,
    }
    first = await cli.env.connect(IDENT)
    second = await cli.env.connect(IDENT)  # a duplicate if the host were not pooled
    server = cli.env.server
    assert all(c.ready for c in server.connections_of(IDENT)) and len(server.connections()) == 2
    for _ in range(2):
        assert (await cli.env.public("/echo?echo=x"))[0] == 200

    tunnels = json.loads(await cli.ok("tunnels", "list", "--json"))["tunnels"]
    assert [t["fingerprint"] for t in tunnels] == [FP, FP]
    assert [t["requests"] for t in tunnels] == [1, 1]  # one each, in turn
    assert len({t["remote"] for t in tunnels}) == 2
    (host,) = (await cli.env.call("GET", "/api/hosts"))[1]["hosts"]
    assert host["connected"] and host["rules"]["pool"] is True

    members = server.connections_of(IDENT)
    out = await cli.ok("tunnels", "kick", FP)  # one tunnel, not "names 2 tunnels"
    assert out.startswith(f"disconnected tunnel {FP}")
    await first.when_ready()
    await second.when_ready()
    assert all(m.closed for m in members)
