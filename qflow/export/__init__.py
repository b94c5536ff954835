"""Exporters: qflow's quantized-checkpoint IR to formats other tools load.

    safetensors_ct   Hugging Face folder: compressed-tensors ``pack-quantized`` (vLLM,
                     transformers), or the AutoAWQ GEMM / GPTQ v1 layouts
    gguf_writer      a llama.cpp GGUF (Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q8_0 mapped from qflow's
                     codes where exact, re-quantized from float otherwise)
    readers          qflow's own decoders of every layout written here (round-trip checks)
    inspect          ``qflow inspect PATH``: identify a quantized file from its headers
    layouts          the bit-level packing of each layout (docs/METHODS.md §2), numpy
    onnx_graph       an onnxruntime Llama decoder with a KV cache (graph and files), built from
    onnx_nodes       the graph writer and the nodes of one linear (MatMul / MatMulNBits / W8A8), and
    onnx_weights     each linear's weights converted from the IR (MatMulNBits packing, W8A8 int8)
    onnx_check       round trip and speed of an ONNX export (onnx_bench: sessions and timing)
    verify           the round trip shared by the exporters: qflow's model, windows, logit comparison

Every exporter reads the IR (``qflow.quant.ir.Checkpoint``) and never the
quantized model, so the exported integers are qflow's own codes, not a
re-quantization, wherever the target layout can hold them.
"""
