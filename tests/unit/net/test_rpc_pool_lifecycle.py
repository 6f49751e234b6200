"""open_rpc_pool's nursery is exited however its ``async with`` goes."""

from __future__ import annotations

import pytest
import trio

import dlog.net.client as client_module
from dlog.net.client import open_rpc_pool

COMPILED = (client_module.__file__ or "").endswith(".so")


async def test_a_pool_that_fails_to_start_leaves_no_nursery_behind(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if COMPILED:
        pytest.skip("a compiled module's globals cannot be patched; the pure build checks this")

    def broken(pool: object) -> None:
        raise RuntimeError("pool construction failed")

    monkeypatch.setattr(client_module, "FaultInjector", broken)
    # (Raised inside the pool's nursery, as the body's own errors are: in a group.)
    with pytest.raises(BaseExceptionGroup) as raised:
        async with open_rpc_pool():
            pass
    assert raised.group_contains(RuntimeError, match="pool construction failed")
    monkeypatch.undo()
    # trio's nursery and cancel-scope stack is intact: nurseries open and close.
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.sleep, 0)
    async with open_rpc_pool() as pool:
        assert pool is not None


async def test_a_pool_is_entered_once() -> None:
    manager = open_rpc_pool()
    async with manager:
        with pytest.raises(RuntimeError, match="entered once"):
            async with manager:
                pass
