"""Shared test configuration."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

# CI gets more examples than a developer's quick run; both are deterministic per seed.
settings.register_profile(
    "default",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "ci",
    deadline=None,
    max_examples=300,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

# `make test-compiled` runs the suites against the compiled build: make sure that is
# what they import (a source tree on sys.path would quietly test pure Python instead).
if os.environ.get("DLOG_EXPECT_COMPILED") == "1":
    import dlog.net.client
    import dlog.storage.log

    for _module in (dlog.storage.log, dlog.net.client):
        if not (_module.__file__ or "").endswith(".so"):
            raise RuntimeError(f"{_module.__name__} is not compiled: {_module.__file__}")
