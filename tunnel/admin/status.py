"""The status page, and how a person reads the server's state.

``page(snapshot)`` renders ``AdminAPI.snapshot()`` (the same data the JSON
routes give) as one HTML document: counters, hosts, tunnels and TCP ports,
and on a node of a cluster its name, what it forwarded and its links.
The request, byte and stream counters are sums over the clients connected
now (the tunnels table's columns), and say so: they fall when a client
leaves.  Lifetime totals are Prometheus' business (``/metrics``, next to
this page), and not every server has a ``Metrics``.
Every value passes through ``html.escape``: hosts and rules are operator
input, but a page must not run what a typo (or a pasted string) holds.

The page refreshes itself with ``SCRIPT``, served from the same origin
(the Content-Security-Policy allows nothing else): every 2 seconds it
fetches the page again and swaps the ``<main>`` element for the new one.
So the HTML is made in one place, here, escaped once, and the browser's
script only moves nodes (no templating in JavaScript, nothing parsed as
HTML into the live document: ``DOMParser`` does not run scripts).  Unlike
a ``<meta http-equiv=refresh>`` it keeps the scroll position and the
selection, says when the server stops answering, and pauses while the tab
is hidden.  The browser re-sends its Basic credentials to the same origin,
so ``fetch`` needs none of its own.  Without JavaScript the page still
shows the state as of its loading.

``human_bytes`` and ``rules_summary`` are shared with ``tunnel-admin``'s
tables, so both show the same thing the same way.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from html import escape
from typing import Any

#: how often the page refreshes itself, in milliseconds
REFRESH_MS = 2000

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def human_bytes(n: int) -> str:
    """``1536`` -> ``1.5 KiB``; below 1 KiB, exact (``512 B``)."""
    value = float(n)
    for unit in _UNITS:
        if abs(value) < 1024 or unit == _UNITS[-1]:
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _value_text(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, Mapping):
        return ", ".join(f"{k} {_value_text(v)}" for k, v in value.items())
    if isinstance(value, list | tuple):
        shown = [_value_text(v) for v in value[:3]]
        more = len(value) - len(shown)
        return " ".join(shown) + (f" (+{more})" if more > 0 else "")
    return str(value)


def _rule_text(name: str, value: Any) -> str:
    if name == "basic_auth" and isinstance(value, Mapping):
        return f"basic auth ({value.get('user', '?')})"
    if name == "allow" and isinstance(value, list):
        return "allow " + _value_text(value)
    if name == "rate" and isinstance(value, Mapping) and "per_second" in value:
        burst = f", burst {value['burst']}" if "burst" in value else ""
        return f"rate {value['per_second']}/s{burst}"
    return f"{name}: {_value_text(value)}"


def rules_summary(rules: Mapping[str, Any] | None) -> str:
    """One line for a host's rules (their public form), or ``-`` for none:
    ``basic auth (alice); allow 10.0.0.0/8 192.0.2.7; rate 5/s, burst 10``."""
    if not rules:
        return "-"
    return "; ".join(_rule_text(name, value) for name, value in rules.items())


# -- the page ------------------------------------------------------------------------------


def _cell(text: Any, cls: str = "") -> str:
    attr = f' class="{escape(cls)}"' if cls else ""
    return f"<td{attr}>{escape(str(text))}</td>"


def _yes_no(flag: bool) -> str:
    return _cell("yes" if flag else "no", "connected yes" if flag else "connected no")


def _table(
    ident: str, caption: str, headings: Sequence[str], rows: Iterable[str], empty: str
) -> str:
    rows = list(rows)
    head = "".join(f"<th scope=col>{escape(h)}</th>" for h in headings)
    if not rows:
        rows = [f'<tr class="empty"><td colspan="{len(headings)}">{escape(empty)}</td></tr>']
    return (
        f'<section><h2>{escape(caption)}</h2><table id="{escape(ident)}">'
        f"<thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table></section>"
    )


def _host_row(host: Mapping[str, Any]) -> str:
    return (
        "<tr>"
        + _cell(host["host"], "host")
        + _cell(host["tunnel"], "tunnel fingerprint")
        + _yes_no(host["connected"])
        + _cell(rules_summary(host.get("rules")), "rules")
        + "</tr>"
    )


def _tunnel_row(tunnel: Mapping[str, Any]) -> str:
    routes = [*tunnel["hosts"], *(f"tcp:{p}" for p in tunnel["ports"])]
    return (
        "<tr>"
        + _cell(tunnel["fingerprint"], "fingerprint")
        + _cell(tunnel["remote"], "remote")
        + _cell(tunnel["connected_since"], "since")
        + _cell(tunnel["requests"], "requests num")
        + _cell(human_bytes(tunnel["bytes_in"]), "bytes-in num")
        + _cell(human_bytes(tunnel["bytes_out"]), "bytes-out num")
        + _cell(tunnel["streams_open"], "streams num")
        + _cell(", ".join(routes) or "-", "routes")
        + "</tr>"
    )


def _port_row(port: Mapping[str, Any]) -> str:
    return (
        "<tr>"
        + _cell(port["port"], "port num")
        + _cell(port["tunnel"], "tunnel fingerprint")
        + _yes_no(port["connected"])
        + "</tr>"
    )


#: what the server holds now
_NOW = (
    ("clients", "clients connected", str),
    ("hosts", "hosts", str),
    ("ports", "TCP ports", str),
)
#: sums over the clients connected now (each since it connected): they go
#: down when a client leaves, so they are labelled as such, not as the
#: server's; its lifetime counters are in /metrics
_OF_CLIENTS = (
    ("requests", "requests", str),
    ("bytes_in", "bytes in", human_bytes),
    ("bytes_out", "bytes out", human_bytes),
    ("streams_open", "open streams", str),
)
CLIENTS_NOTE = (
    "Of the clients connected now, each since it connected: a client that"
    " leaves takes its counts along.  Lifetime totals are in /metrics."
)


#: a node's part in its cluster
_CLUSTER = (
    ("node", "node", str),
    ("tunnels_held", "tunnels held here", str),
    ("forwarded", "sent to other nodes", str),
)
CLUSTER_NOTE = (
    "Requests and TCP connections this node sent to the node holding their"
    " client, since it started.  Tunnels held elsewhere are on their own node's page."
)


def _items(
    values: Mapping[str, Any], counters: Sequence[tuple[str, str, Any]], prefix: str = "total"
) -> str:
    """``<dt>``/``<dd>`` pairs for ``counters`` (name, label, how to show the
    value), each ``<dd>`` with the id ``PREFIX-NAME``."""
    return "".join(
        f'<div><dt>{escape(label)}</dt><dd id="{prefix}-{escape(name.replace("_", "-"))}">'
        f"{escape(show(values[name]))}</dd></div>"
        for name, label, show in counters
    )


def _counters(totals: Mapping[str, Any]) -> str:
    return (
        '<section id="counters"><h2>Counters</h2>'
        f"<dl>{_items(totals, _NOW)}</dl>"
        '<h3 id="of-clients">Connected clients</h3>'
        f'<dl aria-describedby="of-clients-note">{_items(totals, _OF_CLIENTS)}</dl>'
        f'<p class="note" id="of-clients-note">{escape(CLIENTS_NOTE)}</p></section>'
    )


def _link_row(link: Mapping[str, Any]) -> str:
    return (
        "<tr>"
        + _cell(link["peer"], "peer")
        + _cell(link["state"], f"state {link['state']}")
        + _cell(link["streams"], "streams num")
        + _cell(link["dialed_by"], "dialed-by")
        + _cell(link["address"] or "-", "address")
        + "</tr>"
    )


def _cluster(cluster: Mapping[str, Any] | None) -> str:
    """This node's part in its cluster (nothing on a server that is not a node)."""
    if cluster is None:
        return ""
    items = _items(cluster, _CLUSTER, "cluster")
    return (
        f'<section id="cluster"><h2>Cluster</h2><dl>{items}</dl>'
        f'<p class="note">{escape(CLUSTER_NOTE)}</p></section>'
        + _table(
            "links",
            "Links to other nodes",
            ("node", "state", "streams", "dialed by", "address"),
            map(_link_row, cluster["links"]),
            "no link to another node",
        )
    )


def page(snapshot: Mapping[str, Any]) -> bytes:
    """The whole status page for ``snapshot`` (``AdminAPI.snapshot()``)."""
    main = (
        f'<main id="status" data-as-of="{escape(snapshot["now"])}">'
        f'<p class="as-of">as of <time>{escape(snapshot["now"])}</time></p>'
        + _counters(snapshot["totals"])
        + _table(
            "hosts",
            "Hosts",
            ("host", "tunnel", "connected", "rules"),
            map(_host_row, snapshot["hosts"]),
            "no host is configured",
        )
        + _table(
            "tunnels",
            "Tunnels",
            ("tunnel", "remote", "connected since", "requests", "in", "out", "streams", "serves"),
            map(_tunnel_row, snapshot["tunnels"]),
            "no client is connected",
        )
        + _table(
            "ports",
            "TCP ports",
            ("port", "tunnel", "connected"),
            map(_port_row, snapshot["ports"]),
            "no TCP port is configured",
        )
        + _cluster(snapshot.get("cluster"))
        + "</main>"
    )
    document = (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        "<title>tunnel server</title>"
        '<link rel="icon" href="/status.svg" type="image/svg+xml">'
        '<link rel="stylesheet" href="/status.css">'
        '<script src="/status.js" defer></script>'
        "</head><body>"
        '<header><h1>tunnel server</h1><p id="stale" hidden></p></header>'
        f"{main}</body></html>\n"
    )
    return document.encode("utf-8")


_SCRIPT = """\
// Refreshes the status page: fetch it again, swap <main>, every REFRESH_MS ms.
"use strict";
(function () {
  var REFRESH_MS = @REFRESH_MS@;
  var stale = null;
  function note(text) {
    stale = stale || document.getElementById("stale");
    if (!stale) return;
    stale.textContent = text;
    stale.hidden = !text;
  }
  function schedule() { window.setTimeout(refresh, REFRESH_MS); }
  function refresh() {
    if (document.hidden) { schedule(); return; }
    fetch(window.location.pathname, {cache: "no-store", credentials: "same-origin"})
      .then(function (response) {
        if (!response.ok) throw new Error("the server answered " + response.status);
        return response.text();
      })
      .then(function (text) {
        var fresh = new DOMParser().parseFromString(text, "text/html").getElementById("status");
        var current = document.getElementById("status");
        if (!fresh || !current) throw new Error("the page has no status");
        current.replaceWith(document.adoptNode(fresh));
        note("");
      })
      .catch(function (error) {
        note("not updated: " + error.message);
      })
      .then(schedule);
  }
  schedule();
})();
"""
SCRIPT = _SCRIPT.replace("@REFRESH_MS@", str(REFRESH_MS)).encode("utf-8")


#: the page's icon (else a browser asks for /favicon.ico)
ICON = (
    b'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16">'
    b'<circle cx="8" cy="8" r="6" fill="#070"/></svg>'
)

STYLE = b"""\
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; background: #fff; }
h1 { font-size: 1.4em; margin: 0 0 .2em; }
h2 { font-size: 1.1em; margin: 1.4em 0 .4em; }
.as-of, #stale { color: #666; margin: 0; }
#stale { color: #a40; font-weight: bold; }
table { border-collapse: collapse; min-width: 40em; }
th, td { text-align: left; padding: .25em .8em .25em 0; border-bottom: 1px solid #ddd; }
th { font-weight: 600; color: #444; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.fingerprint, td.remote, td.since { font-family: ui-monospace, monospace; }
td.connected.yes { color: #070; }
td.connected.no { color: #a00; }
tr.empty td { color: #888; font-style: italic; }
#counters dl, #cluster dl { display: flex; flex-wrap: wrap; gap: .6em 2em; margin: 0; }
#counters h3 { font-size: .95em; font-weight: 600; color: #444; margin: .9em 0 .3em; }
#counters .note, #cluster .note { color: #666; font-size: .85em; margin: .3em 0 0; }
#counters div, #cluster div { min-width: 7em; }
#counters dt, #cluster dt { color: #666; font-size: .85em; }
#counters dd, #cluster dd { margin: 0; font-size: 1.3em; font-variant-numeric: tabular-nums; }
td.state.open { color: #070; }
td.peer, td.address { font-family: ui-monospace, monospace; }
"""
