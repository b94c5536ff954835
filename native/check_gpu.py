#!/usr/bin/env python3
"""Build the CUDA kernels, check each one bit for bit against the CPU kernels, time them.

    python native/check_gpu.py            # full run (a few minutes on an H100)
    python native/check_gpu.py --quick    # medium shapes only, fewer timing runs

For every kernel, on fresh random inputs (several shapes, 4096x4096 and
11008x4096 included; bits 2-8; groups 32/64/128, per channel, per tensor;
asym/sym schemes; NF4/FP4) the GPU result, written into an output buffer
pre-filled with poison and followed (and, for the unaligned case, preceded)
by a poisoned guard region, must equal qflow.quant.dispatch's CPU result
bit for bit, and the guards must be untouched. The W4A16 GEMV must equal its
host twin bit for bit and an fp64 reference within fp16/fp32 rounding.
Timings are medians of CUDA-event measurements after warm-up, side by side
with torch's own GPU implementation (for the GEMV: torch fp16 dequantize +
matmul, and a dense fp16 matmul). Prints markdown, writes it to
$OUT/gpu_results.md when $OUT is set, exits 1 if any check fails.

Needs a CUDA build of torch. On a GPU machine without nvcc, bring a library
built elsewhere (native/build/) along; the driver must support the CUDA
version nvcc had. `--host-twins` runs the correctness part through the
kernels' host twins on CPU: a self-test of this script for machines without
a GPU (it proves nothing about the device code's grid loops).
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's qflow, installed or not

# What runs the checks: the CUDA ops on "cuda", or (--host-twins, a self-test of this
# script on a machine without a GPU) the host twins of the same kernels on "cpu".
TARGET = {"device": "cuda", "host": False}

POISON_F32 = float("nan")
POISON_U8 = 0xA5
POISON_I32 = 0x5A5A5A5A
GUARD = 64  # poisoned elements after (and before, when unaligned) every output


@dataclass
class Report:
    lines: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    checks: dict[str, list[int]] = field(default_factory=dict)  # op -> [passed, total]

    def say(self, text: str = "") -> None:
        print(text, flush=True)
        self.lines.append(text)

    def record(self, op: str, case: str, ok: bool, detail: str = "") -> None:
        passed_total = self.checks.setdefault(op, [0, 0])
        passed_total[1] += 1
        if ok:
            passed_total[0] += 1
        else:
            message = f"{op} {case}: {detail}"
            self.failures.append(message)
            print("FAIL " + message, flush=True)


# ---- environment ---------------------------------------------------------------

def build(report: Report) -> bool:
    """Build (incrementally); without nvcc here, a library built elsewhere (carried in) is used."""
    cmd = [sys.executable, str(ROOT / "native" / "build.py")]
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    print(proc.stdout + proc.stderr, flush=True)
    library = ROOT / "native" / "build" / "libqflow_kernels.so"
    if proc.returncode != 0:
        report.failures.append(f"build failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
        return False
    if "nvcc not found" in proc.stdout:
        if not library.is_file():
            report.failures.append("nvcc not found and no prebuilt native/build/libqflow_kernels.so")
            return False
        report.say(f"- build: nvcc not found on this machine; using the prebuilt {library} "
                   f"(modified {datetime.datetime.fromtimestamp(library.stat().st_mtime):%Y-%m-%d %H:%M})")
        return True
    report.say(f"- build: ok ({time.perf_counter() - started:.1f} s, `{' '.join(cmd[1:])}`)")
    return True


def describe_environment(report: Report) -> None:
    import torch

    from qflow.kernels import cuda

    props = torch.cuda.get_device_properties(0)
    runtime, driver = cuda.cuda_versions()
    report.say(f"- device: {props.name}, compute capability {props.major}.{props.minor}, "
               f"{props.multi_processor_count} SMs, {props.total_memory / 2**30:.1f} GiB")
    report.say(f"- CUDA driver API {driver // 1000}.{driver % 1000 // 10}, kernels built with runtime "
               f"{runtime // 1000}.{runtime % 1000 // 10}; torch {torch.__version__} (CUDA {torch.version.cuda})")
    if driver // 1000 < runtime // 1000:
        report.say(f"- WARNING: the driver (CUDA {driver // 1000}) is older than the kernels' runtime "
                   f"(CUDA {runtime // 1000}); launches will fail with 'driver version is insufficient'. "
                   f"Rebuild with an nvcc no newer than the driver (NVCC=/path/to/nvcc).")
    from qflow.quant import dispatch

    reference = dispatch.backend_for("quantize", torch.zeros(1))
    if reference == "numba":
        import numba

        reference += f" {numba.__version__} (qflow.kernels.cpu)"
    report.say(f"- CPU reference for the bit-for-bit checks: {reference}; numpy "
               f"{__import__('numpy').__version__}")
    smi = shutil.which("nvidia-smi")
    if smi:
        query = subprocess.run([smi, "--query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem,power.limit",
                                "--format=csv,noheader"], capture_output=True, text=True)
        if query.returncode == 0:
            report.say(f"- nvidia-smi: {query.stdout.strip()}")
    report.say(f"- host: {platform.node()}, {os.cpu_count()} CPUs, python {platform.python_version()}, "
               f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}")


# ---- comparison helpers ----------------------------------------------------------

def ops():
    from qflow.kernels import cuda

    return cuda.host if TARGET["host"] else cuda


def sync() -> None:
    import torch

    if not TARGET["host"]:
        torch.cuda.synchronize()


def poisoned(shape, dtype, device, unaligned: bool = False):
    """(buffer, view): view is the output, the rest of buffer is poison to be left alone."""
    import torch

    n = math.prod(shape)
    front = 1 if unaligned else 0
    if dtype == torch.float32:
        buffer = torch.full((front + n + GUARD,), POISON_F32, dtype=dtype, device=device)
    elif dtype == torch.uint8:
        buffer = torch.full((front + n + GUARD,), POISON_U8, dtype=dtype, device=device)
    elif dtype == torch.int32:
        buffer = torch.full((front + n + GUARD,), POISON_I32, dtype=dtype, device=device)
    else:  # float16
        buffer = torch.full((front + n + GUARD,), float("nan"), dtype=dtype, device=device)
    return buffer, buffer[front:front + n].view(shape)


def guards_intact(buffer, n: int, unaligned: bool) -> bool:
    import torch

    front = 1 if unaligned else 0
    outside = torch.cat([buffer[:front], buffer[front + n:]]).cpu()
    if outside.dtype.is_floating_point:
        return bool(torch.isnan(outside).all())
    value = POISON_U8 if outside.dtype == torch.uint8 else POISON_I32
    return bool((outside == value).all())


def bitwise_diff(got, ref) -> str:
    """'' when identical bit for bit, else a description of the first mismatches."""
    import torch

    got = got.detach().cpu()
    ref = ref.detach().cpu()
    if tuple(got.shape) != tuple(ref.shape) or got.dtype != ref.dtype:
        return f"shape/dtype {tuple(got.shape)} {got.dtype} != {tuple(ref.shape)} {ref.dtype}"
    if got.dtype == torch.float32:
        a, b = got.view(torch.int32), ref.view(torch.int32)
    elif got.dtype == torch.float16:
        a, b = got.view(torch.int16), ref.view(torch.int16)
    else:
        a, b = got, ref
    bad = (a != b).nonzero()
    if bad.numel() == 0:
        return ""
    first = [tuple(i.tolist()) for i in bad[:3]]
    shown = ", ".join(f"{i}: {got[i].item()!r} vs {ref[i].item()!r}" for i in first)
    return f"{bad.shape[0]} of {got.numel()} differ; first {shown}"


# ---- correctness -------------------------------------------------------------------

def make_weight(shape, generator, special: bool = False):
    import torch

    rows, _ = shape
    w = torch.randn(shape, generator=generator) * (0.02 + torch.rand(rows, 1, generator=generator))
    if special and rows >= 8:
        w[0] = 0.0                      # all-zero rows: range guards
        w[1] = 0.37                     # constant row
        w[2] = w[2].abs()               # all positive
        w[3] = -w[3].abs()              # all negative
        w[4] *= 1e-9                    # scale below fp16's range -> 2^-24 guard
        w[5] *= 1e5                     # scale overflows fp16 -> guard
        w[6, ::3] = 0.0                 # exact zeros inside groups
        w[7, 1::2] = -0.0
    return w


def spec_name(spec) -> str:
    if spec.format != "int":
        return f"{spec.format} g{spec.group_size}"
    extra = "" if spec.scale_dtype == "float16" else f" {spec.scale_dtype}"
    extra += " zero_float" if spec.zero_float else ""
    return f"int{spec.bits} {spec.scheme} g{spec.group_size}{extra}"


def check_config(report: Report, spec, shape, generator, *, special=False, unaligned=False,
                 half_params=False) -> None:
    """Every elementwise kernel for one (spec, shape) against the CPU dispatcher."""
    import torch

    from qflow.quant import dispatch

    cuda = ops()
    params = dispatch.kernel_params(spec)  # what the CUDA binding reads: plain numbers
    dev = torch.device(TARGET["device"])
    case = f"[{spec_name(spec)} {shape[0]}x{shape[1]}{' special' if special else ''}" \
           f"{' unaligned' if unaligned else ''}{' fp16-params' if half_params else ''}]"
    rows, cols = shape
    w = make_weight(shape, generator, special)
    if unaligned:  # data 4 bytes past an aligned address: the kernels' scalar paths
        holder = torch.empty(w.numel() + 1, device=dev)
        holder[1:] = w.reshape(-1).to(dev)
        w_dev = holder[1:].view(shape)
    else:
        w_dev = w.to(dev)

    def run(op: str, fn, ref, out_shape, dtype):
        try:
            buffer, view = poisoned(out_shape, dtype, dev, unaligned)
            got = fn(view)
            sync()
            problem = bitwise_diff(got, ref)
            if not problem and got.data_ptr() != view.data_ptr():
                problem = "result was not written to out="
            if not problem and not guards_intact(buffer, view.numel(), unaligned):
                problem = "wrote outside its output"
            report.record(op, case, not problem, problem)
        except Exception as err:  # a crash is a failed check, and the run goes on
            report.record(op, case, False, f"{type(err).__name__}: {err}")

    scale_ref, zero_ref = dispatch.compute_params(w, spec)
    n_params = tuple(scale_ref.shape)

    def params_fn(view):
        zero_buffer, zero_view = poisoned(n_params, torch.float32, dev, unaligned)
        scale, zero = cuda.compute_params(w_dev, params, out=(view, zero_view))
        sync()
        problem = bitwise_diff(zero, zero_ref)
        if problem or not guards_intact(zero_buffer, zero_view.numel(), unaligned):
            raise AssertionError(f"zero: {problem or 'wrote outside its output'}")
        return scale

    run("compute_params", params_fn, scale_ref, n_params, torch.float32)

    if half_params:  # fp16-stored params (already fp16 values): same results expected
        scale_ref, zero_ref = scale_ref.half(), zero_ref.half()
    scale_dev, zero_dev = scale_ref.to(dev), zero_ref.to(dev)
    codes_ref = dispatch.quantize(w, scale_ref.float(), zero_ref.float(), spec)
    packed_ref = dispatch.pack(codes_ref, spec.bits)
    dequant_ref = dispatch.dequantize(codes_ref, scale_ref.float(), zero_ref.float(), spec)
    words = packed_ref.shape[1]

    run("quantize", lambda v: cuda.quantize(w_dev, scale_dev, zero_dev, params, out=v),
        codes_ref, shape, torch.uint8)
    run("quantize_pack", lambda v: cuda.quantize_pack(w_dev, scale_dev, zero_dev, params, out=v),
        packed_ref, (rows, words), torch.int32)
    codes_dev, packed_dev = codes_ref.to(dev), packed_ref.to(dev)
    run("pack", lambda v: cuda.pack(codes_dev, spec.bits, out=v), packed_ref, (rows, words), torch.int32)
    run("unpack", lambda v: cuda.unpack(packed_dev, spec.bits, cols, out=v), codes_ref, shape, torch.uint8)
    run("dequantize", lambda v: cuda.dequantize(codes_dev, scale_dev, zero_dev, params, out=v),
        dequant_ref, shape, torch.float32)
    run("dequantize_packed",
        lambda v: cuda.dequantize_packed(packed_dev, scale_dev, zero_dev, params, cols, out=v),
        dequant_ref, shape, torch.float32)
    run("fake_quant", lambda v: cuda.fake_quant(w_dev, params, out=v), dispatch.fake_quant(w, spec),
        shape, torch.float32)


def correctness_suite(report: Report, quick: bool) -> None:
    import torch

    from qflow.quant.spec import QuantSpec

    generator = torch.Generator().manual_seed(20240611)
    specs = []
    for bits in (2, 3, 4, 5, 6, 8):
        for scheme in ("asym_z", "sym_f", "asym_a", "sym_r"):
            for group in (32, 64, 128, -1, 0):
                specs.append(QuantSpec(bits=bits, scheme=scheme, symmetric=scheme.startswith("sym"),
                                       group_size=group, pad_last_group=True))
    specs += [QuantSpec(bits=4, scheme="asym_h", zero_float=True, group_size=64),
              QuantSpec(bits=4, group_size=128, scale_dtype="float32"),
              QuantSpec(bits=4, group_size=128, scale_dtype="bfloat16"),
              QuantSpec(bits=8, group_size=32, symmetric=True, scale_dtype="bfloat16")]
    for fmt in ("nf4", "fp4"):
        specs += [QuantSpec(format=fmt, group_size=g, pad_last_group=True) for g in (32, 64, 128)]
    medium = [(256, 1024), (37, 1000), (19, 999)]  # aligned; partial groups; odd columns
    started = time.perf_counter()
    for spec in specs:
        for shape in medium:
            check_config(report, spec, shape, generator)
        check_config(report, spec, (64, 512), generator, special=True)
    for spec in specs[::7]:
        check_config(report, spec, (40, 768), generator, unaligned=True)
    report.say(f"- medium shapes: {len(specs)} specs x {len(medium) + 1} shapes "
               f"({time.perf_counter() - started:.0f} s)")
    if quick:
        return
    int4 = QuantSpec(bits=4, group_size=128)
    big = [
        ((4096, 4096), int4), ((4096, 4096), QuantSpec(bits=4, group_size=128, symmetric=True)),
        ((4096, 4096), QuantSpec(bits=2, group_size=32)),
        ((4096, 4096), QuantSpec(bits=3, group_size=64, symmetric=True)),
        ((4096, 4096), QuantSpec(bits=8, group_size=128)),
        ((4096, 4096), QuantSpec(format="nf4", group_size=64)),
        ((11008, 4096), int4), ((11008, 4096), QuantSpec(bits=8, group_size=64, symmetric=True)),
        ((11008, 4096), QuantSpec(format="nf4", group_size=64)),
        ((4096, 11008), QuantSpec(bits=4, group_size=128, symmetric=True)),
    ]
    started = time.perf_counter()
    for shape, spec in big:
        check_config(report, spec, shape, generator)
    check_config(report, int4, (4096, 4096), generator, half_params=True)
    report.say(f"- large shapes: {len(big) + 1} configs ({time.perf_counter() - started:.0f} s)")


def gemv_reference(x, packed, scale, zero, group_size):
    """fp64 y and the magnitude of the terms summed (for the tolerance), on CPU."""
    import torch

    from qflow.quant import dispatch
    from qflow.quant.spec import QuantSpec

    cols = x.shape[-1]
    spec = QuantSpec(bits=4, group_size=group_size, pad_last_group=True)
    z = zero.float() if zero is not None else torch.full(scale.shape, 8.0)
    w = dispatch.dequantize_packed(packed, scale.float(), z, spec, cols).double()
    codes = dispatch.unpack(packed, 4, cols).double()
    g = group_size if group_size > 0 else cols
    s_full = scale.double().reshape(scale.shape[0] if group_size != 0 else 1, -1)
    s_full = s_full.repeat_interleave(g, dim=1)[:, :cols]
    z_full = z.double().reshape(s_full.shape[0], -1).repeat_interleave(g, dim=1)[:, :cols]
    x64 = x.double().reshape(-1, cols)
    terms = (codes + z_full.abs()) * s_full  # |x| (|q| + |z|) s: what the fp32 sums carry
    return x64 @ w.T, x64.abs() @ terms.T


def check_gemv(report: Report, rows: int, cols: int, group: int, *, sym: bool, half: bool,
               batch: int, rows_per_warp: int, generator) -> None:
    import torch

    from qflow.quant import dispatch
    from qflow.quant.spec import QuantSpec

    cuda = ops()
    case = f"[{rows}x{cols} g{group} {'sym' if sym else 'asym'} {'fp16' if half else 'fp32'} params " \
           f"batch {batch} rows/warp {rows_per_warp or 'auto'}]"
    try:
        spec = QuantSpec(bits=4, group_size=group, symmetric=sym, pad_last_group=True)
        w = make_weight((rows, cols), generator)
        scale, zero = dispatch.compute_params(w, spec)
        packed = dispatch.pack(dispatch.quantize(w, scale, zero, spec), 4)
        if half:
            scale, zero = scale.half(), zero.half()
        zero_arg = None if sym else zero
        x = torch.randn(batch, cols, generator=generator).half()
        dev = torch.device(TARGET["device"])
        buffer, view = poisoned((batch, rows), torch.float16, dev)
        y = cuda.gemv_w4a16(x.to(dev), packed.to(dev), scale.to(dev),
                            None if zero_arg is None else zero_arg.to(dev), group, out=view,
                            rows_per_warp=rows_per_warp)
        sync()
        y = y.cpu()
        problems = []
        if not guards_intact(buffer, view.numel(), False):
            problems.append("wrote outside its output")
        from qflow.kernels import cuda as cuda_module

        twin = cuda_module.host.gemv_w4a16(x, packed, scale, zero_arg, group, rows_per_warp=rows_per_warp)
        twin_diff = bitwise_diff(y, twin)
        if twin_diff:
            problems.append(f"differs from its host twin: {twin_diff}")
        ref, magnitude = gemv_reference(x, packed, scale, zero_arg, group)
        error = (y.double() - ref).abs()
        # fp16 rounding of y (half an ulp <= 2^-11 |y|, doubled) + fp32 sums + fp16 subnormals
        tolerance = ref.abs() * 2.0**-10 + magnitude * 2.0**-24 * 4 * math.sqrt(cols) + 2.0**-24
        worst = (error / tolerance).max().item()
        if not (worst <= 1.0):
            problems.append(f"error {error.max().item():.3g} is {worst:.2f}x the tolerance")
        report.record("gemv_w4a16", case, not problems, "; ".join(problems))
    except Exception as err:
        report.record("gemv_w4a16", case, False, f"{type(err).__name__}: {err}")


def gemv_suite(report: Report, quick: bool) -> None:
    import torch

    generator = torch.Generator().manual_seed(7)
    cases = [(512, 1024, 128, False, True, 1, 0), (512, 1024, 64, True, False, 4, 0),
             (300, 999, 64, False, True, 1, 0),   # generic path: odd columns
             (256, 1024, 48, False, False, 1, 0),  # generic path: group not a multiple of 32
             (257, 2048, -1, False, True, 2, 0), (100, 1024, 0, True, False, 1, 0),
             (1000, 4096, 128, False, True, 1, 1), (1000, 4096, 128, False, True, 1, 2),
             (1000, 4096, 128, False, True, 1, 4)]
    if not quick:
        cases += [(4096, 4096, 128, False, True, 1, 0), (4096, 4096, 32, True, True, 1, 0),
                  (4096, 4096, 64, False, False, 1, 0), (11008, 4096, 128, False, True, 1, 0),
                  (11008, 4096, 128, True, True, 1, 0), (4096, 11008, 128, False, True, 1, 0),
                  (4096, 11008, 128, False, False, 1, 4), (4096, 4096, 128, False, True, 8, 0)]
    for rows, cols, group, sym, half, batch, rpw in cases:
        check_gemv(report, rows, cols, group, sym=sym, half=half, batch=batch, rows_per_warp=rpw,
                   generator=generator)


# ---- timing ------------------------------------------------------------------------

class Timer:
    """Median CUDA-event time of fn(); the GPU is kept busy (no memory traffic) while the
    CPU queues each call, so Python overhead stays out of the measurement."""

    def __init__(self, runs: int, warmup: int = 10):
        import torch

        self.runs = runs
        self.warmup = warmup
        self.flush_buffer = torch.empty(512 * 2**20, dtype=torch.uint8, device="cuda")  # > L2

    def __call__(self, fn, cold: bool = False) -> float:
        import torch

        from qflow.kernels import cuda

        for _ in range(self.warmup):
            fn()
        torch.cuda.synchronize()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(self.runs)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(self.runs)]
        for start, end in zip(starts, ends):
            cuda.busy_wait(500_000)
            if cold:
                self.flush_buffer.zero_()
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)) * 1000.0


def torch_unpack(packed, bits, cols):
    import torch

    per = 32 // bits
    shifts = torch.arange(per, device=packed.device, dtype=torch.int32) * bits
    codes = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(packed.shape[0], -1)[:, :cols].to(torch.uint8)


def torch_pack(codes, bits):
    import torch

    per = 32 // bits
    rows, cols = codes.shape
    words = -(-cols // per)
    padded = torch.zeros(rows, words * per, dtype=torch.int64, device=codes.device)
    padded[:, :cols] = codes
    shifts = torch.arange(per, device=codes.device, dtype=torch.int64) * bits
    return (padded.reshape(rows, words, per) << shifts).sum(-1).to(torch.int32)


def torch_dequantize(codes, scale, zero, spec):
    from qflow.quant import affine

    if spec.format == "int":
        return affine.dequantize(codes, scale, zero, spec)
    table = affine.lut(spec).to(codes.device)
    return table[codes.long()] * affine._expand(scale, spec, tuple(codes.shape))


def torch_quantize(w, scale, zero, spec):
    from qflow.quant import affine

    if spec.format == "int":
        return affine.quantize(w, scale, zero, spec)
    import torch

    table = affine.lut(spec).to(w.device)
    x = w / affine._expand(scale, spec, tuple(w.shape))
    return torch.argmin((x.unsqueeze(-1) - table).abs(), dim=-1).to(torch.uint8)


def timing_suite(report: Report, runs: int, quick: bool) -> None:
    import torch

    from qflow.quant import affine
    from qflow.quant.dispatch import kernel_params
    from qflow.quant.spec import QuantSpec

    cuda = ops()
    timer = Timer(runs)
    dev = torch.device(TARGET["device"])
    generator = torch.Generator(device=dev).manual_seed(3)
    rows_out = ["| kernel | shape | config | qflow µs | torch µs | speedup | qflow GB/s |",
                "|---|---|---|---:|---:|---:|---:|"]

    def add(kernel, shape, config, ours, theirs, nbytes):
        rows_out.append(f"| {kernel} | {shape[0]}x{shape[1]} | {config} | {ours:.1f} | {theirs:.1f} | "
                        f"{theirs / ours:.2f}x | {nbytes / ours / 1e3:.0f} |")

    shapes = [(4096, 4096)] if quick else [(4096, 4096), (11008, 4096)]
    configs = [QuantSpec(bits=4, group_size=128), QuantSpec(format="nf4", group_size=64)]
    if not quick:
        configs += [QuantSpec(bits=2, group_size=32), QuantSpec(bits=3, group_size=64, symmetric=True),
                    QuantSpec(bits=8, group_size=128, symmetric=True)]
    for shape in shapes:
        rows, cols = shape
        n = rows * cols
        for spec in configs:
            name = spec_name(spec)
            params = kernel_params(spec)
            try:
                w = torch.randn(shape, device=dev, generator=generator)
                scale, zero = cuda.compute_params(w, params)
                codes = cuda.quantize(w, scale, zero, params)
                packed = cuda.pack(codes, spec.bits)
                out_f = torch.empty(shape, device=dev)
                out_u8 = torch.empty(shape, dtype=torch.uint8, device=dev)
                out_i32 = torch.empty_like(packed)
                params_bytes = 8 * scale.numel()
                packed_bytes = 4 * packed.numel()
                add("dequantize_packed", shape, name,
                    timer(lambda: cuda.dequantize_packed(packed, scale, zero, params, cols, out=out_f)),
                    timer(lambda: torch_dequantize(torch_unpack(packed, spec.bits, cols), scale, zero, spec)),
                    packed_bytes + params_bytes + 4 * n)
                add("quantize_pack", shape, name,
                    timer(lambda: cuda.quantize_pack(w, scale, zero, params, out=out_i32)),
                    timer(lambda: torch_pack(torch_quantize(w, scale, zero, spec), spec.bits)),
                    4 * n + params_bytes + packed_bytes)
                if spec.bits != 4 or spec.format != "int":
                    continue  # the rest once per shape
                add("dequantize", shape, name,
                    timer(lambda: cuda.dequantize(codes, scale, zero, params, out=out_f)),
                    timer(lambda: torch_dequantize(codes, scale, zero, spec)), n + params_bytes + 4 * n)
                add("quantize", shape, name,
                    timer(lambda: cuda.quantize(w, scale, zero, params, out=out_u8)),
                    timer(lambda: torch_quantize(w, scale, zero, spec)), 4 * n + params_bytes + n)
                add("compute_params", shape, name,
                    timer(lambda: cuda.compute_params(w, params)),
                    timer(lambda: affine.compute_params(w, spec)), 4 * n + params_bytes)
                add("fake_quant", shape, name,
                    timer(lambda: cuda.fake_quant(w, params, out=out_f)),
                    timer(lambda: affine.fake_quant(w, spec)), 8 * n + params_bytes)
                add("pack", shape, f"{spec.bits}-bit",
                    timer(lambda: cuda.pack(codes, spec.bits, out=out_i32)),
                    timer(lambda: torch_pack(codes, spec.bits)), n + packed_bytes)
                add("unpack", shape, f"{spec.bits}-bit",
                    timer(lambda: cuda.unpack(packed, spec.bits, cols, out=out_u8)),
                    timer(lambda: torch_unpack(packed, spec.bits, cols)), n + packed_bytes)
            except Exception as err:
                report.failures.append(f"timing {name} {shape}: {type(err).__name__}: {err}")
                traceback.print_exc()
            if not TARGET["host"]:
                torch.cuda.empty_cache()
    report.say("\n## Element-wise kernels (hot L2, median of %d runs)\n" % runs)
    for line in rows_out:
        report.say(line)


def gemv_timing(report: Report, runs: int, quick: bool) -> None:
    import torch

    from qflow.quant.dispatch import kernel_params
    from qflow.quant.spec import QuantSpec

    cuda = ops()
    timer = Timer(runs)
    dev = torch.device(TARGET["device"])
    generator = torch.Generator(device=dev).manual_seed(4)
    lines = ["| shape (out x in) | config | L2 | qflow µs | torch dequant+mm µs | torch fp16 mm µs | "
             "vs dequant+mm | vs fp16 mm | qflow GB/s |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    shapes = [(4096, 4096)] if quick else [(4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096),
                                           (28672, 8192)]
    for rows, cols in shapes:
        params = kernel_params(QuantSpec(bits=4, group_size=128))
        try:
            w = torch.randn(rows, cols, device=dev, generator=generator) * 0.02
            scale32, zero32 = cuda.compute_params(w, params)
            packed = cuda.quantize_pack(w, scale32, zero32, params)
            scale, zero = scale32.half(), zero32.half()
            x = torch.randn(1, cols, device=dev, generator=generator).half()
            y = torch.empty(1, rows, device=dev, dtype=torch.float16)
            dense = cuda.dequantize_packed(packed, scale32, zero32, params, cols).half()
            del w
            nbytes = 4 * packed.numel() + 4 * scale.numel() + 2 * cols + 2 * rows

            def torch_dequant_mm():
                codes = torch_unpack(packed, 4, cols)
                s = scale.repeat_interleave(128, dim=1)[:, :cols]
                z = zero.repeat_interleave(128, dim=1)[:, :cols]
                return x @ ((codes.half() - z) * s).T

            for cold in (True, False):
                variants = [0] if quick or not cold else [0, 1, 2, 4]
                theirs = timer(torch_dequant_mm, cold)
                dense_mm = timer(lambda: x @ dense.T, cold)
                for rpw in variants:
                    ours = timer(lambda: cuda.gemv_w4a16(x, packed, scale, zero, 128, out=y,
                                                         rows_per_warp=rpw), cold)
                    config = f"int4 g128 fp16 params, rows/warp {rpw or 'auto'}"
                    lines.append(f"| {rows}x{cols} | {config} | {'flushed' if cold else 'hot'} | "
                                 f"{ours:.1f} | {theirs:.1f} | {dense_mm:.1f} | {theirs / ours:.2f}x | "
                                 f"{dense_mm / ours:.2f}x | {nbytes / ours / 1e3:.0f} |")
        except Exception as err:
            report.failures.append(f"gemv timing {rows}x{cols}: {type(err).__name__}: {err}")
            traceback.print_exc()
        if not TARGET["host"]:
            torch.cuda.empty_cache()
    report.say("\n## W4A16 GEMV, batch 1 (median of %d runs)\n" % runs)
    report.say("Weights as qflow int4 g128 (`[out, in/8]` int32, fp16 scale and zero). "
               "'flushed': a 512 MiB write evicts L2 before every run (decode reads weights from HBM).\n")
    for line in lines:
        report.say(line)


# ---- main ----------------------------------------------------------------------------

def summarize_checks(report: Report) -> None:
    report.say("\n## Correctness (bit for bit vs qflow.quant.dispatch on CPU)\n")
    report.say("| kernel | passed | checked |")
    report.say("|---|---:|---:|")
    for op, (passed, total) in report.checks.items():
        report.say(f"| {op} | {passed} | {total} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="medium shapes only, 100 timing runs")
    parser.add_argument("--runs", type=int, default=200, help="timed runs per measurement (>= 100)")
    parser.add_argument("--no-build", action="store_true", help="use the library as it is")
    parser.add_argument("--host-twins", action="store_true",
                        help="self-test of this script without a GPU: run the correctness checks "
                             "through the kernels' host twins on CPU tensors (no timing)")
    args = parser.parse_args(argv)
    runs = max(100, 100 if args.quick else args.runs)

    report = Report()
    report.say("# qflow CUDA kernels: GPU check\n")
    started = time.perf_counter()
    try:
        if args.no_build or build(report):
            import torch

            from qflow.kernels import cuda

            if args.host_twins:
                TARGET.update(device="cpu", host=True)
                report.say("- host twins on CPU (script self-test; no GPU involved)")
                correctness_suite(report, args.quick)
                gemv_suite(report, args.quick)
                summarize_checks(report)
            elif not torch.cuda.is_available():
                report.failures.append("torch sees no CUDA device (torch.cuda.is_available() is False)")
            elif not cuda.available():
                report.failures.append(f"qflow.kernels.cuda.available() is False ({cuda.library_path()})")
            else:
                describe_environment(report)
                correctness_suite(report, args.quick)
                gemv_suite(report, args.quick)
                summarize_checks(report)
                timing_suite(report, runs, args.quick)
                gemv_timing(report, runs, args.quick)
    except Exception as err:
        report.failures.append(f"check_gpu.py crashed: {type(err).__name__}: {err}")
        traceback.print_exc()

    report.say(f"\n## Result: {'FAIL' if report.failures else 'PASS'} "
               f"({time.perf_counter() - started:.0f} s)\n")
    for failure in report.failures[:200]:
        report.say(f"- {failure}")
    if len(report.failures) > 200:
        report.say(f"- ... and {len(report.failures) - 200} more")
    out_dir = os.environ.get("OUT")
    if out_dir:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "gpu_results.md").write_text("\n".join(report.lines) + "\n")
        print(f"wrote {Path(out_dir) / 'gpu_results.md'}")
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
