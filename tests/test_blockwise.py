"""Block-wise driver: block-0 capture, propagation, guards, and bit-identical resume after a crash."""

from __future__ import annotations

import filecmp
from pathlib import Path

import pytest
import torch

from qflow.engine.context import StageContext
from qflow.errors import StageError
from qflow.models.adapters import check_group_size, get_adapter
from qflow.quant.algos.awq import AWQOptions, quantize_model_awq
from qflow.quant.algos.blockwise import capture_block0_inputs, capture_block_kwargs, check_calibration, run_blockwise
from qflow.quant.algos.resume import BlockState
from qflow.quant.algos.gptq_model import GPTQOptions, quantize_model_gptq
from qflow.quant.ir import Checkpoint


class SimulatedCrash(RuntimeError):
    """Raised by :func:`crash_after_block` (the test's own hook; production code has none)."""


def crash_after_block(monkeypatch, block: int) -> None:
    """Make the next block-wise run die right after block ``block``'s resume state is saved."""
    original = BlockState.save

    def save(self, next_block, writer, **extra):
        original(self, next_block, writer, **extra)
        if next_block == block + 1:
            raise SimulatedCrash(f"simulated crash after block {block}")

    monkeypatch.setattr(BlockState, "save", save)


def tiny_llama(*, kv_heads: int = 2, layers: int = 2, seed: int = 0, hidden: int = 64, heads: int = 4,
               intermediate: int = 128, vocab: int = 97, attn: str = "sdpa", outliers: bool = True):
    """A random Llama small enough for unit tests (weights ~N(0, 0.05²), a few outlier input channels)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=256, rope_theta=10000.0, tie_word_embeddings=False)
    cfg._attn_implementation = attn
    gen = torch.Generator().manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
            elif outliers and name.endswith("layernorm.weight"):  # activation outliers, as in real LLMs
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
                p[torch.randperm(p.numel(), generator=gen)[:3]] *= 8
    return model


def calib_ids(n: int = 12, seq_len: int = 48, vocab: int = 97, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (n, seq_len), generator=torch.Generator().manual_seed(seed))


def make_ctx(root: Path, *, scratch: Path | None = None) -> StageContext:
    root = Path(root)
    return StageContext(stage_id="quantize", uses="quantize.test", key="k", out_dir=root / "out",
                        scratch=scratch or root / "scratch", run_dir=root / "run", memo_dir=root / "cache", quiet=True)


def same_tree(a: Path, b: Path) -> bool:
    files_a = sorted(p.name for p in a.iterdir())
    files_b = sorted(p.name for p in b.iterdir())
    if files_a != files_b:
        return False
    match, mismatch, errors = filecmp.cmpfiles(a, b, files_a, shallow=False)
    return not mismatch and not errors


# ---- capture ---------------------------------------------------------------

def test_captured_inputs_and_kwargs_reproduce_the_model():
    model = tiny_llama(layers=2)
    adapter = get_adapter(model)
    ids = calib_ids(5, 32)
    with torch.no_grad():
        h = capture_block0_inputs(model, adapter, ids, batch_size=2)
        assert torch.equal(h, model.model.embed_tokens(ids))
        kwargs = capture_block_kwargs(model, adapter, ids)
        assert kwargs[0] is kwargs[1]  # Llama calls every block with the same objects
        assert kwargs[0].get("use_cache") in (False, None)
        for blk, kw in zip(adapter.blocks(), kwargs):
            out = blk(h, **kw)
            h = out[0] if isinstance(out, tuple) else out
        logits = model.lm_head(model.model.norm(h))
        ref = model(input_ids=ids).logits
    assert torch.allclose(logits, ref, atol=1e-5, rtol=1e-5)


def test_calibration_guards():
    model = tiny_llama(layers=1)
    with pytest.raises(StageError, match="too short"):
        check_calibration(torch.zeros(1, 1, dtype=torch.long), model)
    with pytest.raises(StageError, match="max_position_embeddings"):
        check_calibration(torch.zeros(1, 300, dtype=torch.long), model)
    with pytest.raises(StageError, match="vocabulary"):
        check_calibration(torch.full((2, 8), 500, dtype=torch.long), model)
    with pytest.raises(StageError, match="needs >= 4096"):
        check_calibration(torch.zeros(2, 8, dtype=torch.long), model, min_tokens=4096)


def test_unknown_architecture_lists_known_ones():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(StageError, match="known: .*llama"):
        get_adapter(model)


def test_missing_modules_are_an_error_not_a_no_op():
    model = tiny_llama(layers=1)
    block = model.model.layers[0]
    del block.mlp.up_proj
    with pytest.raises(StageError, match="lacks mlp.up_proj"):
        get_adapter(model).awq_sites(block)


def test_group_size_check_from_config():
    cfg = {"model_type": "llama", "hidden_size": 576, "num_attention_heads": 9, "num_key_value_heads": 3,
           "intermediate_size": 1536}
    assert check_group_size(cfg, 64) == []
    (problem,) = check_group_size(cfg, 128)
    assert "576" in problem and "[32, 64]" in problem
    assert "no architecture adapter" in check_group_size({**cfg, "model_type": "gpt2"}, 64)[0]


def test_non_finite_activations_name_block_and_linear(tmp_path):
    model = tiny_llama(layers=2)
    with torch.no_grad():
        model.model.layers[1].post_attention_layernorm.weight[0] = float("inf")
    with pytest.raises(StageError, match=r"model\.layers\.1.*mlp\.gate_proj"):
        quantize_model_gptq(make_ctx(tmp_path), model, get_adapter(model), calib_ids(4, 16),
                            GPTQOptions(bits=4, group_size=32), base_model="tiny")


# ---- resume ----------------------------------------------------------------

def _run(method: str, root: Path, *, scratch: Path | None = None):
    model = tiny_llama(layers=3, seed=3)
    ctx = make_ctx(root, scratch=scratch)
    ids = calib_ids(6, 32)
    if method == "awq":
        res = quantize_model_awq(ctx, model, get_adapter(model), ids, AWQOptions(bits=3, group_size=32, n_grid=5),
                                 base_model="tiny", meta={"m": 1}, batch_size=4)
    else:
        res = quantize_model_gptq(ctx, model, get_adapter(model), ids,
                                  GPTQOptions(bits=3, group_size=32, symmetric=False), base_model="tiny",
                                  meta={"m": 1}, batch_size=4)
    return ctx, res


@pytest.mark.parametrize("method", ["awq", "gptq"])
def test_resume_after_crash_is_bit_identical(tmp_path, monkeypatch, method):
    _, clean = _run(method, tmp_path / "clean")
    scratch = tmp_path / "scratch"
    crash_after_block(monkeypatch, 1)
    with pytest.raises(SimulatedCrash):
        _run(method, tmp_path / "crash1", scratch=scratch)
    assert (scratch / "blockwise_state.pt").is_file()
    monkeypatch.undo()
    ctx, resumed = _run(method, tmp_path / "crash2", scratch=scratch)  # a fresh output dir, same scratch
    assert resumed.resumed_from == 2
    assert same_tree(clean.checkpoint_dir, resumed.checkpoint_dir)
    assert resumed.records == clean.records or len(resumed.records) == len(clean.records)
    assert not (scratch / "blockwise_state.pt").exists()
    assert ctx.info["peak_rss_bytes"] > 0 and ctx.metrics["peak_rss_mb"] > 0
    assert len(Checkpoint(resumed.checkpoint_dir).layers) == 3 * 7


def test_state_from_other_settings_is_ignored(tmp_path, monkeypatch):
    scratch = tmp_path / "scratch"
    crash_after_block(monkeypatch, 0)
    with pytest.raises(SimulatedCrash):
        _run("gptq", tmp_path / "a", scratch=scratch)
    monkeypatch.undo()
    model = tiny_llama(layers=3, seed=3)
    res = quantize_model_gptq(make_ctx(tmp_path / "b", scratch=scratch), model, get_adapter(model), calib_ids(6, 32),
                              GPTQOptions(bits=4, group_size=32), base_model="tiny", batch_size=4)
    assert res.resumed_from == 0


def test_only_one_block_of_activations_is_alive(tmp_path):
    """process() sees exactly its block's inputs; quantized propagation feeds the next block."""
    model = tiny_llama(layers=3)
    adapter = get_adapter(model)
    ids = calib_ids(4, 16)
    seen = []

    def process(block):
        seen.append((block.index, block.inputs.data_ptr(), tuple(block.inputs.shape)))
        acts = block.run(capture=["self_attn.k_proj"])
        assert list(acts.inputs) == ["self_attn.q_proj"]  # shared input stored once

    with torch.no_grad():
        ref_h = model.model.embed_tokens(ids)
    run_blockwise(make_ctx(tmp_path), model, adapter, ids, process, method="probe", base_model="tiny",
                  batch_size=3)
    assert [s[0] for s in seen] == [0, 1, 2]
    assert all(s[2] == tuple(ref_h.shape) for s in seen)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_residual_halves_reproduce_the_block_exactly(attn):
    model = tiny_llama(layers=1, attn=attn)
    adapter = get_adapter(model)
    ids = calib_ids(3, 32)
    with torch.no_grad():
        h = capture_block0_inputs(model, adapter, ids, batch_size=3)
        kw = capture_block_kwargs(model, adapter, ids)[0]
        block = adapter.blocks()[0]
        full = block(h, **kw)
        full = full[0] if isinstance(full, tuple) else full
        split = adapter.mlp_half(block, adapter.attention_half(block, h, kw))
    assert torch.equal(full, split)


def test_gptq_split_pass_gives_the_same_checkpoint(tmp_path, monkeypatch):
    from qflow.models.adapters import ArchAdapter

    _, split = _run("gptq", tmp_path / "split")
    monkeypatch.setattr(ArchAdapter, "splits_residual", False)
    _, whole = _run("gptq", tmp_path / "whole")
    assert same_tree(split.checkpoint_dir, whole.checkpoint_dir)


def test_hqq_resume_after_crash_is_bit_identical(tmp_path, monkeypatch):
    from qflow.quant.algos.hqq_model import HQQOptions, quantize_model_hqq
    from qflow.quant.weights import linear_names

    folder = tmp_path / "model"
    tiny_llama(layers=3).save_pretrained(folder)
    names = linear_names(folder)
    opts = HQQOptions(bits=3, group_size=32)
    clean = quantize_model_hqq(make_ctx(tmp_path / "clean"), folder, opts, names)
    scratch = tmp_path / "scratch"
    crash_after_block(monkeypatch, 0)
    with pytest.raises(SimulatedCrash):
        quantize_model_hqq(make_ctx(tmp_path / "c1", scratch=scratch), folder, opts, names)
    monkeypatch.undo()
    resumed = quantize_model_hqq(make_ctx(tmp_path / "c2", scratch=scratch), folder, opts, names)
    assert resumed.resumed_from == 1
    assert same_tree(clean.checkpoint_dir, resumed.checkpoint_dir)


def test_missing_shards_restart_from_scratch(tmp_path, monkeypatch):
    scratch = tmp_path / "scratch"
    crash_after_block(monkeypatch, 1)
    with pytest.raises(SimulatedCrash):
        _run("gptq", tmp_path / "a", scratch=scratch)
    monkeypatch.undo()
    for shard in (scratch / "ir").glob("shard-*"):
        shard.unlink()
    _, res = _run("gptq", tmp_path / "b", scratch=scratch)
    assert res.resumed_from == 0 and len(Checkpoint(res.checkpoint_dir).layers) == 21


# ---- blocks loaded from disk one at a time -------------------------------------

@pytest.mark.parametrize("method", ["awq", "gptq"])
def test_lazy_blocks_give_the_same_checkpoint_with_one_block_in_memory(tmp_path, method):
    """A model whose blocks stay on disk (qflow.models.lazy) quantizes bit-identically to a
    model loaded whole, and never holds more than one block's weights."""
    from qflow.models.lazy import block_loader, load_model_lazy

    model = tiny_llama(layers=3, seed=3)
    folder = tmp_path / "float"
    model.save_pretrained(folder)
    whole_ctx, whole = _run(method, tmp_path / "whole")

    net, adapter = load_model_lazy(folder, dtype="float32", attn_implementation="sdpa")
    loader = block_loader(net)
    assert loader is not None and all(p.is_meta for p in adapter.blocks()[1].parameters())
    in_memory = []
    original_load = loader.load

    def load(i):
        original_load(i)
        in_memory.append(sorted(loader.loaded))

    loader.load = load
    ctx = make_ctx(tmp_path / "lazy")
    ids = calib_ids(6, 32)
    if method == "awq":
        lazy = quantize_model_awq(ctx, net, adapter, ids, AWQOptions(bits=3, group_size=32, n_grid=5),
                                  base_model="tiny", meta={"m": 1}, batch_size=4)
    else:
        lazy = quantize_model_gptq(ctx, net, adapter, ids, GPTQOptions(bits=3, group_size=32, symmetric=False),
                                   base_model="tiny", meta={"m": 1}, batch_size=4)
    assert same_tree(whole.checkpoint_dir, lazy.checkpoint_dir)
    assert in_memory and max(len(x) for x in in_memory) == 1, in_memory
    assert not loader.loaded and all(p.is_meta for p in adapter.blocks()[2].parameters())


def test_lazy_model_matches_the_whole_model_and_names_missing_tensors(tmp_path):
    from safetensors.torch import load_file, save_file

    from qflow.models.lazy import block_loader, load_model_lazy

    model = tiny_llama(layers=2, seed=5)
    folder = tmp_path / "float"
    model.save_pretrained(folder)
    net, _ = load_model_lazy(folder, dtype="float32", attn_implementation="sdpa")
    loader = block_loader(net)
    for i in range(2):
        loader.load(i)
    ids = calib_ids(2, 16)
    with torch.no_grad():
        assert torch.equal(net(input_ids=ids).logits, model(input_ids=ids).logits)

    weights = load_file(folder / "model.safetensors")
    del weights["model.layers.1.mlp.down_proj.weight"]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    net, _ = load_model_lazy(folder, dtype="float32", attn_implementation="sdpa")
    block_loader(net).load(0)
    with pytest.raises(StageError, match=r"model\.layers\.1\.mlp\.down_proj\.weight is not in the checkpoint"):
        block_loader(net).load(1)


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="VmHWM is Linux's")
def test_peak_rss_is_the_process_own_not_its_parents():
    """Linux carries ru_maxrss across fork+exec: a child of a large parent must not report the parent's peak."""
    import subprocess
    import sys

    ballast = bytearray(600 << 20)   # the parent's resident set grows by 600 MiB (pages touched below)
    ballast[::4096] = b"x" * len(ballast[::4096])
    code = "from qflow.quant.algos.blockwise import peak_rss_bytes; print(peak_rss_bytes())"
    child = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    del ballast
    assert child < 500 << 20, child


def test_fit_batch_size_caps_the_widest_temporary():
    from qflow.quant.algos.blockwise import BATCH_TENSOR_BYTES, fit_batch_size

    from torch import nn

    def mlp(width):
        return nn.Sequential(nn.Linear(2048, width), nn.Linear(width, 2048))

    assert fit_batch_size(mlp(1536), 512, 8) == 8          # the bundled model's width: as asked
    assert fit_batch_size(mlp(8192), 512, 8) == 2          # Llama-3.2-1B: 2 x 512 x 8192 x 4 B = 32 MiB
    assert fit_batch_size(mlp(14336), 2048, 8) == 1        # never below one sequence
    assert fit_batch_size(mlp(8192), 512, 1) == 1
    for width, seq in ((8192, 512), (3072, 1024), (64, 16)):
        b = fit_batch_size(mlp(width), seq, 64)
        assert b == 64 or (b * seq * width * 4 <= BATCH_TENSOR_BYTES < (b + 1) * seq * width * 4)
