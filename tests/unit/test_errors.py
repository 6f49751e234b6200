from __future__ import annotations

import pytest

from dlog.errors import (
    ERRORS,
    DlogError,
    ErrorCode,
    InvalidRequestError,
    NotLeaderError,
    OffsetOutOfRangeError,
    ProtocolError,
    UnknownServerError,
    error_from_wire,
    is_retriable,
)


def test_every_code_has_an_entry() -> None:
    assert set(ERRORS) == set(ErrorCode)


def test_round_trip_keeps_class_message_and_details() -> None:
    err = OffsetOutOfRangeError("offset 9 past end", log_start_offset=0, log_end_offset=5)
    back = error_from_wire(**err.to_wire())
    assert type(back) is OffsetOutOfRangeError
    assert back.message == "offset 9 past end"
    assert back.details == {"log_start_offset": 0, "log_end_offset": 5}
    assert not back.retriable


def test_not_leader_is_retriable_and_carries_leader() -> None:
    back = error_from_wire(**NotLeaderError(leader=2).to_wire())
    assert isinstance(back, NotLeaderError)
    assert back.retriable
    assert back.details["leader"] == 2


def test_protocol_error_travels_as_invalid_request() -> None:
    back = error_from_wire(**ProtocolError("bad frame").to_wire())
    assert type(back) is InvalidRequestError
    assert isinstance(ProtocolError("x"), InvalidRequestError)


@pytest.mark.parametrize("code", [9999, -77])
def test_unknown_code_becomes_unknown_server_error(code: int) -> None:
    back = error_from_wire(code, "from the future")
    assert type(back) is UnknownServerError
    assert back.details["wire_code"] == code
    assert not is_retriable(code)


def test_str_names_the_code() -> None:
    assert str(DlogError("boom")) == "UNKNOWN_SERVER_ERROR: boom"
