"""docker-compose.yml and the Dockerfile stay in step with the code (static checks, no servers)."""

from __future__ import annotations

import glob
import json
import re
import shlex
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from llooma.credentials import (
    CALLOUT_ISSUER,
    CONTROL_PLANE,
    SYSTEM_USER,
    CredentialStore,
    accounts_block,
    callout_block,
    control_plane_user,
    nkey_user,
    public_key,
)
from llooma.embedded import nats_server_binary
from llooma.host.config import HostConfig

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
HOST_CONFIG_TARGET = "/etc/llooma/host.yaml"
INGRESS_PORT = 8080


@cache
def compose() -> dict[str, Any]:
    loaded = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(loaded, dict), f"{COMPOSE_FILE.name} is not a YAML mapping"
    return loaded


def compose_services() -> dict[str, dict[str, Any]]:
    services = compose().get("services")
    assert isinstance(services, dict), f"{COMPOSE_FILE.name} has no `services` mapping"
    return services


def service(name: str) -> dict[str, Any]:
    services = compose_services()
    assert name in services, f"{COMPOSE_FILE.name} has no service {name!r}"
    return services[name]


def command_of(definition: dict[str, Any]) -> list[str]:
    """The command as an argument list (compose accepts a string or a list)."""
    command = definition.get("command")
    if command is None:
        return []
    if isinstance(command, str):
        return shlex.split(command)
    return [str(part) for part in command]


def environment_of(definition: dict[str, Any]) -> dict[str, str]:
    """The environment as a mapping (compose accepts a mapping or a list of KEY=VALUE)."""
    environment = definition.get("environment") or {}
    if isinstance(environment, list):
        pairs = (str(item).partition("=") for item in environment)
        return {key: value for key, _, value in pairs}
    return {str(key): str(value) for key, value in environment.items()}


def service_folders() -> list[str]:
    """Every folder under services/ that is a runnable service (has a main.py)."""
    return sorted(p.parent.name for p in (ROOT / "services").glob("*/main.py"))


def python_module_services() -> dict[str, str]:
    """Compose service name -> the services.<name> module it runs with `python -m`."""
    found: dict[str, str] = {}
    for name, definition in compose_services().items():
        command = command_of(definition)
        if len(command) == 3 and command[0] == "python" and command[1] == "-m":
            found[name] = command[2]
    return found


def bind_mounts(definition: dict[str, Any]) -> list[tuple[str, str]]:
    """(source, target) of every volume entry, short or long syntax."""
    mounts: list[tuple[str, str]] = []
    for volume in definition.get("volumes") or []:
        if isinstance(volume, str):
            source, _, rest = volume.partition(":")
            mounts.append((source, rest.partition(":")[0]))
        else:
            mounts.append((str(volume.get("source", "")), str(volume.get("target", ""))))
    return mounts


def host_worker_configs() -> dict[str, Path]:
    """Compose service name -> the local host YAML mounted where its `--config` points."""
    found: dict[str, Path] = {}
    for name, definition in compose_services().items():
        command = command_of(definition)
        if command[:2] != ["llooma", "host"]:
            continue
        assert "--config" in command, f"host worker {name!r} runs without --config"
        target = command[command.index("--config") + 1]
        sources = [src for src, dst in bind_mounts(definition) if dst == target]
        assert sources, f"host worker {name!r}: nothing is mounted at its config path {target}"
        found[name] = (ROOT / sources[0]).resolve()
    return found


def published_ports(definition: dict[str, Any]) -> list[tuple[int | None, int]]:
    """(published, container) pairs; published is None when Docker picks it."""
    pairs: list[tuple[int | None, int]] = []
    for port in definition.get("ports") or []:
        if isinstance(port, dict):
            published = port.get("published")
            pairs.append((int(published) if published else None, int(port["target"])))
            continue
        parts = str(port).partition("/")[0].split(":")
        container = int(parts[-1])
        pairs.append((int(parts[-2]) if len(parts) >= 2 and parts[-2] else None, container))
    return pairs


def dockerfile_instructions() -> list[str]:
    """Instructions with line continuations joined and comments dropped."""
    instructions: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        instructions.append(pending + line)
        pending = ""
    if pending:
        instructions.append(pending)
    return instructions


def split_arguments(text: str) -> list[str]:
    """A Dockerfile instruction's arguments, in JSON (exec) or shell form."""
    if text.startswith("["):
        return [str(arg) for arg in json.loads(text)]
    return shlex.split(text)


def in_build_context(source: str) -> bool:
    """Whether a COPY source (possibly a wildcard) matches something in the build context."""
    if glob.has_magic(source):
        return bool(glob.glob(str(ROOT / source)))
    return (ROOT / source).exists()


def copy_sources() -> list[str]:
    """The build-context sources of every COPY / ADD (not those copied from another stage)."""
    sources: list[str] = []
    for instruction in dockerfile_instructions():
        keyword, _, rest = instruction.partition(" ")
        if keyword.upper() not in ("COPY", "ADD"):
            continue
        args = split_arguments(rest.strip())
        flags = [arg for arg in args if arg.startswith("--")]
        if any(flag.startswith("--from") for flag in flags):
            continue
        paths = [arg for arg in args if not arg.startswith("--")]
        assert len(paths) >= 2, f"Dockerfile: {instruction!r} needs a source and a destination"
        sources.extend(paths[:-1])
    return sources


# -- the services --------------------------------------------------------------------------


def test_every_service_folder_runs_in_compose() -> None:
    folders = service_folders()
    assert folders, "no services/*/main.py found"
    services = compose_services()
    missing = [folder for folder in folders if folder not in services]
    assert not missing, f"{COMPOSE_FILE.name} lacks services for: {', '.join(missing)}"
    wrong = {
        folder: " ".join(command_of(services[folder]))
        for folder in folders
        if command_of(services[folder]) != ["python", "-m", f"services.{folder}"]
    }
    assert not wrong, (
        "these services are not started with `python -m services.<folder>`: "
        + "; ".join(f"{name}: {command or '(no command)'}" for name, command in wrong.items())
    )


def test_no_compose_service_runs_a_missing_module() -> None:
    folders = set(service_folders())
    unknown = {
        name: module
        for name, module in python_module_services().items()
        if module.removeprefix("services.") not in folders
    }
    assert not unknown, f"compose runs modules with no services/<name>/main.py: {unknown}"


@pytest.mark.parametrize("folder", service_folders())
def test_service_reaches_nats_and_the_collector(folder: str) -> None:
    environment = environment_of(service(folder))
    nats_url = environment.get("NATS_URL", "")
    assert nats_url.startswith("nats://"), f"{folder}: NATS_URL is {nats_url or 'unset'}"
    nats_host = nats_url.removeprefix("nats://").partition(":")[0]
    assert nats_host in compose_services(), f"{folder}: NATS_URL names no compose service"
    assert environment.get("OTEL_EXPORTER_OTLP_ENDPOINT"), (
        f"{folder}: OTEL_EXPORTER_OTLP_ENDPOINT is unset"
    )
    depends_on = service(folder).get("depends_on") or {}
    assert nats_host in depends_on, f"{folder}: does not depend on {nats_host}"


OTLP_HTTP_PORT = 4318


def tracing_processes() -> dict[str, dict[str, str]]:
    """Every service and host worker -> its environment (all of them export spans)."""
    names = [*service_folders(), *host_worker_configs()]
    return {name: environment_of(service(name)) for name in names}


@pytest.mark.parametrize("name", sorted(tracing_processes()))
def test_every_process_exports_traces_over_otlp_http(name: str) -> None:
    environment = tracing_processes()[name]
    endpoint = environment.get("OTEL_EXPORTER_OTLP_ENDPOINT", "")
    # The image has the OTLP/HTTP exporter only: a gRPC endpoint (4317) would export nothing.
    assert environment.get("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf") == "http/protobuf"
    host, _, port = endpoint.removeprefix("http://").partition(":")
    assert endpoint.startswith("http://"), f"{name}: OTEL_EXPORTER_OTLP_ENDPOINT is {endpoint!r}"
    assert host in compose_services(), f"{name}: the trace endpoint names no compose service"
    assert int(port.rstrip("/") or 80) == OTLP_HTTP_PORT, f"{name}: {endpoint} is not OTLP/HTTP"
    if name in service_folders():
        assert environment.get("OTEL_SERVICE_NAME", name) == name, (
            f"{name}: traces would show it as {environment.get('OTEL_SERVICE_NAME')!r}"
        )


def test_accounting_waits_for_migrations() -> None:
    depends_on = service("accounting").get("depends_on") or {}
    assert isinstance(depends_on, dict), "accounting: depends_on must name conditions"
    assert "migrate" in depends_on, "accounting does not depend on the migrate service"
    condition = depends_on["migrate"].get("condition")
    assert condition == "service_completed_successfully", (
        f"accounting waits for migrate with condition {condition!r}"
    )
    assert command_of(service("migrate")) == ["llooma", "migrate"]


# -- infrastructure ------------------------------------------------------------------------


def test_nats_runs_with_jetstream() -> None:
    nats = service("nats")
    assert str(nats.get("image", "")).startswith("nats:"), "the nats service is not a NATS image"
    command = command_of(nats)
    assert "-js" in command or "--jetstream" in command, (
        f"nats runs without JetStream (-js); its command is {command}"
    )


def test_nats_config_fsyncs_before_ack_and_the_server_accepts_it() -> None:
    nats = service("nats")
    command = command_of(nats)
    config_path = command[command.index("-c") + 1]
    mounts = {
        str(volume).split(":")[1]: str(volume).split(":")[0]
        for volume in nats.get("volumes", [])
        if str(volume).startswith("./")
    }
    assert config_path in mounts, f"{config_path} is not mounted into the nats container"
    local = ROOT / mounts[config_path]
    text = local.read_text()
    assert re.search(r"sync_interval:\s*always", text), "JetStream does not fsync before ack"
    checked = subprocess.run(
        [nats_server_binary(), "-c", str(local), "-t"], capture_output=True, text=True, timeout=30
    )
    assert checked.returncode == 0, checked.stderr or checked.stdout


def test_postgres_exists_and_reports_health() -> None:
    postgres = service("postgres")
    assert str(postgres.get("image", "")).startswith("postgres:")
    assert "POSTGRES_PASSWORD" in environment_of(postgres), "postgres has no POSTGRES_PASSWORD"
    test = postgres.get("healthcheck", {}).get("test", [])
    assert "pg_isready" in " ".join(test if isinstance(test, list) else [test]), (
        "postgres has no pg_isready healthcheck"
    )


def test_every_build_points_at_an_existing_dockerfile() -> None:
    built = 0
    for name, definition in compose_services().items():
        build = definition.get("build")
        if build is None:
            continue
        built += 1
        if isinstance(build, str):
            context, dockerfile = build, "Dockerfile"
        else:
            context, dockerfile = build.get("context", "."), build.get("dockerfile", "Dockerfile")
        path = (ROOT / context / dockerfile).resolve()
        assert path.is_file(), f"service {name!r} builds from {path}, which does not exist"
    assert built, f"no service in {COMPOSE_FILE.name} is built from a Dockerfile"


def test_dockerfile_copy_sources_exist() -> None:
    sources = copy_sources()
    assert sources, "the Dockerfile copies nothing"
    missing = [source for source in sources if not in_build_context(source)]
    assert not missing, f"the Dockerfile COPYs paths that do not exist: {', '.join(missing)}"


# -- host workers and the published API ----------------------------------------------------


def test_host_workers_mount_valid_configs() -> None:
    configs = host_worker_configs()
    assert configs, f"{COMPOSE_FILE.name} runs no host worker (`llooma host --config ...`)"
    names: dict[str, str] = {}
    for service_name, path in configs.items():
        assert path.is_file(), f"host worker {service_name!r} mounts {path}, which does not exist"
        try:
            config = HostConfig.model_validate(yaml.safe_load(path.read_text()))
        except ValidationError as error:
            pytest.fail(f"{path.relative_to(ROOT)} is not a valid HostConfig:\n{error}")
        nats_host = config.nats_url.removeprefix("nats://").partition(":")[0]
        assert nats_host in compose_services(), (
            f"{path.relative_to(ROOT)}: nats_url {config.nats_url} names no compose service"
        )
        assert config.name not in names, (
            f"host workers {names.get(config.name)!r} and {service_name!r} share the id"
            f" {config.name!r}"
        )
        names[config.name] = service_name


def test_ingress_publishes_its_port() -> None:
    ingress = service("ingress")
    ports = published_ports(ingress)
    assert (INGRESS_PORT, INGRESS_PORT) in ports, (
        f"ingress does not publish {INGRESS_PORT}:{INGRESS_PORT}; its ports are {ports}"
    )
    host = environment_of(ingress).get("LLOOMA_HTTP_HOST")
    assert host == "0.0.0.0", f"ingress listens on {host or '127.0.0.1'}, unreachable from outside"


# -- the host boundary: accounts and keys --------------------------------------------------

DEV_CREDENTIALS = ROOT / "deploy" / "nats" / "dev-credentials"


def dev_key(name: str) -> str:
    return public_key((DEV_CREDENTIALS / f"{name}.nk").read_bytes().strip())


def mounted_files(definition: dict[str, Any]) -> dict[str, Path]:
    """Container path -> local file for every bind mount of a file in the repository."""
    found = {}
    for volume in definition.get("volumes", []):
        source, _, rest = str(volume).partition(":")
        if source.startswith("./"):
            found[rest.split(":")[0]] = ROOT / source
    return found


def test_nats_config_has_the_embedded_servers_accounts_layout() -> None:
    """The same accounts, exports, imports and auth callout as `llooma up` renders, for the
    dev keys; no host in it."""
    control, system = dev_key(CONTROL_PLANE), dev_key(SYSTEM_USER)
    expected = accounts_block([control_plane_user(control)], [nkey_user(system)]) + callout_block(
        dev_key(CALLOUT_ISSUER), [control, system]
    )
    text = (ROOT / "deploy" / "nats" / "nats.conf").read_text()
    assert expected in text, "deploy/nats/nats.conf differs from llooma.credentials"
    for host in ("host-a", "host-b"):
        assert dev_key(host) not in text


def test_the_dev_registry_admits_the_compose_hosts_and_no_reserved_name() -> None:
    """The callout service answers from this registry: each compose host with its own key."""
    store = CredentialStore(DEV_CREDENTIALS)
    assert store.hosts() == {name: dev_key(name) for name in ("host-a", "host-b")}
    for name in (CONTROL_PLANE, SYSTEM_USER, CALLOUT_ISSUER):
        assert store.public(name) == dev_key(name)


@pytest.mark.parametrize("folder", service_folders())
def test_every_service_connects_with_the_control_planes_key(folder: str) -> None:
    name = next(n for n, m in python_module_services().items() if m == f"services.{folder}")
    definition = service(name)
    seed_file = environment_of(definition).get("LLOOMA_NATS_NKEY_SEED_FILE")
    assert seed_file, f"{name} has no LLOOMA_NATS_NKEY_SEED_FILE"
    mounted = mounted_files(definition)
    assert seed_file in mounted, f"{name} does not mount {seed_file}"
    assert mounted[seed_file] == DEV_CREDENTIALS / f"{CONTROL_PLANE}.nk"


def test_every_host_mounts_only_its_own_key() -> None:
    for service_name, path in host_worker_configs().items():
        config = HostConfig.model_validate(yaml.safe_load(path.read_text()))
        definition = service(service_name)
        assert config.credentials is not None, f"{service_name} has no credentials"
        mounted = mounted_files(definition)
        assert mounted.get(str(config.credentials)) == DEV_CREDENTIALS / f"{config.name}.nk"
        assert DEV_CREDENTIALS / f"{CONTROL_PLANE}.nk" not in mounted.values()
        assert "LLOOMA_NATS_NKEY_SEED_FILE" not in environment_of(definition)
        assert "DATABASE_URL" not in environment_of(definition)
