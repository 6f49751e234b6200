"""The latency baseline for bench/produce.py: the replication topology with no dlog code.

An acks=all produce crosses four processes: the client sends to the leader, the leader
sends to both followers, each follower answers the leader, and the leader answers the
client once both have. Here that chain carries 100-byte messages and nothing else
(no framing beyond a fixed size, no storage, no dispatch), with the leader and
followers written two ways:

- ``blocking``: plain blocking sockets and ``selectors``, the cheapest Python can do;
- ``trio``: trio streams, one task per connection, the way dlog's nodes do I/O;
- ``asyncio``: asyncio streams, for comparison with the other event loop.

And with no network at all, :func:`cpu_probe` measures how steady this machine's CPU
is at this rhythm: one process does the same small piece of Python work once every
millisecond and times each piece. On a quiet machine every piece takes the same time;
on this VM, pieces run several times slower for tens of milliseconds at a time, and a
chain whose every hop costs a few hundred microseconds of Python then falls behind.

The client is the same for both: open loop, like the produce benchmark (a sender
thread keeps to the rate whatever the answers do, a receiver thread times each
answer), so a stall delays every message sent during it and shows in the tail.

    python bench/_relay.py [--rate 1000] [--seconds 10]
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

MESSAGE_BYTES = 100
_ID = struct.Struct(">Q")
_ACK_BYTES = _ID.size


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    parts = []
    while n:
        chunk = sock.recv(n)
        if not chunk:
            raise EOFError
        parts.append(chunk)
        n -= len(chunk)
    return b"".join(parts)


def _nodelay(sock: socket.socket) -> socket.socket:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _listen() -> socket.socket:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    return listener


# -- blocking sockets ---------------------------------------------------------------


def blocking_follower(ports: Any) -> None:
    listener = _listen()
    ports.put(listener.getsockname()[1])
    sock = _nodelay(listener.accept()[0])
    try:
        while True:
            sock.sendall(_recv_exact(sock, MESSAGE_BYTES)[:_ACK_BYTES])
    except (EOFError, OSError):
        pass


def blocking_leader(ports: Any, follower_ports: list[int]) -> None:
    import selectors

    followers = [_nodelay(socket.create_connection(("127.0.0.1", p))) for p in follower_ports]
    listener = _listen()
    ports.put(listener.getsockname()[1])
    client = _nodelay(listener.accept()[0])
    selector = selectors.DefaultSelector()
    selector.register(client, selectors.EVENT_READ, None)
    for follower in followers:
        selector.register(follower, selectors.EVENT_READ, follower)
    acks: dict[bytes, int] = {}
    try:
        while True:
            for key, _ in selector.select():
                if key.data is None:
                    message = _recv_exact(client, MESSAGE_BYTES)
                    acks[message[:_ACK_BYTES]] = 0
                    for follower in followers:
                        follower.sendall(message)
                else:
                    ack = _recv_exact(key.data, _ACK_BYTES)
                    acks[ack] += 1
                    if acks[ack] == len(followers):
                        del acks[ack]
                        client.sendall(ack)
    except (EOFError, OSError):
        pass


# -- trio ----------------------------------------------------------------------------


async def _trio_recv_exact(stream: Any, n: int, buf: bytearray) -> bytes:
    while len(buf) < n:
        chunk = await stream.receive_some(65536)
        if not chunk:
            raise EOFError
        buf += chunk
    out = bytes(buf[:n])
    del buf[:n]
    return out


def trio_follower(ports: Any) -> None:
    import trio

    async def handle(stream: trio.SocketStream) -> None:
        buf = bytearray()
        try:
            while True:
                message = await _trio_recv_exact(stream, MESSAGE_BYTES, buf)
                await stream.send_all(message[:_ACK_BYTES])
        except (EOFError, trio.BrokenResourceError):
            pass

    async def main() -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        ports.put(listeners[0].socket.getsockname()[1])
        await trio.serve_listeners(handle, listeners)

    trio.run(main)


def trio_leader(ports: Any, follower_ports: list[int]) -> None:
    import trio

    async def main() -> None:
        followers = [await trio.open_tcp_stream("127.0.0.1", p) for p in follower_ports]
        acks: dict[bytes, int] = {}
        clients: list[trio.SocketStream] = []
        client_ready = trio.Event()

        async def from_follower(stream: trio.SocketStream) -> None:
            buf = bytearray()
            await client_ready.wait()
            while True:
                ack = await _trio_recv_exact(stream, _ACK_BYTES, buf)
                acks[ack] += 1
                if acks[ack] == len(followers):
                    del acks[ack]
                    await clients[0].send_all(ack)

        async def handle(stream: trio.SocketStream) -> None:
            clients.append(stream)
            client_ready.set()
            buf = bytearray()
            try:
                while True:
                    message = await _trio_recv_exact(stream, MESSAGE_BYTES, buf)
                    acks[message[:_ACK_BYTES]] = 0
                    for follower in followers:
                        await follower.send_all(message)
            except (EOFError, trio.BrokenResourceError):
                nursery.cancel_scope.cancel()  # the client is done: so is the run

        async with trio.open_nursery() as nursery:
            for follower in followers:
                nursery.start_soon(from_follower, follower)
            listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
            ports.put(listeners[0].socket.getsockname()[1])
            await trio.serve_listeners(handle, listeners)

    trio.run(main)


# -- asyncio -------------------------------------------------------------------------


def asyncio_follower(ports: Any) -> None:
    import asyncio

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                message = await reader.readexactly(MESSAGE_BYTES)
                writer.write(message[:_ACK_BYTES])
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)  # TCP_NODELAY is set
        ports.put(server.sockets[0].getsockname()[1])
        await server.serve_forever()

    asyncio.run(main())


def asyncio_leader(ports: Any, follower_ports: list[int]) -> None:
    import asyncio

    async def main() -> None:
        followers = [await asyncio.open_connection("127.0.0.1", p) for p in follower_ports]
        acks: dict[bytes, int] = {}
        clients: list[asyncio.StreamWriter] = []
        done = asyncio.Event()

        async def from_follower(reader: asyncio.StreamReader) -> None:
            while True:
                ack = await reader.readexactly(_ACK_BYTES)
                acks[ack] += 1
                if acks[ack] == len(followers):
                    del acks[ack]
                    clients[0].write(ack)

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            clients.append(writer)
            try:
                while True:
                    message = await reader.readexactly(MESSAGE_BYTES)
                    acks[message[:_ACK_BYTES]] = 0
                    for _, follower in followers:
                        follower.write(message)
            except (asyncio.IncompleteReadError, ConnectionError):
                done.set()  # the client is done: so is the run

        readers = [asyncio.create_task(from_follower(reader)) for reader, _ in followers]
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        ports.put(server.sockets[0].getsockname()[1])
        await done.wait()
        for task in readers:
            task.cancel()
        server.close()

    asyncio.run(main())


STACKS: dict[str, tuple[Callable[..., None], Callable[..., None]]] = {
    "blocking": (blocking_leader, blocking_follower),
    "trio": (trio_leader, trio_follower),
    "asyncio": (asyncio_leader, asyncio_follower),
}


# -- the CPU probe --------------------------------------------------------------------


def _probe_work(n: int = 1000) -> int:
    total = 0
    for i in range(n):
        total += i * i
    return total


def cpu_probe(seconds: float, period_s: float = 0.001) -> dict[str, float]:
    """Do the same small piece of work every ``period_s`` for ``seconds`` (in this
    process, which should be otherwise idle) and time each piece.

    Returns the median and p99 piece in microseconds, the share of pieces that took
    more than 4 times the median (``slow_pct``), and the longest stretch of time in
    which slow pieces followed each other less than 5 ms apart (``longest_slow_ms``).
    """
    perf = time.perf_counter
    durations: list[float] = []
    started: list[float] = []
    end = perf() + seconds
    while perf() < end:
        time.sleep(period_s)
        start = perf()
        _probe_work()
        durations.append(perf() - start)
        started.append(start)
    ordered = sorted(durations)
    median = ordered[len(ordered) // 2]
    slow = [t for t, d in zip(started, durations, strict=True) if d > 4 * median]
    longest = 0.0
    first = last = -math.inf
    for t in slow:
        if t - last >= 0.005:
            first = t  # a new stretch
        last = t
        longest = max(longest, t - first)
    return {
        "p50_us": round(median * 1e6, 1),
        "p99_us": round(ordered[int(len(ordered) * 0.99)] * 1e6, 1),
        "slow_pct": round(100 * len(slow) / len(durations), 2),
        "longest_slow_ms": round(longest * 1e3, 1),
    }


def relay_latencies(stack: str, rate: float, seconds: float) -> list[float]:
    """Run the chain with ``stack``'s leader and followers; each message's ms to its answer."""
    leader, follower = STACKS[stack]
    ctx = mp.get_context("spawn")
    ports = ctx.Queue()
    procs = [ctx.Process(target=follower, args=(ports,), daemon=True) for _ in range(2)]
    for proc in procs:
        proc.start()
    follower_ports = [ports.get(timeout=60), ports.get(timeout=60)]
    procs.append(ctx.Process(target=leader, args=(ports, follower_ports), daemon=True))
    procs[-1].start()
    sock = _nodelay(socket.create_connection(("127.0.0.1", ports.get(timeout=60))))
    count = int(rate * seconds)
    warmup = min(200, count)
    sent = [0.0] * count
    latencies: list[float] = []

    def receive() -> None:
        for _ in range(count):
            (i,) = _ID.unpack(_recv_exact(sock, _ACK_BYTES))
            if i >= warmup:
                latencies.append((time.perf_counter() - sent[i]) * 1000)

    receiver = threading.Thread(target=receive, daemon=True)
    receiver.start()
    padding = b"x" * (MESSAGE_BYTES - _ID.size)
    start = time.perf_counter()
    try:
        for i in range(count):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            sent[i] = time.perf_counter()
            sock.sendall(_ID.pack(i) + padding)
        receiver.join(timeout=60)
    finally:
        sock.close()
        for proc in procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
    if len(latencies) != count - warmup:
        raise RuntimeError(
            f"relay baseline ({stack}): {len(latencies)} of {count - warmup} answers"
        )
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    from _harness import percentile

    figures: dict[str, float] = {}
    for stack in STACKS:
        samples = relay_latencies(stack, args.rate, args.seconds)
        for p in (50, 99):
            figures[f"relay_{stack}_p{p}_ms"] = round(percentile(samples, p), 3)
        print(
            f"{stack:>8}: p50 {percentile(samples, 50):.3f} ms, p99 {percentile(samples, 99):.3f}"
            f" ms, max {max(samples):.3f} ms ({len(samples)} messages)"
        )
    probe = cpu_probe(args.seconds)
    figures.update({f"cpu_probe_{k}": v for k, v in probe.items()})
    print(
        f"cpu probe: one piece of work every ms: p50 {probe['p50_us']} us, p99 {probe['p99_us']}"
        f" us, {probe['slow_pct']}% over 4x the median, longest slow stretch"
        f" {probe['longest_slow_ms']} ms"
    )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
