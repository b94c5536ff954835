"""AWQ and GPTQ cost per decoder block, per model family, as ratios to Llama measured in the same run.

For each family of tests/test_families.py (and the MoE families of tests/test_moe.py) a
random model of the same shape (4 layers, hidden 256, 8 heads / 4 KV heads, MLP 768,
vocabulary 512) is quantized at 4 bits, group 64, on 8 calibration windows of 128 tokens,
one thread, each (family, method) in a fresh subprocess so that its peak RSS is its own.
Printed per row: seconds per block (the method's wall time / number of blocks) and CPU
seconds per block (the process's CPU time over the method / blocks: on a loaded machine
the wall figure carries the load, the CPU figure much less), peak RSS growth during the
method (MiB: the process's own high-water mark ``VmHWM``, reset through
/proc/self/clear_refs when the model and inputs are built, minus the RSS at that reset;
the block-wise driver holds one block's activations at a time, so this is the per-block
working set), and each as a ratio to Llama's row. A family whose ratio jumps is where a
regression is. The load average before and after is printed with the table.

Example::

    .venv/bin/python benchmarks/families.py                 # every family
    .venv/bin/python benchmarks/families.py llama gemma2    # some
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHAPE = {"hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4, "num_attention_heads": 8,
         "num_key_value_heads": 4}
VOCAB, N_CALIB, SEQ_LEN = 512, 8, 128


# mixture-of-experts families (docs/METHODS.md §4.2): 4 experts of width MLP/2, top-2 (the active
# MLP width per token equals the dense families'), Qwen2-MoE with a shared expert of width MLP/2
MOE = {"mixtral": ("MixtralConfig", "MixtralForCausalLM", {"num_local_experts": 4}),
       "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", {"num_experts": 4, "shared_expert_intermediate_size": 384}),
       "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", {"num_experts": 4})}


def build(family: str):
    """The family's model at SHAPE (config extras from tests/test_families.py), weights ~N(0, 0.05²)."""
    import torch
    import transformers

    from tests.test_families import FAMILIES

    shape = dict(SHAPE)
    if family in MOE:
        cfg_name, model_name, extra = MOE[family]
        extra = {**extra, "num_experts_per_tok": 2, "moe_intermediate_size": shape["intermediate_size"] // 2}
        if family == "mixtral":
            shape["intermediate_size"] = extra.pop("moe_intermediate_size")
    else:
        cfg_name, model_name, extra = FAMILIES[family]
    extra = {k: v for k, v in extra.items() if k != "head_dim"}
    cfg = getattr(transformers, cfg_name)(vocab_size=VOCAB, max_position_embeddings=512, tie_word_embeddings=False,
                                          head_dim=shape["hidden_size"] // shape["num_attention_heads"],
                                          **shape, **extra)
    model = getattr(transformers, model_name)(cfg).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    if family in MOE:
        from qflow.models.moe import unfuse_experts

        unfuse_experts(model)
    return model


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak() -> bool:
    """Reset this process's ``VmHWM`` to its current RSS (Linux >= 4.0: "5" to /proc/self/clear_refs), so the
    peak read after the method is the method's own, not model building's; False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def one(family: str, method: str) -> dict:
    """Quantize one family with one method in this process; seconds per block and peak RSS growth."""
    import torch

    from qflow.models.adapters import get_adapter
    from qflow.quant.algos.awq import AWQOptions, quantize_model_awq
    from qflow.quant.algos.blockwise import peak_rss_bytes
    from qflow.quant.algos.gptq_model import GPTQOptions, quantize_model_gptq
    from tests.test_blockwise import make_ctx

    torch.set_num_threads(1)
    model = build(family)
    adapter = get_adapter(model)
    ids = torch.randint(0, VOCAB, (N_CALIB, SEQ_LEN), generator=torch.Generator().manual_seed(1))
    with tempfile.TemporaryDirectory() as tmp:
        ctx = make_ctx(Path(tmp))
        reset = reset_peak()
        start_rss = rss_bytes()
        t0, c0 = time.perf_counter(), time.process_time()
        if method == "awq":
            quantize_model_awq(ctx, model, adapter, ids, AWQOptions(bits=4, group_size=64), base_model="bench",
                               batch_size=8)
        else:
            quantize_model_gptq(ctx, model, adapter, ids, GPTQOptions(bits=4, group_size=64), base_model="bench",
                                batch_size=8)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        peak = peak_rss_bytes()   # VmHWM: this process's own peak (ru_maxrss would carry the parent's)
    n = adapter.n_blocks()
    return {"family": family, "method": method, "seconds_per_block": seconds / n, "cpu_seconds_per_block": cpu / n,
            "peak_rss_growth_mib": (peak - start_rss) / 2**20, "peak_reset": reset}


def main(argv: list[str]) -> None:
    from tests.test_families import FAMILIES

    if len(argv) == 3 and argv[0] == "--one":
        print(json.dumps(one(argv[1], argv[2])))
        return
    families = argv or sorted(FAMILIES) + sorted(MOE)
    if "llama" not in families:
        families = ["llama", *families]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    load_before = os.getloadavg()
    started = time.perf_counter()
    rows = {}
    for method in ("awq", "gptq"):
        for family in families:
            done = subprocess.run([sys.executable, __file__, "--one", family, method], capture_output=True,
                                  text=True, env=env, cwd=REPO)
            if done.returncode != 0:
                print(f"{family} {method}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
                continue
            rows[family, method] = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"{'family':<12} {'method':<6} {'s/block':>8} {'x llama':>8} {'CPU s/block':>11} {'x llama':>8} "
          f"{'peak RSS growth MiB':>20} {'x llama':>8}")
    for (family, method), row in rows.items():
        ref = rows.get(("llama", method))

        def ratio(key, row=row, ref=ref):
            return row[key] / max(ref[key], 1e-9) if ref else float("nan")

        print(f"{family:<12} {method:<6} {row['seconds_per_block']:>8.3f} {ratio('seconds_per_block'):>8.2f} "
              f"{row['cpu_seconds_per_block']:>11.3f} {ratio('cpu_seconds_per_block'):>8.2f} "
              f"{row['peak_rss_growth_mib']:>20.1f} {ratio('peak_rss_growth_mib'):>8.2f}")
    if not all(row["peak_reset"] for row in rows.values()):
        print("note: VmHWM could not be reset on this system: RSS growth includes model building's peak")
    print(f"load average (1/5/15 min) before {'/'.join(f'{x:.2f}' for x in load_before)}, after "
          f"{'/'.join(f'{x:.2f}' for x in os.getloadavg())}; {time.perf_counter() - started:.0f} s in all")


if __name__ == "__main__":
    main(sys.argv[1:])
