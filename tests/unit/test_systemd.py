"""deploy/systemd/*.service stay valid and in step with the code: parsed here (sections,
keys, an absolute ExecStart running something that exists), and checked by
`systemd-analyze verify` where it is installed; the example NATS node config by nats-server."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from llooma.embedded import nats_server_binary

ROOT = Path(__file__).resolve().parents[2]
UNITS = sorted((ROOT / "deploy" / "systemd").glob("*.service"))
SECTIONS = {"Unit", "Service", "Install"}
SERVICE_KEYS = {
    "Type", "User", "Group", "WorkingDirectory", "EnvironmentFile", "Environment", "ExecStart",
    "ExecReload", "KillSignal", "TimeoutStopSec", "Restart", "RestartSec",
    "RestartPreventExitStatus", "NoNewPrivileges", "ProtectSystem", "ProtectHome",
    "PrivateTmp", "ReadWritePaths", "LimitNOFILE",
}  # fmt: skip


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """systemd's INI dialect: [Section], Key=Value (a key may repeat), # and ; comments."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if match := re.fullmatch(r"\[(\w+)\]", line):
            current = sections.setdefault(match[1], {})
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}:{number}: not Key=Value: {raw!r}"
        assert current is not None, f"{path.name}:{number}: a key before any section"
        assert re.fullmatch(r"[A-Za-z]+", key), f"{path.name}:{number}: bad key {key!r}"
        current.setdefault(key, []).append(value.strip())
    return sections


def test_there_are_units_for_every_role() -> None:
    names = {unit.name for unit in UNITS}
    assert {"llooma@.service", "llooma-host.service", "llooma-nats.service"} <= names


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_unit_parses_and_runs_something_that_exists(unit: Path) -> None:
    sections = parse_unit(unit)
    assert set(sections) == SECTIONS, f"{unit.name}: sections {sorted(sections)}"
    assert sections["Unit"].get("Description"), f"{unit.name}: no Description"
    service = sections["Service"]
    unknown = set(service) - SERVICE_KEYS
    assert not unknown, f"{unit.name}: keys this test does not know: {unknown}"
    (exec_start,) = service["ExecStart"]
    program, *args = exec_start.split()
    assert program.startswith("/"), f"{unit.name}: ExecStart must be an absolute path"
    assert service.get("Restart", [""])[0] in ("always", "on-failure")
    assert sections["Install"].get("WantedBy") == ["multi-user.target"]
    if args[:2] == ["-m", "services.%i"]:
        # Every instance named in the unit's comment is a service folder.
        named = re.findall(r"llooma@(\w+)", unit.read_text())
        folders = {p.parent.name for p in (ROOT / "services").glob("*/main.py")}
        assert set(named) >= folders, f"{unit.name} does not name {folders - set(named)}"
        assert set(named) <= folders | {"i"}, f"{unit.name} names {set(named) - folders}"
    if args[:1] == ["host"]:
        assert "--config" in args


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_environment_files_have_examples(unit: Path) -> None:
    for path in parse_unit(unit)["Service"].get("EnvironmentFile", []):
        example = ROOT / "deploy" / "systemd" / (Path(path.lstrip("-")).name + ".example")
        assert example.is_file(), f"{unit.name} reads {path}; no {example.name} shows it"
        for number, line in enumerate(example.read_text().splitlines(), start=1):
            if line.strip() and not line.startswith("#"):
                assert re.fullmatch(r"[A-Z][A-Z0-9_]*=\S*", line), f"{example.name}:{number}"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze here")
@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_systemd_analyze_verify(unit: Path, tmp_path: Path) -> None:
    # verify checks that ExecStart's program exists: point it at stand-ins on this machine.
    text = unit.read_text().replace("/opt/llooma/.venv/bin/", f"{tmp_path}/bin/")
    text = text.replace("/usr/local/bin/nats-server", f"{tmp_path}/bin/nats-server")
    (tmp_path / "bin").mkdir()
    for name in ("python", "llooma", "nats-server"):
        stand_in = tmp_path / "bin" / name
        stand_in.write_text("#!/bin/sh\n")
        stand_in.chmod(0o755)
    name = unit.name.replace("@.service", "@ingress.service")
    (tmp_path / name).write_text(text)
    checked = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(tmp_path / name)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    complaints = [
        line
        for line in (checked.stderr + checked.stdout).splitlines()
        if str(tmp_path) in line or unit.name.split("@")[0] in line
    ]
    # Users, groups and the environment file exist only on a deployed machine.
    complaints = [c for c in complaints if "EnvironmentFile" not in c and "user" not in c]
    assert not complaints, "\n".join(complaints)
    assert checked.returncode == 0, checked.stderr


def test_cluster_node_example_passes_nats_server_check() -> None:
    example = ROOT / "deploy" / "nats" / "cluster-node.conf.example"
    checked = subprocess.run(
        [nats_server_binary(), "-c", str(example), "-t"], capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stderr or checked.stdout
