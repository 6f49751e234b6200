"""Headers assembled from CBOR pieces (framing.encode_call_header, encode_reply_header,
messages.body_cbor) against cbor2 encoding the same maps."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dlog.broker.node  # noqa: F401  (registers the broker's operations)
import dlog.net.protocol  # noqa: F401
import dlog.raft.transport  # noqa: F401
from dlog.net import messages
from dlog.net.framing import (
    CBOR_ARRAY,
    CBOR_MAP,
    FrameDecoder,
    cbor_head,
    cbor_text,
    cbor_uint,
    encode_call_header,
    encode_header,
    encode_reply_header,
)

cbor_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**64), max_value=2**64 - 1)
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | st.text()
    | st.binary(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4)
    ),
    max_leaves=12,
)


@given(cbor_values)
def test_cbor_value_encodes_exactly_as_cbor2(value: Any) -> None:
    assert messages._cbor_value(value) == cbor2.dumps(value)


@given(st.integers(min_value=0, max_value=2**64 - 1))
def test_cbor_uint_is_cbor2s(n: int) -> None:
    assert cbor_uint(n) == cbor2.dumps(n)


@given(st.text())
def test_cbor_text_is_cbor2s(text: str) -> None:
    assert cbor_text(text) == cbor2.dumps(text)


@given(st.integers(min_value=0, max_value=70_000))
def test_cbor_heads_are_cbor2s(n: int) -> None:
    assert cbor_head(CBOR_ARRAY, n) + b"\xf6" * n == cbor2.dumps([None] * n)
    assert (
        cbor_head(CBOR_MAP, n)
        == cbor2.dumps({i: None for i in range(n)})[: len(cbor_head(CBOR_MAP, n))]
    )


def _registered_types() -> list[type[messages.Message]]:
    types: dict[str, type[messages.Message]] = {}
    for op in messages._BY_NAME.values():
        for cls in (op.request, op.response):
            types[cls.__qualname__ + cls.__module__] = cls
    return sorted(types.values(), key=lambda c: c.__name__)


def _strategy(hint: Any) -> st.SearchStrategy[Any]:
    """Values of a field's type; ``Any`` (also nested) from any CBOR value."""
    if hint is Any:
        return cbor_values
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (list, tuple) and args:
        items = st.lists(_strategy(args[0]), max_size=3)
        return items if origin is list else items.map(tuple)
    if origin is dict and args:
        return st.dictionaries(_strategy(args[0]), _strategy(args[1]), max_size=3)
    if origin in (typing.Union, types.UnionType):
        return st.one_of([_strategy(a) for a in args])
    if dataclasses.is_dataclass(hint):
        return _instances(hint)
    return st.from_type(hint)


def _instances(cls: type) -> st.SearchStrategy[Any]:
    """Instances of a message or struct with every field drawn, not only the
    required ones."""
    hints = typing.get_type_hints(cls)
    fields = {
        f.name: _strategy(hints[f.name]) for f in dataclasses.fields(cls) if f.name != "payload"
    }
    return st.builds(cls, **fields)


@pytest.mark.parametrize("cls", _registered_types(), ids=lambda c: c.__name__)
def test_body_cbor_is_cbor2_of_the_body_for_every_registered_message(cls: type) -> None:
    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
    @given(_instances(cls))
    def check(message: messages.Message) -> None:
        assert messages.body_cbor(message) == cbor2.dumps(messages.to_body(message))

    check()


def _header(frame_bytes: bytes) -> dict[str, Any]:
    decoder = FrameDecoder()
    decoder.receive_data(frame_bytes)
    frames = decoder.frames()
    assert len(frames) == 1
    return frames[0].header


@given(
    cid=st.none() | st.integers(min_value=0, max_value=2**64 - 1),
    op=st.text(max_size=40),
    body=st.dictionaries(st.text(max_size=5), cbor_values, max_size=4),
    version=st.integers(min_value=0, max_value=2**32),
    size=st.integers(min_value=0, max_value=2**40),
)
def test_call_header_decodes_to_the_map_encode_header_makes(
    cid: int | None, op: str, body: dict[str, Any], version: int, size: int
) -> None:
    head = encode_call_header(cid, cbor_text(op), cbor2.dumps(body), version, size)
    expected: dict[str, Any] = {"o": op, "b": body}
    if cid is None:
        expected["n"] = True
    else:
        expected["i"] = cid
    if version:
        expected["v"] = version
    # (A frame with a payload needs it to decode: append that many bytes, up to 1 MiB.)
    payload = b"x" * size if size <= 1 << 20 else b""
    if len(payload) == size:
        assert _header(head + payload) == expected | ({"p": size} if size else {})
    assert cbor2.loads(head[4:]) == expected | ({"p": size} if size else {})
    assert head[:4] == encode_header(expected, size)[:4]  # same length prefix


@given(
    cid=st.integers(min_value=0, max_value=2**64 - 1),
    body=st.dictionaries(st.text(max_size=5), cbor_values, max_size=4),
    size=st.integers(min_value=0, max_value=2**40),
)
def test_reply_header_decodes_to_the_map_encode_header_makes(
    cid: int, body: dict[str, Any], size: int
) -> None:
    head = encode_reply_header(cid, cbor2.dumps(body), size)
    assert head == encode_header({"i": cid, "b": body}, size)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class _Leaf(messages.Struct):
    n: int


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class _Nested(messages.Struct):
    items: list[_Leaf | None]
    maybe: _Leaf | None = None
    groups: tuple[list[_Leaf], ...] = ()


@settings(max_examples=50, deadline=None)
@given(_instances(_Nested))
def test_body_cbor_of_nested_optionals_and_sequences_is_cbor2s(value: _Nested) -> None:
    assert messages.body_cbor(value) == cbor2.dumps(messages.to_body(value))
