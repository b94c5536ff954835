"""``calibrate``: calibration token windows + per-linear input statistics."""

from __future__ import annotations

from pydantic import Field

from qflow.artifacts import CalibSet, ModelRef
from qflow.data.tokens import ReadsText
from qflow.registry import Stage, StageConfig, register
from qflow.specs import DataSpec, Regex


class CalibrateConfig(StageConfig):
    data: DataSpec
    n_samples: int = Field(64, ge=1)
    stats: bool = True            # mean |x| and max |x| per input channel of every decoder linear
    xtx: bool = False             # also X^T X per linear (large: in^2 floats each)
    batch_size: int = Field(4, ge=1)
    targets: Regex = r"\.layers\.\d+\."


@register("calibrate")
class Calibrate(ReadsText, Stage):
    """Build the calibration set: the first ``n_samples`` windows of ``data`` and float input statistics.

        calibrate:
          uses: calibrate
          with: {data: {source: "zoo:wiki-pages", seq_len: 512}, n_samples: 64}

    Outputs ``ids.pt`` ([n_samples, seq_len] token ids), ``info.json`` (source,
    fingerprint = sha256 of the ids as little-endian int64) and
    ``stats.safetensors`` (``<linear>.mean_abs`` / ``.max_abs`` / optional ``.xtx``).
    """

    version = 1
    metrics = ("n_tokens",)   # what it logs (qflow lint checks gates against it)
    Config = CalibrateConfig
    inputs = {"model": ModelRef}
    outputs = {"calib": CalibSet}

    def estimate_peak_bytes(self, cfg, inputs_meta, upstream):
        from qflow.models.memory import model_config_of, whole_model_bytes

        return whole_model_bytes(model_config_of(inputs_meta, upstream), copies=1, batch_size=cfg.batch_size,
                                 seq_len=cfg.data.seq_len, logit_copies=4)

    def run(self, ctx, cfg, model):
        import json
        import re

        import torch
        from safetensors.torch import save_file

        from qflow.data.tokens import token_windows, windows_fingerprint
        from qflow.models.loading import load_model

        if cfg.stats:
            net, tok = load_model(model.base_model_dir, dtype="float32")
        else:   # the token windows need only the tokenizer: a model larger than memory is never loaded
            from transformers import AutoTokenizer

            from qflow.recipe.safety import remote_code_allowed, remote_code_refusal

            with remote_code_refusal(str(model.base_model_dir)):   # only from --trust-remote-code
                net, tok = None, AutoTokenizer.from_pretrained(model.base_model_dir, local_files_only=True,
                                                               trust_remote_code=remote_code_allowed())
        ids = token_windows(cfg.data, tok, cfg.n_samples, ctx.memo_dir, where=f"stages.{ctx.stage_id}.with")
        out = ctx.output("calib")
        torch.save(ids, out / "ids.pt")
        info = {"source": cfg.data.source, "seq_len": cfg.data.seq_len, "n_samples": int(ids.shape[0]),
                "fingerprint": windows_fingerprint(ids)}
        (out / "info.json").write_text(json.dumps(info, indent=1))
        ctx.log_metric("n_tokens", ids.numel())
        if cfg.stats:
            stats = self._stats(ctx, cfg, net, ids, re.compile(cfg.targets))
            save_file(stats, str(out / "stats.safetensors"))
        return {"calib": CalibSet(out, **info)}

    @staticmethod
    def _skip_logits(net, hooked) -> dict:
        """``logits_to_keep=1`` unless the output head is a calibration target: the statistics never
        read the logits, which cost a vocab x hidden matmul per token and, for a 262k vocabulary,
        gigabytes per batch."""
        import inspect

        head = net.get_output_embeddings() if hasattr(net, "get_output_embeddings") else None
        if head is None or any(m is head for m in hooked):
            return {}
        return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(type(net).forward).parameters else {}

    def _stats(self, ctx, cfg, net, ids, pattern):
        import torch

        from qflow.errors import StageError

        acc: dict[str, dict[str, torch.Tensor]] = {}
        hooks = []

        def hook(name):
            def fn(module, args):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
                if not bool(torch.isfinite(x).all()):
                    raise StageError(f"non-finite activations at the input of {name} during calibration",
                                     where=f"stages.{ctx.stage_id}", fix="check the model (dtype overflow?) and the calibration text")
                a = acc.setdefault(name, {"sum_abs": torch.zeros(x.shape[1], dtype=torch.float64),
                                          "max_abs": torch.zeros(x.shape[1]), "n": torch.zeros((), dtype=torch.float64)})
                a["sum_abs"] += x.abs().sum(0, dtype=torch.float64)
                a["max_abs"] = torch.maximum(a["max_abs"], x.abs().amax(0))
                a["n"] += x.shape[0]
                if cfg.xtx:
                    a.setdefault("xtx", torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64))
                    a["xtx"] += (x.T.double() @ x.double())
            return fn

        hooked = []
        for name, module in net.named_modules():
            if isinstance(module, torch.nn.Linear) and pattern.search(name + "."):
                hooks.append(module.register_forward_pre_hook(hook(name)))
                hooked.append(module)
        kwargs = self._skip_logits(net, hooked)
        if not hooks:
            raise StageError(f"no linear layer matches targets {cfg.targets!r}", where=f"stages.{ctx.stage_id}.with.targets",
                             fix="adjust the regex")
        try:
            with torch.no_grad(), ctx.progress(ids.shape[0], "calibration forward") as bar:
                for i in range(0, ids.shape[0], cfg.batch_size):
                    batch = ids[i:i + cfg.batch_size]
                    net(input_ids=batch, use_cache=False, **kwargs)
                    bar.update(batch.shape[0])
        finally:
            for h in hooks:
                h.remove()
        stats = {}
        for name, a in acc.items():
            stats[f"{name}.mean_abs"] = (a["sum_abs"] / a["n"]).float().contiguous()
            stats[f"{name}.max_abs"] = a["max_abs"].contiguous()
            if "xtx" in a:
                stats[f"{name}.xtx"] = (a["xtx"] / a["n"]).float().contiguous()
        return stats
