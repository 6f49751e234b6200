"""bench/rpc.py: dlog.net against a raw trio socket, client and server in two processes.

Measures, for dlog's RPC layer and for a raw baseline (the same bytes length-prefixed,
no CBOR, no dispatch) in the same run:

1. pipelined small requests/s on one connection (an echo with a ~50-byte header,
   ``--window`` requests in flight);
2. round trips/s with one request in flight;
3. MB/s of 1 MiB payload requests (a few in flight; the server answers with a tiny ack).

Each figure is the median of ``--repeat`` runs of ``--seconds`` each. Prints a table,
then one JSON line.

    python bench/rpc.py [--seconds 2] [--repeat 3]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import struct
import subprocess
import sys
import time
from dataclasses import dataclass

import trio
from _harness import python_build

from dlog.net import RpcServer, open_rpc_pool
from dlog.net.messages import EchoRequest, Message, register

_U32 = struct.Struct(">I")
PAYLOAD = os.urandom(1 << 20)


@dataclass(frozen=True, slots=True, kw_only=True)
class SinkRequest(Message):
    """Carries a payload; answered with an empty response."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SinkResponse(Message):
    size: int


register("bench.sink", SinkRequest, SinkResponse)


# --- servers (run in a child process) --------------------------------------------------


async def serve_dlog() -> None:
    async def sink(req: SinkRequest) -> SinkResponse:
        return SinkResponse(size=len(req.payload))  # type: ignore[arg-type]

    from dlog.net import Route

    server = RpcServer({"bench.sink": Route(sink, inline=True)}, name="bench")
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.run, "127.0.0.1", 0)
        print(port, flush=True)


async def serve_raw() -> None:
    """Length-prefixed frames: echo frames under 64 KiB, answer bigger ones with 4 bytes."""

    async def handle(stream: trio.SocketStream) -> None:
        buf = bytearray()
        while True:
            data = await stream.receive_some(256 * 1024)
            if not data:
                return
            buf += data
            out = []
            pos = 0
            while len(buf) - pos >= 4:
                (n,) = _U32.unpack_from(buf, pos)
                if len(buf) - pos - 4 < n:
                    break
                body = bytes(buf[pos + 4 : pos + 4 + n])
                pos += 4 + n
                out.append(_U32.pack(n) + body if n < 65536 else _U32.pack(0))
            del buf[:pos]
            if out:
                await stream.send_all(b"".join(out))

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    print(listeners[0].socket.getsockname()[1], flush=True)
    await trio.serve_listeners(handle, listeners)


# --- dlog client side ------------------------------------------------------------------


async def dlog_pipelined(addr: str, seconds: float, window: int) -> float:
    async with open_rpc_pool() as pool:
        conn = await pool.connection(addr)
        request = EchoRequest(data="x" * 20)  # ~50-byte header with id, op, body
        inflight: collections.deque = collections.deque()
        done = 0
        deadline = time.perf_counter() + seconds
        start = time.perf_counter()
        while True:
            while len(inflight) < window:
                inflight.append(await conn.start_call(request))
            await inflight.popleft().result()
            done += 1
            if done % 1024 == 0 and time.perf_counter() >= deadline:
                break
        elapsed = time.perf_counter() - start
        while inflight:
            await inflight.popleft().result()
        return done / elapsed


async def dlog_roundtrip(addr: str, seconds: float) -> float:
    async with open_rpc_pool() as pool:
        conn = await pool.connection(addr)
        request = EchoRequest(data="x" * 20)
        done = 0
        deadline = time.perf_counter() + seconds
        start = time.perf_counter()
        while True:
            await conn.call(request)
            done += 1
            if done % 256 == 0 and time.perf_counter() >= deadline:
                break
        return done / (time.perf_counter() - start)


async def dlog_payload(addr: str, seconds: float, window: int = 4) -> float:
    async with open_rpc_pool() as pool:
        conn = await pool.connection(addr)
        request = SinkRequest(payload=PAYLOAD)
        inflight: collections.deque = collections.deque()
        done = 0
        deadline = time.perf_counter() + seconds
        start = time.perf_counter()
        while True:
            while len(inflight) < window:
                inflight.append(await conn.start_call(request))
            resp = await inflight.popleft().result()
            assert resp.size == len(PAYLOAD)
            done += 1
            if time.perf_counter() >= deadline:
                break
        elapsed = time.perf_counter() - start
        while inflight:
            await inflight.popleft().result()
        return done * len(PAYLOAD) / elapsed / 1e6


# --- raw client side -------------------------------------------------------------------


class RawConn:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buf = bytearray()

    async def read_frame(self) -> bytes:
        while True:
            if len(self.buf) >= 4:
                (n,) = _U32.unpack_from(self.buf, 0)
                if len(self.buf) >= 4 + n:
                    body = bytes(self.buf[4 : 4 + n])
                    del self.buf[: 4 + n]
                    return body
            data = await self.stream.receive_some(256 * 1024)
            if not data:
                raise EOFError
            self.buf += data


async def raw_pipelined(port: int, seconds: float, window: int) -> float:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    conn = RawConn(stream)
    frame = _U32.pack(50) + b"x" * 50
    async with trio.open_nursery() as nursery:
        sent = 0
        done = 0
        deadline = time.perf_counter() + seconds
        start = time.perf_counter()
        await stream.send_all(frame * window)
        sent = window
        while True:
            await conn.read_frame()
            done += 1
            if done % 1024 == 0 and time.perf_counter() >= deadline:
                break
            if sent - done < window // 2:
                await stream.send_all(frame * (window // 2))
                sent += window // 2
        elapsed = time.perf_counter() - start
        while done < sent:
            await conn.read_frame()
            done += 1
        nursery.cancel_scope.cancel()
    await stream.aclose()
    return done / elapsed


async def raw_roundtrip(port: int, seconds: float) -> float:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    conn = RawConn(stream)
    frame = _U32.pack(50) + b"x" * 50
    done = 0
    deadline = time.perf_counter() + seconds
    start = time.perf_counter()
    while True:
        await stream.send_all(frame)
        await conn.read_frame()
        done += 1
        if done % 256 == 0 and time.perf_counter() >= deadline:
            break
    elapsed = time.perf_counter() - start
    await stream.aclose()
    return done / elapsed


async def raw_payload(port: int, seconds: float, window: int = 4) -> float:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    conn = RawConn(stream)
    head = _U32.pack(len(PAYLOAD))
    outstanding = 0
    done = 0
    deadline = time.perf_counter() + seconds
    start = time.perf_counter()
    while True:
        while outstanding < window:
            await stream.send_all(head)
            await stream.send_all(PAYLOAD)
            outstanding += 1
        await conn.read_frame()
        outstanding -= 1
        done += 1
        if time.perf_counter() >= deadline:
            break
    elapsed = time.perf_counter() - start
    while outstanding:
        await conn.read_frame()
        outstanding -= 1
    await stream.aclose()
    return done * len(PAYLOAD) / elapsed / 1e6


# --- driver ----------------------------------------------------------------------------


def start_server(mode: str) -> tuple[subprocess.Popen[bytes], int]:
    """Start a server process; it prints its port as its first line."""
    proc = subprocess.Popen([sys.executable, __file__, "--serve", mode], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if not line:
        proc.kill()
        raise RuntimeError(f"{mode} server did not start")
    return proc, int(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--serve", choices=["dlog", "raw"])
    args = parser.parse_args()
    if args.serve:
        trio.run(serve_dlog if args.serve == "dlog" else serve_raw)
        return

    dlog_proc, dlog_port = start_server("dlog")
    raw_proc, raw_port = start_server("raw")
    addr = f"127.0.0.1:{dlog_port}"
    runs: dict[str, list[float]] = collections.defaultdict(list)
    try:
        for _ in range(args.repeat):
            runs["pipelined_req_s"].append(
                trio.run(dlog_pipelined, addr, args.seconds, args.window)
            )
            runs["raw_pipelined_req_s"].append(
                trio.run(raw_pipelined, raw_port, args.seconds, args.window)
            )
            runs["roundtrip_s"].append(trio.run(dlog_roundtrip, addr, args.seconds))
            runs["raw_roundtrip_s"].append(trio.run(raw_roundtrip, raw_port, args.seconds))
            runs["payload_mb_s"].append(trio.run(dlog_payload, addr, args.seconds))
            runs["raw_payload_mb_s"].append(trio.run(raw_payload, raw_port, args.seconds))
    finally:
        dlog_proc.kill()
        raw_proc.kill()
    med = {k: statistics.median(v) for k, v in runs.items()}
    result = {
        "pipelined_req_s": round(med["pipelined_req_s"]),
        "raw_pipelined_req_s": round(med["raw_pipelined_req_s"]),
        "roundtrip_s": round(med["roundtrip_s"]),
        "raw_roundtrip_s": round(med["raw_roundtrip_s"]),
        "roundtrip_ratio": round(med["roundtrip_s"] / med["raw_roundtrip_s"], 3),
        "payload_mb_s": round(med["payload_mb_s"], 1),
        "raw_payload_mb_s": round(med["raw_payload_mb_s"], 1),
        "payload_ratio": round(med["payload_mb_s"] / med["raw_payload_mb_s"], 3),
        "repeat": args.repeat,
        "seconds": args.seconds,
    }
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"dlog.net vs raw trio socket (median of {args.repeat} x {args.seconds:g}s)"
    )
    table.add_column("measure")
    table.add_column("dlog.net", justify="right")
    table.add_column("raw socket", justify="right")
    table.add_column("ratio", justify="right")
    table.add_column("target", justify="right")
    table.add_row(
        "pipelined echo req/s",
        f"{result['pipelined_req_s']:,}",
        f"{result['raw_pipelined_req_s']:,}",
        f"{result['pipelined_req_s'] / result['raw_pipelined_req_s']:.2f}",
        ">= 100,000/s",
    )
    table.add_row(
        "round trips/s (1 in flight)",
        f"{result['roundtrip_s']:,}",
        f"{result['raw_roundtrip_s']:,}",
        f"{result['roundtrip_ratio']:.2f}",
        ">= 0.6 x raw",
    )
    table.add_row(
        "1 MiB payload MB/s",
        f"{result['payload_mb_s']:,}",
        f"{result['raw_payload_mb_s']:,}",
        f"{result['payload_ratio']:.2f}",
        ">= 0.7 x raw",
    )
    Console().print(table)
    result["python"] = python_build()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
