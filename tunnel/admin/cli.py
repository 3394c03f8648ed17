"""``tunnel-admin``: the admin API from a shell.

::

    tunnel-admin [--url URL] [--token-file F] [--json] COMMAND

    hosts add HOST --identifier-file F [--rules-file RULES.json] [--pool]
    hosts list | hosts show HOST | hosts rm HOST
    tunnels list | tunnels kick FINGERPRINT
    tcp add PORT --identifier-file F | tcp rm PORT | tcp list

The token comes from ``--token-file`` or ``$TUNNEL_ADMIN_TOKEN``, the URL
from ``--url`` or ``$TUNNEL_ADMIN_URL``; identifiers only from a file (or
``-``, standard input), never from argv where ``ps`` would show them.
People get tables and sentences; ``--json`` prints the API's JSON as it
came, for scripts.  Exit status: 0 done, 1 the API refused (its message is
printed), could not be reached or gave an answer this command cannot read,
2 a usage error (a malformed ``--url`` too).  Every error is one line.

``main()`` is the console script (it runs the reactor with ``task.react``);
``command()`` is the same on a running reactor, with its own output
streams, for tests and for programs that embed it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import IO, Any, NoReturn
from urllib.parse import quote

import treq
from hyperlink import URL, URLParseError
from twisted.internet import error as neterror
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import react
from twisted.web.client import Agent, HTTPConnectionPool, ResponseFailed
from twisted.web.http import RESPONSES

from .auth import TokenFileError, parse_token, read_token_file
from .status import human_bytes, rules_summary

PROG = "tunnel-admin"
TOKEN_ENV = "TUNNEL_ADMIN_TOKEN"
URL_ENV = "TUNNEL_ADMIN_URL"
DEFAULT_URL = "http://127.0.0.1:9000"
#: the largest answer read from the API
MAX_ANSWER = 32 * 1024 * 1024
#: a file given for an identifier or rules is small
MAX_FILE = 1024 * 1024


class UsageError(Exception):
    """The command line cannot be run (exit status 2)."""


class Failed(Exception):
    """The command ran and failed (exit status 1); the message says why."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports to our streams and raises instead of exiting."""

    def __init__(self, *args: Any, out: IO[str], err: IO[str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.out = out
        self.err = err

    def _print_message(self, message: str, file: IO[str] | None = None) -> None:
        if message:
            (self.err if file is sys.stderr else self.out).write(message)

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        if message:
            self.err.write(message)
        raise SystemExit(status)

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see {self.prog} --help)")


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds")
    if not 0 < value < 86400:
        raise argparse.ArgumentTypeError(f"{text!r} is not between 0 and 86400 seconds")
    return value


def _globals(parser: argparse.ArgumentParser, suppress: bool) -> None:
    """The options every command takes, before or after the command's name."""
    default = argparse.SUPPRESS if suppress else None
    parser.add_argument(
        "--url",
        default=default,
        help=f"the admin endpoint [default: ${URL_ENV} or {DEFAULT_URL}]",
    )
    parser.add_argument(
        "--token-file",
        default=default,
        metavar="PATH",
        help=f"a file holding the admin token [default: ${TOKEN_ENV}]",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS if suppress else False,
        help="print the API's JSON instead of tables",
    )
    parser.add_argument(
        "--timeout",
        type=_seconds,
        default=argparse.SUPPRESS if suppress else 10.0,
        metavar="SECONDS",
        help="give up on the API after this long [default: 10]",
    )


def build_parser(out: IO[str], err: IO[str]) -> _Parser:
    parser = _Parser(
        prog=PROG,
        description="Manage a tunnel server through its admin API.",
        out=out,
        err=err,
    )
    _globals(parser, suppress=False)
    groups = parser.add_subparsers(dest="group", metavar="COMMAND", required=True)

    def command(group: Any, name: str, run: Callable, help: str) -> argparse.ArgumentParser:
        sub = group.add_parser(name, help=help, description=help, out=out, err=err)
        _globals(sub, suppress=True)
        sub.set_defaults(run=run)
        return sub

    hosts = groups.add_parser("hosts", help="public hosts", out=out, err=err).add_subparsers(
        dest="action", metavar="ACTION", required=True
    )
    add = command(hosts, "add", _hosts_add, "serve HOST by the client holding an identifier")
    add.add_argument("host", metavar="HOST")
    add.add_argument("--identifier-file", required=True, metavar="PATH", help="'-': stdin")
    add.add_argument("--rules-file", metavar="PATH", help="the host's rules, a JSON object")
    add.add_argument(
        "--pool",
        action="store_true",
        help="several clients may hold the tunnel (the rule pool: true)",
    )
    command(hosts, "list", _hosts_list, "list the hosts")
    command(hosts, "show", _hosts_show, "show one host").add_argument("host", metavar="HOST")
    command(hosts, "rm", _hosts_rm, "stop serving HOST").add_argument("host", metavar="HOST")

    tunnels = groups.add_parser(
        "tunnels", help="connected clients", out=out, err=err
    ).add_subparsers(dest="action", metavar="ACTION", required=True)
    command(tunnels, "list", _tunnels_list, "list the connected clients")
    command(tunnels, "kick", _tunnels_kick, "disconnect a client").add_argument(
        "fingerprint", metavar="FINGERPRINT"
    )

    tcp = groups.add_parser("tcp", help="public TCP ports", out=out, err=err).add_subparsers(
        dest="action", metavar="ACTION", required=True
    )
    add = command(tcp, "add", _tcp_add, "listen on PORT for the client holding an identifier")
    add.add_argument("port", metavar="PORT")
    add.add_argument("--identifier-file", required=True, metavar="PATH", help="'-': stdin")
    command(tcp, "rm", _tcp_rm, "close PORT").add_argument("port", metavar="PORT")
    command(tcp, "list", _tcp_list, "list the TCP ports")
    return parser


# -- talking to the API ----------------------------------------------------------------------


class Api:
    """One admin endpoint, asked with treq (no connection kept between requests)."""

    def __init__(self, reactor: Any, url: str, token: bytes, timeout: float) -> None:
        self.reactor = reactor
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.http = treq.client.HTTPClient(Agent(reactor, pool=pool, connectTimeout=timeout))

    async def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """(status, decoded JSON or None); Failed for an error answer or no answer."""
        headers = {
            b"authorization": [b"Bearer " + self.token],
            b"accept": [b"application/json"],
        }
        data = None
        if body is not None:
            headers[b"content-type"] = [b"application/json"]
            data = json.dumps(body).encode("utf-8")
        try:
            d = self._exchange(method, self.url + path, headers, data)
            d.addTimeout(self.timeout, self.reactor)
            code, text_type, raw = await d
        except Failed:
            raise
        except (neterror.ConnectError, neterror.DNSLookupError) as e:
            raise Failed(f"cannot connect to {self.url}: {_connect_reason(e)}")
        except (CancelledError, neterror.TimeoutError):
            raise Failed(f"no answer from {self.url} within {self.timeout:g} s")
        except ResponseFailed as e:
            reasons = "; ".join(r.getErrorMessage() for r in e.reasons) or "connection lost"
            raise Failed(f"the connection to {self.url} failed: {reasons}")
        except Exception as e:  # anything else on the way: one line, not a traceback
            raise Failed(f"the request to {self.url} failed: {type(e).__name__}: {e}")
        document = _decode(raw)
        if code >= 400:
            if isinstance(document, dict) and isinstance(document.get("error"), str):
                raise Failed(f"{document['error']} (HTTP {code})")
            line = _text_line(raw) if text_type else None
            if line:  # what the admin endpoint's channel says when it refuses a request
                raise Failed(f"{line} (HTTP {code})")
            phrase = RESPONSES.get(code, b"").decode("latin-1")
            raise Failed(f"the server answered {code} {phrase}".rstrip())
        if raw and document is None:
            raise Failed(f"{self.url} did not answer with JSON: is it the admin endpoint?")
        return code, document

    def _exchange(self, method: str, url: str, headers: dict, data: bytes | None) -> Deferred:
        """(status, whether the answer is text/plain, its body)."""

        async def exchange() -> tuple[int, bool, bytes]:
            response = await self.http.request(method, url, headers=headers, data=data)
            chunks: list[bytes] = []
            size = 0

            def collect(chunk: bytes) -> None:
                nonlocal size
                size += len(chunk)
                if size > MAX_ANSWER:
                    raise Failed(f"the answer from {self.url} is larger than {MAX_ANSWER} bytes")
                chunks.append(chunk)

            await treq.collect(response, collect)
            kind = (response.headers.getRawHeaders(b"content-type") or [b""])[0]
            text_type = kind.split(b";")[0].strip().lower() == b"text/plain"
            return response.code, text_type, b"".join(chunks)

        return Deferred.fromCoroutine(exchange())


def _decode(raw: bytes) -> Any:
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return None


def _text_line(raw: bytes) -> str | None:
    """The first line of a short text answer, if it is printable."""
    try:
        text = raw[:500].decode("utf-8").strip()
    except UnicodeDecodeError:
        return None
    line = text.split("\n", 1)[0].strip()
    return line if line and line.isprintable() else None


def _connect_reason(error: Exception) -> str:
    if isinstance(error, neterror.ConnectionRefusedError):
        return "connection refused"
    if isinstance(error, neterror.DNSLookupError):
        return "unknown host name"
    return error.osError.strerror if getattr(error, "osError", None) else str(error).strip()


# -- the commands -------------------------------------------------------------------------------


def _read_small(path: str, what: str, stdin: IO[str]) -> str:
    if path == "-":
        return stdin.read(MAX_FILE + 1)[:MAX_FILE]
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(MAX_FILE + 1)
    except OSError as e:
        raise UsageError(f"{what}: cannot read {path!r}: {e.strerror}")
    except UnicodeDecodeError:
        raise UsageError(f"{what}: {path!r} is not UTF-8 text")
    if len(text) > MAX_FILE:
        raise UsageError(f"{what}: {path!r} is larger than {MAX_FILE} bytes")
    return text


def _identifier(args: argparse.Namespace, stdin: IO[str]) -> str:
    # as the client's --identifier-file: surrounding white space is not part of it
    identifier = _read_small(args.identifier_file, "--identifier-file", stdin).strip()
    if not identifier:
        raise UsageError(f"--identifier-file: {args.identifier_file!r} holds no identifier")
    return identifier


def _rules(args: argparse.Namespace, stdin: IO[str]) -> Any:
    if args.rules_file is None:
        return None
    if args.rules_file == "-" and args.identifier_file == "-":
        raise UsageError("only one of --identifier-file and --rules-file may be '-'")
    text = _read_small(args.rules_file, "--rules-file", stdin)
    try:
        rules = json.loads(text)
    except ValueError as e:
        raise UsageError(f"--rules-file: {args.rules_file!r} is not JSON: {e}")
    if not isinstance(rules, dict):
        raise UsageError(f"--rules-file: {args.rules_file!r} must hold a JSON object")
    return rules


def _yes(flag: Any) -> str:
    return "yes" if flag else "no"


def table(headings: Sequence[str], rows: Sequence[Sequence[Any]], numeric: set[int]) -> str:
    """Aligned columns, two spaces apart; the ``numeric`` columns right-aligned."""
    cells = [list(headings)] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headings))]
    lines = []
    for row in cells:
        parts = [
            c.rjust(w) if i in numeric else c.ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines) + "\n"


def _pairs(pairs: Sequence[tuple[str, Any]]) -> str:
    width = max(len(name) for name, _ in pairs) + 1
    return "".join(f"{(name + ':').ljust(width)}  {value}\n" for name, value in pairs)


def _connected_note(entry: Mapping[str, Any]) -> str:
    return "connected" if entry.get("connected") else "not connected"


async def _hosts_add(api: Api, args: argparse.Namespace, stdin: IO[str]) -> tuple[Any, str]:
    body: dict[str, Any] = {"identifier": _identifier(args, stdin)}
    rules = _rules(args, stdin)
    if args.pool:
        rules = {**(rules or {}), "pool": True}
    if rules is not None:
        body["rules"] = rules
    code, entry = await api.call("PUT", "/api/hosts/" + _segment(args.host), body)
    verb = "added" if code == 201 else "replaced"
    return entry, (
        f"{verb} {entry['host']}: tunnel {entry['tunnel']} ({_connected_note(entry)})"
        f", rules: {rules_summary(entry.get('rules'))}\n"
    )


async def _hosts_list(api: Api, args: argparse.Namespace, stdin: IO[str]) -> tuple[Any, str]:
    _, document = await api.call("GET", "/api/hosts")
    hosts = document["hosts"]
    if not hosts:
        return document, "no host is configured\n"
    rows = [
        (h["host"], h["tunnel"], _yes(h["connected"]), rules_summary(h.get("rules"))) for h in hosts
    ]
    return document, table(("HOST", "TUNNEL", "CONNECTED", "RULES"), rows, set())


async def _hosts_show(api: Api, args: argparse.Namespace, stdin: IO[str]) -> tuple[Any, str]:
    _, h = await api.call("GET", "/api/hosts/" + _segment(args.host))
    return h, _pairs(
        [
            ("host", h["host"]),
            ("tunnel", h["tunnel"]),
            ("connected", _yes(h["connected"])),
            ("rules", rules_summary(h.get("rules"))),
        ]
    )


async def _hosts_rm(api: Api, args: argparse.Namespace, stdin: IO[str]) -> tuple[Any, str]:
    await api.call("DELETE", "/api/hosts/" + _segment(args.host))
    return None, f"removed {args.host}\n"


async def _tunnels_list(api: Api, args: argparse.Namespace, stdin: IO[str]) -> tuple[Any, str]:
    _, document = await api.call("GET", "/api/tunnels")
    tunnels = document["tunnels"]
    if not tunnels:
        return document, "no client is connected\n"
    rows = [
        (
            t["fingerprint"],
            t["remote"],
            t["connected_since"],
            t["requests"],
            human_bytes(t["bytes_in"]),
            human_bytes(t["bytes_out"]),
            t["streams_open"],
            ", ".join([*t["hosts"], *(f"tcp:{p}" for p in t["ports"])]) or "-",
        )
        for t in tunnels
    ]
    headings = ("TUNNEL", "REMOTE", "SINCE", "REQUESTS", "IN", "OUT", "STREAMS", "SERVES")
    return document, table(headings, rows, {3, 4, 5, 6})


async def _tunnels_kick(api: Api, args: argparse.Namespace, stdin: IO[str]) -> tuple[Any, str]:
    _, t = await api.call("DELETE", "/api/tunnels/" + _segment(args.fingerprint))
    return t, (
        f"disconnected tunnel {t['fingerprint']} (from {t['remote']});"
        " it reconnects unless its hosts were removed\n"
    )


async def _tcp_add(api: Api, args: argparse.Namespace, stdin: IO[str]) -> tuple[Any, str]:
    body = {"identifier": _identifier(args, stdin)}
    code, entry = await api.call("PUT", "/api/tcp/" + _segment(args.port), body)
    verb = "opened" if code == 201 else "replaced"
    return entry, (
        f"{verb} TCP port {entry['port']}: tunnel {entry['tunnel']} ({_connected_note(entry)})\n"
    )


async def _tcp_rm(api: Api, args: argparse.Namespace, stdin: IO[str]) -> tuple[Any, str]:
    await api.call("DELETE", "/api/tcp/" + _segment(args.port))
    return None, f"closed TCP port {args.port}\n"


async def _tcp_list(api: Api, args: argparse.Namespace, stdin: IO[str]) -> tuple[Any, str]:
    _, document = await api.call("GET", "/api/tcp")
    ports = document["ports"]
    if not ports:
        return document, "no TCP port is configured\n"
    rows = [(p["port"], p["tunnel"], _yes(p["connected"])) for p in ports]
    return document, table(("PORT", "TUNNEL", "CONNECTED"), rows, {0})


def _segment(text: str) -> str:
    """One path segment, whatever ``text`` holds."""
    return quote(text, safe="")


# -- running ------------------------------------------------------------------------------------


def _token(args: argparse.Namespace, environ: Mapping[str, str], err: IO[str]) -> bytes:
    try:
        if args.token_file:
            return read_token_file(
                args.token_file, warn=lambda text: err.write(f"{PROG}: warning: {text}\n")
            )
        if environ.get(TOKEN_ENV):
            return parse_token(environ[TOKEN_ENV].encode("utf-8"), f"${TOKEN_ENV}")
    except TokenFileError as e:
        raise UsageError(str(e))
    raise UsageError(f"the admin token is required: --token-file PATH or ${TOKEN_ENV}")


def _url(args: argparse.Namespace, environ: Mapping[str, str]) -> str:
    url = args.url or environ.get(URL_ENV) or DEFAULT_URL
    if not url.startswith(("http://", "https://")):
        raise UsageError(f"--url must be an http:// or https:// URL, not {url!r}")
    try:
        parsed = URL.from_text(url)
    except URLParseError as e:
        raise UsageError(f"--url {url!r} is not a URL: {e}")
    host = parsed.host
    if not host or any(c.isspace() or not c.isprintable() for c in host):
        raise UsageError(f"--url {url!r} names no host")
    if not 0 < parsed.port <= 65535:
        raise UsageError(f"--url {url!r}: the port must be from 1 to 65535")
    return url


async def command(
    reactor: Any,
    argv: Sequence[str],
    out: IO[str],
    err: IO[str],
    *,
    stdin: IO[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> int:
    """Run one ``tunnel-admin`` command line on a running reactor; its exit status."""
    stdin = sys.stdin if stdin is None else stdin
    environ = os.environ if environ is None else environ
    parser = build_parser(out, err)
    try:
        args = parser.parse_args(list(argv))
        api = Api(reactor, _url(args, environ), _token(args, environ, err), args.timeout)
        try:
            document, text = await args.run(api, args, stdin)
        except (KeyError, TypeError, IndexError, AttributeError) as e:
            # an answer without what this command reads from it
            what = f"no field {e}" if isinstance(e, KeyError) else str(e)
            raise Failed(f"{api.url} gave an answer tunnel-admin does not understand ({what})")
    except SystemExit as e:  # --help
        return int(e.code or 0)
    except UsageError as e:
        err.write(f"{PROG}: {e}\n")
        return 2
    except Failed as e:
        err.write(f"{PROG}: {e}\n")
        return 1
    if args.json:
        if document is not None:
            out.write(json.dumps(document, indent=2, ensure_ascii=False) + "\n")
    else:
        out.write(text)
    return 0


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """The console script: run ``command`` on the reactor and exit with its status."""
    arguments = sys.argv[1:] if argv is None else list(argv)

    async def run(reactor: Any) -> None:
        status = await command(reactor, arguments, sys.stdout, sys.stderr)
        if status:
            raise SystemExit(status)

    react(lambda reactor: Deferred.fromCoroutine(run(reactor)))
