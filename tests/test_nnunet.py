"""nnU-Net v2 integration: the network class nnU-Net builds from the plans, the plans edit, the
checkpoint import, and nnU-Net's own planning, training and prediction end to end on CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("nnunetv2", reason="needs nnU-Net v2 (the test extra installs it)")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from scnas.genotype import builtin_genotype  # noqa: E402
from scnas.integrations.nnunet import NETWORK_CLASS, NNUNetError, SCNASUNetForNNUNet  # noqa: E402


def plainconv_architecture(strides: list[list[int]]) -> dict:
    """nnU-Net 2.8's own planned network for ``strides`` (as nnUNetv2_plan_and_preprocess writes it)."""
    stages = len(strides)
    return {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
            "arch_kwargs": {"n_stages": stages, "features_per_stage": [min(32 * 2 ** i, 320) for i in range(stages)],
                            "conv_op": "torch.nn.modules.conv.Conv3d", "kernel_sizes": [[3, 3, 3]] * stages,
                            "strides": strides, "n_conv_per_stage": [2] * stages,
                            "n_conv_per_stage_decoder": [2] * (stages - 1), "conv_bias": True,
                            "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                            "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None,
                            "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}},
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}


def write_plans(folder: Path, patch=(32, 32, 32), strides=None, spacing=(1.0, 1.0, 1.0)) -> Path:
    """A plans file (3d_fullres and 2d) and its dataset.json (2 channels, 3 labels) in ``folder``
    (named as nnU-Net names a dataset folder, DatasetXXX_Name)."""
    strides = strides or [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]]
    common = {"data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
              "normalization_schemes": ["ZScoreNormalization"] * 2, "use_mask_for_norm": [False, False],
              "batch_dice": False}
    plans = {"dataset_name": folder.name, "plans_name": "nnUNetPlans", "image_reader_writer": "SimpleITKIO",
             "original_median_spacing_after_transp": list(spacing), "transpose_forward": [0, 1, 2],
             "transpose_backward": [0, 1, 2], "experiment_planner_used": "ExperimentPlanner",
             "label_manager": "LabelManager", "foreground_intensity_properties_per_channel": {},
             "configurations": {
                 "2d": {**common, "data_identifier": "nnUNetPlans_2d", "patch_size": list(patch[1:]),
                        "spacing": list(spacing[1:]), "architecture": plainconv_architecture(
                            [[1, 1], [2, 2], [2, 2]])},
                 "3d_fullres": {**common, "patch_size": list(patch), "spacing": list(spacing),
                                "architecture": plainconv_architecture(strides)}}}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "nnUNetPlans.json").write_text(json.dumps(plans))
    (folder / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T1", "1": "T2"},
                                                     "labels": {"background": 0, "a": 1, "b": 2},
                                                     "numTraining": 4, "file_ending": ".nii.gz"}))
    return folder / "nnUNetPlans.json"


def arch_kwargs(depth: int, stem: int = 6) -> dict:
    return {"genotype": builtin_genotype("uresnet").to_dict(), "stem_channels": stem,
            "strides": [[1, 1, 1]] + [[2, 2, 2]] * depth}


def from_plans(kwargs: dict, deep_supervision: bool, allow_init: bool = True):
    """The network as nnU-Net's trainer builds it: ``get_network_from_plans``."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    return get_network_from_plans(NETWORK_CLASS, kwargs, [], 2, 3, allow_init=allow_init,
                                  deep_supervision=deep_supervision)


def test_deep_supervision_gives_the_outputs_and_scales_nnunet_expects():
    """One output per scale of nnU-Net's own _get_deep_supervision_scales, highest resolution
    first, shaped patch x scale; nnU-Net's own set_deep_supervision_enabled switches to one tensor
    (in eval mode too: nnU-Net validates with the list)."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    torch.manual_seed(0)
    kwargs = arch_kwargs(depth=3)
    network = from_plans(kwargs, deep_supervision=True)
    trainer = SimpleNamespace(enable_deep_supervision=True, is_ddp=False, network=network,
                              configuration_manager=SimpleNamespace(pool_op_kernel_sizes=kwargs["strides"]))
    scales = nnUNetTrainer._get_deep_supervision_scales(trainer)
    patch = (32, 16, 24)
    x = torch.randn(1, 2, *patch)
    for mode in ("train", "eval"):
        getattr(network, mode)()
        with torch.no_grad():
            outputs = network(x)
        assert isinstance(outputs, list) and len(outputs) == len(scales) == 3
        for output, scale in zip(outputs, scales):
            assert tuple(output.shape) == (1, 3, *(round(n * s) for n, s in zip(patch, scale)))
    nnUNetTrainer.set_deep_supervision_enabled(trainer, False)
    with torch.no_grad():
        single = network(x)
    assert isinstance(single, torch.Tensor) and tuple(single.shape) == (1, 3, *patch)
    assert torch.equal(single, outputs[0])   # the main output is the same with or without the heads
    # inference builds it with deep supervision off: the same weights load (the heads are always built)
    inference = from_plans(kwargs, deep_supervision=False)
    inference.load_state_dict(network.state_dict())
    assert isinstance(inference.eval()(x), torch.Tensor)


def test_initialised_as_nnunet_initialises_its_unets():
    """get_network_from_plans applies network.initialize: He (Kaiming-normal, LeakyReLU 0.01)
    convolution weights and zero biases, as InitWeights_He(1e-2) gives nnU-Net's PlainConvUNet."""
    torch.manual_seed(0)
    network = from_plans(arch_kwargs(depth=2, stem=16), deep_supervision=True)
    convs = [m for m in network.modules() if isinstance(m, torch.nn.Conv3d)]
    assert all(m.bias is None or torch.count_nonzero(m.bias) == 0 for m in convs)
    big = max(convs, key=lambda m: m.weight.numel())
    fan_in = big.weight[0].numel()
    expected = (2 / (1 + 0.01 ** 2) / fan_in) ** 0.5
    assert abs(big.weight.std().item() / expected - 1) < 0.05
    assert torch.count_nonzero(from_plans(arch_kwargs(depth=2), True, allow_init=False).out.bias) > 0  # torch default


@pytest.mark.parametrize("strides, reason", [
    ([[1, 1, 1], [1, 2, 2], [2, 2, 2]], "strides[1] is [1, 2, 2]: scnas's reduction cells halve all three axes"),
    ([[1, 1, 1], [2, 2, 2], [3, 3, 3]], "strides[2] is [3, 3, 3]"),
    ([[2, 2, 2], [2, 2, 2]], "strides[0] is [2, 2, 2]: the first stage"),
    ([[1, 1, 1]] + [[2, 2, 2]] * 9, "10 stages give depth 9; scnas networks have 1 to 8"),
    ([[1, 1, 1]], "1 stages give depth 0"),
    ([[1, 1], [2, 2]], "must be a list of [z, y, x] integer triples"),
])
def test_strides_the_cells_cannot_take_are_refused(strides, reason):
    with pytest.raises(NNUNetError, match=r"arch_kwargs\.strides") as error:
        SCNASUNetForNNUNet(2, 3, builtin_genotype("uresnet").to_dict(), stem_channels=6, strides=strides,
                           deep_supervision=True)
    assert reason in str(error.value)


def test_parameters_equal_scnas_builds(cli):
    """The network nnU-Net builds from the plans edit is the genotype's: scnas build's count."""
    network = from_plans(arch_kwargs(depth=3, stem=10), deep_supervision=True)
    built = cli("build", "uresnet", "--stem", 10, "--in-channels", 2, "--classes", 3, "--depth", 3,
                "--deep-supervision", "--patch", 32, 32, 32, "--json")
    assert built.code == 0, built
    assert sum(p.numel() for p in network.parameters()) == json.loads(built.out)["params"]


def test_plans_edit_matches_nnunets_flops_and_inherits_3d_fullres(cli, tmp_path):
    plans = write_plans(tmp_path / "Dataset902_Tiny")
    result = cli("nnunet-plans", plans, "uresnet", "--match-flops", "--json")
    assert result.code == 0, result
    report = json.loads(result.out)
    written = json.loads((tmp_path / "Dataset902_Tiny" / "nnUNetPlans_scnas.json").read_text())
    configuration = written["configurations"]["3d_fullres_scnas"]
    assert configuration["inherits_from"] == "3d_fullres"
    assert configuration["architecture"]["network_class_name"] == NETWORK_CLASS
    assert configuration["architecture"]["arch_kwargs"]["strides"] == [[1, 1, 1]] + [[2, 2, 2]] * 3
    assert configuration["architecture"]["arch_kwargs"]["stem_channels"] == report["stem"]
    assert written["plans_name"] == "nnUNetPlans_scnas"
    assert written["configurations"]["3d_fullres"] == json.loads(plans.read_text())["configurations"]["3d_fullres"]
    assert report["train_command"] == "nnUNetv2_train Dataset902_Tiny 3d_fullres_scnas FOLD -p nnUNetPlans_scnas"
    # nnU-Net's network counted independently here, and the stem's neighbours are no nearer
    from torch.utils.flop_counter import FlopCounterMode

    from scnas.build import BuildConfig
    from scnas.build.stats import network_flops
    from scnas.integrations.nnunet import nnunet_network

    plans_doc = json.loads(plans.read_text())
    dataset = json.loads((tmp_path / "Dataset902_Tiny" / "dataset.json").read_text())
    counter = FlopCounterMode(display=False)
    with counter:
        nnunet_network(plans_doc, "3d_fullres", dataset).eval()(torch.zeros(1, 2, 32, 32, 32))
    assert report["nnunet_flops"] == counter.get_total_flops()
    config = BuildConfig(in_channels=2, num_classes=3, depth=3, stem_channels=report["stem"])
    assert report["flops"] == network_flops(builtin_genotype("uresnet"), config, (32, 32, 32))
    for other in (report["stem"] - 1, report["stem"] + 1):
        flops = network_flops(builtin_genotype("uresnet"), config.model_copy(update={"stem_channels": other}),
                              (32, 32, 32))
        assert abs(flops - report["nnunet_flops"]) >= abs(report["flops"] - report["nnunet_flops"])
    # the network of the edited plans, built by nnU-Net, has the reported parameter count
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    manager = PlansManager(written).get_configuration("3d_fullres_scnas")
    assert manager.patch_size == [32, 32, 32] and manager.data_identifier == "nnUNetPlans_3d_fullres"
    network = nnunet_network(written, "3d_fullres_scnas", dataset, deep_supervision=True)
    assert sum(p.numel() for p in network.parameters()) == report["params"]


def _refused(cli, tmp_path, plans, *args, expected: str):
    before = sorted(p.name for p in plans.parent.iterdir())
    result = cli("nnunet-plans", plans, "uresnet", "--stem", 8, *args)
    assert result.code == 1, result
    assert expected in result.err and "Traceback" not in result.err, result.err
    assert len(result.err.strip().splitlines()) == 1
    assert sorted(p.name for p in plans.parent.iterdir()) == before   # nothing written


def test_plans_of_another_nnunet_version_are_refused(cli, tmp_path):
    plans = write_plans(tmp_path / "v1")
    plans.write_text(json.dumps({"plans_per_stage": {}, "num_stages": 1, "configurations": {}}))
    _refused(cli, tmp_path, plans, expected="an nnU-Net v1 plans file")
    old = json.loads(write_plans(tmp_path / "old").read_text())
    old["configurations"]["3d_fullres"] = {"UNet_class_name": "PlainConvUNet", "patch_size": [32, 32, 32]}
    (tmp_path / "old" / "nnUNetPlans.json").write_text(json.dumps(old))
    _refused(cli, tmp_path, tmp_path / "old" / "nnUNetPlans.json", expected="written by nnU-Net v2 before 2.4")
    (tmp_path / "old" / "nnUNetPlans.json").write_text("[1, 2]")
    _refused(cli, tmp_path, tmp_path / "old" / "nnUNetPlans.json", expected="not an nnU-Net plans file")
    (tmp_path / "old" / "nnUNetPlans.json").write_text('{"name": "x"}')
    _refused(cli, tmp_path, tmp_path / "old" / "nnUNetPlans.json", expected="not an nnU-Net v2 plans file")


def test_a_2d_configuration_is_refused(cli, tmp_path):
    plans = write_plans(tmp_path / "d")
    _refused(cli, tmp_path, plans, "--base", "2d", expected="configurations.2d is a 2D configuration")
    _refused(cli, tmp_path, plans, "--base", "3d_lowres", expected="has no configuration '3d_lowres'")


def test_a_genotype_without_outputs_for_deep_supervision_is_refused(cli, tmp_path):
    """Decoder cells reading only the expansion cell, expansion cells only the previous expansion:
    the decoder cells above level 0 reach no output, so nnU-Net's deep supervision has nothing there."""
    def cell(source: int) -> dict:
        return {"edges": [{"from": source, "to": 2, "op": "conv_3x3x3"}, {"from": 2, "to": 3, "op": "conv_3x3x3"}],
                "concat": [2, 3]}
    doc = {"format": "scnas-genotype", "version": 1, "nodes": 2, "ops": ["zero", "conv_3x3x3"],
           "cells": {"encoder_normal": cell(1), "reduction": cell(1), "decoder_normal": cell(1), "expansion": cell(0)}}
    (tmp_path / "g.json").write_text(json.dumps(doc))
    plans = write_plans(tmp_path / "s")
    result = cli("nnunet-plans", plans, tmp_path / "g.json", "--stem", 8)
    assert result.code == 1 and "leaves decoder_normal_1, decoder_normal_2 unused" in result.err, result
    assert not (tmp_path / "s" / "nnUNetPlans_scnas.json").exists()
    network = SCNASUNetForNNUNet(2, 3, doc, stem_channels=4, strides=[[1, 1, 1], [2, 2, 2], [2, 2, 2]],
                                 deep_supervision=False)
    network.decoder.deep_supervision = True   # as nnU-Net's trainer switches it
    with pytest.raises(NNUNetError, match="decoder_normal_1 unused"):
        network(torch.zeros(1, 2, 16, 16, 16))


def test_the_width_is_given_once_and_the_plans_file_is_never_replaced(cli, tmp_path):
    plans = write_plans(tmp_path / "w")
    for args in ((), ("--stem", 8, "--match-flops")):
        result = cli("nnunet-plans", plans, "uresnet", *args)
        assert result.code == 1 and "give either --stem N or --match-flops" in result.err, result
    original = plans.read_text()
    result = cli("nnunet-plans", plans, "uresnet", "--stem", 8, "-o", plans)
    assert result.code == 1 and "would replace the plans file itself" in result.err, result
    assert plans.read_text() == original


def test_anisotropic_strides_are_refused_and_depth_gives_isotropic_ones(cli, tmp_path):
    plans = write_plans(tmp_path / "a", patch=(16, 64, 64), spacing=(3.0, 1.0, 1.0),
                        strides=[[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]])
    _refused(cli, tmp_path, plans, expected="strides: strides[1] is [1, 2, 2]: scnas's reduction cells halve all three")
    _refused(cli, tmp_path, plans, "--depth", 5, expected="D=16 is not a multiple of 2**depth = 32")
    result = cli("nnunet-plans", plans, "uresnet", "--stem", 8, "--depth", 3)
    assert result.code == 0, result
    written = json.loads((tmp_path / "a" / "nnUNetPlans_scnas.json").read_text())
    assert written["configurations"]["3d_fullres_scnas"]["architecture"]["arch_kwargs"]["strides"] == \
        [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]]


class NotData:
    """A class a pickle would have to import and call: what weights_only refuses."""


def _fake_checkpoint(path: Path, plans: dict, network, logging_value, drop: str | None = None) -> None:
    """A checkpoint shaped as nnU-Net 2.8's trainer saves it (save_checkpoint), less tensor ``drop``."""
    weights = {key: value for key, value in network.state_dict().items() if key != drop}
    torch.save({"network_weights": weights, "optimizer_state": {}, "grad_scaler_state": None,
                "logging": {"mean_fg_dice": [logging_value]}, "_best_ema": logging_value, "current_epoch": 1,
                "init_args": {"plans": plans, "configuration": "3d_fullres_scnas", "fold": 0,
                              "dataset_json": {}, "device": torch.device("cpu")},
                "trainer_name": "nnUNetTrainer", "inference_allowed_mirroring_axes": (0, 1, 2)}, path)


def test_checkpoint_imports_as_a_scnas_model_and_pickled_code_is_refused(cli, tmp_path):
    from scnas.build import load_model
    from scnas.integrations.nnunet import scnas_configuration

    torch.manual_seed(0)
    kwargs = arch_kwargs(depth=2)
    network = from_plans(kwargs, deep_supervision=True)
    plans = {"plans_name": "nnUNetPlans_scnas", "configurations": {"3d_fullres_scnas": scnas_configuration(
        builtin_genotype("uresnet"), kwargs["stem_channels"], kwargs["strides"], base="3d_fullres")}}
    _fake_checkpoint(tmp_path / "checkpoint_final.pth", plans, network, np.float64(0.5))   # numpy scalars: allowed
    result = cli("nnunet-import", tmp_path / "checkpoint_final.pth", "-o", tmp_path / "model.safetensors")
    assert result.code == 0, result
    model = load_model(tmp_path / "model.safetensors")
    x = torch.randn(1, 2, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(x), network.eval()(x)[0])

    _fake_checkpoint(tmp_path / "evil.pth", plans, network, NotData())
    result = cli("nnunet-import", tmp_path / "evil.pth", "-o", tmp_path / "evil.safetensors")
    assert result.code == 1 and "not an nnU-Net checkpoint torch can read safely" in result.err, result
    assert not (tmp_path / "evil.safetensors").exists()
    _fake_checkpoint(tmp_path / "partial.pth", plans, network, 0.5, drop="heads.decoder_normal_1.bias")
    result = cli("nnunet-import", tmp_path / "partial.pth", "-o", tmp_path / "partial.safetensors")
    assert result.code == 1 and "network_weights do not fit the genotype's network" in result.err, result
    plans["configurations"]["3d_fullres_scnas"]["architecture"]["arch_kwargs"]["stem_channels"] = 7
    _fake_checkpoint(tmp_path / "other.pth", plans, network, 0.5)
    result = cli("nnunet-import", tmp_path / "other.pth", "-o", tmp_path / "other.safetensors")
    assert result.code == 1 and "network_weights do not fit the genotype's network" in result.err, result


# ---------------------------------------------------------------------------------------------
# End to end: nnU-Net's own commands


TRAINER = "nnUNetTrainer_scnasCITest"
TRAINER_SOURCE = f'''"""Written by scnas's tests/test_nnunet.py for one test run, removed after it."""
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


class {TRAINER}(nnUNetTrainer):
    """nnU-Net's trainer for 1 epoch of 3 iterations (1 validation iteration), no final validation."""

    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 1
        self.num_iterations_per_epoch = 3
        self.num_val_iterations_per_epoch = 1

    def perform_actual_validation(self, save_probabilities: bool = False):
        pass   # predicting the validation cases: nnUNetv2_predict below does that
'''


@pytest.fixture
def test_trainer():
    """A short trainer where nnU-Net finds trainers by class name: a module directly in
    nnunetv2/training/nnUNetTrainer/. (The nnUNet_extTrainer folder is searched only after every
    module in there has been imported, including the Primus trainers, whose timm import fails
    where torchvision's build does not match torch's, as on a CPU-only torch.) Removed afterwards."""
    import nnunetv2

    folder = Path(nnunetv2.__path__[0]) / "training" / "nnUNetTrainer"
    module = folder / f"{TRAINER}.py"
    module.write_text(TRAINER_SOURCE)
    try:
        yield TRAINER
    finally:
        module.unlink(missing_ok=True)
        for cached in (folder / "__pycache__").glob(f"{TRAINER}.*"):
            cached.unlink(missing_ok=True)


def _nnunet(env: dict, *command: str, timeout: float = 300) -> str:
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


@pytest.mark.slow
def test_nnunet_plans_trains_and_predicts_with_nnunets_own_commands(cli, tmp_path, test_trainer):
    from scnas.build import load_model
    from scnas.data.phantom import write_phantom_dataset
    from scnas.integrations.nnunet import load_nnunet_checkpoint, nnunet_network

    raw, preprocessed, results = tmp_path / "raw", tmp_path / "preprocessed", tmp_path / "results"
    raw.mkdir()
    write_phantom_dataset(raw / "Dataset901_Phantom", cases=6, channels=1, foreground_classes=2, shape=(40, 40, 40),
                          spacing=(1.0, 1.0, 1.0), layout="nnunetv2")
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "nnUNet_raw": str(raw), "nnUNet_preprocessed": str(preprocessed),
           "nnUNet_results": str(results), "nnUNet_compile": "f", "nnUNet_def_n_proc": "1",
           "nnUNet_n_proc_DA": "1", "OMP_NUM_THREADS": "1"}
    _nnunet(env, str(bin_dir / "nnUNetv2_plan_and_preprocess"), "-d", "901", "-c", "3d_fullres", "-np", "1",
            "-npfp", "1")
    plans = preprocessed / "Dataset901_Phantom" / "nnUNetPlans.json"

    edit = cli("nnunet-plans", plans, "uresnet", "--stem", 8)
    assert edit.code == 0, edit
    command = "nnUNetv2_train Dataset901_Phantom 3d_fullres_scnas FOLD -p nnUNetPlans_scnas"
    assert f"train with: {command}" in edit.out

    env["nnUNet_n_proc_DA"] = "0"   # augmentation in the training process: no worker processes
    _nnunet(env, str(bin_dir / "nnUNetv2_train"), "Dataset901_Phantom", "3d_fullres_scnas", "0", "-p",
            "nnUNetPlans_scnas", "-tr", test_trainer, "-device", "cpu")
    fold = results / "Dataset901_Phantom" / f"{test_trainer}__nnUNetPlans_scnas__3d_fullres_scnas" / "fold_0"
    checkpoint = load_nnunet_checkpoint(fold / "checkpoint_final.pth")   # torch.load(weights_only=True)
    weights = checkpoint["network_weights"]

    # the network nnU-Net trained is the genotype's: scnas build's parameters, scnas's weight names
    built = cli("build", "uresnet", "--stem", 8, "--in-channels", 1, "--classes", 3, "--depth", 3,
                "--deep-supervision", "--patch", 40, 32, 40, "--json")
    assert built.code == 0, built
    assert sum(t.numel() for t in weights.values() if t.is_floating_point()) == json.loads(built.out)["params"]
    # trained with deep supervision, outputs in nnU-Net's order: the level-1 head got gradients (its
    # bias was initialised to zero); nnU-Net weighs the coarsest output (level 2) 0, so that head did not
    assert json.loads((fold / "debug.json").read_text())["enable_deep_supervision"] == "True"
    assert torch.count_nonzero(weights["heads.decoder_normal_1.bias"]) > 0
    assert torch.count_nonzero(weights["heads.decoder_normal_2.bias"]) == 0

    # the checkpoint becomes a scnas model file that computes what nnU-Net's network computes
    imported = cli("nnunet-import", fold / "checkpoint_final.pth", "-o", tmp_path / "model.safetensors")
    assert imported.code == 0, imported
    model = load_model(tmp_path / "model.safetensors")
    plans_doc = json.loads((preprocessed / "Dataset901_Phantom" / "nnUNetPlans_scnas.json").read_text())
    dataset = json.loads((preprocessed / "Dataset901_Phantom" / "dataset.json").read_text())
    network = nnunet_network(plans_doc, "3d_fullres_scnas", dataset)
    network.load_state_dict(weights)
    x = torch.randn(1, 1, 40, 32, 40, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(x), network.eval()(x))

    # nnU-Net's own prediction of a case
    images = tmp_path / "images"
    images.mkdir()
    case = raw / "Dataset901_Phantom" / "imagesTr" / "phantom_000_0000.nii.gz"
    (images / case.name).write_bytes(case.read_bytes())
    _nnunet(env, str(bin_dir / "nnUNetv2_predict"), "-i", str(images), "-o", str(tmp_path / "predicted"), "-d", "901",
            "-c", "3d_fullres_scnas", "-p", "nnUNetPlans_scnas", "-tr", test_trainer, "-f", "0", "-device", "cpu",
            "-npp", "0", "-nps", "0", "--disable_tta")   # 0 and 0: in this process, no worker pools
    import nibabel as nib

    predicted = nib.load(tmp_path / "predicted" / "phantom_000.nii.gz")
    assert predicted.shape == nib.load(case).shape
    assert set(np.unique(np.asarray(predicted.dataobj))) <= {0, 1, 2}
