"""The trio RPC server: framed, pipelined requests dispatched to a handler table.

Ownership: :meth:`RpcServer.run` opens its own nursery holding the listeners and one
task (with its own nursery) per connection. Each connection has a reader loop, a
writer task, and one task per in-flight *concurrent* request. Cancelling ``run``
closes every connection; :meth:`RpcServer.drain` first lets in-flight requests finish
(bounded), answering new ones with BROKER_NOT_AVAILABLE.

Routing: a handler is ``async def handler(request) -> response``. A :class:`Route`
marked ``inline=True`` is run in the connection's read loop (no task spawn: use it
for handlers that never block for long, e.g. metadata or a local append), so inline
requests of one connection are handled in the order they arrived; an inline handler
may return a :class:`Deferred` to finish the rest in a task, or a :class:`Later` to
answer from elsewhere without a task (a parked long poll), and may be a plain function
(called with no coroutine at all: the cheapest way to answer a request).
Other handlers run in their own task, so a long-polling fetch does not hold up the
requests behind it and responses may go out in a different order than requests came in.

Bad input never crashes the server or touches another connection: a malformed frame,
an oversize frame or an unknown operation gets an error response (when a correlation id
can be read) and the connection is closed; a handler's exception becomes an error
response (DlogError as itself, anything else as UNKNOWN_SERVER_ERROR, logged).

One-way requests (header ``"n": true``, sent with ``RpcConnection.send_oneway``) are
dispatched like any other but answered with nothing: their response is dropped and
their errors are only logged and counted (``ServerStats.oneway_errors``). A malformed
one still closes the connection.

Backpressure: at most ``max_in_flight`` requests per connection are being handled and
at most ``max_outbox_bytes`` of responses wait to be written; past either, the server
stops reading that connection, so TCP pushes back on the client.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import trio

from dlog.errors import (
    BrokerNotAvailableError,
    DlogError,
    ProtocolError,
    UnknownServerError,
    UnsupportedVersionError,
)
from dlog.net.framing import (
    DEFAULT_MAX_FRAME_BYTES,
    Frame,
    FrameDecoder,
    encode_header,
    encode_reply_header,
)
from dlog.net.messages import (
    ApiVersionsRequest,
    ApiVersionsResponse,
    EchoRequest,
    EchoResponse,
    Message,
    Operation,
    Payload,
    body_cbor,
    body_decoder,
    check_version,
    operation,
    payload_length,
)
from dlog.net.writer import FrameWriter

log = logging.getLogger(__name__)

#: The body of a request that has none (decoders only read it).
_NO_BODY: Mapping[str, Any] = {}

#: ``async def handler(request)``, or for an inline route also a plain function.
Handler = Callable[[Any], "Awaitable[Message | Deferred] | Message | Deferred | Later"]


@dataclass(frozen=True, slots=True)
class Deferred:
    """What an inline handler returns when it has done the part that must happen in
    request order (e.g. appending a produce request's batches) and must wait for the
    rest (e.g. replication): the server awaits ``finish()`` in a task of its own and
    sends what it returns, while the connection's next requests are read."""

    finish: Callable[[], Awaitable[Message]]


def _finisher(deferred: Deferred) -> Handler:
    async def finish(_request: Any) -> Message:
        return await deferred.finish()

    return finish


async def _wait_for(awaitable: Awaitable[None]) -> None:
    await awaitable


def _awaited(awaitable: Awaitable[Message | Deferred]) -> Handler:
    async def result(_request: Any) -> Message | Deferred:
        return await awaitable

    return result


class Later:
    """What an inline handler returns to answer its request later without a task: it
    keeps the ``Later`` and calls :meth:`reply` once, from anywhere in the server's
    trio run (e.g. a long-polling fetch, answered by the append that brings its data or
    by a shared timer). Until then the request counts as in flight, for ``max_in_flight``
    and for :meth:`RpcServer.drain`. A reply after the connection closed does nothing;
    :attr:`done` then tells a waiting holder that nobody wants the answer any more, and
    :attr:`on_abandon`, if set, is called.
    Not thread-safe: call it from the trio thread."""

    __slots__ = ("_cid", "_conn", "_early", "done", "on_abandon")

    def __init__(self) -> None:
        self._conn: _ServerConnection | None = None
        self._cid: int | None = None
        self._early: Message | None = None
        #: Replied, or the connection is gone.
        self.done = False
        #: Called (once, from the connection's teardown) if the connection goes away
        #: before the reply, so that the holder can let go of the request at once.
        self.on_abandon: Callable[[], None] | None = None

    def reply(self, response: Message) -> None:
        """Send ``response`` (at most once; later calls are ignored)."""
        if self.done:
            return
        self.done = True
        conn = self._conn
        if conn is None:
            self._early = response  # replied before the server took it: sent then
            return
        conn._later_replied(self, response)


@dataclass(frozen=True, slots=True)
class Route:
    """A handler and how to run it (see the module docstring for ``inline``)."""

    handler: Handler
    inline: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerConfig:
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    #: Requests handled at once per connection before the server stops reading it.
    max_in_flight: int = 1024
    #: Response bytes waiting to be written before the server stops reading.
    max_outbox_bytes: int = 64 * 1024 * 1024
    #: A connection with no request in flight and no traffic for this long is closed.
    idle_timeout_s: float = 600.0
    #: How long ``drain`` waits for in-flight requests (callers may pass their own).
    drain_timeout_s: float = 5.0
    receive_bytes: int = 256 * 1024

    def __post_init__(self) -> None:
        if self.max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        if self.max_outbox_bytes < 1 or self.receive_bytes < 1024:
            raise ValueError("max_outbox_bytes must be >= 1 and receive_bytes >= 1024")
        if self.idle_timeout_s <= 0 or self.drain_timeout_s < 0:
            raise ValueError("idle_timeout_s must be > 0 and drain_timeout_s >= 0")


@dataclass(slots=True)
class ServerStats:
    connections_accepted: int = 0
    connections_open: int = 0
    requests: int = 0
    #: Of ``requests``, those sent one-way (answered with nothing).
    oneway_requests: int = 0
    error_responses: int = 0
    #: Errors of one-way requests: logged and counted, never sent.
    oneway_errors: int = 0
    protocol_errors: int = 0
    handler_crashes: int = 0


class RpcServer:
    """Serves a handler table over TCP (``run``) or over any trio stream (``serve_stream``).

    ``routes`` maps operation names (registered with :func:`dlog.net.messages.register`)
    to handlers or :class:`Route` objects. ``echo`` and ``api_versions`` are built in.
    """

    def __init__(
        self,
        routes: Mapping[str, Handler | Route],
        *,
        config: ServerConfig | None = None,
        name: str = "rpc",
    ) -> None:
        self.config = config or ServerConfig()
        self.name = name
        self.stats = ServerStats()
        self._routes: dict[str, tuple[Operation, Route, Callable[[Any, bytes], Message], bool]] = {}
        builtin: dict[str, Handler | Route] = {
            "echo": Route(_echo, inline=True),
            "api_versions": Route(self._api_versions, inline=True),
        }
        for op_name, route in {**builtin, **routes}.items():
            op = operation(op_name)
            route = route if isinstance(route, Route) else Route(route)
            # A plain (not async) inline handler is called without a coroutine.
            plain = route.inline and not inspect.iscoroutinefunction(route.handler)
            self._routes[op_name] = (op, route, body_decoder(op.request), plain)
        self._draining = False
        self._in_flight = 0
        # Made only while drain() waits: most requests never touch an Event.
        self._idle: trio.Event | None = None
        self._cancel_scope: trio.CancelScope | None = None
        #: Test hook: while set, new connections are closed at once and open ones are
        #: dropped, as if the network to this server were cut.
        self.refuse_connections = False
        self._connections: set[_ServerConnection] = set()

    async def run(
        self,
        host: str,
        port: int,
        *,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on ``host:port`` (0 picks a free port) and serve until cancelled.

        ``task_status.started(bound_port)`` once listening.
        """
        try:
            listeners = await trio.open_tcp_listeners(port, host=host)
        except OSError as exc:
            # (trio's own message may not name the address: say which one it was.)
            raise OSError(
                exc.errno, f"{self.name} cannot listen on {host}:{port}: {exc.strerror}"
            ) from exc
        bound_port: int = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            self._cancel_scope = nursery.cancel_scope
            await nursery.start(
                partial(trio.serve_listeners, self.serve_stream, listeners, handler_nursery=nursery)
            )
            log.debug("%s listening on %s:%d", self.name, host, bound_port)
            task_status.started(bound_port)

    async def serve_stream(self, stream: trio.abc.Stream) -> None:
        """Serve one connection until the peer closes it, it breaks, or we are cancelled.

        Closes ``stream`` on the way out, whatever happens.
        """
        conn = _ServerConnection(self, stream)
        self._connections.add(conn)
        self.stats.connections_accepted += 1
        self.stats.connections_open += 1
        try:
            if self.refuse_connections:
                return
            await conn.run()
        finally:
            self._connections.discard(conn)
            self.stats.connections_open -= 1
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await stream.aclose()

    async def drain(self, timeout_s: float | None = None) -> bool:
        """Stop taking requests, wait for in-flight ones, then stop serving.

        New requests get BROKER_NOT_AVAILABLE (retriable) meanwhile. Returns whether
        every in-flight request finished within the timeout.
        """
        self._draining = True
        finished = False
        with trio.move_on_after(self.config.drain_timeout_s if timeout_s is None else timeout_s):
            if self._in_flight:
                self._idle = trio.Event()
                await self._idle.wait()
            finished = True
        if self._cancel_scope is not None:
            self._cancel_scope.cancel()
        return finished

    def drop_connections(self) -> None:
        """Close every open connection (a test hook for a network cut)."""
        for conn in list(self._connections):
            conn.close()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def _request_started(self) -> None:
        self._in_flight += 1

    def _request_finished(self) -> None:
        self._in_flight -= 1
        if self._in_flight == 0 and self._idle is not None:
            self._idle.set()

    def _api_versions(self, request: ApiVersionsRequest) -> ApiVersionsResponse:
        return ApiVersionsResponse(
            operations={name: entry[0].version for name, entry in self._routes.items()}
        )


def _echo(request: EchoRequest) -> EchoResponse:
    return EchoResponse(data=request.data, payload=request.payload)


class _ServerConnection:
    """One accepted connection: reader loop (this task), writer task, handler tasks."""

    def __init__(self, server: RpcServer, stream: trio.abc.Stream) -> None:
        self.server = server
        self.stream = stream
        cfg = server.config
        self.decoder = FrameDecoder(max_frame_bytes=cfg.max_frame_bytes)
        self.writer = FrameWriter(stream, max_outbox_bytes=cfg.max_outbox_bytes)
        self.in_flight = 0
        self.slot_free = trio.Event()
        self.last_activity = trio.current_time()
        self.closing = False
        self.cancel_scope = trio.CancelScope()
        self.fd: int | None = None
        if isinstance(stream, trio.SocketStream):
            self.fd = stream.socket.fileno()
        self.drained = True
        #: Requests a handler answers later (see :class:`Later`), not yet answered.
        self.laters: set[Later] = set()
        self.nursery: trio.Nursery | None = None

    def close(self) -> None:
        self.closing = True
        self.cancel_scope.cancel()

    async def run(self) -> None:
        try:
            with self.cancel_scope:
                async with trio.open_nursery() as nursery:
                    self.nursery = nursery
                    nursery.start_soon(self._write_then_close)
                    nursery.start_soon(self._idle_watchdog)
                    try:
                        await self._read_loop(nursery)
                        # Let the writer send what is queued (e.g. a protocol error reply).
                        with trio.move_on_after(1):
                            await self.writer.flush()
                    finally:
                        # From here on nothing is answered (and the nursery takes no
                        # new tasks): replies to laters go nowhere.
                        self.closing = True
                        nursery.cancel_scope.cancel()
        finally:
            self.closing = True
            self.nursery = None
            laters, self.laters = self.laters, set()
            for later in laters:  # nobody can be answered now
                later.done = True
                later._conn = None
                self.in_flight -= 1
                self.server._request_finished()
                if later.on_abandon is not None:
                    try:
                        later.on_abandon()
                    except Exception:
                        log.exception("%s: a Later's on_abandon failed", self.server.name)

    def _take_later(
        self, later: Later, cid: int | None, *, in_read_loop: bool = True
    ) -> Awaitable[None] | None:
        """A handler returned ``later``: it is in flight until replied. In the read loop,
        returns what stops reading while ``max_in_flight`` are (the read loop alone
        corks the writer, so only it may wait that way)."""
        if later.done:  # replied already (or handed back twice: answered once)
            early, later._early = later._early, None
            return None if early is None else self._send_response(cid, early)
        later._conn, later._cid = self, cid
        self.laters.add(later)
        self.in_flight += 1
        self.server._request_started()
        if in_read_loop and self.in_flight >= self.server.config.max_in_flight:
            return self._until_a_slot_is_free()  # stop reading: backpressure
        return None

    def _later_replied(self, later: Later, response: Message) -> None:
        if later not in self.laters:
            return
        self.laters.discard(later)
        later._conn = None
        self.in_flight -= 1
        self.server._request_finished()
        self.slot_free.set()
        if self.closing or self.nursery is None:
            return
        unfinished = self._send_response(later._cid, response)
        if unfinished is not None:
            self.nursery.start_soon(_wait_for, unfinished)

    async def _write_then_close(self) -> None:
        await self.writer.run()
        self.close()  # the stream broke: nothing more can be answered

    async def _read_loop(self, nursery: trio.Nursery) -> None:
        server = self.server
        receive_bytes = server.config.receive_bytes
        while not self.closing:
            try:
                data = await self._receive(receive_bytes)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            if not data or server.refuse_connections:
                return
            self.last_activity = trio.current_time()
            # Answers to the requests in this read leave together, in one write.
            self.writer.cork()
            try:
                self.decoder.receive_data(data)
                for frame in self.decoder.frames():
                    unfinished = self._dispatch(frame, nursery)
                    if unfinished is not None:
                        await unfinished
                    if self.closing:
                        return
            except ProtocolError as exc:
                server.stats.protocol_errors += 1
                cid = exc.details.pop("correlation_id", None)
                log.info("%s: closing connection after protocol error: %s", server.name, exc)
                if cid is not None:
                    await self._send_error(cid, exc)
                return
            finally:
                self.writer.uncork()

    async def _receive(self, receive_bytes: int) -> bytes | bytearray:
        """The next bytes from the peer (b"" at its end).

        On a TCP socket: after a short read (the socket was emptied, as between the
        requests of a client that waits for each answer) wait for readability before
        reading, which saves a read that would only say "nothing yet"; after a full
        one, read again at once (after a checkpoint, for fairness)."""
        fd = self.fd
        if fd is None:
            return await self.stream.receive_some(receive_bytes)
        if self.drained:
            await trio.lowlevel.wait_readable(fd)
        else:
            await trio.lowlevel.checkpoint()
        while True:
            try:
                data = os.read(fd, receive_bytes)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(fd)
                continue
            except OSError as exc:
                raise trio.BrokenResourceError(f"read failed: {exc}") from exc
            self.drained = len(data) < receive_bytes
            return data

    def _dispatch(self, frame: Frame, nursery: trio.Nursery) -> Awaitable[None] | None:
        """Handle one request as far as it goes without waiting; what is left (a full
        outgoing queue, an async inline handler, an error to send) is returned for the
        read loop to await, so a request a plain inline handler answers costs no
        coroutine at all. Raises ProtocolError for a request that must close the
        connection."""
        server = self.server
        header, payload = frame
        cid: int | None
        if header.get("n") is True:
            cid = None  # one-way: nothing is answered, not even an error
            server.stats.oneway_requests += 1
        else:
            cid = header.get("i")
            if type(cid) is not int:
                raise ProtocolError("request frame without an integer correlation id 'i'")
        server.stats.requests += 1
        name = header.get("o")
        entry = server._routes.get(name) if isinstance(name, str) else None
        if entry is None:
            raise ProtocolError(f"unknown operation {name!r}", correlation_id=cid)
        op, route, decode, plain = entry
        try:
            if "v" in header:
                check_version(op, header["v"])
            request = decode(header.get("b", _NO_BODY), payload)
        except UnsupportedVersionError as exc:
            return self._send_error(cid, exc)
        except ProtocolError as exc:
            exc.details["correlation_id"] = cid
            raise
        if server._draining:
            return self._send_error(cid, BrokerNotAvailableError(f"{server.name} is shutting down"))
        if not route.inline:
            return self._spawn(nursery, cid, route.handler, request)
        if not plain:
            return self._inline(nursery, cid, route.handler, request)
        server._request_started()
        try:
            response = route.handler(request)
        except DlogError as exc:
            return self._send_error(cid, exc)
        except Exception as exc:
            return self._send_error(cid, self._crashed(request, exc))
        finally:
            server._request_finished()
        if isinstance(response, Deferred):
            # The ordered part is done; the waiting part runs in its own task.
            return self._spawn(nursery, cid, _finisher(response), request)
        if isinstance(response, Later):
            return self._take_later(response, cid)
        if not isinstance(response, Message) and inspect.isawaitable(response):
            # A callable object whose __call__ is async (not told apart up front).
            return self._inline(nursery, cid, _awaited(response), request)
        return self._send_response(cid, response)

    async def _inline(
        self, nursery: trio.Nursery, cid: int | None, handler: Handler, request: Message
    ) -> None:
        """An async inline handler, awaited in the read loop."""
        server = self.server
        server._request_started()
        try:
            deferred = await self._respond(cid, handler, request)
        finally:
            server._request_finished()
        if deferred is not None:
            # The ordered part is done; the waiting part runs in its own task.
            unfinished = self._spawn(nursery, cid, _finisher(deferred), request)
            if unfinished is not None:
                await unfinished

    def _spawn(
        self, nursery: trio.Nursery, cid: int | None, handler: Handler, request: Message
    ) -> Awaitable[None] | None:
        """Run ``handler`` in a task of its own; when ``max_in_flight`` are running,
        returns what waits for a free slot first."""
        if self.in_flight >= self.server.config.max_in_flight:
            return self._spawn_when_free(nursery, cid, handler, request)
        self.in_flight += 1
        self.server._request_started()
        nursery.start_soon(self._handle, cid, handler, request)
        return None

    async def _spawn_when_free(
        self, nursery: trio.Nursery, cid: int | None, handler: Handler, request: Message
    ) -> None:
        await self._until_a_slot_is_free()
        self._spawn(nursery, cid, handler, request)

    async def _until_a_slot_is_free(self) -> None:
        """Wait (and so stop reading this connection) while ``max_in_flight`` requests
        are being handled."""
        max_in_flight = self.server.config.max_in_flight
        self.writer.uncork()  # answers already made must not wait behind us
        while self.in_flight >= max_in_flight:
            self.slot_free = trio.Event()
            await self.slot_free.wait()
        self.writer.cork()

    async def _handle(self, cid: int | None, handler: Handler, request: Message) -> None:
        try:
            await self._respond(cid, handler, request)
        finally:
            self.in_flight -= 1
            self.server._request_finished()
            self.slot_free.set()

    async def _respond(
        self, cid: int | None, handler: Handler, request: Message
    ) -> Deferred | None:
        """Await ``handler`` and send its answer (none for a one-way request, ``cid``
        None); a :class:`Deferred` is handed back."""
        try:
            response = handler(request)
            if inspect.isawaitable(response):  # (a plain handler may run in a task too)
                response = await response
        except DlogError as exc:
            await self._send_error(cid, exc)
            return None
        except Exception as exc:
            await self._send_error(cid, self._crashed(request, exc))
            return None
        if isinstance(response, Deferred):
            return response
        if isinstance(response, Later):
            unfinished = self._take_later(response, cid, in_read_loop=False)
        else:
            unfinished = self._send_response(cid, response)
        if unfinished is not None:
            await unfinished
        return None

    def _crashed(self, request: Message, exc: Exception) -> DlogError:
        """Log a handler's unexpected exception; the error its caller gets."""
        self.server.stats.handler_crashes += 1
        log.error(
            "%s: handler for %s failed",
            self.server.name,
            type(request).__name__,
            exc_info=(type(exc), exc, exc.__traceback__),
        )
        return UnknownServerError(f"{type(exc).__name__}: {exc}")

    def _send_response(self, cid: int | None, response: Message) -> Awaitable[None] | None:
        """Queue ``response`` (nothing for a one-way request, ``cid`` None); returns what
        waits for room in a full outgoing queue, or sends an encoding failure."""
        if cid is None:
            return None
        try:
            payload = response.payload
            size = payload_length(payload) if payload else 0
            head = encode_reply_header(cid, body_cbor(response), size)
        except Exception as exc:
            # A response that cannot be encoded is a bug in the handler; it is this
            # request's failure, never the connection's or the node's.
            self.server.stats.handler_crashes += 1
            log.exception("%s: cannot encode %s", self.server.name, type(response).__name__)
            return self._send_error(cid, UnknownServerError(f"{type(exc).__name__}: {exc}"))
        # Inline answers are corked by the read loop; a handler task alone on its
        # connection writes at once; with others in flight, the writer task batches.
        alone = self.in_flight <= 1
        try:
            if self.writer.send_frame_nowait(head, payload, size, write_now=alone):
                return None
        except trio.BrokenResourceError:
            self.close()
            return None
        return self._send_when_room(head, payload, size, alone)

    async def _send_when_room(self, head: bytes, payload: Payload, size: int, alone: bool) -> None:
        try:
            await self.writer.send_frame(head, payload, size, write_now=alone)
        except trio.BrokenResourceError:
            self.close()

    async def _send_error(self, cid: int | None, exc: DlogError) -> None:
        if cid is None:
            self.server.stats.oneway_errors += 1
            log.debug("%s: one-way request failed (nobody to tell): %s", self.server.name, exc)
            return
        self.server.stats.error_responses += 1
        try:
            await self.writer.enqueue(
                encode_header({"i": cid, "e": exc.to_wire()}), write_now=self.in_flight <= 1
            )
        except trio.BrokenResourceError:
            self.close()

    async def _idle_watchdog(self) -> None:
        timeout = self.server.config.idle_timeout_s
        while True:
            await trio.sleep_until(self.last_activity + timeout)
            now = trio.current_time()
            if self.in_flight:
                self.last_activity = now  # a request being handled is activity
            elif now >= self.last_activity + timeout:
                log.debug("%s: closing idle connection", self.server.name)
                self.close()
                return
