"""``host:port`` addresses, as flags and configs spell them."""

from __future__ import annotations

from dlog.errors import InvalidConfigError


def parse_address(address: str, *, default_port: int | None = None) -> tuple[str, int]:
    """Split ``host:port`` (``[v6]:port`` for IPv6) into its parts.

    Raises InvalidConfigError with a message fit for a CLI user.
    """
    text = address.strip()
    host: str
    port_text: str | None
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise InvalidConfigError(f"bad address {address!r}: unclosed '['")
        host = text[1:end]
        rest = text[end + 1 :]
        if rest and not rest.startswith(":"):
            raise InvalidConfigError(f"bad address {address!r}")
        port_text = rest[1:] if rest else None
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    elif ":" not in text:
        host, port_text = text, None
    else:
        raise InvalidConfigError(f"bad address {address!r}: write IPv6 hosts as [host]:port")
    if port_text is None or port_text == "":
        if default_port is None:
            raise InvalidConfigError(f"bad address {address!r}: expected HOST:PORT")
        return host or "127.0.0.1", default_port
    try:
        port = int(port_text)
    except ValueError:
        raise InvalidConfigError(f"bad address {address!r}: port is not a number") from None
    if not 0 <= port <= 65535:
        raise InvalidConfigError(f"bad address {address!r}: port out of range")
    return host or "127.0.0.1", port


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
