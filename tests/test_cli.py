"""The genotype commands, run in-process: output, exit codes, one-line errors."""

from __future__ import annotations

import json

import pytest
import yaml

from scnas.genotype import builtin_genotype, genotype_hash, read_genotype, short_hash


def test_validate_builtins_and_files(cli, tmp_path):
    result = cli("validate", "uresnet", "minimal")
    assert result.code == 0 and "uresnet: ok (hash" in result.out


def test_validate_reports_every_problem_one_line_each(cli, tmp_path, small_doc):
    small_doc["cells"]["reduction"]["edges"][0]["op"] = "conv_9"
    small_doc["cells"]["expansion"]["concat"] = [7]
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(small_doc))
    result = cli("validate", "uresnet", bad, tmp_path / "missing.json")
    lines = result.out.strip().splitlines()
    assert result.code == 1
    assert lines[1].startswith(f"{bad}: cells.reduction.edges[0].op: unknown op 'conv_9'")
    assert lines[2].startswith(f"{bad}: cells.expansion.concat[0]:")
    assert lines[3] == f"{tmp_path / 'missing.json'}: no such file"
    assert "Traceback" not in result.out + result.err


def test_show_prints_cells_and_hash(cli, uresnet):
    result = cli("show", "uresnet")
    assert result.code == 0 and short_hash(uresnet) in result.out
    for name in ("encoder_normal", "reduction", "decoder_normal", "expansion", "conv_3x3x3 x4, identity x2"):
        assert name in result.out


def test_diff_exit_codes(cli, tmp_path):
    assert cli("diff", "uresnet", "uresnet").code == 0
    result = cli("diff", "uresnet", "minimal")
    assert result.code == 1 and "nodes: 4 -> 1" in result.out and "encoder_normal:" in result.out


def test_convert_chain_keeps_the_hash(cli, tmp_path):
    expected = genotype_hash(builtin_genotype("uresnet"))
    steps = ["g.json", "g.yaml", "g.oneline", "g2.json"]
    previous = "uresnet"
    for name in steps:
        result = cli("convert", previous, tmp_path / name)
        assert result.code == 0, result
        previous = tmp_path / name
    assert genotype_hash(read_genotype(previous)) == expected


def test_convert_darts_with_maps(cli, tmp_path):
    src = tmp_path / "arch.darts"
    src.write_text("Genotype(normal=[('sep_conv_3x3', 0), ('skip_connect', 1)], normal_concat=[2], "
                   "reduce=[('max_pool_3x3', 0), ('dil_conv_3x3', 1)], reduce_concat=range(2, 3))\n")
    assert cli("convert", src, tmp_path / "out.yaml").code == 1  # sep_conv_3x3 needs a mapping
    assert not (tmp_path / "out.yaml").exists()
    result = cli("convert", src, tmp_path / "out.yaml", "--op-map", "sep_conv_3x3=conv_3x3x3")
    assert result.code == 0
    assert read_genotype(tmp_path / "out.yaml").cell("decoder_normal").edges[0].op == "conv_3x3x3"
    back = cli("convert", tmp_path / "out.yaml", tmp_path / "back.darts")
    assert back.code == 0 and "('sep_conv_3x3', 0)" in (tmp_path / "back.darts").read_text()  # the name it was read with


def test_convert_to_stdout_defaults_to_yaml(cli):
    result = cli("convert", "minimal", "-")
    assert result.code == 0 and yaml.safe_load(result.out)["nodes"] == 1


def test_convert_darts_refusal_is_one_line(cli, tmp_path):
    result = cli("convert", "uresnet", tmp_path / "u.darts")
    assert result.code == 1 and result.err.count("\n") == 1 and "DARTS cells have exactly two" in result.err
    assert not (tmp_path / "u.darts").exists()


def test_schema_prints_and_writes(cli, tmp_path):
    printed = cli("schema")
    assert printed.code == 0 and json.loads(printed.out)["title"].startswith("scnas genotype")
    assert cli("schema", "-o", tmp_path / "s.json").code == 0
    assert json.loads((tmp_path / "s.json").read_text()) == json.loads(printed.out)


def test_genotype_random_builtin_list_ops(cli, tmp_path):
    assert cli("genotype", "random", "--seed", "3", "--nodes", "5", "-o", tmp_path / "r.json").code == 0
    assert read_genotype(tmp_path / "r.json").nodes == 5
    assert cli("genotype", "builtin", "uresnet", "-o", tmp_path / "u.yaml").code == 0
    assert genotype_hash(read_genotype(tmp_path / "u.yaml")) == genotype_hash(builtin_genotype("uresnet"))
    assert "uresnet" in cli("genotype", "list").out
    assert "sep_dil4_conv_3x3x3" in cli("genotype", "ops").out


def test_bad_input_gives_one_line_and_no_traceback(cli, tmp_path):
    for args in (("show", tmp_path), ("show", tmp_path / "x.yaml"), ("genotype", "builtin", "nope"),
                 ("genotype", "random", "--seed", "1", "--ops", "zero")):
        result = cli(*args)
        assert result.code == 1 and result.err.startswith("error: ") and result.err.count("\n") == 1, result
        assert "Traceback" not in result.err


def test_write_to_missing_folder_is_an_error(cli, tmp_path):
    result = cli("genotype", "builtin", "minimal", "-o", tmp_path / "nope" / "g.yaml")
    assert result.code == 1 and "does not exist" in result.err


def test_usage_errors_exit_2(cli):
    assert cli("frobnicate").code == 2
    assert cli("genotype", "random").code == 2  # --seed is required


def test_version(cli):
    result = cli("--version")
    assert result.code == 0 and result.out.startswith("scnas ")


def test_threads_follow_the_option_then_omp_num_threads_then_the_load(monkeypatch):
    from scnas import threads

    monkeypatch.setattr(threads, "usable_cores", lambda: 8)
    monkeypatch.setattr(threads, "other_load", lambda: 2.6)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert threads.choose_threads(3) == (3, "--threads")
    assert threads.choose_threads()[0] == 5        # 8 cores less 3 taken by other jobs
    monkeypatch.setattr(threads, "other_load", lambda: 40.0)
    assert threads.choose_threads()[0] == 1        # never fewer than one
    monkeypatch.setattr(threads, "other_load", lambda: 0.2)
    assert threads.choose_threads() == (8, "8 cores")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert threads.choose_threads() == (2, "OMP_NUM_THREADS")
    with pytest.raises(ValueError, match="at least 1"):
        threads.choose_threads(0)


def test_the_threads_option_sets_torch_and_says_why_when_load_lowers_it(cli, monkeypatch, tmp_path):
    import torch

    from scnas import threads

    before = torch.get_num_threads()
    try:
        quiet = ("build", "minimal", "--stem", "2", "--patch", "16", "16", "16")   # uses torch, computes little
        result = cli("--threads", "1", *quiet)
        assert result.code == 0 and torch.get_num_threads() == 1 and "thread" not in result.err
        monkeypatch.delenv("SCNAS_THREADS")
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setattr(threads, "usable_cores", lambda: 2)
        monkeypatch.setattr(threads, "other_load", lambda: 1.2)
        result = cli(*quiet)
        assert result.code == 0 and torch.get_num_threads() == 1 and result.err == ""   # little computed: quiet
        result = cli("predict", "uresnet", "-i", tmp_path / "nowhere", "-o", tmp_path / "nowhere-out")
        assert result.code != 0 and torch.get_num_threads() == 1
        assert "using 1 torch thread(s) (2 cores, load 1.2 from other processes); --threads N" in result.err
    finally:
        torch.set_num_threads(before)


def test_help_prints_no_thread_notice_and_sets_no_threads(cli, monkeypatch):
    import torch

    from scnas import threads

    monkeypatch.delenv("SCNAS_THREADS")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    monkeypatch.setattr(threads, "other_load", lambda: 1.2)   # a busy machine: computing commands would say so
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        for args in (("cv", "--help"), ("search", "-h"), ("--threads", "1", "train", "--help")):
            result = cli(*args)
            assert result.code == 0 and "Usage" in result.out, result
            assert "thread(s)" not in result.err and torch.get_num_threads() == 2, (args, result.err)
    finally:
        torch.set_num_threads(before)


def test_genotype_commands_run_without_importing_torch():
    import subprocess
    import sys

    code = ("import sys; from scnas.cli.main import main; "
            "codes = [main(args) for args in (['validate', 'uresnet'], ['show', 'minimal'], ['genotype', 'list'], "
            "['--threads', '1', 'diff', 'uresnet', 'uresnet'])]; "
            "sys.exit(3 if 'torch' in sys.modules else max(codes))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr   # 3: torch was imported (seconds, for a YAML file)


def test_command_line_defaults_are_the_librarys():
    # One source of defaults: every option that names a config field (or a predict_folder
    # parameter) and has a default shows the library's default, for every command.
    import inspect

    import typer

    from scnas.build import BuildConfig
    from scnas.cli.main import _register_commands, app
    from scnas.search import SearchConfig
    from scnas.train.predict import predict_folder
    from scnas.train.trainer import TrainConfig

    _register_commands()
    commands = typer.main.get_command(app).commands
    predict_defaults = {name: p.default for name, p in inspect.signature(predict_folder).parameters.items()}
    renamed = {"steps": "steps_per_epoch", "stem": "stem_channels", "classes": "num_classes"}
    library = {"train": {k: f.default for k, f in TrainConfig.model_fields.items()},
               "cv": {k: f.default for k, f in TrainConfig.model_fields.items()},
               "search": {k: f.default for k, f in SearchConfig.model_fields.items()},
               "build": {k: f.default for k, f in BuildConfig.model_fields.items()},
               "export-onnx": {k: f.default for k, f in BuildConfig.model_fields.items()},
               "predict": predict_defaults}
    compared = 0
    for command, defaults in library.items():
        for param in commands[command].params:
            key = param.name if param.name in defaults else renamed.get(param.name)
            if key in defaults and param.default is not None and key not in ("data", "output"):
                shown = tuple(param.default) if isinstance(param.default, list) else param.default
                assert shown == defaults[key], (command, param.name, shown, defaults[key])
                compared += 1
    assert compared >= 40
