"""qflow's command line. Thin: parse, call the engine, print.

    qflow run RECIPE [OVERRIDES...] [--dry-run] [--only ID] [--from ID] [--force ID] [--json]
    qflow run -m RECIPE params.bits=3,4 ...        # sweep (Hydra multirun)
    qflow explain RECIPE [OVERRIDES...]
    qflow ls stages | qflow show stage NAME | qflow schema [-o FILE]
    qflow recipes ls | qflow recipes show NAME [OVERRIDES...]
    qflow lint RECIPE... [OVERRIDES...] [--json]                    # exit 1 when it finds something
    qflow lock RECIPE [OVERRIDES...]  |  qflow run RECIPE --locked   # refuses when anything resolves differently
    qflow cache ls | gc --keep N | verify [--fix]
    qflow sync [--runs-dir DIR]                    # upload runs queued while MLflow was unreachable
    qflow ui

Heavy libraries (torch, mlflow) are imported only by the commands that need them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .errors import QflowError
from .interrupts import Terminated


def _runs_root(args) -> Path:
    return Path(args.runs_dir or os.environ.get("QFLOW_RUNS_DIR") or "runs")


def _setup_logging(verbose: bool) -> None:
    import logging

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")


def _offline_defaults() -> None:
    # qflow never reaches a hub unless the user opts in explicitly
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(var, "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    from .threads import passive_wait_policy

    passive_wait_policy()  # before torch loads: idle OpenMP threads sleep instead of spinning on a busy machine


# ---- run / explain --------------------------------------------------------------

def cmd_run(args) -> int:
    from .interrupts import sigterm_raises

    with sigterm_raises():  # SIGTERM ends the MLflow run as KILLED instead of leaving it RUNNING
        return _run(args)


def _run(args) -> int:
    from . import api

    if args.trust_remote_code:
        from .recipe.safety import allow_remote_code

        allow_remote_code()

    if not args.dry_run:
        _set_threads(args)
    if args.multirun and (args.locked or args.lock_file):
        raise QflowError("--locked checks one run against its lock; a sweep is many runs", where="qflow run -m",
                         fix="lock and run each point (qflow lock RECIPE params.bits=3; qflow run --locked ...)")
    common = dict(runs_dir=_runs_root(args), track=not args.no_track, quiet=args.quiet, libraries=args.lib or [],
                  allow_env=args.allow_env or [])
    if args.multirun:
        from .engine.sweep import _print_points

        swept = api.sweep(args.recipe, args.overrides, jobs=args.jobs, objective=args.objective,
                          constraints=args.constraint or [], **common)
        out = swept.to_json()
        if args.json:
            print(json.dumps(out, default=str))
        else:
            _print_points(out["points"], out.get("best"), swept.sweep_dir, swept.mlflow_parent_run_id)
        return 0 if swept.ok else 1
    result = api.run(args.recipe, args.overrides, dry_run=args.dry_run, only=args.only, from_=args.from_,
                     force=args.force or [], locked=bool(args.locked or args.lock_file), lock_file=args.lock_file,
                     **common)
    if args.json:
        print(json.dumps(result.to_json(), default=str))
    else:
        print_summary(result, dry_run=args.dry_run)
    return 0 if result.status == "ok" else 1


def _set_threads(args) -> None:
    """torch/numba threads from the free cores or QFLOW_THREADS (qflow/threads.py), split across sweep jobs."""
    from .threads import ThreadChoice, apply_thread_policy, current_choice

    choice = current_choice()
    jobs = max(1, args.jobs) if args.multirun else 1
    if jobs > 1:
        choice = ThreadChoice(max(1, choice.threads // jobs), f"{choice.reason}; split across {jobs} sweep jobs")
        os.environ["OMP_NUM_THREADS"] = str(choice.threads)  # sweep workers' torch starts with it
    apply_thread_policy(choice)
    # logged (shown with -v), not printed: a bad recipe's error must stay the only paragraph on stderr
    import logging

    logging.getLogger("qflow.threads").info("threads: %d (%s; QFLOW_THREADS=N overrides)", choice.threads,
                                            choice.reason)


def _sweep_report(points: list[dict], folder: Path) -> Path | None:
    """The Pareto report of a sweep's points (the engine takes it as a callback: it knows no evaluation)."""
    from .evaluation.report import pareto_report_for_points

    return pareto_report_for_points(points, folder)


def print_summary(result, dry_run: bool = False) -> None:
    from .units import format_bytes

    stream = sys.stdout

    rows = [("stage", "uses", "status", "est. peak" if dry_run else "seconds", "key")]
    for sid, r in result.stages.items():
        fourth = (format_bytes(r.peak_estimate_bytes) if r.peak_estimate_bytes else "") if dry_run \
            else f"{r.seconds:.1f}"
        rows.append((sid, r.uses, r.status, fourth, (r.key or "")[:12]))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    for i, row in enumerate(rows):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip(), file=stream)
        if i == 0:
            print("  ".join("-" * w for w in widths), file=stream)
    for sid, r in result.stages.items():
        if r.error:
            print(f"\n{sid} {r.status}: {r.error}", file=stream)
    if result.metrics:
        print("\nmetrics:", file=stream)
        for k, v in result.metrics.items():
            print(f"  {k:<32} {_fmt(v)}", file=stream)
        # what a metric means, where its stage says so (evaluate.lm: which KL, which bpw convention)
        for sid, r in result.stages.items():
            for k, v in (r.tags or {}).items():
                if k.startswith("qflow.metric."):
                    print(f"  {sid}/{k[len('qflow.metric.'):]}: {v}", file=stream)
    # what a stage wants the user to read (e.g. per-layer specs, recipe overrides beating a plan)
    notes = [(sid, k, v) for sid, r in result.stages.items() for k, v in (r.tags or {}).items()
             if k.startswith(("qflow.note.", "qflow.layers."))]
    if notes:
        print("\nnotes:", file=stream)
        for sid, k, v in notes:
            print(f"  {sid}/{k.split('.', 2)[2]}: {v}", file=stream)
    for g in result.gates:
        mark = "PASS" if g.passed else "FAIL"
        print(f"gate {mark} {g.stage}/{g.metric}: {g.reason or _fmt(g.value)}", file=stream)
    if not dry_run:
        print(f"\nrun folder: {result.run_dir}", file=stream)
        if result.mlflow_run_id:
            print(f"mlflow run: {result.mlflow_run_id} (qflow ui to browse)", file=stream)
        print(f"status: {result.status}", file=stream)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def cmd_explain(args) -> int:
    from . import api

    report = api.explain(args.recipe, args.overrides, runs_dir=_runs_root(args), libraries=args.lib or [],
                         allow_env=args.allow_env or [], trust_remote_code=args.trust_remote_code)
    for sid, e in report.items():
        if e.status == "hit":
            print(f"{sid:<14} hit   {e.key[:12]}")
        elif e.closest is None:
            print(f"{sid:<14} miss  {e.key[:12]}  ({e.reason})")
        else:
            print(f"{sid:<14} miss  {e.key[:12]}  closest {e.closest[:12]} differs in:")
            for line in e.differs:
                print(f"{'':<22}{line}")
    if args.json:
        print(json.dumps({sid: e.to_json() for sid, e in report.items()}))
    return 0


# ---- stages / schema ---------------------------------------------------------------

def cmd_ls(args) -> int:
    from .registry import discover

    reg = discover()
    if args.json:
        print(json.dumps({"stages": {n: {"module": reg.origins[n], "version": c.version,
                                         "summary": c.doc().splitlines()[0] if c.doc() else ""}
                                     for n, c in sorted(reg.stages.items())},
                          "broken": reg.broken}))
        return 0
    width = max((len(n) for n in reg.stages), default=10)
    for name, cls in sorted(reg.stages.items()):
        summary = cls.doc().splitlines()[0] if cls.doc() else ""
        print(f"{name:<{width}}  v{cls.version}  {summary}")
    for module, err in reg.broken.items():
        print(f"BROKEN {module}: {err}")
    return 1 if reg.broken else 0


def cmd_show(args) -> int:
    from .errors import did_you_mean
    from .registry import discover

    reg = discover()
    cls = reg.stages.get(args.name)
    if cls is None:
        raise QflowError(f"unknown stage '{args.name}'", where="qflow show stage", fix=did_you_mean(args.name, reg.stages))
    print(f"{cls.name}  (version {cls.version}, module {reg.origins[cls.name]})\n")
    print(cls.doc() or "(no description)")
    print("\ninputs:  " + (", ".join(f"{k}: {v.__name__}" for k, v in cls.inputs.items()) or "none"))
    print("outputs: " + (", ".join(f"{k}: {v.__name__}" for k, v in cls.outputs.items()) or "none"))
    if cls.metrics is not None:   # what gates may name (qflow lint); the engine adds peak_rss_mb to every stage
        print("metrics: " + ", ".join((*cls.metrics, "peak_rss_mb")))
    print("\nconfig schema:")
    print(json.dumps(cls.Config.model_json_schema(), indent=2))
    return 0


def recipe_schema() -> dict:
    from .recipe.schema import Recipe
    from .registry import discover

    schema = Recipe.model_json_schema()
    variants = []
    for name, cls in sorted(discover().stages.items()):
        cfg_schema = cls.Config.model_json_schema()
        defs = cfg_schema.pop("$defs", {})
        schema.setdefault("$defs", {}).update(defs)
        variants.append({
            "type": "object",
            "properties": {"uses": {"const": name}, "needs": {"type": "array", "items": {"type": "string"}},
                           "with": cfg_schema, "gates": {"type": "object", "additionalProperties": {"$ref": "#/$defs/Gate"}},
                           "inputs": {"type": "object", "additionalProperties": {"type": "string"}}},
            "required": ["uses"], "additionalProperties": False,
            "description": (cls.doc().splitlines()[0] if cls.doc() else name),
        })
    schema["properties"]["stages"] = {"type": "object", "additionalProperties": {"oneOf": variants}}
    schema["properties"]["defaults"] = {"type": "array"}
    schema["properties"]["hydra"] = {"type": "object"}
    schema["title"] = "qflow recipe"
    return schema


def cmd_schema(args) -> int:
    text = json.dumps(recipe_schema(), indent=2)
    if args.output:
        Path(args.output).write_text(text)
        print(f"wrote {args.output}", file=sys.stderr)
    else:
        print(text)
    return 0


# ---- cache -----------------------------------------------------------------------

def cmd_cache(args) -> int:
    from .engine.cache import Broken, CacheStore

    root = _runs_root(args)
    store = CacheStore(root / "cache")
    if args.cache_cmd == "ls":
        rows = []
        for e in store.items():
            if isinstance(e, Broken):
                rows.append({"key": e.key, "stage": "?", "stage_id": "", "bytes": 0, "committed_at": None,
                             "broken": e.problem})
                continue
            ingr = e.manifest.get("ingredients", {})
            rows.append({"key": e.key, "stage": ingr.get("stage") or f"memo:{e.manifest.get('memo')}",
                         "stage_id": e.manifest.get("stage_id", ""), "bytes": store.size_bytes(e),
                         "committed_at": e.manifest.get("committed_at")})
        if args.json:
            print(json.dumps(rows))
        else:
            for r in rows:
                if "broken" in r:
                    print(f"{r['key'][:12]}  BROKEN: {r['broken']} (qflow cache verify --fix removes it)")
                else:
                    print(f"{r['key'][:12]}  {r['stage']:<24} {r['stage_id']:<12} {r['bytes'] / 1e6:10.1f} MB")
            n_broken = sum("broken" in r for r in rows)
            print(f"{len(rows)} entries, {sum(r['bytes'] for r in rows) / 1e6:.1f} MB"
                  + (f", {n_broken} broken" if n_broken else ""))
        return 0
    if args.cache_cmd == "gc":
        return _gc(root, store, args.keep, args.dry_run, args.stale_days, args.libs_days)
    if args.cache_cmd == "verify":
        return _verify(store, args.fix)
    return 2


def _verify(store, fix: bool) -> int:
    """Re-hash every entry; with ``fix``, remove the bad ones (under their lock; keys in use are skipped)."""
    from .engine.cache import Broken

    bad = busy = n = 0
    for e in store.items():
        n += 1
        problems = [e.problem] if isinstance(e, Broken) else store.verify(e)
        if not problems:
            continue
        bad += 1
        print(f"{'BROKEN' if isinstance(e, Broken) else 'CORRUPT'} {e.key[:12]}: {'; '.join(problems)}")
        if fix:
            lock = store.try_lock(e.key)
            if lock is None:
                busy += 1
                print(f"  skipped {e.key[:12]}: in use by a running qflow (re-run verify --fix when it ends)")
                continue
            try:
                store.remove(e.key)
            finally:
                lock.release()
            print(f"  removed {e.key[:12]}")
    if fix:
        store.empty_trash()
    print(f"verified {n} entries: {n - bad} ok, {bad} corrupt" + (f", {busy} in use and skipped" if busy else ""))
    return 1 if bad and (not fix or busy) else 0


def _gc(root: Path, store, keep: int, dry_run: bool, stale_days: float, libs_days: float = 30.0) -> int:
    """Entries not used by the last ``keep`` runs, orphan scratch and temp folders, old quarantine, trash,
    fetched recipe libraries (``<cache>/libs``) neither listed by those runs nor used for ``libs_days`` days."""
    from .engine.cache import Broken
    from .recipe.libraries import collect_fetched

    runs = sorted((root / "runs").glob("*/summary.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    live: set[str] = set()
    live_libs: set[str] = set()
    for summary in runs[:keep]:
        try:
            data = json.loads(summary.read_text())
        except (OSError, json.JSONDecodeError):
            continue  # a run killed while writing its summary uses nothing
        live |= {k for k in data.get("keys", {}).values() if k}
        live |= set(data.get("memo_keys", []))
        live_libs |= {str(n) for n in data.get("libraries", []) or []}
    freed = removed = busy = 0
    for e in list(store.items()):
        if e.key in live and not isinstance(e, Broken):
            continue
        lock = store.try_lock(e.key)
        if lock is None:
            busy += 1
            continue
        try:
            freed += 0 if isinstance(e, Broken) else store.size_bytes(e)
            removed += 1
            if not dry_run:
                store.remove(e.key)
        finally:
            lock.release()
    verb = "would remove" if dry_run else "removed"
    print(f"{verb} {removed} entries ({freed / 1e6:.1f} MB); kept those used by the last {keep} runs"
          + (f"; skipped {busy} in use by a running qflow" if busy else ""))
    scratch = store.collect_scratch(stale_days, dry_run=dry_run)
    quarantined = store.collect_quarantine(stale_days, dry_run=dry_run)
    if not dry_run:
        tmp = store.clean_tmp()
        trash = store.empty_trash()
        print(f"removed {len(scratch)} scratch folders (committed keys, or untouched for {stale_days:g} days), "
              f"{len(quarantined)} quarantined entries older than {stale_days:g} days, "
              f"{len(tmp)} temp folders of ended runs, {trash} leftovers in trash")
    else:
        print(f"would remove {len(scratch)} scratch folders and {len(quarantined)} quarantined entries")
    libs = collect_fetched(store.root, live_libs, libs_days, stale_days, dry_run=dry_run)
    freed = sum(n for rows in libs.values() for _, n in rows)
    shown = ", ".join(name for name, _ in libs["libraries"][:5]) + (" ..." if len(libs["libraries"]) > 5 else "")
    print(f"{verb} {len(libs['libraries'])} fetched recipe libraries ({freed / 1e6:.1f} MB"
          + (f": {shown}" if shown else "") + f"; kept those used by the last {keep} runs or in the last "
          f"{libs_days:g} days), {len(libs['names'])} qualified-name folders, {len(libs['temps'])} fetch temps")
    return 0


def cmd_sweep(args) -> int:
    from .engine.sweep import sweep_status

    rows = sweep_status(_runs_root(args), args.sweep)
    if args.json:
        print(json.dumps(rows))
        return 0
    if not rows:
        print("no sweep points found")
        return 0
    print(f"sweep {rows[0]['sweep']}")
    for r in rows:
        print(f"  [{r['job']}] {r['status']:<8} {' '.join(r['overrides'])}")
    counts = {s: sum(r["status"] == s for r in rows) for s in ("done", "running", "failed", "died")}
    print("  " + ", ".join(f"{n} {s}" for s, n in counts.items() if n))
    return 0


def cmd_report(args) -> int:
    from .evaluation.report import cli_report

    return cli_report(args, _runs_root(args))


def cmd_inspect(args) -> int:
    from .export.inspect import cli_inspect

    return cli_inspect(args)


def cmd_ui(args) -> int:
    from .tracking import find_run, run_page, serve_ui

    root = _runs_root(args)
    if args.open:
        experiment_id, run_id = find_run(root, args.open)
        print(f"run {run_id}: {run_page(experiment_id, run_id, f'http://127.0.0.1:{args.port}')}", flush=True)
        if args.url_only:
            return 0
    return serve_ui(root, port=args.port)


def cmd_sync(args) -> int:
    from .engine.sync import sync_pending

    root = Path(args.sync_runs_dir) if args.sync_runs_dir else _runs_root(args)
    rows = sync_pending(root, report=_sweep_report)
    if args.json:
        print(json.dumps(rows, default=str))
    elif not rows:
        print(f"nothing to sync: no queued runs or sweeps under {root}")
    for r in [] if args.json else rows:
        name = Path(r["run_dir"]).name
        if r["status"] == "uploaded" and r["kind"] == "sweep":
            print(f"uploaded sweep {name} -> mlflow parent run {r['run_id']} (experiment {r['experiment']}, "
                  f"{r['mlflow_status']}): {r['points']} points ({r['points_reused']} were already there)")
        elif r["status"] == "uploaded":
            print(f"uploaded {name} -> mlflow run {r['run_id']} (experiment {r['experiment']}, "
                  f"{r['mlflow_status']}): {r['params']} params, {r['metrics']} metrics, "
                  f"artifacts {', '.join(r['artifacts']) or 'none'}")
        else:
            print(f"{r['status']} {name}: {r['reason']}")
    return 1 if any(r["status"] == "failed" for r in rows) else 0


# ---- recipe libraries, lock, lint -----------------------------------------------------

def _libraries(args):
    from .recipe.libraries import resolve_libraries

    return resolve_libraries(args.lib or [], _runs_root(args) / "cache")


def cmd_recipes(args) -> int:
    from .recipe.libraries import list_recipes

    local = Path(args.dir) if args.dir else (Path("recipes") if Path("recipes").is_dir() else None)
    if args.recipes_cmd == "ls":
        rows = list_recipes(_libraries(args), local)
        if args.json:
            print(json.dumps(rows))
            return 0
        width = max((len(r["qualified"]) for r in rows), default=10)
        for r in rows:
            print(f"{r['qualified']:<{width}}  [{r['library']}]  {r['description']}")
        return 0
    from .recipe.provenance import find_recipe, render, sources

    path = find_recipe(args.name, _libraries(args), local)
    cfg, where = sources(path, args.overrides, libraries=args.lib or [], cache_dir=_runs_root(args) / "cache")
    if args.json:
        print(json.dumps({"recipe": str(path), "config": cfg, "sources": where}, default=str))
    else:
        print(f"# {path} composed" + (f" with {' '.join(args.overrides)}" if args.overrides else ""))
        print(render(cfg, where, Path.cwd()))
    return 0


def cmd_lock(args) -> int:
    from . import api

    path, record = api.lock(args.recipe, args.overrides, runs_dir=_runs_root(args), libraries=args.lib or [],
                            allow_env=args.allow_env or [], output=args.output,
                            trust_remote_code=args.trust_remote_code)
    if args.json:
        print(json.dumps(record, default=str))
    else:
        libs = ", ".join(f"{k} {v['fingerprint'][:19]}" for k, v in record["libraries"].items()) or "none"
        print(f"wrote {path}: {len(record['stages'])} stages, libraries {libs}")
    return 0


def cmd_lint(args) -> int:
    from .engine.lint import lint

    recipes = [a for a in args.targets if a.endswith((".yaml", ".yml"))]
    overrides = [a for a in args.targets if not a.endswith((".yaml", ".yml"))]
    if not recipes:
        raise QflowError("no recipe to lint", where="qflow lint", fix="pass one or more .yaml recipe files")
    model_check = None
    if args.trust_remote_code:
        from .recipe.safety import allow_remote_code

        allow_remote_code()
    if not args.no_model:
        from .models.lint import model_findings as model_check
    findings = []
    for recipe in recipes:
        findings += lint(recipe, overrides, libraries=args.lib or [], cache_root=_runs_root(args) / "cache",
                         model_check=model_check)
    if args.json:
        print(json.dumps({"findings": findings, "recipes": recipes}))
    else:
        for f in findings:
            print(f"{f['recipe']}: {f['where']}: [{f['code']}] {f['message']}" + (f" Fix: {f['fix']}" if f["fix"] else ""))
        print(f"{len(findings)} finding{'s' if len(findings) != 1 else ''} in {len(recipes)} recipe"
              f"{'s' if len(recipes) != 1 else ''}")
    return 1 if findings else 0


# ---- parser -------------------------------------------------------------------------

VERSIONED = ("torch", "transformers", "safetensors", "hydra-core", "omegaconf", "pydantic", "mlflow", "numpy",
             "numba", "gguf", "onnx", "onnxruntime", "compressed-tensors", "lm-eval", "optuna", "ray")


def versions() -> dict[str, str | None]:
    """qflow's version, Python's and each key library's (None: not installed), read from package metadata."""
    import platform
    from importlib import metadata

    from . import __version__

    found: dict[str, str | None] = {"qflow": __version__, "python": platform.python_version()}
    for name in VERSIONED:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


class _PrintVersions(argparse.Action):
    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        for name, version in versions().items():
            print(f"{name:<20} {version or 'not installed'}")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qflow", description="Declarative, cached, tracked model quantization.")
    p.add_argument("--runs-dir", help="output root (default: $QFLOW_RUNS_DIR or ./runs)")
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("--version", action=_PrintVersions, help="print the versions of qflow, torch and key libraries")
    sub = p.add_subparsers(dest="cmd", required=True)
    _add_run(sub)

    e = sub.add_parser("explain", help="per stage: cache hit or miss, and what changed")
    e.add_argument("recipe")
    e.add_argument("overrides", nargs="*")
    e.add_argument("--lib", action="append")
    e.add_argument("--allow-env", action="append", metavar="NAME")
    e.add_argument("--trust-remote-code", action="store_true",
                   help="let a checkpoint's own Python code (auto_map) run; a recipe can never ask for it")
    e.add_argument("--json", action="store_true")
    e.set_defaults(fn=cmd_explain)

    ls = sub.add_parser("ls", help="list registered stages")
    ls.add_argument("what", choices=["stages"])
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(fn=cmd_ls)

    sh = sub.add_parser("show", help="describe one stage")
    sh.add_argument("what", choices=["stage"])
    sh.add_argument("name")
    sh.set_defaults(fn=cmd_show)

    sc = sub.add_parser("schema", help="JSON Schema of recipes (for editors)")
    sc.add_argument("-o", "--output")
    sc.set_defaults(fn=cmd_schema)

    _add_cache(sub)
    _add_library_commands(sub)

    sw = sub.add_parser("sweep", help="sweep bookkeeping")
    swsub = sw.add_subparsers(dest="sweep_cmd", required=True)
    sws = swsub.add_parser("status", help="points done, running, failed (latest sweep by default)")
    sws.add_argument("sweep", nargs="?", help="sweep folder or name under runs/sweeps")
    sws.add_argument("--json", action="store_true")
    sw.set_defaults(fn=cmd_sweep)

    rp = sub.add_parser("report", help="Pareto report across the runs of an experiment, a sweep or run ids")
    rp.add_argument("target", nargs="+", help="experiment name, sweep folder/name, or MLflow run id(s) separated by "
                    "commas; several targets share one report (e.g. a mixed-precision sweep and a uniform one)")
    rp.add_argument("--objectives", default="bpw_quantized:min,kl_mean:min",
                    help="metric:min|max pairs (metric names without the stage prefix match any stage)")
    rp.add_argument("--constraint", action="append", default=[], help="hard constraint, e.g. evaluate/bpw_quantized<=4.5")
    rp.add_argument("-o", "--output", help="output folder (default: <runs>/reports/<target>)")
    rp.add_argument("--json", action="store_true")
    rp.set_defaults(fn=cmd_report)

    ins = sub.add_parser("inspect", help="identify a quantized model file/folder from its headers")
    ins.add_argument("path")
    ins.add_argument("--json", action="store_true")
    ins.set_defaults(fn=cmd_inspect)

    sy = sub.add_parser("sync", help="upload runs queued while the MLflow store was unreachable")
    sy.add_argument("--runs-dir", dest="sync_runs_dir", help="output root (default: $QFLOW_RUNS_DIR or ./runs)")
    sy.add_argument("--json", action="store_true")
    sy.set_defaults(fn=cmd_sync)

    u = sub.add_parser("ui", help="start the MLflow UI on 127.0.0.1")
    u.add_argument("--port", type=int, default=5000)
    u.add_argument("--open", metavar="RUN", help="print the URL of this run (MLflow run id or run folder)")
    u.add_argument("--url-only", action="store_true", help="with --open: print the URL, start no server")
    u.set_defaults(fn=cmd_ui)
    return p


def _add_run(sub) -> None:
    r = sub.add_parser("run", help="run a recipe (or a sweep with -m)")
    r.add_argument("recipe")
    r.add_argument("overrides", nargs="*", help="Hydra overrides: key=value, +key=value, ~key")
    r.add_argument("-m", "--multirun", action="store_true", help="sweep over comma lists / range() / choice()")
    r.add_argument("-j", "--jobs", type=int, default=1, help="parallel sweep points (local)")
    r.add_argument("--objective", help="sweep objective METRIC[:min|max], e.g. evaluate/kl_mean:min (Optuna)")
    r.add_argument("--constraint", action="append", help="sweep constraint, e.g. evaluate/bpw_quantized<=3.5")
    r.add_argument("--dry-run", action="store_true", help="print the plan, its keys and cache status")
    r.add_argument("--only", metavar="ID", help="run only this stage (upstream from the cache)")
    r.add_argument("--from", dest="from_", metavar="ID", help="recompute this stage and everything after it")
    r.add_argument("--force", metavar="ID", action="append", help="recompute this stage even if cached")
    r.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    r.add_argument("--no-track", action="store_true", help="do not write to MLflow")
    r.add_argument("--lib", action="append", help="recipe library: folder, pkg://module or git+URL[@ref]")
    r.add_argument("--allow-env", action="append", metavar="NAME",
                   help="let the recipe read this environment variable with ${oc.env:NAME} (redacted when tracked)")
    r.add_argument("-q", "--quiet", action="store_true")
    r.add_argument("--trust-remote-code", action="store_true",
                   help="let a checkpoint's own Python code (auto_map) run; a recipe can never ask for it")
    r.add_argument("--locked", action="store_true", help="refuse to run unless the recipe resolves to RECIPE.lock")
    r.add_argument("--lock-file", metavar="PATH", help="the lock to check (implies --locked)")
    r.set_defaults(fn=cmd_run)


def _add_library_commands(sub) -> None:
    rc = sub.add_parser("recipes", help="recipes of every library: ls, show NAME (values with their source file:line)")
    rsub = rc.add_subparsers(dest="recipes_cmd", required=True)
    rl = rsub.add_parser("ls", help="every recipe of ./recipes and of every library, with its description")
    rs = rsub.add_parser("show", help="the composed recipe, each value with the file and line it came from")
    rs.add_argument("name", help="a .yaml path, or a name from `qflow recipes ls` (qualified: LIBRARY/NAME)")
    rs.add_argument("overrides", nargs="*")
    for x in (rl, rs):
        x.add_argument("--lib", action="append", help="recipe library: folder, NAME=DIR, pkg://NAME, git+URL@COMMIT")
        x.add_argument("--dir", help="the local recipes folder (default: ./recipes)")
        x.add_argument("--json", action="store_true")
    rc.set_defaults(fn=cmd_recipes)

    lk = sub.add_parser("lock", help="write RECIPE.lock: resolved recipe, model/data fingerprints, library commits")
    lk.add_argument("recipe")
    lk.add_argument("overrides", nargs="*")
    lk.add_argument("--lib", action="append", help="recipe library: folder, NAME=DIR, pkg://NAME, git+URL@COMMIT")
    lk.add_argument("--allow-env", action="append", metavar="NAME")
    lk.add_argument("-o", "--output", help="lock file (default: the recipe's path with .lock)")
    lk.add_argument("--trust-remote-code", action="store_true",
                    help="let a checkpoint's own Python code (auto_map) run; a recipe can never ask for it")
    lk.add_argument("--json", action="store_true")
    lk.set_defaults(fn=cmd_lock)

    li = sub.add_parser("lint", help="check recipes before running them (exit 1 when anything is found)")
    li.add_argument("targets", nargs="+", metavar="RECIPE|OVERRIDE", help="recipe files, then overrides for all")
    li.add_argument("--lib", action="append", help="recipe library: folder, NAME=DIR, pkg://NAME, git+URL@COMMIT")
    li.add_argument("--no-model", action="store_true", help="skip the checks against the model's configuration")
    li.add_argument("--trust-remote-code", action="store_true", help="let the model's own configuration code run")
    li.add_argument("--json", action="store_true")
    li.set_defaults(fn=cmd_lint)


def _add_cache(sub) -> None:
    c = sub.add_parser("cache", help="inspect and maintain the cache")
    csub = c.add_subparsers(dest="cache_cmd", required=True)
    cl = csub.add_parser("ls")
    cl.add_argument("--json", action="store_true")
    cg = csub.add_parser("gc")
    cg.add_argument("--keep", type=int, default=10, help="keep entries used by the last N runs")
    cg.add_argument("--dry-run", action="store_true")
    cg.add_argument("--stale-days", type=float, default=7.0,
                    help="also remove scratch (resume state) of uncommitted keys and quarantined entries this old")
    cg.add_argument("--libs-days", type=float, default=30.0,
                    help="remove fetched git recipe libraries (<cache>/libs) no run used for this many days, "
                         "unless one of the last --keep runs used them (a pinned commit is fetched again)")
    cv = csub.add_parser("verify", help="re-hash every entry")
    cv.add_argument("--fix", action="store_true", help="remove corrupt and broken entries")
    c.set_defaults(fn=cmd_cache)


def _accept_global_options(parser: argparse.ArgumentParser, options: list | None = None) -> argparse.ArgumentParser:
    """Let the global options follow the command as well (``qflow run R --runs-dir D``, ``qflow cache ls -v``).

    Every (nested) subcommand gets a copy whose default is SUPPRESS, so a value given before the
    command survives unless the same option is repeated after it; a subcommand with its own
    spelling of an option (``qflow sync --runs-dir``) keeps its own. argparse has no public way
    to list subcommands, hence ``_actions``.
    """
    if options is None:
        options = [a for a in parser._actions if isinstance(a, (argparse._StoreAction, argparse._StoreTrueAction))]
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        for subparser in {id(s): s for s in action.choices.values()}.values():
            for opt in options:
                kwargs = {"dest": opt.dest, "default": argparse.SUPPRESS, "help": opt.help}
                if isinstance(opt, argparse._StoreTrueAction):
                    kwargs["action"] = "store_true"
                try:
                    subparser.add_argument(*opt.option_strings, **kwargs)
                except argparse.ArgumentError:  # the subcommand defines this option itself
                    pass
            _accept_global_options(subparser, options)
    return parser


def main(argv: list[str] | None = None) -> int:
    _offline_defaults()
    parser = _accept_global_options(build_parser())
    # overrides may come after flags (`qflow run R --json a=1`): collect the leftovers
    args, extra = parser.parse_known_args(argv)
    if extra:
        if hasattr(args, "overrides") and not any(e.startswith("-") for e in extra):
            args.overrides = list(args.overrides) + extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    _setup_logging(args.verbose)
    try:
        return args.fn(args)
    except QflowError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a full disk outside a stage (run folder, summary): say so; other errors are bugs
        from .errors import disk_full

        full = disk_full(exc, where=f"qflow {getattr(args, 'cmd', '')}".strip())
        if full is None:
            raise
        print(f"error: {full}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished stages are cached, a re-run resumes", file=sys.stderr)
        return 130
    except Terminated as exc:
        print(f"{exc}; finished stages are cached, a re-run resumes", file=sys.stderr)
        return exc.exit_status


if __name__ == "__main__":
    sys.exit(main())
