"""``evaluate.lm_eval``: EleutherAI lm-evaluation-harness tasks on the (quantized) model, offline."""

from __future__ import annotations

from pydantic import Field

from qflow.artifacts import EvalReport, ModelRef
from qflow.registry import Stage, StageConfig, register

INSTALL_HINT = "pip install lm-eval"


class LMEvalConfig(StageConfig):
    tasks: list[str] = Field(min_length=1)
    include_path: str | None = None          # folder of task YAMLs whose dataset points at local files
    num_fewshot: int | None = Field(None, ge=0)
    limit: int | None = Field(None, ge=1)     # examples per task (None: all)
    batch_size: int = Field(4, ge=1)
    dtype: str = "float32"


def _lm_eval_missing() -> str | None:
    import importlib.util

    if importlib.util.find_spec("lm_eval") is None:
        return (f"package 'lm_eval' is not installed, so evaluate.lm_eval cannot run. "
                f"Fix: {INSTALL_HINT} (then give tasks local data with include_path)")
    return None


@register("evaluate.lm_eval")
class EvaluateLMEval(Stage):
    """Run lm-evaluation-harness tasks (``lm_eval.simple_evaluate``) on the model, datasets from local files.

        harness:
          uses: evaluate.lm_eval
          needs: [quantize]
          with: {tasks: [my_local_task], include_path: ./tasks, limit: 200}

    Needs ``pip install lm-eval``. qflow runs offline (``HF_DATASETS_OFFLINE=1``):
    point each task's ``dataset_path`` at local files (e.g. ``dataset_path: json``
    with ``dataset_kwargs: {data_files: ...}``) in a YAML under ``include_path``.
    Metrics are named ``TASK.METRIC`` (filters other than ``none`` appended: ``TASK.METRIC.FILTER``).
    """

    version = 1
    # TASK.METRIC[.FILTER] as lm-eval names them (arc_easy.acc, gsm8k.exact_match.strict-match)
    metrics = ("*.*",)
    Config = LMEvalConfig
    inputs = {"model": ModelRef}
    outputs = {"report": EvalReport}
    requires_packages = ("lm_eval",)

    def check(self, cfg, inputs_meta):
        problem = _lm_eval_missing()
        return [problem] if problem else []

    def run(self, ctx, cfg, model):
        import json

        from qflow.artifacts import QuantizedCheckpoint
        from qflow.errors import StageError
        from qflow.models.loading import load_model

        problem = _lm_eval_missing()
        if problem:
            raise StageError(problem, where=f"stages.{ctx.stage_id}.uses", fix=INSTALL_HINT)
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager

        net, tok = load_model(model.base_model_dir, dtype=cfg.dtype, device=ctx.device)
        if isinstance(model, QuantizedCheckpoint):
            from qflow.models.quantized import apply_checkpoint
            from qflow.quant.ir import Checkpoint

            ckpt = Checkpoint(model.ir_dir)
            act = any(r.spec.act_bits for r in ckpt.layers.values())
            net = apply_checkpoint(net, ckpt, mode="qlinear" if act else "dequant")
        manager = TaskManager(include_path=cfg.include_path) if cfg.include_path else TaskManager()
        unknown = [t for t in cfg.tasks if t not in manager.all_tasks]
        if unknown:
            raise StageError(f"unknown lm-eval task(s): {', '.join(unknown)}", where=f"stages.{ctx.stage_id}.with.tasks",
                             fix="name tasks defined by lm-eval or by a YAML under include_path")
        lm = HFLM(pretrained=net, tokenizer=tok, batch_size=cfg.batch_size, device=ctx.device)
        try:
            results = lm_eval.simple_evaluate(model=lm, tasks=list(cfg.tasks), num_fewshot=cfg.num_fewshot,
                                              limit=cfg.limit, task_manager=manager, random_seed=ctx.seed,
                                              numpy_random_seed=ctx.seed, torch_random_seed=ctx.seed)
        except (ConnectionError, OSError) as exc:
            raise StageError(f"lm-eval could not load a task's data offline: {exc}",
                             where=f"stages.{ctx.stage_id}.with.tasks",
                             fix="point the task's dataset_path at local files via include_path") from exc
        metrics = {}
        for task, values in (results or {}).get("results", {}).items():
            for key, value in values.items():
                if not isinstance(value, (int, float)) or isinstance(value, bool) or key == "alias":
                    continue
                metric, _, flt = key.partition(",")
                name = f"{task}.{metric}" + (f".{flt}" if flt and flt != "none" else "")
                metrics[name] = float(value)
        ctx.log_metrics(metrics)
        out = ctx.output("report")
        (out / "lm_eval.json").write_text(json.dumps({"metrics": metrics, "results": (results or {}).get("results"),
                                                      "config": cfg.model_dump(mode="json")}, indent=1, default=str))
        ctx.log_artifact(out / "lm_eval.json")
        return {"report": EvalReport(out, tasks=list(cfg.tasks))}
