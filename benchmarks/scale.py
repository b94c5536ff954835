"""Memory and time at 1B parameters: a synthetic Llama-3.2-1B through RTN, AWQ and GPTQ, block by block.

A model with Llama-3.2-1B's shapes (hidden 2048, 16 layers, intermediate 8192,
32 heads / 8 KV heads, vocabulary 128256, tied embeddings: 1.24 B parameters,
4.94 GB in fp32) is written to safetensors with random weights, one shard per
block, each tensor streamed to disk in row chunks (the writer never holds a
tensor whole). qflow then runs it as a user would: ``qflow run`` of a recipe
``model -> calibrate (stats: false) -> quantize.<method>``. Model and
calibration run once; each method then runs in its own process, where both
are cache hits, so the process's peak RSS (``wait4``'s ``ru_maxrss``) is the
quantize stage's. Printed per method: peak RSS, its ratio to the fp32 model
size (target < 0.35: one block plus its activations, not the model; the
embedding is memory-mapped, ``qflow/models/lazy.py``), the stage's seconds and
seconds per block; for reference, measured in the same run, the peak RSS of a
process that only imports what the stage imports (torch, transformers, qflow).
While a method runs, each finished block is printed with the child's peak RSS so far
(``VmHWM``), so a run stopped early still leaves per-block figures.

Projection to Llama-3.1-8B and -70B: seconds per block scale with the block's
parameter count (an underestimate for GPTQ, whose Hessian inverse grows with
in_features^3) times the layer count; peak memory with the block's size.

Example::

    .venv/bin/python benchmarks/scale.py                       # ~5 GB on disk under runs/scale
    .venv/bin/python benchmarks/scale.py --layers 2 --n-calib 2 --seq-len 128 --methods rtn  # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHAPES = {
    "llama-3.2-1b": dict(hidden=2048, layers=16, intermediate=8192, heads=32, kv_heads=8, vocab=128256, tied=True),
    "llama-3.1-8b": dict(hidden=4096, layers=32, intermediate=14336, heads=32, kv_heads=8, vocab=128256, tied=False),
    "llama-3.1-70b": dict(hidden=8192, layers=80, intermediate=28672, heads=64, kv_heads=8, vocab=128256, tied=False),
}
METHODS = {"rtn": "quantize.rtn", "awq": "quantize.awq", "gptq": "quantize.gptq"}
TARGET_RATIO = 0.35
CHUNK_BYTES = 64 * 2**20


def block_tensors(shape: dict, i: int) -> list[tuple[str, tuple[int, ...]]]:
    h, inter = shape["hidden"], shape["intermediate"]
    kv = shape["kv_heads"] * (h // shape["heads"])
    p = f"model.layers.{i}."
    return [(p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,)),
            (p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, h)),
            (p + "mlp.gate_proj.weight", (inter, h)), (p + "mlp.up_proj.weight", (inter, h)),
            (p + "mlp.down_proj.weight", (h, inter))]


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def block_params(shape: dict) -> int:
    return sum(_numel(s) for _, s in block_tensors(shape, 0))


def model_params(shape: dict) -> int:
    embed = shape["vocab"] * shape["hidden"]
    return shape["layers"] * block_params(shape) + embed * (1 if shape["tied"] else 2) + shape["hidden"]


def write_shard(path: Path, tensors: list[tuple[str, tuple[int, ...]]], generator) -> None:
    """A safetensors file of random fp32 tensors (norms: ones), each written in row chunks."""
    import torch

    header, offset = {}, 0
    for name, shape in tensors:
        size = _numel(shape) * 4
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as fh:
        fh.write(len(raw).to_bytes(8, "little"))
        fh.write(raw)
        for name, shape in tensors:
            if len(shape) == 1:
                fh.write(torch.ones(shape, dtype=torch.float32).numpy().tobytes())
                continue
            rows = max(1, CHUNK_BYTES // (4 * _numel(shape[1:])))
            std = 0.02 if "embed" in name else shape[1] ** -0.5 * 0.5
            for r0 in range(0, shape[0], rows):
                n = min(rows, shape[0] - r0)
                fh.write((torch.randn((n, *shape[1:]), generator=generator) * std).numpy().tobytes())
    os.replace(tmp, path)


def write_model(folder: Path, shape: dict, tokenizer_dir: Path, seed: int = 0) -> Path:
    """The synthetic model folder (config, tokenizer, one shard per block + one for the rest), reused if whole."""
    import torch
    from transformers import LlamaConfig

    done = folder / "model.safetensors.index.json"
    if done.is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    cfg = LlamaConfig(vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
                      num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                      num_key_value_heads=shape["kv_heads"], max_position_embeddings=4096,
                      tie_word_embeddings=shape["tied"], rope_theta=500000.0)
    cfg.save_pretrained(folder)
    for f in tokenizer_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            shutil.copy(f, folder / f.name)
    gen = torch.Generator().manual_seed(seed)
    weight_map = {}
    shards = [[("model.embed_tokens.weight", (shape["vocab"], shape["hidden"])), ("model.norm.weight", (shape["hidden"],))]]
    if not shape["tied"]:
        shards[0].append(("lm_head.weight", (shape["vocab"], shape["hidden"])))
    shards += [block_tensors(shape, i) for i in range(shape["layers"])]
    for k, tensors in enumerate(shards):
        name = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        write_shard(folder / name, tensors, gen)
        weight_map.update({t: name for t, _ in tensors})
        print(f"  wrote {name}", file=sys.stderr, flush=True)
    done.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    return folder


def recipe(model_dir: Path, method: str | None, n_calib: int, seq_len: int, group_size: int) -> str:
    lines = [f"name: scale-{method or 'calibrate'}", f'model: {{source: "{model_dir}"}}', "stages:",
             f'  calibrate: {{uses: calibrate, with: {{data: {{source: "zoo:wiki-pages", seq_len: {seq_len}}}, '
             f"n_samples: {n_calib}, stats: false}}}}"]
    if method:
        needs = "" if method == "rtn" else "needs: [calibrate], "
        lines.append(f"  quantize: {{uses: {METHODS[method]}, {needs}with: {{bits: 4, group_size: {group_size}}}}}")
    return "\n".join(lines) + "\n"


def child_peak_rss(pid: int) -> int:
    """A running child's peak RSS so far (``VmHWM`` of /proc/PID/status), 0 when unreadable."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def measured_child(args: list[str], env: dict, on_err_line=None) -> tuple[int, int, float, str, str]:
    """Run ``args`` in a fresh child and return its own peak RSS (fork + exec + wait4, nothing shared).

    ``on_err_line(pid, line)``: called for each line the child writes to stderr, while it runs."""
    t0 = time.perf_counter()
    r_out, w_out = os.pipe()
    r_err, w_err = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.chdir(REPO)
        os.dup2(w_out, 1)
        os.dup2(w_err, 2)
        os.execve(args[0], args, env)
    os.close(w_out)
    os.close(w_err)
    import threading

    chunks: dict[int, list[bytes]] = {r_out: [], r_err: []}

    def drain(fd: int) -> None:
        pending = b""
        while data := os.read(fd, 65536):
            chunks[fd].append(data)
            if fd == r_err and on_err_line is not None:
                *lines, pending = (pending + data).replace(b"\r", b"\n").split(b"\n")
                for line in lines:
                    on_err_line(pid, line.decode(errors="replace"))

    threads = [threading.Thread(target=drain, args=(fd,)) for fd in (r_out, r_err)]
    for t in threads:
        t.start()
    _, status, usage = os.wait4(pid, 0)
    for t in threads:
        t.join()
    os.close(r_out)
    os.close(r_err)
    seconds = time.perf_counter() - t0
    return (os.waitstatus_to_exitcode(status), usage.ru_maxrss * 1024, seconds,
            b"".join(chunks[r_out]).decode(errors="replace"), b"".join(chunks[r_err]).decode(errors="replace"))


def progress_printer(method: str, fp32_bytes: int):
    """An ``on_err_line`` that prints each finished block as the stage's progress line reports it, with the
    child's peak RSS so far: a run stopped before its end still leaves per-block figures in the log."""
    import re

    state = {"done": 0, "t": time.perf_counter()}

    def on_line(pid: int, line: str) -> None:
        m = re.search(r"\b(\d+)/(\d+)\b", line) if line.startswith("[quantize]") else None
        if not m or int(m.group(1)) <= state["done"]:
            return
        now = time.perf_counter()
        hwm = child_peak_rss(pid)
        print(f"    {method} block {m.group(1)}/{m.group(2)} done: {now - state['t']:.0f} s since the previous "
              f"report, peak RSS so far {hwm / 1e9:.2f} GB = {hwm / fp32_bytes:.3f} of fp32, "
              f"load average {os.getloadavg()[0]:.1f}", flush=True)
        state.update(done=int(m.group(1)), t=now)

    return on_line


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="llama-3.2-1b", choices=sorted(SHAPES))
    ap.add_argument("--layers", type=int, help="override the layer count (smoke runs; the ratio needs the real count)")
    ap.add_argument("--methods", default="rtn,awq,gptq")
    ap.add_argument("--n-calib", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "scale")
    args = ap.parse_args()
    shape = dict(SHAPES[args.shape])
    if args.layers:
        shape["layers"] = args.layers
    methods = [m for m in args.methods.split(",") if m]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    work = args.work
    runs = work / "runs"
    from qflow.models.sources import resolve_model

    # the bundled model's tokenizer (ids < 49152 fit the 128k vocabulary), converted once per machine
    tokenizer_dir = resolve_model("zoo:smollm2-135m", REPO / "runs" / "test-cache").path
    tag = f"{args.shape}-{shape['layers']}l"
    t0 = time.perf_counter()
    model_dir = write_model(work / f"model-{tag}", shape, tokenizer_dir)
    fp32_bytes = model_params(shape) * 4
    print(f"model: {args.shape} shapes, {shape['layers']} layers, {model_params(shape) / 1e9:.3f} B parameters, "
          f"fp32 {fp32_bytes / 1e9:.2f} GB on disk ({time.perf_counter() - t0:.0f} s to write or reuse)", flush=True)
    print(f"calibration: {args.n_calib} x {args.seq_len} tokens of zoo:wiki-pages; W4 g{args.group_size}; "
          f"load average at start {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)

    recipes = work / "recipes"
    recipes.mkdir(parents=True, exist_ok=True)
    qflow = [sys.executable, "-m", "qflow.cli", "--runs-dir", str(runs)]
    base = recipes / "calibrate.yaml"
    base.write_text(recipe(model_dir, None, args.n_calib, args.seq_len, args.group_size))
    rc, rss, secs, out, err = measured_child([*qflow, "run", str(base), "--no-track", "--json"], env)
    if rc != 0:
        print(err[-3000:], file=sys.stderr)
        return 1
    print(f"model + calibrate (once, not measured against the target): {secs:.0f} s, peak RSS {rss / 1e9:.2f} GB",
          flush=True)
    floor_code = ("import torch, transformers, safetensors, qflow.quant.algos.blockwise, qflow.models.lazy; "
                  "from transformers import LlamaForCausalLM")
    _, floor, _, _, _ = measured_child([sys.executable, "-c", floor_code], env)

    rows = []
    for method in methods:
        path = recipes / f"{method}.yaml"
        path.write_text(recipe(model_dir, method, args.n_calib, args.seq_len, args.group_size))
        rc, rss, secs, out, err = measured_child([*qflow, "run", str(path), "--no-track", "--json", "--force",
                                                  "quantize"], env, progress_printer(method, fp32_bytes))
        if rc != 0:
            print(f"{method}: failed ({rc})\n{err[-3000:]}", file=sys.stderr)
            rows.append((method, None, None, None))
            continue
        st = json.loads(out)["stages"]["quantize"]
        rows.append((method, rss, st["seconds"], st["seconds"] / shape["layers"]))
        print(f"  {method}: peak RSS {rss / 1e9:.2f} GB = {rss / fp32_bytes:.3f} of fp32, stage {st['seconds']:.0f} s, "
              f"process {secs:.0f} s, load average {os.getloadavg()[0]:.1f}", flush=True)

    print(f"\nreference: a process importing torch/transformers/qflow's block-wise code peaks at {floor / 1e9:.2f} GB "
          f"({floor / fp32_bytes:.3f} of the fp32 model)")
    print(f"{'method':<6} {'peak RSS GB':>11} {'ratio to fp32':>13} {'target':>7} {'stage s':>8} {'s/block':>8}")
    for method, rss, secs, per_block in rows:
        if rss is None:
            print(f"{method:<6} {'failed':>11}")
            continue
        ok = "ok" if rss / fp32_bytes < TARGET_RATIO else "ABOVE"
        print(f"{method:<6} {rss / 1e9:11.2f} {rss / fp32_bytes:13.3f} {'<' + str(TARGET_RATIO):>7} {secs:8.1f} "
              f"{per_block:8.2f}  {ok}")

    print("\nprojection (seconds per block x block-size ratio x layers; peak RSS x block-size ratio):")
    one = block_params(shape)
    for name in ("llama-3.1-8b", "llama-3.1-70b"):
        target = SHAPES[name]
        scale = block_params(target) / one
        for method, rss, secs, per_block in rows:
            if rss is None:
                continue
            hours = per_block * scale * target["layers"] / 3600
            print(f"  {name:<14} {method:<5} ~{hours:6.2f} h, peak RSS ~{rss * scale / 1e9:6.1f} GB "
                  f"(fp32 model {model_params(target) * 4 / 1e9:.0f} GB)")
    summary = {"shape": args.shape, "layers": shape["layers"], "fp32_bytes": fp32_bytes, "floor_rss_bytes": floor,
               "n_calib": args.n_calib, "seq_len": args.seq_len, "group_size": args.group_size,
               "rows": [dict(zip(("method", "peak_rss_bytes", "seconds", "seconds_per_block"), r)) for r in rows],
               "loadavg_end": os.getloadavg()[0]}
    (work / f"scale-{tag}.json").write_text(json.dumps(summary, indent=1))
    last = [r for r in rows if r[1] is not None]
    if last:
        print("max_ratio=" + f"{max(r[1] for r in last) / fp32_bytes:.3f}")
    return 0 if all(r[1] is not None for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
