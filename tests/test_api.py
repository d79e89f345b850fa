"""The package's interface: every choice written once, and public functions that cannot be
called with their arguments in the wrong order."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path
from typing import get_args

import scnas
from scnas import defaults as D

ROOT = Path(scnas.__file__).parent

CHOICES = {name: value for name, value in vars(D).items() if name.endswith("_CHOICES") or name in ("PRECISIONS",
                                                                                                   "CHECKPOINT_MODES")}

CLI_CHOICES = {   # (command, flag): the name of the defaults tuple its values must be one of
    ("search", "--checkpoint"): "CHECKPOINT_CHOICES", ("train", "--checkpoint"): "CHECKPOINT_CHOICES",
    ("plan", "--checkpoint"): "CHECKPOINT_CHOICES",
    ("search", "--amp"): "AMP_CHOICES", ("train", "--amp"): "AMP_CHOICES", ("cv", "--amp"): "AMP_CHOICES",
    ("predict", "--amp"): "AMP_CHOICES", ("plan", "--amp"): "AMP_CHOICES",
    ("search", "--device"): "DEVICE_CHOICES", ("train", "--device"): "DEVICE_CHOICES",
    ("cv", "--device"): "DEVICE_CHOICES", ("predict", "--device"): "DEVICE_CHOICES",
    ("search", "--loss"): "LOSS_CHOICES", ("train", "--loss"): "LOSS_CHOICES", ("cv", "--loss"): "LOSS_CHOICES",
    ("search", "--sampling"): "SAMPLING_CHOICES", ("plan", "--sampling"): "SAMPLING_CHOICES",
    ("search", "--tau-schedule"): "TAU_SCHEDULE_CHOICES",
    ("search", "--derive"): "DERIVE_CHOICES", ("derive", "--derive"): "DERIVE_CHOICES",
    ("build", "--upsampling"): "UPSAMPLING_CHOICES", ("nnunet-plans", "--upsampling"): "UPSAMPLING_CHOICES",
    ("prepare", "--dtype"): "IMAGE_DTYPE_CHOICES", ("phantom", "--layout"): "LAYOUT_CHOICES", ("predict", "--backend"): "BACKEND_CHOICES",
    ("export-onnx", "--provider"): "ONNX_PROVIDER_CHOICES",
    ("cv", "--sampling"): "SAMPLING_CHOICES", ("cv", "--derive-by"): "DERIVE_BY_CHOICES",
    ("derive", "--by"): "DERIVE_BY_CHOICES", ("search-report", "--by"): "DERIVE_BY_CHOICES",
    ("derive", "--device"): "DEVICE_CHOICES",
}


def _commands(typer_app, prefix=""):
    for info in typer_app.registered_commands:
        yield info.name or info.callback.__name__.replace("_", "-"), info.callback
    for group in typer_app.registered_groups:
        yield from _commands(group.typer_instance)


def _cli_choices() -> dict[tuple[str, str], tuple]:
    from scnas.cli.main import _register_commands, app
    from scnas.cli.options import Choice

    _register_commands()
    found = {}
    for command, callback in _commands(app):
        for parameter in inspect.signature(callback).parameters.values():
            parser = getattr(parameter.default, "parser", None)
            if isinstance(parser, Choice):
                found[command, parser.flag] = parser.choices
    return found


def test_the_cli_checks_each_choice_against_the_librarys_own_tuple():
    found = _cli_choices()
    assert sorted(found) == sorted(CLI_CHOICES)
    for key, name in CLI_CHOICES.items():
        assert found[key] is CHOICES[name], key   # the very object, not an equal copy


def test_the_library_uses_the_same_choices():
    from scnas.build import BuildConfig, network
    from scnas.data.preprocess import PrepareSettings
    from scnas.export import onnx_export
    from scnas import metrics
    from scnas.engine import processes, steps
    from scnas.search import sampling
    from scnas.search.config import SearchConfig
    from scnas.engine.settings import RunSettings

    assert steps.AMP_CHOICES is D.AMP_CHOICES and D.AMP_CHOICES[1:] == D.PRECISIONS
    assert network.CHECKPOINT_MODES is D.CHECKPOINT_MODES and D.CHECKPOINT_CHOICES[1:] == D.CHECKPOINT_MODES
    assert processes.DEVICE_CHOICES is D.DEVICE_CHOICES and sampling.SAMPLING_CHOICES is D.SAMPLING_CHOICES
    assert tuple(metrics.LOSSES) == D.LOSS_CHOICES and tuple(onnx_export.PROVIDERS) == D.ONNX_PROVIDER_CHOICES
    literals = {(RunSettings, "checkpoint"): D.CHECKPOINT_CHOICES, (RunSettings, "amp"): D.AMP_CHOICES,
                (RunSettings, "device"): D.DEVICE_CHOICES, (RunSettings, "loss"): D.LOSS_CHOICES,
                (SearchConfig, "sampling"): D.SAMPLING_CHOICES, (SearchConfig, "tau_schedule"): D.TAU_SCHEDULE_CHOICES,
                (SearchConfig, "derive"): D.DERIVE_CHOICES, (BuildConfig, "upsampling"): D.UPSAMPLING_CHOICES,
                (PrepareSettings, "image_dtype"): D.IMAGE_DTYPE_CHOICES}
    for (model, field), choices in literals.items():
        assert get_args(model.model_fields[field].annotation) == choices, (model.__name__, field)


def test_no_choice_is_typed_again_outside_defaults():
    # A tuple, list, set, dict or Literal of strings that spells out a whole set of choices
    # anywhere but scnas/defaults.py is a second copy that can drift from the first.
    whole_sets = {frozenset(choices): name for name, choices in CHOICES.items()}
    copies = []
    for path in sorted(ROOT.rglob("*.py")):
        if path == ROOT / "defaults.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
                elements = node.elts
            elif isinstance(node, ast.Dict):
                elements = node.keys
            elif isinstance(node, ast.Subscript) and getattr(node.value, "id", None) == "Literal":
                elements = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
            else:
                continue
            strings = frozenset(e.value for e in elements if isinstance(e, ast.Constant) and isinstance(e.value, str))
            if len(strings) >= 2 and strings in whole_sets:
                copies.append(f"{path.relative_to(ROOT)}:{node.lineno}: {whole_sets[strings]}")
    assert copies == []


def test_a_value_outside_the_choices_is_one_line_naming_them(cli):
    result = cli("plan", "uresnet", "--amp", "fp8")
    assert result.code == 1 and result.err == "error: --amp must be auto, off, fp16 or bf16, not 'fp8'\n"
    result = cli("build", "uresnet", "--upsampling", "nearest")
    assert result.code == 1 and result.err == "error: --upsampling must be trilinear or transposed, not 'nearest'\n"


MAX_POSITIONAL = 3


def _public_callables():
    """(qualified name, callable) for every public function and method defined in scnas."""
    import importlib
    import pkgutil

    seen = set()
    for module_info in pkgutil.walk_packages(scnas.__path__, "scnas."):
        if any(part.startswith("_") for part in module_info.name.split(".")[1:]):
            continue
        module = importlib.import_module(module_info.name)
        for name, value in vars(module).items():
            if name.startswith("_") or getattr(value, "__module__", None) != module.__name__:
                continue
            members = [(name, value)]
            if inspect.isclass(value):
                members += [(f"{name}.{attribute}", member) for attribute, member in vars(value).items()
                            if not attribute.startswith("_") or attribute == "__init__"]
            for qualified, member in members:
                function = member.__func__ if isinstance(member, (classmethod, staticmethod)) else member
                if inspect.isfunction(function) and (module.__name__, qualified) not in seen:
                    seen.add((module.__name__, qualified))
                    yield f"{module.__name__}.{qualified}", function


def _is_a_command(function) -> bool:
    # typer calls a command's function with keywords; its parameters are the command's options.
    return any(type(p.default).__module__.startswith("typer") for p in inspect.signature(function).parameters.values())


UNDER_WORK: tuple[str, ...] = ()   # modules exempt while being reworked (none now)


def test_no_public_function_takes_more_than_three_positional_parameters():
    # Dataclasses count too: their fields after the third are keyword-only (``_: KW_ONLY``).
    too_many = []
    for name, function in _public_callables():
        if _is_a_command(function) or name.startswith(UNDER_WORK):
            continue
        positional = [p for p in inspect.signature(function).parameters.values()
                      if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name not in ("self", "cls")]
        if len(positional) > MAX_POSITIONAL:
            too_many.append(f"{name}({', '.join(p.name for p in positional)})")
    assert too_many == []



def test_a_run_loop_is_made_without_touching_anything_until_it_runs(tmp_path):
    import pytest

    from scnas.errors import ScnasError
    from scnas.genotype import builtin_genotype
    from scnas.train.trainer import TrainConfig, TrainingLoop

    loop = TrainingLoop(builtin_genotype("minimal"), TrainConfig(data=str(tmp_path / "no-task")), tmp_path / "run")
    assert not (tmp_path / "run").exists() and not loop.initialized   # no folder, no data, no processes
    with pytest.raises(ScnasError, match="no-task"):
        loop.execute()                                                    # initialize() finds the missing task


def test_every_step_and_hook_of_the_run_loop_says_when_it_is_called():
    from scnas.engine.runs import RunLoop

    undocumented = [name for name, member in vars(RunLoop).items()
                    if callable(member) and not name.startswith("_") and not (member.__doc__ or "").strip()]
    assert undocumented == []



def test_every_public_function_with_keyword_only_parameters_documents_them_in_args():
    # MONAI's habit: an "Args:" block naming every parameter (for a class, in its docstring).
    # Dataclasses' generated constructors are exempt: their fields are documented where declared.
    import importlib

    undocumented = []
    for name, function in _public_callables():
        signature = inspect.signature(function)
        names = [p.name for p in signature.parameters.values() if p.name not in ("self", "cls")
                 and p.kind != p.VAR_KEYWORD]
        if _is_a_command(function) or name.startswith(UNDER_WORK) or function.__code__.co_filename.startswith("<") \
                or not any(p.kind == p.KEYWORD_ONLY for p in signature.parameters.values()):
            continue
        doc = inspect.getdoc(function) or ""
        if function.__name__ == "__init__":
            owner = importlib.import_module(function.__module__)
            for part in function.__qualname__.split(".")[:-1]:
                owner = getattr(owner, part)
            doc += "\n" + (inspect.getdoc(owner) or "")
        args = doc.split("Args:", 1)[1] if "Args:" in doc else ""
        missing = [n for n in names if f"{n}:" not in args]
        if missing:
            undocumented.append(f"{name}: {', '.join(missing)}")
    assert undocumented == []

def test_the_top_level_package_exports_each_stage_lazily():
    import subprocess
    import sys

    code = ("import sys, scnas; loaded = sorted(m for m in sys.modules if m.startswith('scnas.') or m in "
            "('torch', 'pydantic', 'numpy')); print(loaded); sys.exit(bool(loaded))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout   # 'import scnas' imports none of its modules (nor torch)
    assert set(scnas.__all__) <= set(dir(scnas))
    for name in scnas.__all__:
        value = getattr(scnas, name)
        home = scnas._EXPORTS.get(name)
        assert home is None or value is getattr(__import__(home, fromlist=[name]), name), name
    from scnas.apps import cv

    assert {"run_study", "plan_study", "write_report"} <= set(scnas.__all__) and scnas.run_study is cv.run_study
    try:
        scnas.no_such_thing
    except AttributeError as exc:
        assert "no_such_thing" in str(exc)
    else:
        raise AssertionError("an unknown name must raise AttributeError")
