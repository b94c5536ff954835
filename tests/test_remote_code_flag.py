"""``--trust-remote-code`` (issue 16): only the command line (or the Python API's argument) lets a
checkpoint's own Python code run. Every command that composes a recipe refuses the key in a recipe;
the flag of ``lock`` / ``explain`` / ``run`` reaches the code that loads models; every transformers
``from_pretrained`` / ``from_config`` in qflow passes ``trust_remote_code`` explicitly; the export
readers run a checkpoint's code only with the flag. (Recipe, library and override refusals at
composition: tests/test_recipe_security.py.)"""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import pytest

from qflow.cli import main
from qflow.errors import SourceError
from qflow.recipe.safety import REMOTE_CODE_ENV, remote_code, remote_code_allowed
from tests.conftest import tiny_recipe, write_recipe

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def no_remote_code(monkeypatch):
    """The flag off, restored after the test (the CLI sets it process-wide)."""
    monkeypatch.setenv(REMOTE_CODE_ENV, "0")


def _remote_code_model(folder: Path, tiny_model_dir: Path, marker: Path) -> Path:
    """The tiny model with its own configuration and model classes in the folder's Python files; importing
    them writes ``marker``."""
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config |= {"model_type": "evilllama", "architectures": ["EvilForCausalLM"],
               "auto_map": {"AutoConfig": "configuration_evil.EvilConfig",
                            "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "configuration_evil.py").write_text(
        f"open({str(marker)!r}, 'a').write('config ')\nfrom transformers import LlamaConfig\n\n\n"
        "class EvilConfig(LlamaConfig):\n    model_type = 'evilllama'\n")
    (folder / "modeling_evil.py").write_text(
        f"open({str(marker)!r}, 'a').write('model ')\nfrom transformers import LlamaForCausalLM\n\n"
        "from .configuration_evil import EvilConfig\n\n\n"
        "class EvilForCausalLM(LlamaForCausalLM):\n    config_class = EvilConfig\n")
    return folder


@pytest.mark.parametrize("command", ["run {} --dry-run --no-track", "lock {}", "explain {}", "lint {} --no-model",
                                     "recipes show {}"])
def test_no_command_takes_trust_remote_code_from_a_recipe(tmp_path, capsys, tiny_model_dir, no_remote_code,
                                                          command):
    text = tiny_recipe(tiny_model_dir).replace(f'model: {{source: "{tiny_model_dir}"}}',
                                               f'model: {{source: "{tiny_model_dir}", trust_remote_code: true}}')
    recipe = write_recipe(tmp_path / "r", text)
    code = main(["--runs-dir", str(tmp_path / "runs"), *[str(recipe) if a == "{}" else a for a in command.split()]])
    out = capsys.readouterr()
    said = out.out + out.err   # lint reports findings on stdout, the other commands errors on stderr
    assert code != 0 and "--trust-remote-code on the command line" in said and "Traceback" not in said
    assert not remote_code_allowed() and not (tmp_path / "r" / "recipe.lock").exists()


def test_lock_and_explain_flags_reach_the_model_code(tmp_path, monkeypatch, capsys, tiny_model_dir, no_remote_code):
    import qflow.engine.keys as keys

    recipe = write_recipe(tmp_path / "r", tiny_recipe(tiny_model_dir))
    runs = ["--runs-dir", str(tmp_path / "runs")]
    assert main([*runs, "lock", str(recipe), "--trust-remote-code"]) == 0
    assert json.loads(recipe.with_suffix(".lock").read_text())["trust_remote_code"] is True
    # a lock made with the flag is drift for a run without it (and the reverse)
    assert main([*runs, "run", str(recipe), "--locked", "--dry-run", "--no-track"]) == 2
    assert "trust_remote_code: locked true, now \"<absent>\"" in capsys.readouterr().err
    assert main([*runs, "lock", str(recipe)]) == 0
    assert "trust_remote_code" not in json.loads(recipe.with_suffix(".lock").read_text())

    seen = []
    real = keys.compute_keys

    def spy(*args, **kwargs):
        seen.append(remote_code_allowed())
        return real(*args, **kwargs)

    monkeypatch.setattr(keys, "compute_keys", spy)
    assert main([*runs, "explain", str(recipe)]) == 0
    assert main([*runs, "explain", str(recipe), "--trust-remote-code"]) == 0
    assert seen == [False, True]
    assert not remote_code_allowed(), "the API's flag outlived its call"


def test_export_readers_run_checkpoint_code_only_with_the_flag(tmp_path, tiny_model_dir, no_remote_code):
    import torch

    from qflow.export.readers import _float_model
    from qflow.export.safetensors_ct import linear_module_names

    marker = tmp_path / "ran"
    folder = _remote_code_model(tmp_path / "remote-model", tiny_model_dir, marker)
    for read in (lambda: linear_module_names(folder), lambda: _float_model(folder, torch.float32)):
        with pytest.raises(SourceError, match="--trust-remote-code on the command line"):
            read()
    assert not marker.exists()
    with remote_code(True):   # what `--trust-remote-code` / trust_remote_code=True set
        names = linear_module_names(folder)
        model = _float_model(folder, torch.float32)
    assert "model.layers.0.self_attn.q_proj" in names and type(model).__name__ == "EvilForCausalLM"
    assert "config" in marker.read_text() and "model" in marker.read_text()
    assert not remote_code_allowed()


def _loader_calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and node.func.attr in ("from_pretrained", "from_config") \
                and isinstance(node.func.value, ast.Name) and node.func.value.id.startswith("Auto"):
            yield node


def test_every_transformers_loader_passes_trust_remote_code_explicitly():
    """A new ``Auto*.from_pretrained`` / ``from_config`` in qflow must take the flag (never a literal True)."""
    missing, calls = [], 0
    for path in sorted([*(ROOT / "qflow").rglob("*.py"), *(ROOT / "stages").rglob("*.py")]):
        for node in _loader_calls(ast.parse(path.read_text())):
            calls += 1
            kw = {k.arg: k.value for k in node.keywords}
            value = kw.get("trust_remote_code")
            if value is None or (isinstance(value, ast.Constant) and value.value is True):
                missing.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert calls >= 15 and not missing, missing
