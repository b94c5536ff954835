"""CUDA kernels (native/): nvcc build, host twins vs the reference, GPU numerics.

Without a GPU the kernels' per-thread code still runs through its host twins
(``qflow.kernels.cuda.host``), so the arithmetic and indexing are checked bit
for bit against qflow.quant.affine / packing wherever nvcc exists. The tests
marked ``gpu`` compare the CUDA kernels with the CPU dispatcher and are
skipped when torch sees no CUDA device (native/check_gpu.py is the full check).
"""

from __future__ import annotations

import importlib.util
import math
import re
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from qflow.kernels import cuda
from qflow.kernels.params import LOOKUPS, SCALE_DTYPES, SCHEMES
from qflow.quant import affine, dispatch, packing
from qflow.quant.dispatch import kernel_params
from qflow.quant.spec import QuantSpec

ROOT = Path(__file__).resolve().parents[1]
NATIVE = ROOT / "native"
NO_NVCC = "nvcc is not on PATH, so the CUDA kernels cannot be compiled on this machine"
NO_GPU = "torch sees no CUDA device"


def _load_build_script():
    spec = importlib.util.spec_from_file_location("qflow_native_build", NATIVE / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def built_library() -> Path:
    """Build native/ (incremental: a no-op when the .so is newer than its sources)."""
    if shutil.which("nvcc") is None:
        pytest.skip(NO_NVCC)
    proc = subprocess.run([sys.executable, str(NATIVE / "build.py")], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"native/build.py failed:\n{proc.stdout}\n{proc.stderr}"
    assert cuda.library_path().is_file()
    return cuda.library_path()


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Integer view for bit-for-bit comparison (distinguishes -0.0, compares NaN payloads)."""
    t = t.detach().cpu()
    if t.dtype == torch.float32:
        return t.view(torch.int32)
    if t.dtype == torch.float16:
        return t.view(torch.int16)
    return t


def assert_bitwise(got: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    assert got.dtype == ref.dtype and got.shape == ref.shape, \
        f"{what}: {got.dtype} {tuple(got.shape)} vs {ref.dtype} {tuple(ref.shape)}"
    differ = (_bits(got) != _bits(ref)).nonzero()
    assert differ.numel() == 0, \
        f"{what}: {differ.shape[0]} of {got.numel()} differ, first at {differ[0].tolist()}: " \
        f"{got.cpu()[tuple(differ[0])].item()!r} vs {ref[tuple(differ[0])].item()!r}"


def _weight(shape, seed: int, special: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * (0.02 + torch.rand(shape[0], 1, generator=g))
    if special:
        w[0] = 0.0
        w[1] = 0.37
        w[2] = w[2].abs()
        w[3] *= 1e-9   # fp16 scale underflows -> 2^-24 guard
        w[4] *= 1e5    # fp16 scale overflows -> guard
        w[5, ::3] = 0.0
    return w


SPECS = [
    *(QuantSpec(bits=b, group_size=g, pad_last_group=True) for b in (2, 3, 4, 5, 6, 8) for g in (32, 128)),
    *(QuantSpec(bits=b, scheme=s, symmetric=s.startswith("sym"), group_size=64)
      for b in (3, 4, 8) for s in ("asym_a", "sym_f", "sym_r")),
    QuantSpec(bits=4, group_size=-1), QuantSpec(bits=8, group_size=0, symmetric=True),
    QuantSpec(bits=4, group_size=0),
    QuantSpec(bits=4, scheme="asym_h", zero_float=True, group_size=64),
    QuantSpec(bits=4, group_size=128, scale_dtype="bfloat16"),
    QuantSpec(bits=4, group_size=128, scale_dtype="float32"),
    QuantSpec(format="nf4", group_size=64), QuantSpec(format="fp4", group_size=32),
    QuantSpec(format="nf4", group_size=48, pad_last_group=True),
]
SHAPES = [(24, 256), (13, 999)]  # vector paths; scalar paths with partial groups and words


def _seed(*parts) -> int:
    """A fixed seed per test case (Python's hash() of a str changes between runs)."""
    return zlib.crc32(repr(parts).encode())


def _spec_id(spec: QuantSpec) -> str:
    if spec.format != "int":
        return f"{spec.format}-g{spec.group_size}"
    return f"int{spec.bits}-{spec.scheme}-g{spec.group_size}-{spec.scale_dtype}{'-zf' if spec.zero_float else ''}"


# ---- build ---------------------------------------------------------------------------

def test_build_compiles_for_sm80_sm90(built_library):
    """native/build.py compiles both architectures with warnings as errors (incremental)."""
    listing = subprocess.run(["cuobjdump", "--list-elf", str(built_library)], capture_output=True, text=True) \
        if shutil.which("cuobjdump") else None
    if listing is not None and listing.returncode == 0:
        assert "sm_80" in listing.stdout and "sm_90" in listing.stdout, listing.stdout


def test_build_without_nvcc_is_a_message_not_a_failure(monkeypatch, capsys):
    build = _load_build_script()
    monkeypatch.setattr(build, "find_nvcc", lambda: None)
    assert build.main([]) == 0
    assert "nvcc not found" in capsys.readouterr().out
    assert build.main(["--check-only"]) == 0
    assert build.main(["--require-nvcc"]) == 1


# ---- the binding without a GPU -------------------------------------------------------

def test_cuda_module_imports_without_touching_cuda():
    code = ("import qflow.kernels.cuda as c, torch; assert c._lib is None; "
            "print(c.available(), torch.cuda.is_available())")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    available, has_gpu = proc.stdout.split()
    if has_gpu == "False":
        assert available == "False"


def test_available_is_false_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert cuda.available() is False


def test_tables_in_the_kernels_equal_the_reference():
    source = (NATIVE / "qflow_math.cuh").read_text()
    for name, table in (("NF4", affine.NF4_TABLE), ("FP4", affine.FP4_TABLE)):
        body = re.search(rf"#define QFLOW_{name}_VALUES((?:.*\\\n)*.*)", source).group(1)  # with continuations
        literals = re.findall(r"-?0x[0-9a-fA-F.]+p[+-]?\d+f", body)
        values = np.array([float.fromhex(x[:-1]) for x in literals], dtype=np.float32)
        expected = np.array(table, dtype=np.float32)
        assert values.tobytes() == expected.tobytes(), name  # bytes: the -0.0 of fp4 code 8 counts


def test_header_constants_match_the_binding():
    header = (NATIVE / "qflow_kernels.h").read_text()
    defines = dict(re.findall(r"#define (QFLOW_\w+) (\d+)", header))
    assert int(defines["QFLOW_ABI_VERSION"]) == cuda.ABI_VERSION
    for scheme, value in SCHEMES.items():
        assert int(defines[f"QFLOW_SCHEME_{scheme.upper()}"]) == value
    assert int(defines["QFLOW_KIND_AFFINE"]) == cuda._KIND_AFFINE == LOOKUPS["none"]
    assert int(defines["QFLOW_KIND_NF4"]) == LOOKUPS["nf4"]
    assert int(defines["QFLOW_KIND_FP4"]) == LOOKUPS["fp4"]
    assert int(defines["QFLOW_KIND_AFFINE_FLOAT_ZERO"]) == cuda._KIND_AFFINE_FLOAT_ZERO
    for dtype, suffix in (("float32", "F32"), ("float16", "F16"), ("bfloat16", "BF16")):
        assert int(defines[f"QFLOW_SCALE_{suffix}"]) == SCALE_DTYPES[dtype]


# ---- host twins: the kernels' code on the CPU, bit for bit against the reference ------

@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("spec", SPECS, ids=_spec_id)
def test_host_twins_match_reference(built_library, spec, shape):
    host = cuda.host
    cols = shape[1]
    params = kernel_params(spec)
    w = _weight(shape, seed=_seed(_spec_id(spec), shape), special=True)
    scale, zero = affine.compute_params(w, spec)
    got_scale, got_zero = host.compute_params(w, params)
    assert_bitwise(got_scale, scale, "scale")
    assert_bitwise(got_zero, zero, "zero")
    codes = affine.quantize(w, scale, zero, spec)
    packed = packing.pack_reference(codes, spec.bits)
    w_hat = affine.dequantize(codes, scale, zero, spec)
    assert_bitwise(host.quantize(w, scale, zero, params), codes, "quantize")
    assert_bitwise(host.quantize_pack(w, scale, zero, params), packed, "quantize_pack")
    assert_bitwise(host.pack(codes, spec.bits), packed, "pack")
    assert_bitwise(host.unpack(packed, spec.bits, cols), codes, "unpack")
    assert_bitwise(host.dequantize(codes, scale, zero, params), w_hat, "dequantize")
    assert_bitwise(host.dequantize_packed(packed, scale, zero, params, cols), w_hat, "dequantize_packed")
    assert_bitwise(host.fake_quant(w, params), affine.fake_quant(w, spec), "fake_quant")


def test_host_twins_accept_fp16_params_and_unaligned_inputs(built_library):
    spec = QuantSpec(bits=4, group_size=64)
    w = _weight((16, 256), seed=5)
    scale, zero = affine.compute_params(w, spec)
    holder = torch.empty(w.numel() + 1)
    holder[1:] = w.reshape(-1)
    w_unaligned = holder[1:].view(16, 256)  # 4 bytes off: the scalar code paths
    codes = affine.quantize(w, scale, zero, spec)
    assert_bitwise(cuda.host.quantize(w_unaligned, scale.half(), zero.half(), kernel_params(spec)), codes, "quantize")
    assert_bitwise(cuda.host.fake_quant(w_unaligned, kernel_params(spec)), affine.fake_quant(w, spec), "fake_quant")


def test_binding_rejects_bad_arguments(built_library):
    spec = QuantSpec(bits=4, group_size=64)
    w = _weight((4, 128), seed=6)
    scale, zero = affine.compute_params(w, spec)
    with pytest.raises(ValueError, match="scale has"):
        cuda.host.quantize(w, scale[:, :1], zero, kernel_params(spec))
    with pytest.raises(ValueError, match="needs cpu tensors|needs cuda tensors"):
        cuda.quantize(w, scale, zero, kernel_params(spec))  # CPU tensors to the device op
    lib = cuda._load()
    codes = torch.zeros(2, 8, dtype=torch.uint8)
    out = torch.zeros(2, 1, dtype=torch.int32)
    assert lib.qflow_host_pack(codes.data_ptr(), 2, 8, 7, out.data_ptr()) == 1  # bits=7: invalid value


def _gemv_case(rows, cols, group, sym, half, batch, seed):
    spec = QuantSpec(bits=4, group_size=group, symmetric=sym, pad_last_group=True)
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    scale, zero = affine.compute_params(w, spec)
    packed = packing.pack_reference(affine.quantize(w, scale, zero, spec), 4)
    if half:
        scale, zero = scale.half(), zero.half()
    x = torch.randn(batch, cols, generator=g).half()
    w_hat = affine.dequantize(packing.unpack_reference(packed, 4, cols), scale.float(), zero.float(), spec)
    ref = x.double() @ w_hat.double().T
    magnitude = x.double().abs() @ w_hat.double().abs().T
    return x, packed, scale, None if sym else zero, ref, magnitude


GEMV_CASES = [  # rows, cols, group, sym, fp16 params, batch
    (40, 256, 128, False, True, 1), (33, 512, 32, True, False, 3), (9, 1024, 64, False, True, 1),
    (17, 999, 64, False, True, 1),  # generic path: odd columns
    (8, 512, 48, True, False, 1),   # generic path: group not a multiple of 32
    (12, 256, -1, False, False, 1), (12, 256, 0, False, True, 2),
]


@pytest.mark.parametrize("case", GEMV_CASES, ids=lambda c: "-".join(map(str, c)))
def test_host_gemv_matches_fp64_reference(built_library, case):
    rows, cols, group, sym, half, batch = case
    x, packed, scale, zero, ref, magnitude = _gemv_case(rows, cols, group, sym, half, batch, seed=rows)
    for rows_per_warp in (0, 1, 2, 4):
        y = cuda.host.gemv_w4a16(x, packed, scale, zero, group, rows_per_warp=rows_per_warp)
        assert y.dtype == torch.float16 and y.shape == (batch, rows)
        tolerance = ref.abs() * 2.0**-10 + magnitude * 2.0**-22 * math.sqrt(cols) + 2.0**-24
        assert ((y.double() - ref).abs() <= tolerance).all(), (y.double() - ref).abs().max()


# ---- on a GPU: the CUDA kernels against the CPU dispatcher, bit for bit ---------------

@pytest.fixture(scope="module")
def gpu_ready(built_library):
    assert cuda.available(), f"{built_library} is built and a GPU is present, yet available() is False"


@pytest.mark.parametrize("shape", [(24, 256), (13, 999), (512, 1024)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("spec", SPECS, ids=_spec_id)
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_GPU)
def test_cuda_kernels_match_cpu_dispatcher(gpu_ready, spec, shape):
    dev = torch.device("cuda")
    cols = shape[1]
    params = kernel_params(spec)
    w = _weight(shape, seed=_seed(_spec_id(spec), shape, "gpu"), special=True)
    scale, zero = dispatch.compute_params(w, spec)
    got_scale, got_zero = cuda.compute_params(w.to(dev), params)
    assert_bitwise(got_scale, scale, "scale")
    assert_bitwise(got_zero, zero, "zero")
    codes = dispatch.quantize(w, scale, zero, spec)
    packed = dispatch.pack(codes, spec.bits)
    w_hat = dispatch.dequantize(codes, scale, zero, spec)
    w_d, s_d, z_d, codes_d, packed_d = (t.to(dev) for t in (w, scale, zero, codes, packed))
    poison = torch.full(shape, float("nan"), device=dev)
    assert_bitwise(cuda.quantize(w_d, s_d, z_d, params), codes, "quantize")
    assert_bitwise(cuda.quantize_pack(w_d, s_d, z_d, params), packed, "quantize_pack")
    assert_bitwise(cuda.pack(codes_d, spec.bits), packed, "pack")
    assert_bitwise(cuda.unpack(packed_d, spec.bits, cols), codes, "unpack")
    assert_bitwise(cuda.dequantize(codes_d, s_d, z_d, params, out=poison), w_hat, "dequantize")
    poison.fill_(float("nan"))
    assert_bitwise(cuda.dequantize_packed(packed_d, s_d, z_d, params, cols, out=poison), w_hat,
                   "dequantize_packed")
    assert_bitwise(cuda.fake_quant(w_d, params), dispatch.fake_quant(w, spec), "fake_quant")


@pytest.mark.parametrize("case", GEMV_CASES + [(4096, 4096, 128, False, True, 1)],
                         ids=lambda c: "-".join(map(str, c)))
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_GPU)
def test_cuda_gemv_matches_host_twin_and_fp64(gpu_ready, case):
    rows, cols, group, sym, half, batch = case
    x, packed, scale, zero, ref, magnitude = _gemv_case(rows, cols, group, sym, half, batch, seed=rows)
    dev = torch.device("cuda")
    for rows_per_warp in (0, 1, 2, 4):
        y = cuda.gemv_w4a16(x.to(dev), packed.to(dev), scale.to(dev),
                            None if zero is None else zero.to(dev), group, rows_per_warp=rows_per_warp)
        twin = cuda.host.gemv_w4a16(x, packed, scale, zero, group, rows_per_warp=rows_per_warp)
        assert_bitwise(y, twin, f"gemv rows_per_warp={rows_per_warp} vs host twin")
        tolerance = ref.abs() * 2.0**-10 + magnitude * 2.0**-22 * math.sqrt(cols) + 2.0**-24
        assert ((y.cpu().double() - ref).abs() <= tolerance).all()
