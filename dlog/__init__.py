"""dlog: a Kafka-style replicated, ordered log on trio."""

from __future__ import annotations

__version__ = "0.1.0"
