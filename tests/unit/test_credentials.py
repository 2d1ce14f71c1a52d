"""The credential store the auth callout answers from: reserved names, concurrent writers, and
a server config that names no host."""

from __future__ import annotations

import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from llooma.credentials import RESERVED_NAMES, CredentialStore, public_key, render_nats_config
from llooma.embedded import nats_server_binary


def test_concurrent_issues_and_revokes_lose_no_entry(tmp_path: Path) -> None:
    store = CredentialStore(tmp_path)
    names = [f"host-{index}" for index in range(48)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(store.issue, names))
    assert sorted(store.hosts()) == sorted(names)
    for name in names:
        assert store.hosts()[name] == public_key(store.seed_path(name).read_bytes())
    with ThreadPoolExecutor(16) as pool:
        assert all(pool.map(store.revoke, names[::2]))
    assert sorted(store.hosts()) == sorted(names[1::2])


@pytest.mark.parametrize("name", RESERVED_NAMES)
def test_a_reserved_name_is_never_issued_to_a_host(tmp_path: Path, name: str) -> None:
    store = CredentialStore(tmp_path)
    store.control_plane_seed()
    with pytest.raises(ValueError, match="control plane"):
        store.issue(name)
    assert not store.revoke(name)
    assert name not in store.hosts()


def test_the_server_config_names_no_host_and_is_valid(tmp_path: Path) -> None:
    store = CredentialStore(tmp_path / "credentials")
    store.issue("host-a")
    config = render_nats_config(store, 4222, tmp_path / "jetstream")
    assert store.hosts()["host-a"] not in config
    assert "auth_callout" in config
    (tmp_path / "nats.conf").write_text(config)
    checked = subprocess.run(
        [nats_server_binary(), "-c", str(tmp_path / "nats.conf"), "-t"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    store.issue("host-b")
    assert render_nats_config(store, 4222, tmp_path / "jetstream") == config
