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
from tunnel.server.http1 import OriginResponseError, ResponseReader
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


def decode(pieces: list[bytes], max_size: int = 256) -> tuple[list[ControlMessage], str | None]:
    """(messages, error text) after feeding ``pieces`` to one MessageDecoder."""
    decoder = MessageDecoder(max_size=max_size)
    out: list[ControlMessage] = []
    for piece in pieces:
        if decoder.error is not None:
            break
        out += decoder.feed(piece)
    return out, None if decoder.error is None else str(decoder.error)


def cut(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:], strict=False)]


# bytes that make JSON, nearly-JSON and not-JSON-at-all
json_ish = st.lists(
    st.sampled_from(
        [b"{", b"}", b"[", b"]", b'"', b":", b",", b" ", b"\n", b"\\", b"u", b"00e9", b"0", b"1"]
        + [b"-", b".", b"e", b"+", b'"action"', b'"localPort"', b"true", b"null", b"NaN"]
        + [b"Infinity", b"tr", b"\xc3\xa9", b"\xc3", b"\xff", b"\x01", b"a", b"12345"]
        + [ControlMessage(1, 2, 80).encode()]
    ),
    max_size=30,
).map(b"".join)


@SETTINGS
@given(data=json_ish, cuts=st.lists(st.integers(0, 400), max_size=6))
def test_message_decoder_gives_the_same_result_for_every_split(data, cuts):
    """Messages and error alike: a bad byte is judged where it stands, not where a piece ends."""
    whole = decode([data])
    assert decode(cut(data, cuts)) == whole
    assert decode([data[i : i + 1] for i in range(len(data))]) == whole


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.floats(allow_nan=False)
    | st.text(max_size=6),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=8,
)
json_objects = st.fixed_dictionaries(
    {}, optional={"action": st.integers(0, 9), "localPort": st.integers(0, 65535), "x": json_values}
)


@SETTINGS
@given(
    values=st.lists(json_objects | json_values, max_size=5),
    spaces=st.sampled_from([None, (",", ":"), (", ", ": ")]),
    ascii_only=st.booleans(),
    gap=st.sampled_from([b"\n", b" ", b"\r\n\t"]),
    cuts=st.lists(st.integers(0, 400), max_size=6),
)
def test_message_decoder_agrees_with_json(values, spaces, ascii_only, gap, cuts):
    """Each value is what json.loads makes of it; the first that is no message is the error."""
    texts = [json.dumps(v, separators=spaces, ensure_ascii=ascii_only).encode() for v in values]
    expected: list[ControlMessage] = []
    error = None
    for text in texts:
        try:
            expected.append(ControlMessage.from_json(json.loads(text)))
        except ControlMessageError as e:
            error = str(e)
            break
    # a number at the very end may still go on: json.Decoder (Go's too) waits for more
    wire = gap.join(texts) + gap
    assert decode(cut(wire, cuts), max_size=1 << 20) == (expected, error)


def test_message_decoder_takes_an_escape_split_across_pieces():
    """The old decoder failed a \\u escape cut in two ("Invalid \\uXXXX escape")."""
    wire = b'{"x":"caf\\u00e9","action":1,"transportProtocol":3,"localPort":8080}\n'
    for at in range(len(wire) + 1):
        assert decode([wire[:at], wire[at:]]) == ([ControlMessage(1, 3, 8080)], None)


@pytest.mark.parametrize(
    ("data", "error"),
    [
        # found at the bad byte, not when more bytes come (the old decoder waited on these)
        (b"{1", "invalid control message: Expecting property name enclosed in double quotes"),
        (b"[00", "invalid control message: Expecting ',' delimiter"),
        (b"+", "invalid control message: Expecting value"),
        (b"[" * 513, "invalid control message: nested more than 512 deep"),
        (b"12 ", "control message is not an object: 12"),
        (b"1.x", "control message is not an object: 1"),
        (
            b"{}\xff",
            "control stream is not UTF-8: 'utf-8' codec can't decode byte 0xff in position 2:"
            " invalid start byte",
        ),
        (b"null", None),
        (b"12", None),  # a number may go on
        (b"[" * 512, None),
    ],
)
def test_message_decoder_errors(data, error):
    assert decode([data], max_size=1 << 20)[1] == error
    assert decode([data[i : i + 1] for i in range(len(data))], max_size=1 << 20)[1] == error


def test_message_decoder_bound_is_on_one_unfinished_value():
    """More than max_size bytes of an unfinished value fail; whitespace around values is free."""
    message = b'{"x":"' + b"a" * 90 + b'"}'  # 98 bytes
    assert decode([b" " * 1000 + message], max_size=97) == ([ControlMessage(0, 0, 0)], None)
    longer = "control message longer than 96 bytes"
    assert decode([message], max_size=96) == ([], longer)
    assert decode([message[:97]], max_size=96) == ([], longer)
    assert decode([message[:96]], max_size=96) == ([], None)


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
def test_response_reader_raises_only_origin_response_error(raw):
    heads = []

    class Sink:
        interim = final = heads.append

        def upgraded(self, head, rest):
            heads.append(head)

        def body(self, data):
            pass

        def complete(self):
            pass

    reader = ResponseReader(Sink())
    try:
        reader.feed(raw)
        reader.eof()
    except OriginResponseError:
        pass
    for head in heads:
        assert 100 <= head.code <= 999
        assert all(name == name.strip() and name for name, _ in head.headers)
        assert all(b"\0" not in value and b"\r" not in value for _, value in head.headers)


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
