"""The write side of a framed connection, shared by server and client connections.

One :class:`FrameWriter` per connection owns all writes to its stream. Callers hand it
whole frames (header bytes, then payload chunks); frames never interleave.

How bytes leave, fastest first:

- ``enqueue(..., write_now=True)`` on a TCP stream with nothing queued and no write in
  progress writes straight to the (non-blocking) socket without yielding, so a lone
  request costs no task switch -- this is what keeps round-trip latency near a raw
  socket's. Callers pass it when nothing else of theirs is in flight; under
  pipelining they leave it off, and the writer task sends many frames per write.
- What the socket does not take at once is queued, and the writer task (:meth:`run`)
  sends it with ``send_all``, coalescing small frames into few writes and passing big
  chunks through without copying.
- Between :meth:`cork` and :meth:`uncork` frames are only queued; ``uncork`` sends them
  together (the server corks while it handles one read's worth of pipelined requests).
- Either way, once 64 frames or 256 KiB are queued they go out at once, so that two
  pipelining peers work at the same time rather than taking turns.

The writer task is cancelled only when the connection is torn down, so a frame is
never torn on a connection that stays open.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import trio

Chunk = bytes | bytearray | memoryview

_COALESCE_BYTES = 256 * 1024
_BIG_CHUNK = 64 * 1024
#: Frames (chunks) queued before they go out even while more are coming: a pipelining
#: peer then gets work while this side goes on producing, instead of the two taking
#: turns with a whole window each (which left each process idle half the time).
_EAGER_CHUNKS = 64


class FrameWriter:
    """Queue of outgoing chunks plus the task (:meth:`run`) that writes what is left.

    ``enqueue`` waits while more than ``max_outbox_bytes`` are queued, which is what
    pushes back on a producer of frames when the peer reads slowly.
    """

    def __init__(self, stream: trio.abc.SendStream, *, max_outbox_bytes: int) -> None:
        self._stream = stream
        self._fd: int | None = None
        if isinstance(stream, trio.SocketStream):
            self._fd = stream.socket.fileno()
        self._max_outbox_bytes = max_outbox_bytes
        self._outbox: list[Chunk] = []
        self._outbox_bytes = 0
        self._wake = trio.Event()
        self._drained = trio.Event()
        self._drained.set()
        self._sending = False
        self._corked = False
        self.broken = False

    @property
    def queued_bytes(self) -> int:
        return self._outbox_bytes

    @property
    def has_room(self) -> bool:
        """Whether :meth:`enqueue` would return without waiting (so a caller on a hot
        path may use :meth:`enqueue_nowait` and skip a coroutine)."""
        return self._outbox_bytes < self._max_outbox_bytes and not self.broken

    async def enqueue(self, *chunks: Chunk, write_now: bool = False) -> None:
        """Send one frame's chunks (in order, contiguous on the wire).

        Returns once they are written or queued; waits only while the queue is full.
        """
        while self._outbox_bytes >= self._max_outbox_bytes and not self.broken:
            self._kick(write_now=True)  # even when corked: a full queue must drain
            await self._drained.wait()
        self.enqueue_nowait(*chunks, write_now=write_now)

    def send_frame_nowait(
        self, head: bytes, payload: Chunk | Sequence[Chunk], size: int, *, write_now: bool
    ) -> bool:
        """:meth:`send_frame` if the queue has room: True once the frame is queued (or
        written); False, with nothing queued, when the caller must await
        :meth:`send_frame`. The hot paths try this first: a plain call, not a
        coroutine."""
        # enqueue_nowait without its *chunks: this runs for every request and response.
        if self._outbox_bytes >= self._max_outbox_bytes or self.broken:
            return False
        outbox = self._outbox
        outbox.append(head)
        added = len(head)
        if size:
            if isinstance(payload, bytes | bytearray | memoryview):
                outbox.append(payload)
                added += len(payload)
            else:
                for chunk in payload:
                    outbox.append(chunk)
                    added += len(chunk)
        self._outbox_bytes += added
        self._queued(write_now)
        return True

    async def send_frame(
        self, head: bytes, payload: Chunk | Sequence[Chunk], size: int, *, write_now: bool
    ) -> None:
        """Queue a frame: its encoded header, then a payload of ``size`` bytes given as
        one buffer or as chunks (sent one after another, never joined). Waits only
        while the queue is full."""
        if self.send_frame_nowait(head, payload, size, write_now=write_now):
            return
        if not size:
            await self.enqueue(head, write_now=write_now)
        elif isinstance(payload, bytes | bytearray | memoryview):
            await self.enqueue(head, payload, write_now=write_now)
        else:
            await self.enqueue(head, *payload, write_now=write_now)

    def enqueue_nowait(self, *chunks: Chunk, write_now: bool = False) -> None:
        """Queue without waiting for room (for small frames whose count is bounded)."""
        if self.broken:
            raise trio.BrokenResourceError("connection is closed")
        for chunk in chunks:
            self._outbox.append(chunk)
            self._outbox_bytes += len(chunk)
        self._queued(write_now)

    def _queued(self, write_now: bool) -> None:
        """After frames were queued: send now, or leave them to the writer task."""
        if len(self._outbox) >= _EAGER_CHUNKS or self._outbox_bytes >= _COALESCE_BYTES:
            self._kick(write_now=True)  # corked or not: see _EAGER_CHUNKS
        elif not self._corked:
            self._kick(write_now=write_now)

    def cork(self) -> None:
        """Hold frames back until :meth:`uncork`, so they leave in one write."""
        self._corked = True

    def uncork(self) -> None:
        self._corked = False
        if self._outbox and not self.broken:
            self._kick(write_now=True)

    async def flush(self) -> None:
        """Wait until everything queued so far has been handed to the stream."""
        while self._outbox and not self.broken:
            await self._drained.wait()

    def _kick(self, *, write_now: bool) -> None:
        if self._sending:
            return  # the writer task is mid-write and will pick the new frames up
        if write_now and self._fd is not None and self._try_write_now():
            return
        if self._drained.is_set():
            self._drained = trio.Event()
        self._wake.set()

    def _try_write_now(self) -> bool:
        """Write the queue straight to the socket; True when all of it went out."""
        assert self._fd is not None
        chunks = coalesce(self._outbox)
        for i, chunk in enumerate(chunks):
            try:
                written = os.write(self._fd, chunk)
            except BlockingIOError:
                written = 0
            except OSError:
                # Broken: leave the rest for the writer task, whose send_all reports it.
                self._outbox = list(chunks[i:])
                return False
            if written < len(chunk):
                rest: list[Chunk] = [memoryview(chunk)[written:]]
                rest.extend(chunks[i + 1 :])
                self._outbox = rest
                self._outbox_bytes = sum(len(c) for c in rest)
                return False
        self._outbox = []
        self._outbox_bytes = 0
        return True

    async def run(self) -> None:
        """Write queued chunks until cancelled; returns if the stream breaks."""
        try:
            while True:
                await self._wake.wait()
                self._wake = trio.Event()
                self._sending = True
                try:
                    while self._outbox:
                        chunks, self._outbox = self._outbox, []
                        for data in coalesce(chunks):
                            await self._stream.send_all(data)
                        self._outbox_bytes = sum(len(c) for c in self._outbox)
                finally:
                    self._sending = False
                self._drained.set()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            # Broken, closed or cancelled (the connection is going away): frames can no
            # longer be sent, and whoever waits for room must wake up and hear so.
            self.broken = True
            self._drained.set()


def coalesce(chunks: Sequence[Chunk]) -> list[Chunk]:
    """Join small chunks into few writes; pass big ones through without copying."""
    if len(chunks) == 1:
        return [chunks[0]]
    out: list[Chunk] = []
    pending: list[Chunk] = []
    pending_bytes = 0
    for chunk in chunks:
        n = len(chunk)
        if n >= _BIG_CHUNK:
            if pending:
                out.append(b"".join(pending))
                pending, pending_bytes = [], 0
            out.append(chunk)
            continue
        pending.append(chunk)
        pending_bytes += n
        if pending_bytes >= _COALESCE_BYTES:
            out.append(b"".join(pending))
            pending, pending_bytes = [], 0
    if pending:
        out.append(b"".join(pending) if len(pending) > 1 else pending[0])
    return out
