"""The RPC client: pipelined connections and a pool with one connection per address.

Ownership: :func:`open_rpc_pool` is an async context manager that owns a nursery;
every connection's reader and writer tasks live there and end when the block exits.
A connection pipelines any number of requests (bounded by ``max_in_flight``);
responses are matched by correlation id and may arrive in any order. The reader task
reads responses, except while a call is the only one in flight: its caller then reads
the socket itself (``RpcConnection._read_for``), which saves a task switch per round
trip. ``send_oneway`` sends a request the server answers with nothing (no pending call,
no correlation id): for messages whose answer is a message of its own.

Failure behaviour:

- A call that gets no response within its timeout raises RequestTimedOutError
  (retriable); a response that arrives later is dropped.
- When a connection drops, every call in flight on it fails with NetworkError
  (retriable): the request may or may not have been handled.
- A connect that fails (refused, unresolvable, or a host name the resolver cannot
  even encode: addresses come from peers) raises NetworkError.
- Connecting to an address that failed recently waits out an exponential backoff with
  jitter (bounded by the call's own timeout) before trying again.
- A caller cancelled while waiting leaves the connection usable.

The pool's :class:`FaultInjector` is a test hook: a blocked address behaves like a cut
network link (calls fail with NetworkError, open connections to it are closed).
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import trio
from mypy_extensions import mypyc_attr

from dlog.errors import (
    DlogError,
    NetworkError,
    ProtocolError,
    RequestTimedOutError,
    error_from_wire,
)
from dlog.net.address import parse_address
from dlog.net.framing import DEFAULT_MAX_FRAME_BYTES, FrameDecoder, encode_call_header
from dlog.net.messages import (
    Message,
    Operation,
    body_cbor,
    from_body,
    operation_of,
    payload_length,
)
from dlog.net.writer import FrameWriter

log = logging.getLogger(__name__)

#: How long the reader task stays parked after a caller read its own answer and
#: nothing else is in flight: back-to-back lone calls then never wake it, and a
#: connection the server closes while idle is noticed this much later at most.
_READER_RESUME_S = 0.01

_M = TypeVar("_M", bound=Message)

#: The body of a response that has none (decoders only read it).
_NO_BODY: Mapping[str, Any] = {}


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientConfig:
    connect_timeout_s: float = 5.0
    #: Default per-call timeout (covers connecting, sending and waiting).
    request_timeout_s: float = 30.0
    reconnect_backoff_s: float = 0.05
    reconnect_backoff_max_s: float = 1.0
    #: Calls in flight per connection before ``start_call`` waits.
    max_in_flight: int = 4096
    max_outbox_bytes: int = 64 * 1024 * 1024
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    receive_bytes: int = 256 * 1024

    def __post_init__(self) -> None:
        if self.connect_timeout_s <= 0 or self.request_timeout_s <= 0:
            raise ValueError("timeouts must be positive")
        if not 0 < self.reconnect_backoff_s <= self.reconnect_backoff_max_s:
            raise ValueError("need 0 < reconnect_backoff_s <= reconnect_backoff_max_s")
        if self.max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")


class PendingCall:
    """A request that was sent and whose response has not been awaited yet.

    It resolves exactly once: with the response, the server's error, NetworkError
    when the connection drops, or RequestTimedOutError at its deadline.
    """

    __slots__ = (
        "_conn",
        "_done",
        "_error",
        "_event",
        "_response",
        "_waiters",
        "cid",
        "deadline",
        "op",
        "timeout",
    )

    def __init__(
        self, conn: RpcConnection, cid: int, op: Operation, deadline: float, timeout: float
    ) -> None:
        self._conn = conn
        self.cid = cid
        self.op = op
        self.deadline = deadline
        self.timeout = timeout
        self._done = False
        # Made only when someone waits before the response is in: a pipelining
        # caller that collects finished calls never pays for one.
        self._event: trio.Event | None = None
        self._response: Message | None = None
        self._error: DlogError | None = None
        self._waiters = 0

    @property
    def done(self) -> bool:
        return self._done

    def _resolve(self, response: Message | None, error: DlogError | None) -> None:
        if self._done:
            return
        self._response, self._error = response, error
        self._done = True
        if self._event is not None:
            self._event.set()
        conn = self._conn
        if conn._direct_call is self and conn._direct_scope is not None:
            conn._direct_scope.cancel()  # resolved by another task: stop reading for it

    async def result(self) -> Message:
        """Wait for the response; raises the server's error, NetworkError or
        RequestTimedOutError. Cancelling the last waiter forgets the call (a late
        answer is dropped, and ``result()`` raises RequestTimedOutError from then on).

        When the response is already there this returns without a checkpoint, so a
        loop that drains finished calls and starts new ones does so in one scheduling
        step and its requests leave in one write.
        """
        if not self._done:
            self._waiters += 1
            try:
                await self._wait_done()
            except BaseException:
                if self._waiters == 1:  # the last one waiting gives up on the answer
                    self.forget()  # (resolved too: a later result() raises, never hangs)
                raise
            finally:
                self._waiters -= 1
        if self._error is not None:
            raise self._error
        assert self._response is not None
        return self._response

    async def wait(self) -> None:
        """Wait until the call is finished (answered, failed or timed out), then read
        it with :meth:`result`. Unlike ``result``, cancelling this wait leaves the call
        in flight, so a caller can wait in slices (doing something between them) and
        must :meth:`forget` the call itself if it gives up."""
        if not self._done:
            self._waiters += 1
            try:
                await self._wait_done()
            finally:
                self._waiters -= 1

    async def _wait_done(self) -> None:
        conn = self._conn
        if conn._fd is not None and conn._direct_call is None and len(conn._pending) == 1:
            await conn._read_for(self)
        if not self._done:
            if conn._reader_parked and conn._direct_call is None:
                conn._wake_reader()  # nobody reads for us: the reader task must
            if self._event is None:
                self._event = trio.Event()
            await self._event.wait()

    def forget(self) -> None:
        """Drop interest in the response; a late one is discarded (and ``result()``
        raises RequestTimedOutError from now on, unless the answer was already in)."""
        conn = self._conn
        conn._forget(self)
        self._resolve(
            None,
            RequestTimedOutError(
                f"{self.op.name} to {conn.address}: forgotten before its answer came",
                address=conn.address,
            ),
        )


class RpcConnection:
    """One client connection. Run :meth:`run` in a nursery; then ``call`` from any task."""

    def __init__(self, stream: trio.abc.Stream, address: str, config: ClientConfig) -> None:
        self.address = address
        self.config = config
        self._stream = stream
        self._writer = FrameWriter(stream, max_outbox_bytes=config.max_outbox_bytes)
        # A response header may be as large as a whole frame: a metadata answer for
        # thousands of partitions is one header of several MiB. (The server's smaller
        # cap on request headers bounds what strangers can make it parse.)
        self._decoder = FrameDecoder(
            max_frame_bytes=config.max_frame_bytes, max_header_bytes=config.max_frame_bytes
        )
        self._pending: dict[int, PendingCall] = {}
        self._cids = itertools.count(1)
        #: The clock; run() swaps in the run's own clock method, which skips
        #: trio.current_time's lookups (a run's clock never changes).
        self._now: Callable[[], float] = trio.current_time
        # Deadlines without a cancel scope per call (those cost more than the rest of a
        # call) and without a timer structure per call (one would keep finished calls,
        # and their responses, alive until their deadlines): the timer task sleeps until
        # the earliest deadline it knows of, then scans the calls still in flight (at
        # most max_in_flight) and expires the overdue ones. A call with an earlier
        # deadline than the timer's wakes it.
        self._timer_target = math.inf
        self._timer_wake = trio.Event()
        # Tasks waiting in start_call for a free slot share one Event, replaced only
        # when it fires (so every waiter wakes, and a connection nobody waits on never
        # makes one).
        self._slot_free = trio.Event()
        self._slot_waiters = 0
        self._cancel_scope = trio.CancelScope()
        self._closed_reason: str | None = None
        self.closed = trio.Event()
        # Who reads: normally the reader task (run). A caller whose call is the only
        # one in flight reads the socket itself (_read_for) while the reader task
        # steps aside, so its response wakes it straight from the I/O wait. Both read
        # the raw socket and feed the decoder with no checkpoint in between, so bytes
        # reach the decoder in the order they arrived whoever reads them.
        self._fd: int | None = None
        if isinstance(stream, trio.SocketStream):
            self._fd = stream.socket.fileno()
        self._direct_call: PendingCall | None = None
        self._direct_scope: trio.CancelScope | None = None
        self._reader_scope: trio.CancelScope | None = None
        # The reader task stays parked after a caller's read while nothing is in
        # flight, so back-to-back lone calls cost it no wake-ups. It is woken as soon
        # as a call needs it (_wake_reader), and resumes by itself _READER_RESUME_S
        # after the last caller's read ended (never while one reads) to notice a
        # connection closed while idle. Its park deadline is set only when it parked
        # without one, so lone calls cost at most one reader wake-up per
        # _READER_RESUME_S and no deadline change each.
        self._reader_parked = False
        self._reader_back = trio.Event()
        self._park_scope: trio.CancelScope | None = None
        self._direct_read_ended = -math.inf

    @property
    def is_closed(self) -> bool:
        return self._closed_reason is not None

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    @property
    def has_room(self) -> bool:
        """Whether a request sent now is queued without waiting for the outgoing
        buffer (``max_outbox_bytes``) to drain."""
        return self._writer.has_room

    def close(self, reason: str = "closed by client") -> None:
        if self._closed_reason is None:
            self._closed_reason = reason
        self._cancel_scope.cancel()
        if self._direct_scope is not None:
            self._direct_scope.cancel()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Read responses and write requests until the connection ends or is closed.

        On the way out, fails every pending call with NetworkError and closes the stream.
        """
        self._now = trio.lowlevel.current_clock().current_time
        try:
            with self._cancel_scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._write_loop)
                    nursery.start_soon(self._expire_loop)
                    task_status.started()
                    await self._read_loop()
                    nursery.cancel_scope.cancel()
        finally:
            if self._closed_reason is None:
                self._closed_reason = "connection closed by peer"
            error = f"connection to {self.address} lost: {self._closed_reason}"
            pending, self._pending = self._pending, {}
            for call in pending.values():
                call._resolve(None, NetworkError(error, address=self.address))
            self._slot_free.set()
            self.closed.set()
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await self._stream.aclose()

    async def _write_loop(self) -> None:
        await self._writer.run()
        self.close("write failed")

    async def _expire_loop(self) -> None:
        while True:
            self._timer_target = target = self._expire_overdue(trio.current_time())
            with trio.move_on_at(target):
                await self._timer_wake.wait()
            self._timer_wake = trio.Event()

    def _expire_overdue(self, now: float) -> float:
        """Expire the calls due by ``now``; returns the earliest deadline left.

        (A function of its own so that no local keeps a call alive while the timer
        task sleeps.)"""
        target = math.inf
        overdue = []
        for call in self._pending.values():
            if call.deadline <= now:
                overdue.append(call)
            elif call.deadline < target:
                target = call.deadline
        for call in overdue:
            self._expire(call)
        return target

    def _expire(self, call: PendingCall) -> None:
        self._forget(call)
        call._resolve(
            None,
            RequestTimedOutError(
                f"{call.op.name} to {self.address} timed out after {call.timeout:g}s",
                address=self.address,
            ),
        )

    async def _read_loop(self) -> None:
        if self._fd is None:
            await self._read_stream()
        else:
            await self._read_socket(self._fd)

    async def _read_stream(self) -> None:
        """The reader for streams other than TCP sockets (tests' memory streams)."""
        receive_bytes = self.config.receive_bytes
        while True:
            try:
                data = await self._stream.receive_some(receive_bytes)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self._closed_reason = f"read failed: {exc}"
                return
            if not data or not self._feed(data):
                return

    async def _read_socket(self, fd: int) -> None:
        """The reader task on a TCP socket; steps aside while a caller reads itself.

        After a short read (the socket was emptied) it waits for readability before
        reading again, which saves a read that would only say "nothing yet"; after a
        full one it reads again at once (after a checkpoint, for fairness)."""
        receive_bytes = self.config.receive_bytes
        drained = True
        while True:
            if self._reader_parked:
                with trio.CancelScope(deadline=self._resume_at()) as park:
                    self._park_scope = park
                    try:
                        await self._reader_back.wait()
                    finally:
                        self._park_scope = None
                if self._reader_parked and self._resume_at() > trio.current_time():
                    continue  # callers are still reading for themselves: park again
                self._reader_parked = False
                drained = True
                continue
            if drained:
                with trio.CancelScope() as scope:
                    self._reader_scope = scope
                    try:
                        await trio.lowlevel.wait_readable(fd)
                    except trio.ClosedResourceError as exc:
                        self._closed_reason = f"read failed: {exc}"
                        return
                    finally:
                        self._reader_scope = None
                if scope.cancelled_caught:
                    continue  # a caller took over reading
            else:
                await trio.lowlevel.checkpoint()
                if self._direct_call is not None:
                    continue
            try:
                data = os.read(fd, receive_bytes)
            except BlockingIOError:
                drained = True
                continue
            except OSError as exc:
                self._closed_reason = f"read failed: {exc}"
                return
            drained = len(data) < receive_bytes
            if not data or not self._feed(data):
                return

    async def _read_for(self, call: PendingCall) -> None:
        """Read the socket in the caller's task until ``call`` resolves (or the
        connection fails). Only while ``call`` is the only one in flight: the response
        then wakes its caller straight from the I/O wait, a task switch and a
        scheduling round sooner than through the reader task. Frames for other calls
        that arrive meanwhile are dispatched as usual. Cancellation-safe: a read is
        never torn, and the reader task takes over again on the way out."""
        fd = self._fd
        assert fd is not None
        self._direct_call = call
        if self._reader_back.is_set():  # (an unset one may have the reader waiting on it)
            self._reader_back = trio.Event()
        self._reader_parked = True
        if self._reader_scope is not None:
            self._reader_scope.cancel()  # trio aborts its wait now: the socket is ours
        receive_bytes = self.config.receive_bytes
        try:
            while not call._done and not self.is_closed:
                with trio.CancelScope() as scope:
                    self._direct_scope = scope
                    try:
                        await trio.lowlevel.wait_readable(fd)
                    finally:
                        self._direct_scope = None
                if scope.cancelled_caught or call._done or self.is_closed:
                    # (Woken together with a resolve or a close that cancelled us too
                    # late: the socket may already be closed, its fd reused.)
                    continue
                try:
                    data = os.read(fd, receive_bytes)
                except BlockingIOError:
                    continue
                except OSError as exc:
                    self.close(f"read failed: {exc}")
                    return
                if not data:
                    self.close("connection closed by peer")
                    return
                if not self._feed(data):
                    self.close()
                    return
        except trio.ClosedResourceError as exc:
            self.close(f"read failed: {exc}")
        finally:
            self._direct_call = None
            if self._pending:
                self._wake_reader()  # other calls' answers are coming: the reader reads them
            else:
                self._direct_read_ended = now = self._now()
                park = self._park_scope
                if park is not None and park.deadline == math.inf:
                    park.deadline = now + _READER_RESUME_S

    def _resume_at(self) -> float:
        """When the parked reader resumes reading by itself."""
        if self._direct_call is not None:
            return math.inf
        return self._direct_read_ended + _READER_RESUME_S

    def _wake_reader(self) -> None:
        self._reader_parked = False
        self._reader_back.set()

    def _feed(self, data: bytes | bytearray) -> bool:
        """Decode ``data`` and resolve the calls it answers; False on a protocol error
        (the connection must close). (One loop with the common case inline: this runs
        for every response.)"""
        try:
            self._decoder.receive_data(data)
            pop = self._pending.pop
            for header, payload in self._decoder.frames():
                cid = header.get("i")
                if type(cid) is not int:
                    raise ProtocolError("response without an integer correlation id")
                call = pop(cid, None)
                if call is None:
                    continue  # the caller timed out or was cancelled
                if self._slot_waiters:
                    self._free_slot()
                err = header.get("e")
                if err is not None:
                    call._resolve(None, _error_of(err))
                    continue
                try:
                    response = from_body(call.op.response, header.get("b", _NO_BODY), payload)
                except ProtocolError as exc:
                    call._resolve(None, exc)
                    continue
                call._resolve(response, None)
        except Exception as exc:  # ProtocolError, or a response nothing can make sense of
            log.warning("bad response stream from %s: %s", self.address, exc)
            if self._closed_reason is None:
                self._closed_reason = f"protocol error: {exc}"
            return False
        return True

    def _forget(self, call: PendingCall) -> None:
        if self._pending.pop(call.cid, None) is not None and self._slot_waiters:
            self._free_slot()

    def _free_slot(self) -> None:
        self._slot_free.set()
        self._slot_free = trio.Event()

    async def start_call(self, request: Message, *, timeout: float | None = None) -> PendingCall:
        """Send ``request`` and return at once; await ``.result()`` for the response.

        The call fails with RequestTimedOutError ``timeout`` seconds from now (default
        ``config.request_timeout_s``). Waits only while ``max_in_flight`` calls are
        outstanding on this connection.
        """
        op = operation_of(request)
        pending = self._pending
        config = self.config
        while len(pending) >= config.max_in_flight and self._closed_reason is None:
            self._slot_waiters += 1
            try:
                await self._slot_free.wait()
            finally:
                self._slot_waiters -= 1
        if self._closed_reason is not None:
            raise NetworkError(
                f"connection to {self.address} lost: {self._closed_reason}", address=self.address
            )
        limit = config.request_timeout_s if timeout is None else timeout
        cid = next(self._cids)
        call = PendingCall(self, cid, op, self._now() + limit, limit)
        payload = request.payload
        size = payload_length(payload) if payload else 0
        head = encode_call_header(cid, op.name_cbor, body_cbor(request), op.version, size)
        pending[cid] = call
        # Alone on the connection: write at once (latency). Pipelining: let the
        # writer task batch this with the calls around it (throughput).
        alone = len(pending) == 1
        writer = self._writer
        try:
            if not writer.send_frame_nowait(head, payload, size, write_now=alone):
                await writer.send_frame(head, payload, size, write_now=alone)
        except trio.BrokenResourceError:
            self._pending.pop(cid, None)
            raise NetworkError(f"connection to {self.address} lost", address=self.address) from None
        except BaseException:
            self._pending.pop(cid, None)
            raise
        if call.deadline < self._timer_target:
            self._timer_wake.set()
        return call

    async def call(self, request: Message, *, timeout: float | None = None) -> Message:
        """Send ``request`` and wait for its response (RequestTimedOutError after timeout)."""
        call = await self.start_call(request, timeout=timeout)
        return await call.result()

    async def send_oneway(self, request: Message) -> None:
        """Send ``request`` as a one-way message: the server handles it and answers
        nothing, not even an error (for messages whose answer, if any, is a message of
        its own, such as Raft's, and for acks=none produce requests).

        Returns once the frame is written or queued; waits only while the outgoing
        queue is full (``max_outbox_bytes``), which is the backpressure a one-way
        sender gets. Raises NetworkError if the connection is closed; a message
        queued on a connection that then breaks is lost without a word.
        """
        if self.is_closed:
            raise NetworkError(
                f"connection to {self.address} lost: {self._closed_reason}", address=self.address
            )
        op = operation_of(request)
        payload = request.payload
        size = payload_length(payload) if payload else 0
        head = encode_call_header(None, op.name_cbor, body_cbor(request), op.version, size)
        try:
            await self._writer.send_frame(head, payload, size, write_now=True)
        except trio.BrokenResourceError:
            raise NetworkError(f"connection to {self.address} lost", address=self.address) from None


def _error_of(err: Any) -> DlogError:
    """The exception an error response's ``"e"`` map stands for."""
    if not isinstance(err, dict):
        return ProtocolError("malformed error in response")
    code = err.get("code", -1)
    details = err.get("details")
    return error_from_wire(
        code if type(code) is int else -1,
        str(err.get("message", "")),
        details if isinstance(details, dict) else None,
    )


def expect_response(response: Message, response_type: type[_M]) -> _M:
    """``response``, checked to be a ``response_type`` (ProtocolError otherwise)."""
    if not isinstance(response, response_type):
        raise ProtocolError(f"expected {response_type.__name__}, got {type(response).__name__}")
    return response


class FaultInjector:
    """Test hook on a pool: blocked addresses act as if the network to them were cut."""

    def __init__(self, pool: RpcPool) -> None:
        self._pool = pool
        self._blocked: set[str] = set()
        self.block_everything = False

    def is_blocked(self, address: str) -> bool:
        return self.block_everything or address in self._blocked

    def block(self, *addresses: str) -> None:
        for address in addresses:
            self._blocked.add(address)
            self._pool.disconnect(address, reason="blocked by fault injection")

    def block_all(self) -> None:
        self.block_everything = True
        for address in list(self._pool._connections):
            self._pool.disconnect(address, reason="blocked by fault injection")

    def heal(self) -> None:
        self._blocked.clear()
        self.block_everything = False


@dataclass(slots=True)
class _Backoff:
    failures: int = 0
    next_attempt: float = -math.inf


# (Tests subclass it with an in-memory transport; the compiled build must allow that.)
@mypyc_attr(allow_interpreted_subclasses=True)
class RpcPool:
    """One pooled connection per address. Create it with :func:`open_rpc_pool`."""

    def __init__(self, nursery: trio.Nursery, config: ClientConfig, rng: random.Random) -> None:
        self.config = config
        self._nursery = nursery
        self._rng = rng
        self._connections: dict[str, RpcConnection] = {}
        self._connecting: dict[str, trio.Lock] = {}
        self._backoff: dict[str, _Backoff] = {}
        self.faults = FaultInjector(self)

    async def call(
        self, address: str, request: Message, *, timeout: float | None = None
    ) -> Message:
        """Send ``request`` to ``address`` and wait for its response.

        ``timeout`` (default ``config.request_timeout_s``) covers waiting out a
        reconnect backoff and the response; connecting itself is bounded by
        ``connect_timeout_s``. Raises the server's error, NetworkError or
        RequestTimedOutError.
        """
        call = await self.start_call(address, request, timeout=timeout)
        return await call.result()

    async def start_call(
        self, address: str, request: Message, *, timeout: float | None = None
    ) -> PendingCall:
        """Send ``request`` to ``address`` (connecting if needed) and return at once;
        ``timeout`` as for :meth:`call`, counted from now."""
        limit = self.config.request_timeout_s if timeout is None else timeout
        deadline = trio.current_time() + limit
        conn = await self.connection(address, deadline=deadline)
        return await conn.start_call(request, timeout=max(0.0, deadline - trio.current_time()))

    async def call_typed(
        self,
        address: str,
        request: Message,
        response_type: type[_M],
        *,
        timeout: float | None = None,
    ) -> _M:
        """:meth:`call`, checking that the response has the expected type."""
        return expect_response(await self.call(address, request, timeout=timeout), response_type)

    async def connection(self, address: str, *, deadline: float = math.inf) -> RpcConnection:
        """The open connection to ``address``, connecting (with backoff) if needed.

        If the reconnect backoff ends after ``deadline``, waits until the deadline and
        raises RequestTimedOutError.
        """
        if self.faults.is_blocked(address):
            raise NetworkError(
                f"{address} unreachable (blocked by fault injection)", address=address
            )
        conn = self._connections.get(address)
        if conn is not None and not conn.is_closed:
            return conn
        lock = self._connecting.setdefault(address, trio.Lock())
        async with lock:
            conn = self._connections.get(address)
            if conn is not None and not conn.is_closed:
                return conn
            backoff = self._backoff.setdefault(address, _Backoff())
            if backoff.next_attempt > deadline:
                await trio.sleep_until(deadline)
                raise RequestTimedOutError(
                    f"{address} is backing off after failed connects", address=address
                )
            await trio.sleep_until(backoff.next_attempt)
            try:
                stream = await self._open_stream(address)
            # ValueError: a host name the resolver refuses to encode (IDNA), which an
            # address learned from a peer may hold; a failed connect like any other.
            except (OSError, ValueError, trio.TooSlowError, DlogError) as exc:
                backoff.failures += 1
                delay = min(
                    self.config.reconnect_backoff_max_s,
                    # The exponent is capped: past ~1,000 failures 2**n no longer fits
                    # in a float, and a peer can stay down that long.
                    self.config.reconnect_backoff_s * 2 ** min(backoff.failures - 1, 32),
                )
                backoff.next_attempt = trio.current_time() + delay * self._rng.uniform(0.8, 1.2)
                if isinstance(exc, DlogError):
                    raise
                raise NetworkError(f"cannot connect to {address}: {exc}", address=address) from None
            backoff.failures = 0
            backoff.next_attempt = -math.inf
            conn = RpcConnection(stream, address, self.config)
            await self._nursery.start(conn.run)
            self._connections[address] = conn
            return conn

    async def _open_stream(self, address: str) -> trio.abc.Stream:
        host, port = parse_address(address)
        with trio.fail_after(self.config.connect_timeout_s):
            return await trio.open_tcp_stream(host, port)

    def disconnect(self, address: str, *, reason: str = "closed by client") -> None:
        """Close the connection to ``address`` (its in-flight calls fail)."""
        conn = self._connections.pop(address, None)
        if conn is not None:
            conn.close(reason)

    def close(self) -> None:
        for address in list(self._connections):
            self.disconnect(address)


class open_rpc_pool:  # (lowercase: to its callers it is a function, `async with open_rpc_pool()`)
    """A connection pool whose connections live exactly as long as the ``async with``.

    (A class rather than an ``asynccontextmanager`` generator so that the compiled
    build, which cannot compile async generators, can compile this module.)"""

    def __init__(
        self, config: ClientConfig | None = None, *, rng: random.Random | None = None
    ) -> None:
        self._config = config or ClientConfig()
        self._rng = rng or random.Random()
        self._nursery_manager: Any = None
        self._pool: RpcPool | None = None

    async def __aenter__(self) -> RpcPool:
        if self._nursery_manager is not None:
            raise RuntimeError("open_rpc_pool() is entered once; make another for another pool")
        manager = self._nursery_manager = trio.open_nursery()
        nursery = await manager.__aenter__()
        try:
            pool = self._pool = RpcPool(nursery, self._config, self._rng)
        except BaseException as exc:  # (the nursery must be exited, whatever happened)
            await manager.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        return pool

    async def __aexit__(self, *exc_info: Any) -> bool:
        pool = self._pool
        assert pool is not None
        try:
            pool.close()
        finally:
            pool._nursery.cancel_scope.cancel()
            suppressed = await self._nursery_manager.__aexit__(*exc_info)
        return bool(suppressed)
