from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest

from dlog.errors import ProtocolError, UnsupportedVersionError
from dlog.net.messages import (
    INT_MAX,
    INT_MIN,
    Message,
    Struct,
    check_version,
    from_body,
    operation,
    payload_bytes,
    payload_length,
    register,
    to_body,
)


@dataclass(frozen=True, slots=True, kw_only=True)
class Part(Struct):
    partition: int
    size: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class TopicData(Struct):
    name: str
    parts: list[Part]
    leader: Part | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class NestedRequest(Message):
    topics: list[TopicData]
    by_name: dict[str, Part] = None  # type: ignore[assignment]
    acks: int = -1


@dataclass(frozen=True, slots=True, kw_only=True)
class NestedResponse(Message):
    ok: bool


register("test.nested", NestedRequest, NestedResponse, version=2)


def test_nested_round_trip() -> None:
    req = NestedRequest(
        topics=[TopicData(name="t", parts=[Part(partition=0, size=3)], leader=Part(partition=1))],
        by_name={"x": Part(partition=5)},
        payload=b"abc",
    )
    body = to_body(req)
    assert "payload" not in body
    assert body["topics"][0]["parts"][0] == {"partition": 0, "size": 3}
    back = from_body(NestedRequest, body, b"abc")
    assert back == req


def test_unknown_fields_are_ignored_and_defaults_apply() -> None:
    back = from_body(NestedRequest, {"topics": [], "future_field": [1, 2]})
    assert back == NestedRequest(topics=[])


def test_missing_required_field_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError, match="topics"):
        from_body(NestedRequest, {"acks": 1})
    with pytest.raises(ProtocolError, match="partition"):
        from_body(NestedRequest, {"topics": [{"name": "t", "parts": [{"size": 1}]}]})


@pytest.mark.parametrize(
    "body", [[1], {"topics": 5}, {"topics": [7]}, {"topics": [{"name": "t", "parts": {}}]}]
)
def test_wrong_shapes_are_protocol_errors(body: object) -> None:
    with pytest.raises(ProtocolError):
        from_body(NestedRequest, body)


@dataclass(frozen=True, slots=True, kw_only=True)
class ScalarsRequest(Message):
    offset: int = 0
    name: str = ""
    flag: bool = False
    ratio: float = 0.0
    epoch: int | None = None
    ids: list[int] = dataclasses.field(default_factory=list)
    configs: dict[str, int] = dataclasses.field(default_factory=dict)
    parts: list[Part] = dataclasses.field(default_factory=list)


def test_scalars_of_the_declared_types_decode_including_the_64_bit_extremes() -> None:
    body = {
        "offset": INT_MAX,
        "name": "ü/..",
        "flag": True,
        "ratio": 3,  # an integer is a number
        "epoch": INT_MIN,
        "ids": [0, -1, INT_MAX],
        "configs": {"a": INT_MIN},
        "parts": [{"partition": -5}],
    }
    req = from_body(ScalarsRequest, body)
    assert (req.offset, req.name, req.flag, req.epoch) == (INT_MAX, "ü/..", True, INT_MIN)
    assert req.ratio == 3
    assert from_body(ScalarsRequest, {"epoch": None}).epoch is None
    assert from_body(ScalarsRequest, to_body(req)) == req


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"offset": "1"}, "offset"),
        ({"offset": 1.0}, "offset"),
        ({"offset": True}, "offset"),  # a bool is not an integer on the wire
        ({"offset": None}, "offset"),  # not optional
        ({"offset": INT_MAX + 1}, "offset"),  # CBOR carries bignums; int64 is the limit
        ({"offset": INT_MIN - 1}, "offset"),
        ({"name": b"t"}, "name"),
        ({"name": 7}, "name"),
        ({"flag": 1}, "flag"),
        ({"ratio": "0.5"}, "ratio"),
        ({"epoch": "3"}, "epoch"),
        ({"epoch": 1 << 64}, "epoch"),
        ({"parts": [{"partition": "0"}]}, "partition"),
        ({"ids": [1, "2"]}, "array"),
        ({"ids": [1 << 70]}, "array"),
        ({"configs": {"a": "1"}}, "map"),
        ({"configs": {1: 1}}, "map"),
    ],
)
def test_scalars_of_the_wrong_type_or_range_are_protocol_errors(body: dict, field: str) -> None:
    with pytest.raises(ProtocolError, match=field):
        from_body(ScalarsRequest, body)


def test_versions() -> None:
    op = operation("test.nested")
    check_version(op, 0)
    check_version(op, 2)
    with pytest.raises(UnsupportedVersionError):
        check_version(op, 3)
    with pytest.raises(ProtocolError):
        check_version(op, "1")


def test_unknown_operation() -> None:
    with pytest.raises(ProtocolError):
        operation("no.such.op")


def test_registration_clash_is_refused() -> None:
    register("test.nested", NestedRequest, NestedResponse, version=2)  # idempotent
    with pytest.raises(ValueError, match="already registered"):
        register("test.nested", NestedRequest, NestedResponse, version=3)


def test_payload_helpers() -> None:
    chunks = [b"ab", memoryview(b"cd"), bytearray(b"e")]
    assert payload_length(chunks) == 5
    assert payload_bytes(chunks) == b"abcde"
    assert payload_bytes(memoryview(b"xy")) == b"xy"


@dataclass(frozen=True, slots=True, kw_only=True)
class OptionalListRequest(Message):
    names: list[str] | None = None
    parts: list[Part] | None = None


def test_optional_fields_keep_their_values() -> None:
    req = OptionalListRequest(names=["a", "b"], parts=[Part(partition=1)])
    body = to_body(req)
    assert body == {"names": ["a", "b"], "parts": [{"partition": 1, "size": 0}]}
    assert from_body(OptionalListRequest, body) == req
    assert from_body(OptionalListRequest, {"names": None}) == OptionalListRequest()


def _every_replaced_init() -> dict[type, object]:
    # Importing the layers registers all their operations (and their nested structs).
    import dlog.gossip.node
    import dlog.net.protocol
    import dlog.raft.transport  # noqa: F401
    from dlog.net.messages import _DATACLASS_INITS

    return dict(_DATACLASS_INITS)


def test_fast_inits_cover_the_registered_messages_and_their_structs() -> None:
    from dlog.net.protocol import FetchPartition, FetchRequest, ProduceRequest

    replaced = _every_replaced_init()
    for cls in (FetchRequest, FetchPartition, ProduceRequest, NestedRequest, TopicData, Part):
        assert cls in replaced, cls


def test_fast_inits_take_and_build_exactly_what_the_dataclass_inits_do() -> None:
    import inspect

    for cls, dataclass_init in _every_replaced_init().items():
        assert str(inspect.signature(cls.__init__)) == str(inspect.signature(dataclass_init))  # type: ignore[arg-type]
        fields = dataclasses.fields(cls)
        required = {
            f.name: f"<{f.name}>"
            for f in fields
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        }
        every = {f.name: (f"<{f.name}>",) for f in fields}
        for kwargs in (required, every):
            fast = cls(**kwargs)
            slow = object.__new__(cls)
            dataclass_init(slow, **kwargs)  # type: ignore[operator]
            assert fast == slow, cls
            assert [getattr(fast, f.name) for f in fields] == [
                getattr(slow, f.name) for f in fields
            ]
        for f in fields:
            if f.default_factory is not dataclasses.MISSING:
                # A fresh value per instance, as with the dataclass's own __init__.
                assert getattr(cls(**required), f.name) is not getattr(cls(**required), f.name)
        if required:
            with pytest.raises(TypeError):
                cls(**dict(list(required.items())[1:]))
        with pytest.raises(TypeError):
            cls(**required, no_such_field=1)
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(fast, fields[0].name, "changed")


def test_a_message_class_keeps_its_own_init() -> None:
    @dataclass(frozen=True, slots=True, kw_only=True)
    class OwnInitRequest(Message):
        n: int = 0

        def __init__(self, n: str) -> None:  # e.g. parses its argument
            object.__setattr__(self, "n", int(n))
            object.__setattr__(self, "payload", b"")

    register("test.own_init", OwnInitRequest, NestedResponse)
    assert OwnInitRequest("5").n == 5
    from dlog.net.messages import _DATACLASS_INITS

    assert OwnInitRequest not in _DATACLASS_INITS


def test_fast_inits_are_made_only_where_they_change_nothing() -> None:
    from dlog.net.messages import _DATACLASS_INITS, _fast_init

    @dataclass(frozen=True, slots=True, kw_only=True)
    class NamesOfGeneratedCode(Struct):  # names a generator might use for itself
        FACTORY: list[int] = dataclasses.field(default_factory=list)
        set1: int = 0
        f1: int = 0
        d0: int = 0

    @dataclass(frozen=True, slots=True, kw_only=True)
    class WithInitVar(Struct):
        a: int = 0
        hint: dataclasses.InitVar[int] = 0

    @dataclass(slots=True, kw_only=True)
    class NotFrozen:
        n: int = 0

        def __setattr__(self, name: str, value: object) -> None:
            if name == "n" and isinstance(value, int) and value < 0:
                raise ValueError("negative")
            object.__setattr__(self, name, value)

    namespace: dict[str, object] = {"dataclass": dataclass, "Struct": Struct}
    exec(  # an __init__ of the class's own, compiled from a string like dataclasses'
        "@dataclass(frozen=True, slots=True, kw_only=True)\n"
        "class OwnInitFromString(Struct):\n"
        "    n: int = 0\n"
        "    def __init__(self, n):\n"
        "        object.__setattr__(self, 'n', int(n))\n",
        namespace,
    )
    own = namespace["OwnInitFromString"]
    for cls in (NamesOfGeneratedCode, WithInitVar, NotFrozen, own):
        _fast_init(cls)  # type: ignore[arg-type]
    assert NamesOfGeneratedCode in _DATACLASS_INITS
    made = NamesOfGeneratedCode(FACTORY=[1], set1=2, f1=3, d0=4)
    assert (made.FACTORY, made.set1, made.f1, made.d0) == ([1], 2, 3, 4)
    assert NamesOfGeneratedCode().FACTORY == []
    assert NamesOfGeneratedCode.__init__.__module__ == __name__
    assert WithInitVar not in _DATACLASS_INITS and WithInitVar(a=1, hint=2).a == 1
    assert NotFrozen not in _DATACLASS_INITS
    with pytest.raises(ValueError, match="negative"):
        NotFrozen(n=-1)
    assert own not in _DATACLASS_INITS and own("7").n == 7  # type: ignore[operator]
