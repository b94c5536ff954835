#!/usr/bin/env python3
"""Build qflow's CUDA kernels into native/build/libqflow_kernels.so with nvcc.

    python native/build.py                 # build if a source is newer than the .so
    python native/build.py --force         # always rebuild
    python native/build.py --check-only    # compile and link into a temp dir, keep nothing
    python native/build.py --require-nvcc  # a missing nvcc is an error (exit 1)

No GPU is needed to compile. Without nvcc the script says so and exits 0, so
`make native` / `make test` work on CPU-only machines (the CUDA backend then
reports itself unavailable); `--require-nvcc` turns that into a failure.
A compile error exits with nvcc's status. nvcc is looked up on PATH, then in
$CUDA_HOME/bin and /usr/local/cuda/bin; set NVCC to override.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
BUILD_DIR = HERE / "build"
LIBRARY = BUILD_DIR / "libqflow_kernels.so"
SOURCES = sorted(HERE.glob("*.cu"))
HEADERS = sorted(HERE.glob("*.cuh")) + sorted(HERE.glob("*.h"))

# sm_80 (A100) and sm_90 (H100/H200) cubins, plus compute_90 PTX for newer GPUs to JIT.
GENCODE = [
    "-gencode", "arch=compute_80,code=sm_80",
    "-gencode", "arch=compute_90,code=sm_90",
    "-gencode", "arch=compute_90,code=compute_90",
]
COMPILE_FLAGS = [
    "-O3", "-std=c++17", "-lineinfo",
    "-Xcompiler", "-fPIC,-Wall,-Wextra,-Werror,-Wno-unknown-pragmas,-ffp-contract=off",
    "-Werror", "all-warnings",   # nvcc / front-end warnings are errors too
]
# Symbols qflow/kernels/cuda.py binds; the build fails if one is missing.
EXPORTS = [
    "qflow_abi_version", "qflow_error_string", "qflow_cuda_versions", "qflow_busy_wait",
    "qflow_group_minmax", "qflow_params_from_minmax", "qflow_compute_params",
    "qflow_quantize", "qflow_quantize_pack", "qflow_fake_quant", "qflow_dequantize",
    "qflow_dequantize_packed", "qflow_pack", "qflow_unpack", "qflow_gemv_w4a16",
]
EXPORTS += ["qflow_host_" + name[len("qflow_"):] for name in EXPORTS
            if name not in ("qflow_abi_version", "qflow_error_string", "qflow_cuda_versions",
                            "qflow_busy_wait")]


def find_nvcc() -> str | None:
    if os.environ.get("NVCC"):
        return os.environ["NVCC"]
    found = shutil.which("nvcc")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and (Path(root) / "bin" / "nvcc").is_file():
            return str(Path(root) / "bin" / "nvcc")
    return None


def up_to_date() -> bool:
    if not LIBRARY.is_file():
        return False
    built = LIBRARY.stat().st_mtime
    inputs = SOURCES + HEADERS + [Path(__file__).resolve()]
    return all(p.stat().st_mtime <= built for p in inputs)


def run(cmd: list[str]) -> int:
    print("+ " + " ".join(cmd), flush=True)
    return subprocess.run(cmd).returncode


def compile_and_link(nvcc: str, out_dir: Path, library: Path, extra: list[str]) -> int:
    """Compile every .cu to an object in parallel (one nvcc per file), then link."""
    objects = [out_dir / (src.stem + ".o") for src in SOURCES]
    threads = "2" if (os.cpu_count() or 1) >= 2 * len(SOURCES) else "1"
    commands = [[nvcc, *COMPILE_FLAGS, *extra, *GENCODE, "--threads", threads, "-I", str(HERE),
                 "-c", str(src), "-o", str(obj)] for src, obj in zip(SOURCES, objects)]
    with ThreadPoolExecutor(max_workers=len(commands)) as pool:
        codes = list(pool.map(run, commands))
    if any(codes):
        return next(code for code in codes if code)
    return run([nvcc, "-shared", *GENCODE, "-o", str(library), *map(str, objects)])


def missing_exports(library: Path) -> list[str] | None:
    """Exported names not found in the library; None when nm is unavailable."""
    nm = shutil.which("nm")
    if nm is None:
        return None
    listing = subprocess.run([nm, "-D", "--defined-only", str(library)], capture_output=True, text=True)
    if listing.returncode != 0:
        return None
    defined = {line.split()[-1] for line in listing.stdout.splitlines() if line.strip()}
    return [name for name in EXPORTS if name not in defined]


def build(nvcc: str, library: Path, extra: list[str]) -> int:
    library.parent.mkdir(parents=True, exist_ok=True)
    # build in a private temp dir and rename: concurrent builds never see a half-written .so
    with tempfile.TemporaryDirectory(prefix=".qflow-build-", dir=library.parent) as tmp:
        staged = Path(tmp) / library.name
        started = time.perf_counter()
        rc = compile_and_link(nvcc, Path(tmp), staged, extra)
        if rc != 0:
            print(f"native/build.py: nvcc failed (exit {rc})", file=sys.stderr)
            return rc
        missing = missing_exports(staged)
        if missing:
            print(f"native/build.py: library lacks symbols {missing}", file=sys.stderr)
            return 1
        os.replace(staged, library)
    print(f"native/build.py: built {library} in {time.perf_counter() - started:.1f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
    parser.add_argument("--check-only", action="store_true",
                        help="compile and link into a temporary directory; keep nothing")
    parser.add_argument("--require-nvcc", action="store_true",
                        help="exit 1 (not 0) when nvcc is missing")
    parser.add_argument("--resource-usage", action="store_true",
                        help="print registers/spills per kernel (ptxas -v)")
    parser.add_argument("--optional", action="store_true",
                        help="accepted for compatibility: a missing nvcc is already not an error")
    args = parser.parse_args(argv)

    nvcc = find_nvcc()
    if nvcc is None:
        print("native/build.py: nvcc not found (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin); "
              "skipping the CUDA kernels. qflow uses its numba/torch kernels instead. "
              "Install the CUDA toolkit or set NVCC=/path/to/nvcc to build them.")
        return 1 if args.require_nvcc else 0

    extra = ["-Xptxas", "-v"] if args.resource_usage else []
    if args.check_only:
        with tempfile.TemporaryDirectory(prefix="qflow-check-") as tmp:
            return build(nvcc, Path(tmp) / LIBRARY.name, extra)
    if not args.force and not args.resource_usage and up_to_date():
        print(f"native/build.py: {LIBRARY} is up to date")
        return 0
    return build(nvcc, LIBRARY, extra)


if __name__ == "__main__":
    sys.exit(main())
