"""Property tests for the small parsers: Host headers, control messages,
origin response heads, the CONNECT reply, the control path."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tunnel.client.protocol import MAX_REPLY, _content_length
from tunnel.heads import HeadScanner
from tunnel.koding.wire import ControlMessage, ControlMessageError, MessageDecoder
from tunnel.server.forward_ws import _Head
from tunnel.server.vhosts import normalize_host, split_host
from tunnel.server.web import is_control_path

SETTINGS = settings(max_examples=300, deadline=None)

labels = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
hostnames = st.lists(labels, min_size=1, max_size=4).map(".".join)
ports = st.integers(0, 65535)


@SETTINGS
@given(name=hostnames, port=ports, upper=st.booleans(), dot=st.booleans())
def test_split_host_round_trips_and_normalises(name, port, upper, dot):
    text = (name.upper() if upper else name) + ("." if dot else "")
    if port:
        text += f":{port}"
    assert split_host(text) == (name, port)
    assert normalize_host(text) == (f"{name}:{port}" if port else name)


@SETTINGS
@given(text=st.text(max_size=80))
def test_split_host_only_ever_raises_value_error(text):
    try:
        name, port = split_host(text)
    except ValueError:
        return
    assert 0 <= port <= 65535 and name == name.lower()


messages = st.builds(
    ControlMessage,
    st.integers(0, 2**32 - 1),
    st.integers(0, 2**32 - 1),
    st.integers(0, 65535),
)


@SETTINGS
@given(batch=st.lists(messages, max_size=8), cuts=st.lists(st.integers(0, 400), max_size=6))
def test_message_decoder_is_independent_of_how_bytes_are_split(batch, cuts):
    wire = b"".join(m.encode() for m in batch)
    decoder = MessageDecoder()
    out = []
    last = 0
    for cut in sorted(c for c in cuts if c <= len(wire)) + [len(wire)]:
        out += decoder.feed(wire[last:cut])
        last = cut
    assert out == batch and decoder.error is None


@SETTINGS
@given(data=st.binary(max_size=300))
def test_message_decoder_fails_only_with_its_own_error(data):
    decoder = MessageDecoder(max_size=256)
    decoder.feed(data)  # never raises on first bad input: it records it
    if decoder.error is not None:
        assert isinstance(decoder.error, ControlMessageError)
        with pytest.raises(ControlMessageError):
            decoder.feed(b"{}")


@SETTINGS
@given(
    value=st.one_of(
        st.none(),
        st.booleans(),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=5),
        st.integers(-(2**40), 2**40),
        st.lists(st.integers(), max_size=2),
    )
)
def test_control_message_fields_follow_go_types(value):
    """null is zero; only integers in range are accepted (8.0, "8", true are not)."""
    obj = json.loads(json.dumps({"action": 1, "transportProtocol": 1, "localPort": value}))
    valid = value is None or (type(value) is int and 0 <= value <= 65535)
    if valid:
        assert ControlMessage.from_json(obj).local_port == (value or 0)
    else:
        with pytest.raises(ControlMessageError):
            ControlMessage.from_json(obj)


@SETTINGS
@given(raw=st.binary(max_size=200))
def test_response_head_parser_raises_only_value_error(raw):
    try:
        head = _Head(raw)
    except ValueError:
        return
    assert 100 <= head.code <= 999
    assert all(name == name.strip() and name for name, _ in head.headers)


@SETTINGS
@given(head=st.binary(max_size=120), rest=st.binary(max_size=40))
def test_connect_reply_end_is_the_first_blank_line(head, rest):
    data = head + b"\n\n" + rest
    found = HeadScanner(MAX_REPLY, bare_lf=True).feed(data)
    assert found is not None
    reply, end = found
    assert end <= len(head) + 2 and reply == data[:end]
    assert reply.endswith((b"\n\n", b"\r\n\r\n"))
    assert b"\n\n" not in reply[:-1] and b"\r\n\r\n" not in reply[:-1]
    _content_length(reply)  # never raises


@SETTINGS
@given(path=st.binary(max_size=60))
def test_control_path_check_never_raises(path):
    is_control_path(path)


@pytest.mark.parametrize(
    "path, expected",
    [
        (b"/_controlPath/", True),
        (b"/_controlPath", True),
        (b"//_controlPath//", True),
        (b"/x/../_controlPath/", True),
        (b"/_controlPath/x", False),
        (b"/_controlpath/", False),
        (b"/", False),
    ],
)
def test_control_path_is_go_path_clean(path, expected):
    assert is_control_path(path) is expected
