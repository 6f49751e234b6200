"""Message types: frozen dataclasses, a registry of operations, and their CBOR codec.

Every request and response is a :class:`Message` subclass declared as
``@dataclass(frozen=True, slots=True, kw_only=True)``. Each message has a ``payload``
(raw bytes that ride after the CBOR header, never through cbor2); all other fields
travel in the header's body map. Nested values are :class:`Struct` subclasses (also
frozen dataclasses), lists/tuples of them, or plain CBOR values.

An operation is registered once with :func:`register`, naming its request and response
types and the highest version this build speaks::

    @dataclass(frozen=True, slots=True, kw_only=True)
    class EchoRequest(Message):
        data: str = ""

    register("echo", EchoRequest, EchoResponse)

Decoding ignores unknown fields (newer peers may add some) and raises
:class:`~dlog.errors.ProtocolError` for missing required fields or values of the wrong
shape, so a malformed message is an error response, never a crash.

Layers above register their own operations (Raft's messages in ``dlog.raft``, the
client protocol in :mod:`dlog.net.protocol`); this module knows none of them.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, Union

import cbor2

from dlog.errors import ProtocolError, UnsupportedVersionError
from dlog.net.framing import CBOR_ARRAY, CBOR_MAP, cbor_head, cbor_text, cbor_uint

#: A payload as a handler may return it: one buffer or several chunks (e.g. file
#: slices) that are written one after another without being joined.
Payload = bytes | bytearray | memoryview | Sequence[bytes | bytearray | memoryview]


@dataclass(frozen=True, slots=True, kw_only=True)
class Struct:
    """A nested value inside a message body."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Message:
    """Base of every request and response. ``payload`` travels raw after the header."""

    payload: Payload = b""


def payload_length(payload: Payload) -> int:
    if isinstance(payload, bytes | bytearray | memoryview):
        return memoryview(payload).nbytes
    return sum(memoryview(chunk).nbytes for chunk in payload)


def payload_bytes(payload: Payload) -> bytes:
    """The payload as one bytes object (joins chunks; for tests and small payloads)."""
    if isinstance(payload, bytes):
        return payload
    if isinstance(payload, bytearray | memoryview):
        return bytes(payload)
    return b"".join(payload)


# --- codec -----------------------------------------------------------------------

_Encoder = Callable[[Any], Any]
_Decoder = Callable[[Any], Any]


@dataclass(frozen=True, slots=True)
class _FieldPlan:
    name: str
    required: bool
    encode: _Encoder | None  # None: the value is already CBOR-ready
    decode: _Decoder | None
    #: Straight to CBOR bytes (nested structs, sequences and optionals of them; see
    #: :func:`_converters`); None: ``_cbor_value(encode(value))``.
    cbor: Callable[[Any], bytes] | None
    #: For a scalar field, the decoder's type test and what the value should be
    #: (see :func:`_scalar_test`).
    check: tuple[str, str] | None = None


_PLANS: dict[type, tuple[_FieldPlan, ...]] = {}


_CborEncoder = Callable[[Any], bytes]


def _converters(tp: Any) -> tuple[_Encoder | None, _Decoder | None, _CborEncoder | None]:
    """How to turn a field of type ``tp`` into CBOR values and back, and (for nested
    structs and sequences and optionals of them) straight into CBOR bytes, byte for
    byte what cbor2 makes of the CBOR-ready value but with no dict in between."""
    origin = typing.get_origin(tp)
    if isinstance(tp, type) and issubclass(tp, Struct | Message):
        _fast_init(tp)
        # A message nested in another travels as its body (its payload is not carried).
        return _encode_struct, _struct_decoder(tp), body_cbor
    if origin in (list, tuple, Sequence):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        if len(args) == 1:
            enc, dec, cbor = _converters(args[0])
            make: Callable[[Any], Any] = tuple if origin is tuple else list
            if enc is None and dec is None:
                return None, _sequence_checker(make, _scalar_checker(args[0])), None
            return _sequence_encoder(enc), _sequence_decoder(dec, make), _array_cbor(cbor)
        return None, None, None
    if origin is dict:
        key_t, val_t = typing.get_args(tp)
        enc, dec, _ = _converters(val_t)
        if enc is None and dec is None:
            return None, _mapping_checker(_scalar_checker(key_t), _scalar_checker(val_t)), None
        return _mapping_encoder(enc), _mapping_decoder(dec), None
    if origin in (Union, types.UnionType):
        members = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(members) == 1:
            enc, dec, cbor = _converters(members[0])
            if enc is None and dec is None:
                return None, None, None
            return _optional(enc), _optional(dec), None if cbor is None else _optional_cbor(cbor)
        return None, None, None
    return None, None, None


#: Integers in message bodies are 64-bit signed, as Kafka's widest are: anything
#: outside is malformed input, refused before a handler (or a struct.pack) sees it.
INT_MIN: int = -(1 << 63)
INT_MAX: int = (1 << 63) - 1


def _scalar_test(tp: Any) -> tuple[str, str] | None:
    """For a scalar field type (int, str, bool, float, or an optional of one): an
    expression over ``{v}`` that is true when the value has the wrong type or range,
    and what the value should be (for the error). None for anything else (structs,
    sequences, maps and ``Any`` are checked by their decoders, or not at all)."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        members = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(members) == 1 and len(typing.get_args(tp)) == 2:
            inner = _scalar_test(members[0])
            if inner is not None:
                return f"{{v}} is not None and ({inner[0]})", f"{inner[1]} or null"
        return None
    if tp is int:
        return "type({v}) is not int or not INT_MIN <= {v} <= INT_MAX", "a 64-bit integer"
    if tp is bool:
        return "type({v}) is not bool", "a boolean"
    if tp is str:
        return "type({v}) is not str", "a text string"
    if tp is float:
        return "type({v}) is not float and type({v}) is not int", "a number"
    return None


def _scalar_checker(tp: Any) -> Callable[[Any], bool] | None:
    """A function telling whether a value is of the wrong type for ``tp`` (as
    :func:`_scalar_test`), or None when ``tp`` is not a checked scalar."""
    test = _scalar_test(tp)
    if test is None:
        return None
    ns: dict[str, Any] = {"INT_MIN": INT_MIN, "INT_MAX": INT_MAX}
    # The source is generated from our own type annotations, never from input.
    exec(f"def wrong(v):\n    return {test[0].format(v='v')}\n", ns)
    wrong: Callable[[Any], bool] = ns["wrong"]
    return wrong


def _array_cbor(item: _CborEncoder | None) -> _CborEncoder | None:
    if item is None:
        return None

    def encode(value: Any) -> bytes:
        return b"".join([cbor_head(CBOR_ARRAY, len(value)), *[item(v) for v in value]])

    return encode


def _optional_cbor(fn: _CborEncoder) -> _CborEncoder:
    def encode(value: Any) -> bytes:
        return b"\xf6" if value is None else fn(value)

    return encode


def _optional(fn: Callable[[Any], Any] | None) -> Callable[[Any], Any]:
    def convert(value: Any) -> Any:
        if value is None:
            return None
        return value if fn is None else fn(value)

    return convert


def _encode_struct(value: Any) -> dict[str, Any]:
    return to_body(value)


def _struct_decoder(cls: type) -> _Decoder:
    def decode(value: Any) -> Any:
        return from_body(cls, value)

    return decode


def _sequence_encoder(enc: _Encoder | None) -> _Encoder:
    def encode(value: Any) -> Any:
        if enc is None:
            return list(value)
        return [enc(item) for item in value]

    return encode


def _sequence_decoder(dec: _Decoder | None, make: Callable[[Any], Any]) -> _Decoder:
    def decode(value: Any) -> Any:
        if not isinstance(value, list | tuple):
            raise ProtocolError(f"expected an array, got {type(value).__name__}")
        if dec is None:
            return make(value)
        return make(dec(item) for item in value)

    return decode


def _sequence_checker(
    make: Callable[[Any], Any], wrong: Callable[[Any], bool] | None = None
) -> _Decoder:
    def decode(value: Any) -> Any:
        if not isinstance(value, list | tuple):
            raise ProtocolError(f"expected an array, got {type(value).__name__}")
        if wrong is not None:
            for item in value:
                if wrong(item):
                    raise ProtocolError(f"unexpected {type(item).__name__} item in an array")
        return value if make is list and isinstance(value, list) else make(value)

    return decode


def _mapping_encoder(enc: _Encoder | None) -> _Encoder:
    def encode(value: Any) -> Any:
        return {k: (v if enc is None else enc(v)) for k, v in value.items()}

    return encode


def _mapping_decoder(dec: _Decoder | None) -> _Decoder:
    def decode(value: Any) -> Any:
        if not isinstance(value, dict):
            raise ProtocolError(f"expected a map, got {type(value).__name__}")
        return {k: (v if dec is None else dec(v)) for k, v in value.items()}

    return decode


def _mapping_checker(
    wrong_key: Callable[[Any], bool] | None, wrong_value: Callable[[Any], bool] | None
) -> _Decoder:
    def decode(value: Any) -> Any:
        if not isinstance(value, dict):
            raise ProtocolError(f"expected a map, got {type(value).__name__}")
        if wrong_key is not None or wrong_value is not None:
            for k, v in value.items():
                if (wrong_key is not None and wrong_key(k)) or (
                    wrong_value is not None and wrong_value(v)
                ):
                    raise ProtocolError(
                        f"unexpected {type(k).__name__}: {type(v).__name__} entry in a map"
                    )
        return value

    return decode


#: The ``__init__`` that @dataclass wrote, for each class :func:`_fast_init` replaced.
_DATACLASS_INITS: dict[type, Callable[..., None]] = {}


class _Factory:
    """The default of a parameter whose field has a default_factory (shown as
    dataclasses shows it)."""

    def __repr__(self) -> str:
        return "<factory>"


_FACTORY = _Factory()


def _fast_init(cls: type) -> None:
    """Give a frozen, slotted message or struct class an ``__init__`` that fills its
    slots directly: same signature and result as the one @dataclass wrote, which
    sets each field through ``object.__setattr__`` (the frozen dataclass's way past
    its own ``__setattr__``) and costs a third more. Handlers build a response, and
    clients a request, for every call.

    Only the ``__init__`` a frozen dataclass generated is replaced: a class's own
    ``__init__``, ``__post_init__``, ``init=False``, ``InitVar`` or ``ClassVar``
    fields, no slots of its own, or a field name the generated code would clash with
    keep the dataclass's."""
    original: Any = cls.__dict__.get("__init__")
    code = getattr(original, "__code__", None)
    params_of = getattr(cls, "__dataclass_params__", None)
    if (
        cls in _DATACLASS_INITS
        or code is None
        # What dataclasses' generated frozen __init__ looks like (exec'd source that
        # sets fields through __dataclass_builtins_object__).
        or code.co_filename != "<string>"
        or "__dataclass_builtins_object__" not in code.co_freevars + code.co_names
        or params_of is None
        or not params_of.frozen
        or "__slots__" not in cls.__dict__
        or hasattr(cls, "__post_init__")
    ):
        return
    fields = dataclasses.fields(cls)
    if len(fields) != len(cls.__dataclass_fields__) or any(  # type: ignore[attr-defined]
        not f.init or f.name == "self" or f.name.startswith("__dlog_") for f in fields
    ):
        return
    module = sys.modules.get(cls.__module__)
    # The module's globals (a copy), so that the annotations resolve as the
    # original's do; the generated code's own names cannot clash with a field's.
    ns: dict[str, Any] = dict(vars(module)) if module is not None else {}
    ns["__dlog_FACTORY"] = _FACTORY
    positional: list[str] = []
    keyword: list[str] = []
    body: list[str] = []
    for i, f in enumerate(fields):
        setter, default, factory = f"__dlog_set_{i}", f"__dlog_default_{i}", f"__dlog_factory_{i}"
        if f.default is not dataclasses.MISSING:
            ns[default] = f.default
            param = f"{f.name}={default}"
        elif f.default_factory is not dataclasses.MISSING:
            ns[factory] = f.default_factory
            param = f"{f.name}=__dlog_FACTORY"
        else:
            param = f.name
        (keyword if f.kw_only else positional).append(param)
        ns[setter] = _slot_setter(cls, f.name)
        if f.default_factory is not dataclasses.MISSING:
            value = f"{factory}() if {f.name} is __dlog_FACTORY else {f.name}"
            body.append(f"    {setter}(self, {value})")
        else:
            body.append(f"    {setter}(self, {f.name})")
    params = ", ".join(["self", *positional, *(["*", *keyword] if keyword else [])])
    # The source is generated from our own dataclass definitions, never from input.
    exec(f"def __init__({params}) -> None:\n" + "\n".join(body or ["    pass"]) + "\n", ns)
    init = ns["__init__"]
    init.__qualname__ = original.__qualname__
    init.__module__ = original.__module__
    init.__doc__ = original.__doc__
    init.__annotations__ = dict(original.__annotations__)
    _DATACLASS_INITS[cls] = original
    type.__setattr__(cls, "__init__", init)


def _plan(cls: type) -> tuple[_FieldPlan, ...]:
    plan = _PLANS.get(cls)
    if plan is not None:
        return plan
    _fast_init(cls)
    hints = typing.get_type_hints(cls)
    fields = []
    for f in dataclasses.fields(cls):
        if f.name == "payload":
            continue
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        tp = hints[f.name]
        fields.append(_FieldPlan(f.name, required, *_converters(tp), _scalar_test(tp)))
    plan = tuple(fields)
    _PLANS[cls] = plan
    return plan


def to_body(value: Any) -> dict[str, Any]:
    """A message's or struct's fields (not its payload) as a CBOR-ready dict."""
    return _codec(type(value))[0](value)


def body_cbor(value: Any) -> bytes:
    """``cbor2.dumps(to_body(value))``, made faster: the map's head and keys are
    constants and common values are encoded here (see :func:`_cbor_value`)."""
    encode = _CBOR_ENCODERS.get(type(value))  # (one lookup: this runs for every message)
    if encode is None:
        encode = _codec(type(value))[2]
    return encode(value)


_dumps = cbor2.dumps


def _cbor_value(value: Any) -> bytes:
    """``cbor2.dumps(value)``; strings, ints in [0, 2**64), None and bools without
    cbor2 (whose per-call cost is most of encoding one), anything else with it."""
    t = type(value)
    if t is str:
        return cbor_text(value)
    if t is int:
        return cbor_uint(value) if 0 <= value < 0x10000000000000000 else _dumps(value)
    if value is None:
        return b"\xf6"
    if t is bool:
        return b"\xf5" if value else b"\xf4"
    return _dumps(value)


_T = TypeVar("_T")


def from_body(cls: type[_T], body: Any, payload: bytes = b"") -> _T:
    """Build ``cls`` from a decoded body; unknown keys are ignored."""
    decode = _DECODERS.get(cls)
    if decode is None:
        decode = _codec(cls)[1]
    result: _T = decode(body, payload)
    return result


def body_decoder(cls: type[_T]) -> Callable[[Any, bytes], _T]:
    """``from_body`` for one type, looked up once (for a caller that decodes many)."""
    return _codec(cls)[1]


def _slot_setter(cls: type, name: str) -> Callable[[Any, Any], None]:
    for klass in cls.__mro__:
        descriptor = klass.__dict__.get(name)
        if descriptor is not None and hasattr(descriptor, "__set__"):
            setter: Callable[[Any, Any], None] = descriptor.__set__
            return setter
    raise TypeError(f"{cls.__name__}.{name} is not a slot")


_Codec = tuple[Callable[[Any], dict[str, Any]], Callable[[Any, bytes], Any], Callable[[Any], bytes]]
_CODECS: dict[type, _Codec] = {}
#: Each codec's decoder and CBOR encoder by type, for the hot paths' single lookup.
_DECODERS: dict[type, Callable[[Any, bytes], Any]] = {}
_CBOR_ENCODERS: dict[type, Callable[[Any], bytes]] = {}
_MISSING = object()


def _codec(cls: type) -> _Codec:
    """An encoder (to a dict), a decoder and an encoder straight to CBOR bytes,
    generated for ``cls`` (straight-line code: this runs for every request and
    response, so no per-field loop or ``**kwargs``)."""
    codec = _CODECS.get(cls)
    if codec is not None:
        return codec
    plan = _plan(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    ns: dict[str, Any] = {
        "cls": cls,
        "MISSING": _MISSING,
        "ProtocolError": ProtocolError,
        "dict": dict,
        "isinstance": isinstance,
        "cv": _cbor_value,
        "NULL": b"\xf6",
        "INT_MIN": INT_MIN,
        "INT_MAX": INT_MAX,
    }
    enc_items = []
    # CBOR: the map's head and each key are constants (k0 holds the head too).
    cbor_items = []
    ns["k0"] = cbor_head(CBOR_MAP, len(plan))
    dec_lines = [
        "def decode(body, payload):",
        "    if not isinstance(body, dict):",
        f"        raise ProtocolError({cls.__name__ + ': body is not a map'!r})",
        "    get = body.get",
    ]
    args = []
    for i, f in enumerate(plan):
        name = f.name
        ns[f"k{i}"] = ns.get(f"k{i}", b"") + cbor_text(name)
        if f.encode is None:
            enc_items.append(f"{name!r}: value.{name}")
        else:
            ns[f"enc{i}"] = f.encode
            enc_items.append(
                f"{name!r}: (None if (v{i} := value.{name}) is None else enc{i}(v{i}))"
            )
        if f.cbor is not None:  # (None stays CBOR null, as the generic path has it)
            ns[f"cbor{i}"] = f.cbor
            cbor_items.append(f"k{i}, (NULL if (v{i} := value.{name}) is None else cbor{i}(v{i}))")
        elif f.encode is None:
            cbor_items.append(f"k{i}, cv(value.{name})")
        else:
            cbor_items.append(f"k{i}, cv(None if (v{i} := value.{name}) is None else enc{i}(v{i}))")
        dec_lines.append(f"    v{i} = get({name!r}, MISSING)")
        dec_lines.append(f"    if v{i} is MISSING:")
        spec = fields[name]
        if f.required:
            message = f"{cls.__name__}: missing required field {name!r}"
            dec_lines.append(f"        raise ProtocolError({message!r})")
        elif spec.default_factory is not dataclasses.MISSING:
            ns[f"factory{i}"] = spec.default_factory
            dec_lines.append(f"        v{i} = factory{i}()")
        else:
            ns[f"default{i}"] = spec.default
            dec_lines.append(f"        v{i} = default{i}")
        if f.check is not None:
            test, expected = f.check
            message = f"{cls.__name__}: field {name!r} must be {expected}"
            dec_lines.append(f"    elif {test.format(v=f'v{i}')}:")
            dec_lines.append(f"        raise ProtocolError({message!r})")
        if f.decode is not None:
            ns[f"dec{i}"] = f.decode
            dec_lines.append(f"    elif v{i} is not None:")
            dec_lines.append(f"        v{i} = dec{i}(v{i})")
        args.append(f"{name}=v{i}")
    if "payload" in fields:
        args.append("payload=payload")
    slotted = "__slots__" in cls.__dict__ and not hasattr(cls, "__post_init__")
    if slotted:
        # Fill the slots directly: a frozen dataclass's __init__ (keyword parsing and a
        # setattr per field) costs more than all the rest of decoding a message.
        ns["new"] = object.__new__
        dec_lines.append("    obj = new(cls)")
        for arg in args:
            name, value = arg.split("=", 1)
            ns[f"set_{name}"] = _slot_setter(cls, name)
            dec_lines.append(f"    set_{name}(obj, {value})")
        dec_lines.append("    return obj")
    else:
        dec_lines += [
            "    try:",
            f"        return cls({', '.join(args)})",
            "    except (TypeError, ValueError) as exc:",
            f"        raise ProtocolError({cls.__name__ + ': '!r} + str(exc)) from None",
        ]
    enc_src = "def encode(value):\n    return {" + ", ".join(enc_items) + "}\n"
    if cbor_items:
        cbor_src = "def encode_cbor(value):\n    return b''.join((" + ", ".join(cbor_items) + "))\n"
    else:
        cbor_src = "def encode_cbor(value):\n    return k0\n"
    # The source is generated from our own dataclass definitions, never from input.
    exec(enc_src + cbor_src + "\n".join(dec_lines) + "\n", ns)
    codec = (ns["encode"], ns["decode"], ns["encode_cbor"])
    _CODECS[cls] = codec
    _DECODERS[cls] = codec[1]
    _CBOR_ENCODERS[cls] = codec[2]
    return codec


# --- registry --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Operation:
    """One registered operation: its name, types and the highest version we speak."""

    name: str
    request: type[Message]
    response: type[Message]
    version: int
    #: ``name`` as CBOR text, ready for request headers.
    name_cbor: bytes = dataclasses.field(default=b"", compare=False, repr=False)


_BY_NAME: dict[str, Operation] = {}
_BY_REQUEST: dict[type, Operation] = {}


def register(
    name: str, request: type[Message], response: type[Message], *, version: int = 0
) -> Operation:
    """Register an operation; registering the same one twice is allowed, a clash is not."""
    op = Operation(name, request, response, version, cbor_text(name))
    existing = _BY_NAME.get(name)
    if existing is not None and existing != op:
        raise ValueError(f"operation {name!r} is already registered as {existing}")
    if request in _BY_REQUEST and _BY_REQUEST[request].name != name:
        raise ValueError(f"{request.__name__} is already the request of another operation")
    _BY_NAME[name] = op
    _BY_REQUEST[request] = op
    _plan(request)
    _plan(response)
    return op


def operation(name: str) -> Operation:
    """The operation registered under ``name``; ProtocolError when unknown."""
    op = _BY_NAME.get(name)
    if op is None:
        raise ProtocolError(f"unknown operation {name!r}")
    return op


def operation_of(request: Message) -> Operation:
    op = _BY_REQUEST.get(type(request))
    if op is None:
        raise TypeError(f"{type(request).__name__} is not a registered request type")
    return op


def operations() -> dict[str, Operation]:
    """Every registered operation by name."""
    return dict(_BY_NAME)


def check_version(op: Operation, version: Any) -> None:
    if type(version) is not int or version < 0:
        raise ProtocolError(f"{op.name}: version must be a non-negative integer")
    if version > op.version:
        raise UnsupportedVersionError(
            f"{op.name} v{version} is newer than this node speaks (v{op.version})",
            operation=op.name,
            max_version=op.version,
        )


# --- built-in diagnostic operations ------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class EchoRequest(Message):
    """Returns its data and payload; used by health checks and bench/rpc.py."""

    data: Any = None


@dataclass(frozen=True, slots=True, kw_only=True)
class EchoResponse(Message):
    data: Any = None


@dataclass(frozen=True, slots=True, kw_only=True)
class ApiVersionsRequest(Message):
    pass


@dataclass(frozen=True, slots=True, kw_only=True)
class ApiVersionsResponse(Message):
    #: operation name -> highest version the server speaks, for handled operations.
    operations: dict[str, int]


register("echo", EchoRequest, EchoResponse)
register("api_versions", ApiVersionsRequest, ApiVersionsResponse)
