"""Operating a server, end to end through real processes (issue 10's "done when").

``twistd tunnel-server --db --admin`` with no host on its command line;
``tunnel-admin`` (a child process, on the checkout's code) adds hosts, with
and without access rules; a ``twistd tunnel-client`` with that identifier
serves them; ``/api/tunnels`` and ``/metrics`` count what passed; the
server restarts on the same database and serves the same hosts, with the
same rules, and the file never held the identifier or a password; removing
the host makes its requests Go's 502.
"""

from __future__ import annotations

import base64
import grp
import json
import os
import pwd
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.utils import getProcessOutputAndValue
from twisted.web.resource import Resource
from twisted.web.server import Site

from .live import http_client
from .processes import (
    REPO_ROOT,
    Twistd,
    free_port,
    reap_all,
    spawn_client,
    spawn_twistd,
    stop,
    until_children,
)

IDENTIFIER = "operate-e2e-identifier-6c1f0a9e"
PASSWORD = "correct horse battery staple"
TOKEN = "admin-token-for-the-e2e-test-3f9d"
CLI = "from tunnel.admin.cli import main; main()"


class Origin(Resource):
    """The local site: says which host and path it was asked for, and whether
    an Authorization header reached it."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.authorization: list[bytes | None] = []

    def render_GET(self, request):
        self.authorization.append(request.getHeader(b"authorization"))
        request.setHeader(b"content-type", b"text/plain")
        return b"origin: %s %s" % (request.getHeader(b"host"), request.uri)


async def public_get(port: int, host: str, *, password: str | None = None):
    headers = {"Host": host}
    if password is not None:
        headers["Authorization"] = "Basic " + base64.b64encode(f"ops:{password}".encode()).decode()
    response = await http_client().get(f"http://127.0.0.1:{port}/", headers=headers, timeout=5)
    return response.code, await treq.content(response)


class Admin:
    """``tunnel-admin`` as a child process, and raw reads of the admin endpoint."""

    def __init__(self, port: int, token_file) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.token_file = str(token_file)

    async def run(self, *argv: str) -> tuple[int, str, str]:
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
        env.pop("TUNNEL_ADMIN_TOKEN", None)
        args = ["-c", CLI, "--url", self.url, "--token-file", self.token_file, *argv]
        out, err, code = await getProcessOutputAndValue(
            sys.executable, args, env=env, path=str(REPO_ROOT)
        )
        return code, out.decode(), err.decode()

    async def json(self, *argv: str):
        code, out, err = await self.run("--json", *argv)
        assert code == 0, err
        return json.loads(out)

    async def metrics(self) -> str:
        response = await http_client().get(f"{self.url}/metrics", timeout=5)  # no token
        assert response.code == 200
        return (await treq.content(response)).decode()


def metric(text: str, name: str) -> float:
    """The sum of a metric's samples (all label sets) in the text format."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def start_server(processes: list[Twistd], port: int, admin: int, db, token_file) -> Twistd:
    server = spawn_twistd(
        "tunnel-server",
        "--listen", f"tcp:{port}:interface=127.0.0.1",
        "--db", str(db),
        "--admin", f"tcp:{admin}:interface=127.0.0.1",
        "--admin-token-file", str(token_file),
        "--shutdown-grace", "2",
    )  # fmt: skip
    processes.append(server)
    return server


@pytest_twisted.ensureDeferred
async def test_a_server_operated_through_its_admin_api_and_tunnel_admin(tmp_path):
    origin = Origin()
    origin_port = reactor.listenTCP(0, Site(origin), interface="127.0.0.1")
    db = tmp_path / "registry.db"
    token_file = tmp_path / "admin.token"
    token_file.write_text(TOKEN + "\n")
    ident_file = tmp_path / "identifier"
    ident_file.write_text(IDENTIFIER + "\n")
    rules = {
        "auth.localhost": {"basic_auth": {"user": "ops", "password": PASSWORD}},
        "allow.localhost": {"allow": ["10.0.0.0/8"]},
        "rate.localhost": {"rate": {"per_second": 0.001, "burst": 1}},
    }
    port, admin_port = free_port(), free_port()
    admin = Admin(admin_port, token_file)
    processes: list[Twistd] = []
    try:
        server = start_server(processes, port, admin_port, db, token_file)

        async def admin_up():
            code, _, _ = await admin.run("hosts", "list")
            return True if code == 0 else None

        await until_children("the admin endpoint", admin_up, server)

        # hosts added from the command line, sharing one identifier
        code, out, err = await admin.run(
            "hosts", "add", "App.Localhost", "--identifier-file", str(ident_file)
        )
        assert code == 0, err
        assert out.startswith("added app.localhost: tunnel ")
        for host, host_rules in rules.items():
            rules_file = tmp_path / f"{host}.json"
            rules_file.write_text(json.dumps(host_rules))
            code, _, err = await admin.run(
                "hosts", "add", host, "--identifier-file", str(ident_file),
                "--rules-file", str(rules_file),
            )  # fmt: skip
            assert code == 0, err

        client = spawn_client([port], ident_file, origin_port.getHost().port)
        processes.append(client)

        async def served():
            code, body = await public_get(port, "app.localhost")
            return body if code == 200 else None

        body = await until_children("the added host to be served", served, server, client)
        assert body == b"origin: app.localhost /"

        # the tunnel's counters and the server's metrics move with requests
        (tunnel,) = (await admin.json("tunnels", "list"))["tunnels"]
        before = tunnel["requests"]
        requests_before = metric(await admin.metrics(), "tunnel_requests_total")
        for _ in range(3):
            assert (await public_get(port, "app.localhost"))[0] == 200
        (tunnel,) = (await admin.json("tunnels", "list"))["tunnels"]
        assert tunnel["requests"] == before + 3
        assert tunnel["bytes_in"] > 0 and tunnel["bytes_out"] > 0
        assert sorted(tunnel["hosts"]) == sorted(["app.localhost", *rules])
        text = await admin.metrics()
        assert metric(text, "tunnel_requests_total") >= requests_before + 3
        assert metric(text, "tunnel_clients_connected") == 1

        async def rules_hold():
            auth = await public_get(port, "auth.localhost")
            assert auth[0] == 401, auth
            wrong = await public_get(port, "auth.localhost", password="guess")
            assert wrong[0] == 401, wrong
            right = await public_get(port, "auth.localhost", password=PASSWORD)
            assert right == (200, b"origin: auth.localhost /"), right
            assert origin.authorization[-1] is None  # never forwarded
            assert (await public_get(port, "allow.localhost"))[0] == 403
            rated = [(await public_get(port, "rate.localhost"))[0] for _ in range(2)]
            assert rated == [200, 429], rated

        await rules_hold()
        assert metric(await admin.metrics(), "tunnel_errors_total") >= 4

        # a restart on the same database: the same hosts, with their rules
        await stop(server)
        for path in tmp_path.glob("registry.db*"):
            content = path.read_bytes()
            assert IDENTIFIER.encode() not in content, path
            assert PASSWORD.encode() not in content, path
        server = start_server(processes, port, admin_port, db, token_file)
        body = await until_children("the host to be served again", served, server, client)
        assert body == b"origin: app.localhost /"
        await rules_hold()

        # removed: Go's 502 for its requests
        code, out, err = await admin.run("hosts", "rm", "app.localhost")
        assert (code, out.strip()) == (0, "removed app.localhost"), err
        assert await public_get(port, "app.localhost") == (
            502,
            b'no virtual host available for "app.localhost"\n',
        )
        code, _, err = await admin.run("hosts", "rm", "app.localhost")
        assert code == 1 and "no such host" in err

        await stop(client)
        await stop(server)
        for p in processes:
            assert IDENTIFIER not in p.log and PASSWORD not in p.log and TOKEN not in p.log, p.log
    finally:
        await reap_all(processes)
        await origin_port.stopListening()


@pytest_twisted.ensureDeferred
async def test_with_a_db_a_port_taken_at_start_still_fails_the_start(tmp_path):
    """The registry is loaded before the reactor runs, so a port that cannot
    be bound ends twistd with the error and a non-zero exit, as without --db."""
    taken = reactor.listenTCP(0, Site(Origin()), interface="127.0.0.1")
    processes: list[Twistd] = []
    try:
        server = spawn_twistd(
            "tunnel-server",
            "--listen", f"tcp:{taken.getHost().port}:interface=127.0.0.1",
            "--db", str(tmp_path / "registry.db"),
            "--vhost", f"app.localhost={IDENTIFIER}",
        )  # fmt: skip
        processes.append(server)
        await server.ended()
        assert server.reason.exitCode not in (0, None), server.log
        assert "Address already in use" in server.log
        assert IDENTIFIER not in server.log
    finally:
        await reap_all(processes)
        await taken.stopListening()


def _nobody() -> tuple[int, int] | None:
    if os.getuid() != 0:
        return None
    try:
        return pwd.getpwnam("nobody").pw_uid, grp.getgrnam("nogroup").gr_gid
    except KeyError:
        return None


@pytest_twisted.ensureDeferred
async def test_with_a_db_twistd_uid_binds_as_root_and_opens_the_file_as_its_user():
    """twistd --uid/--gid: the registry file is given to that user before
    twistd sheds its privileges, and the routes are loaded (and the ports
    bound) before, so the server starts and keeps its file usable."""
    owner = _nobody()
    if owner is None:
        pytest.skip("needs root and a nobody/nogroup user to switch to")
    directory = Path(tempfile.mkdtemp(prefix="tunnel-uid-"))  # reachable by nobody
    directory.chmod(0o777)
    db = directory / "registry.db"
    port = free_port()
    processes: list[Twistd] = []
    try:
        server = spawn_twistd(
            "tunnel-server",
            "--listen", f"tcp:{port}:interface=127.0.0.1",
            "--db", str(db),
            "--vhost", f"app.localhost={IDENTIFIER}",
            twistd_args=("--uid", "nobody", "--gid", "nogroup"),
        )  # fmt: skip
        processes.append(server)

        async def listening():
            code, body = await public_get(port, "app.localhost")
            return body if code == 502 else None

        body = await until_children("the server to listen", listening, server)
        assert body == b"no client session established\n"
        assert (db.stat().st_uid, db.stat().st_gid) == owner
        await stop(server)
    finally:
        await reap_all(processes)
        shutil.rmtree(directory, ignore_errors=True)
