"""dlog.net: CBOR-framed TCP RPC, knowing nothing of brokers.

Layers, bottom up:

- :mod:`dlog.net.framing` (sans-I/O): ``u32 header length | CBOR header | raw payload``;
  :class:`FrameDecoder` turns bytes into frames, :func:`encode_header` frames into bytes.
- :mod:`dlog.net.messages`: :class:`Message` / :class:`Struct` frozen dataclasses, the
  operation registry (:func:`register`) and the body codec. A message's ``payload``
  rides raw after the header (record batches never pass through cbor2).
- :mod:`dlog.net.server`: :class:`RpcServer` -- ``await nursery.start(server.run, host,
  port)`` returns the bound port; handlers are ``async def h(request) -> response``;
  ``Route(h, inline=True)`` for handlers that never block (an inline ``h`` may be a
  plain function: called with no coroutine at all).
- :mod:`dlog.net.client`: ``async with open_rpc_pool() as pool: await pool.call(addr,
  request)``; one pipelined connection per address, reconnect with backoff,
  per-call timeouts, ``pool.faults`` to simulate cut links in tests;
  ``conn.send_oneway(request)`` for messages that want no answer (Raft's, acks=none
  produce): the server handles them and sends nothing back, not even an error.
- :mod:`dlog.net.protocol`: the client/broker operations (produce, fetch, metadata, ...).

Errors are :mod:`dlog.errors` exceptions on both sides: a handler raises
``NotLeaderError(leader=2)``, the caller catches ``NotLeaderError`` with the same details.
"""

from dlog.net.address import format_address, parse_address
from dlog.net.client import ClientConfig, PendingCall, RpcConnection, RpcPool, open_rpc_pool
from dlog.net.framing import NEED_DATA, Frame, FrameDecoder, encode_frame, encode_header
from dlog.net.messages import (
    Message,
    Payload,
    Struct,
    payload_bytes,
    payload_length,
    register,
)
from dlog.net.server import Route, RpcServer, ServerConfig

__all__ = [
    "NEED_DATA",
    "ClientConfig",
    "Frame",
    "FrameDecoder",
    "Message",
    "Payload",
    "PendingCall",
    "Route",
    "RpcConnection",
    "RpcPool",
    "RpcServer",
    "ServerConfig",
    "Struct",
    "encode_frame",
    "encode_header",
    "format_address",
    "open_rpc_pool",
    "parse_address",
    "payload_bytes",
    "payload_length",
    "register",
]
