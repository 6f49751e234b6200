"""compose/ runs the same 3-node topology as `cluster up`; its commands must be valid
`dlogctl node run` invocations (checked against the CLI's own flags)."""

from __future__ import annotations

from pathlib import Path

import typer.main
import yaml
from dlogctl.main import app

ROOT = Path(__file__).resolve().parents[2]


def node_run_flags() -> set[str]:
    group = typer.main.get_command(app)
    run = group.commands["node"].commands["run"]  # type: ignore[attr-defined]
    return {opt for param in run.params for opt in param.opts if opt.startswith("--")}


def parse(command: list[str]) -> dict[str, list[str]]:
    assert command[:2] == ["node", "run"]
    flags: dict[str, list[str]] = {}
    for arg in command[2:]:
        name, _, value = arg.partition("=")
        flags.setdefault(name, []).append(value)
    return flags


def test_compose_services_match_the_cli() -> None:
    spec = yaml.safe_load((ROOT / "compose" / "docker-compose.yml").read_text())
    services = spec["services"]
    assert sorted(services) == ["node1", "node2", "node3"]
    known = node_run_flags()
    gossip_addresses = {}
    parsed = {}
    for name, service in services.items():
        flags = parse(service["command"])
        parsed[name] = flags
        assert set(flags) <= known, set(flags) - known
        assert flags["--advertise-gossip"][0].startswith(f"{name}:")
        gossip_addresses[name] = flags["--advertise-gossip"][0]
    node_ids = {flags["--node-id"][0] for flags in parsed.values()}
    assert len(node_ids) == 3
    bootstrappers = [n for n, f in parsed.items() if "--bootstrap-cluster" in f]
    assert bootstrappers == ["node1"]
    for name, flags in parsed.items():
        service = services[name]
        rpc_port = flags["--rpc"][0].rsplit(":", 1)[1]
        assert flags["--advertise-rpc"] == [f"{name}:{rpc_port}"]
        # Clients outside reach the advertised rpc port on the host.
        assert f"{rpc_port}:{rpc_port}/tcp" in service["ports"]
        # Every node joins through the others' gossip addresses.
        assert set(flags["--join"]) == {a for n, a in gossip_addresses.items() if n != name}
        # The data directory is a volume.
        data_dir = flags["--data-dir"][0]
        assert any(v.endswith(f":{data_dir}") for v in service["volumes"])
        health = service["healthcheck"]["test"]
        assert health[1:4] == ["dlogctl", "node", "ping"]
        assert health[health.index("--address") + 1].endswith(f":{rpc_port}")
        # The ping gives up (exit 1, a clean "unhealthy") before Docker kills it.
        ping_timeout = float(health[health.index("--timeout") + 1])
        assert ping_timeout < float(service["healthcheck"]["timeout"].rstrip("s"))
    assert set(spec["volumes"]) == {f"{n}-data" for n in services}


def test_dockerfile_runs_as_non_root_and_installs_the_repo() -> None:
    text = (ROOT / "compose" / "Dockerfile").read_text()
    assert "FROM python:3.11-slim" in text
    assert "USER dlog" in text
    assert "pip install ." in text
    assert 'ENTRYPOINT ["dlogctl"]' in text
