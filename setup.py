"""The optional compiled build.

``DLOG_COMPILE=1 pip install --no-build-isolation .`` (``make compiled`` does it, into
``.venv-compiled``) compiles the modules below with mypyc, from the same typed source:
the storage engine's append and read path and the RPC layer, where profiles show
per-message and per-batch Python overhead bounding throughput. Without
``DLOG_COMPILE=1`` (the default, and every editable install) dlog is pure Python.
A compiled install needs mypy (for mypyc) and a C compiler in the installing venv.

Compiled modules differ from the pure ones in two ways code must allow for: a compiled
class's methods cannot be patched (and it cannot be subclassed by an interpreted class
unless marked ``@mypyc_attr(allow_interpreted_subclasses=True)``), and ``raise E from
exc`` leaves ``E.__cause__`` unset (``exc`` is still its ``__context__``; ``from None``
does not suppress the context either). Code that needs to know why an error happened
must not read ``__cause__`` alone.

Never compile into the source tree: a stale extension module next to its ``.py``
is imported instead of it, and edits would silently not take effect.
"""

from __future__ import annotations

import os
import sys

from setuptools import setup

COMPILED_MODULES = [
    "dlog/storage/batch.py",
    "dlog/storage/index.py",
    "dlog/storage/segment.py",
    "dlog/storage/log.py",
    "dlog/storage/epoch_cache.py",
    "dlog/net/framing.py",
    "dlog/net/writer.py",
    "dlog/net/client.py",
    "dlog/net/server.py",
]


def ext_modules() -> list:  # type: ignore[type-arg]
    if os.environ.get("DLOG_COMPILE") != "1":
        return []
    if {"develop", "editable_wheel"} & set(sys.argv):
        raise SystemExit("DLOG_COMPILE=1 is for non-editable installs (see setup.py)")
    from mypyc.build import mypycify

    return mypycify(COMPILED_MODULES, opt_level="3")


setup(ext_modules=ext_modules())
