"""nnU-Net v2: a genotype's network as an nnU-Net architecture, the plans edit that selects it,
and the way back from nnU-Net's checkpoint to a scnas model file.

nnU-Net builds its network from the plans: ``configurations.<name>.architecture`` holds
``network_class_name`` (found with ``pydoc.locate``), ``arch_kwargs`` and ``_kw_requires_import``;
``get_network_from_plans`` calls the class with ``input_channels=, num_classes=, deep_supervision=,
**arch_kwargs`` and then ``network.apply(network.initialize)``. The trainer reads
``arch_kwargs["strides"]`` for its deep-supervision scales (one per stride but the last) and
switches deep supervision at run time through ``network.decoder.deep_supervision``.

nnunetv2 is imported only inside the functions that need it (``pip install 'scnas[nnunet]'``).
"""

from __future__ import annotations

import json
import os
from dataclasses import KW_ONLY, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from scnas import defaults as D
from scnas.build.config import BuildConfig, BuildError
from scnas.build.network import SCNASUNet, build_network, check_spatial_size
from scnas.errors import ScnasError
from scnas.fileio import atomic_write_text, check_input_file, read_bytes_bounded
from scnas.genotype import Genotype, genotype_from_data, short_hash

NETWORK_CLASS = "scnas.integrations.nnunet.SCNASUNetForNNUNet"
BASE_CONFIGURATION = "3d_fullres"
PLANS_SIZE_LIMIT = 64 * 2 ** 20


class NNUNetError(ScnasError):
    """An nnU-Net plans file, configuration or checkpoint that scnas cannot serve."""


def depth_of_strides(strides: Any) -> int:
    """The number of down-samplings (``BuildConfig.depth``) that nnU-Net's ``strides`` ask for,
    or ``NNUNetError`` when the cells cannot give them: the stem works at full resolution
    (stage 0: [1, 1, 1]) and each reduction cell halves all three axes (every later stage:
    [2, 2, 2]); nnU-Net plans other strides for anisotropic spacing."""
    if (not isinstance(strides, (list, tuple)) or not strides
            or not all(isinstance(s, (list, tuple)) and len(s) == 3 and all(isinstance(n, int) for n in s)
                       for s in strides)):
        raise NNUNetError(f"must be a list of [z, y, x] integer triples, one per stage; got {strides!r}",
                          source="arch_kwargs.strides")
    if list(strides[0]) != [1, 1, 1]:
        raise NNUNetError(f"strides[0] is {list(strides[0])}: the first stage (scnas's stem) works at full "
                          "resolution, so it must be [1, 1, 1]", source="arch_kwargs.strides")
    for index, stride in enumerate(strides[1:], start=1):
        if list(stride) != [2, 2, 2]:
            raise NNUNetError(f"strides[{index}] is {list(stride)}: scnas's reduction cells halve all three axes, so "
                              "every stage after the first must be [2, 2, 2] (nnU-Net plans other strides for "
                              "anisotropic spacing; 'scnas nnunet-plans --depth N' writes isotropic ones where the "
                              "patch allows)", source="arch_kwargs.strides")
    depth = len(strides) - 1
    if not 1 <= depth <= 8:
        raise NNUNetError(f"{len(strides)} stages give depth {depth}; scnas networks have 1 to 8 down-samplings "
                          "(2 to 9 stages)", source="arch_kwargs.strides")
    return depth


def settings_from_arch_kwargs(input_channels: int, num_classes: int, genotype: Any, *, stem_channels: int,
                              strides: Any, upsampling: str = D.UPSAMPLING,
                              negative_slope: float = 0.01) -> tuple[Genotype, BuildConfig]:
    """The genotype and build settings that a plans file's ``arch_kwargs`` describe. Deep
    supervision heads are always built (as nnU-Net's own U-Net always builds its segmentation
    layers), so a checkpoint trained with them loads into the network nnU-Net builds for inference.

    Args:
        input_channels: nnU-Net's input channels.
        num_classes: nnU-Net's output channels.
        genotype: the genotype document (or a Genotype).
        stem_channels: the stem width.
        strides: ``[[1, 1, 1]] + [[2, 2, 2]] * depth``.
        upsampling: ``trilinear`` or ``transposed``.
        negative_slope: the LeakyReLU's slope.
    """
    genotype = genotype if isinstance(genotype, Genotype) else genotype_from_data(genotype, source="arch_kwargs.genotype")
    depth = depth_of_strides(strides)
    try:
        config = BuildConfig(stem_channels=stem_channels, in_channels=input_channels, num_classes=num_classes,
                             depth=depth, upsampling=upsampling, negative_slope=negative_slope, deep_supervision=True)
    except ValueError as exc:   # pydantic's ValidationError
        raise NNUNetError(f"arch_kwargs do not make a scnas network: {str(exc).splitlines()[0]} "
                          f"({' '.join(str(exc).splitlines()[1:3]).strip()})") from None
    return genotype, config


class DeepSupervisionSwitch(nn.Module):
    """What nnU-Net's trainer calls ``network.decoder``: it sets ``deep_supervision`` on it (and
    on nothing else) to turn the extra outputs on and off. Holds no weights."""

    def __init__(self, enabled: bool):
        super().__init__()
        self.deep_supervision = bool(enabled)

    def extra_repr(self) -> str:
        return f"deep_supervision={self.deep_supervision}"


def he_initialization(module: nn.Module) -> None:
    """nnU-Net's initialisation of its own U-Nets (``InitWeights_He(1e-2)`` of
    dynamic_network_architectures): Kaiming-normal convolution weights for LeakyReLU(0.01),
    zero biases; norms keep weight 1 and bias 0."""
    from dynamic_network_architectures.initialization.weight_init import InitWeights_He

    InitWeights_He(1e-2)(module)


class SCNASUNetForNNUNet(SCNASUNet):
    """A genotype's network with nnU-Net v2's interface. nnU-Net calls it with
    ``input_channels``, ``num_classes``, ``deep_supervision`` and the plans' ``arch_kwargs``:
    ``genotype`` (the genotype document inline, so the plans file is self-contained),
    ``stem_channels``, ``strides`` (``[[1, 1, 1]] + [[2, 2, 2]] * depth``; nnU-Net reads them too),
    ``upsampling`` and ``negative_slope`` as in :class:`BuildConfig`.

    With ``decoder.deep_supervision`` on, ``forward`` returns ``depth`` logits, highest resolution
    first (the output, then the heads of decoder levels 1 to depth-1): exactly the scales
    nnU-Net derives from ``strides``. Off, one tensor. The weights' names are scnas's own, so
    nnU-Net's ``network_weights`` load into ``build_network(genotype, config)`` unchanged.
    Initialised as nnU-Net initialises its U-Nets (:func:`he_initialization`, applied by
    ``get_network_from_plans``).

    Args:
        input_channels: input channels (nnU-Net passes them).
        num_classes: output channels (nnU-Net passes them).
        genotype: the genotype document, inline in the plans.
        stem_channels: the stem width.
        strides: ``[[1, 1, 1]] + [[2, 2, 2]] * depth``.
        deep_supervision: return the coarser heads' logits too.
        upsampling: ``trilinear`` or ``transposed``.
        negative_slope: the LeakyReLU's slope.
    """

    def __init__(self, input_channels: int, num_classes: int, genotype: Any, *, stem_channels: int,
                 strides: Sequence[Sequence[int]], deep_supervision: bool = False,
                 upsampling: str = D.UPSAMPLING, negative_slope: float = 0.01):
        genotype, config = settings_from_arch_kwargs(input_channels, num_classes, genotype,
                                                     stem_channels=stem_channels, strides=strides,
                                                     upsampling=upsampling, negative_slope=negative_slope)
        super().__init__(genotype, config)
        self.decoder = DeepSupervisionSwitch(deep_supervision)
        missing = [f"decoder_normal_{level}" for level in range(1, config.depth)
                   if f"decoder_normal_{level}" not in self.heads]
        self._unsupervised_levels = missing
        if deep_supervision:
            self._check_supervision()

    initialize = staticmethod(he_initialization)

    def _check_supervision(self) -> None:
        if self._unsupervised_levels:
            raise NNUNetError(f"genotype {short_hash(self.genotype)} leaves {', '.join(self._unsupervised_levels)} "
                              "unused (no path from there to the network output), so it has no output at that level "
                              "for nnU-Net's deep supervision, which nnU-Net's trainer turns on; train it with a "
                              "trainer whose enable_deep_supervision is False")

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        if self.decoder.deep_supervision:
            self._check_supervision()
        return self.run_cells(x, supervise=self.decoder.deep_supervision)


# ---------------------------------------------------------------------------------------------
# The plans edit


def read_json_document(path: str | os.PathLike, what: str) -> dict[str, Any]:
    """A JSON object from ``path`` (size-bounded), or ``NNUNetError``."""
    check_input_file(path, NNUNetError)
    data = read_bytes_bounded(path, PLANS_SIZE_LIMIT, NNUNetError)
    try:
        document = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise NNUNetError(f"not a JSON {what} ({exc})", source=str(path)) from None
    if not isinstance(document, dict):
        raise NNUNetError(f"not an nnU-Net {what}: a JSON object was expected", source=str(path))
    return document


def check_plans(plans: dict[str, Any], source: str) -> None:
    """``NNUNetError`` unless ``plans`` is an nnU-Net v2 plans document of the format nnU-Net
    2.4 and later write (each configuration's network in an ``architecture`` block)."""
    if "plans_per_stage" in plans or "num_stages" in plans:
        raise NNUNetError("an nnU-Net v1 plans file; plan the dataset with nnU-Net v2 "
                          "(nnUNetv2_plan_and_preprocess) and give its nnUNetPlans.json", source=source)
    missing = [key for key in ("dataset_name", "plans_name", "configurations") if key not in plans]
    if missing or not isinstance(plans.get("configurations"), dict):
        raise NNUNetError(f"not an nnU-Net v2 plans file (no {', '.join(missing) or 'configurations object'}); "
                          "give the nnUNetPlans.json that nnUNetv2_plan_and_preprocess wrote", source=source)
    for name, configuration in plans["configurations"].items():
        if isinstance(configuration, dict) and "UNet_class_name" in configuration:
            raise NNUNetError(f"configurations.{name}: written by nnU-Net v2 before 2.4 (UNet_class_name, no "
                              "'architecture' block); re-run nnUNetv2_plan_experiment with nnU-Net 2.8", source=source)


def resolved_configuration(plans: dict[str, Any], name: str, source: str) -> dict[str, Any]:
    """Configuration ``name`` with its ``inherits_from`` chain applied, as nnU-Net resolves it."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    if name not in plans["configurations"]:
        raise NNUNetError(f"has no configuration {name!r} (it has {', '.join(plans['configurations'])})",
                          source=source)
    try:
        return PlansManager(plans).get_configuration(name).configuration
    except (RuntimeError, KeyError, ValueError) as exc:
        raise NNUNetError(f"configurations.{name}: {exc}", source=source) from None


def check_base_configuration(configuration: dict[str, Any], name: str, source: str) -> tuple[int, int, int]:
    """The 3D patch size of the configuration the new one inherits from, or ``NNUNetError``."""
    patch = configuration.get("patch_size")
    if not isinstance(patch, list) or not all(isinstance(n, int) for n in patch):
        raise NNUNetError(f"configurations.{name}.patch_size: expected a list of integers, got {patch!r}", source=source)
    if len(patch) != 3:
        raise NNUNetError(f"configurations.{name} is a {len(patch)}D configuration (patch {patch}); scnas cells are "
                          "3D: inherit from a 3D configuration (3d_fullres, 3d_lowres)", source=source)
    architecture = configuration.get("architecture")
    if not isinstance(architecture, dict) or not isinstance(architecture.get("arch_kwargs"), dict):
        raise NNUNetError(f"configurations.{name}.architecture: missing or not an object", source=source)
    return tuple(patch)  # type: ignore[return-value]


def scnas_strides(configuration: dict[str, Any], name: str, patch: tuple[int, int, int], *, depth: int | None,
                  source: str) -> list[list[int]]:
    """The strides of the new configuration: nnU-Net's own for ``name`` (when the cells can take
    them), or ``depth`` isotropic halvings; the patch must then be divisible by 2**depth.

    Args:
        configuration: nnU-Net's configuration the new one is based on.
        name: its name, for error messages.
        patch: its patch size.
        depth: isotropic down-samplings (None: nnU-Net's own strides).
        source: the plans file, for error messages.
    """
    if depth is None:
        strides = configuration["architecture"]["arch_kwargs"].get("strides")
        try:
            depth = depth_of_strides(strides)
        except NNUNetError as exc:
            raise NNUNetError(f"configurations.{name}.architecture.arch_kwargs.strides: {exc.problems[0].message} "
                              f"(nnU-Net planned them for spacing {configuration.get('spacing')}, patch {list(patch)})",
                              source=source) from None
    strides = [[1, 1, 1]] + [[2, 2, 2]] * depth
    try:
        check_spatial_size(patch, BuildConfig(depth=depth))
    except BuildError as exc:
        raise NNUNetError(f"configurations.{name}.patch_size: {exc.problems[0].message}", source=source) from None
    return strides


def scnas_configuration(genotype: Genotype, stem_channels: int, strides: list[list[int]], *, base: str,
                        upsampling: str = D.UPSAMPLING) -> dict[str, Any]:
    """The plans configuration that trains ``genotype`` in nnU-Net on ``base``'s preprocessed data.

    Args:
        genotype: the cells.
        stem_channels: the stem width.
        strides: from :func:`scnas_strides`.
        base: the configuration it inherits from.
        upsampling: ``trilinear`` or ``transposed``.
    """
    return {
        "inherits_from": base,
        "architecture": {
            "network_class_name": NETWORK_CLASS,
            "arch_kwargs": {"genotype": genotype.to_dict(), "stem_channels": stem_channels, "strides": strides,
                            "upsampling": upsampling, "negative_slope": 0.01},
            "_kw_requires_import": [],
        },
    }


def network_channels(plans: dict[str, Any], configuration: str, dataset_json: dict[str, Any]) -> tuple[int, int]:
    """Input channels and output channels (segmentation heads) of ``configuration``'s network, as
    nnU-Net's trainer computes them (cascades, regions and ignore labels included)."""
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    manager = PlansManager(plans)
    return (determine_num_input_channels(manager, configuration, dataset_json),
            manager.get_label_manager(dataset_json).num_segmentation_heads)


def nnunet_network(plans: dict[str, Any], configuration: str, dataset_json: dict[str, Any],
                   *, deep_supervision: bool = False) -> nn.Module:
    """The network nnU-Net's trainer builds for ``configuration`` (not initialised), through
    nnU-Net's own ``get_network_from_plans``. Build it under ``torch.device("meta")`` to count it.

    Args:
        plans: the plans document.
        configuration: the configuration's name.
        dataset_json: the dataset.json document.
        deep_supervision: build with deep supervision.
    """
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    manager = PlansManager(plans).get_configuration(configuration)
    in_channels, out_channels = network_channels(plans, configuration, dataset_json)
    return get_network_from_plans(manager.network_arch_class_name, manager.network_arch_init_kwargs,
                                  manager.network_arch_init_kwargs_req_import, in_channels, out_channels,
                                  allow_init=False, deep_supervision=deep_supervision)


def nnunet_network_cost(plans: dict[str, Any], configuration: str, dataset_json: dict[str, Any],
                        *, source: str = "plans") -> tuple[int, int]:
    """Parameters and FLOPs (one inference forward at the configuration's patch, batch 1) of
    nnU-Net's own network for ``configuration``, counted as scnas counts its networks.

    Args:
        plans: the plans document.
        configuration: the configuration's name.
        dataset_json: the dataset.json document.
        source: the plans file, for error messages.
    """
    from scnas.build.stats import forward_flops

    patch = resolved_configuration(plans, configuration, source)["patch_size"]
    with torch.device("meta"):
        network = nnunet_network(plans, configuration, dataset_json)
    in_channels, _ = network_channels(plans, configuration, dataset_json)
    return sum(p.numel() for p in network.parameters()), forward_flops(network.eval(), (1, in_channels, *patch))


@dataclass
class PlansEdit:
    """What ``scnas nnunet-plans`` wrote, for its report."""

    output: Path
    configuration: str
    base: str
    _: KW_ONLY
    dataset: str
    plans_identifier: str
    stem_channels: int
    depth: int
    patch: tuple[int, int, int]
    in_channels: int
    num_classes: int
    params: int
    flops: int
    nnunet_params: int | None = None
    nnunet_flops: int | None = None

    @property
    def train_command(self) -> str:
        return f"nnUNetv2_train {self.dataset} {self.configuration} FOLD -p {self.plans_identifier}"


def default_output(plans_path: str | os.PathLike) -> Path:
    """``nnUNetPlans.json`` -> ``nnUNetPlans_scnas.json`` beside it (nnU-Net looks for plans there)."""
    path = Path(plans_path)
    return path.with_name(f"{path.stem}_scnas.json")


def write_nnunet_plans(plans_path: str | os.PathLike, genotype: Genotype, output: str | os.PathLike | None = None,
                       *, stem_channels: int | None = None, match_nnunet_flops: bool = False,
                       configuration: str = "3d_fullres_scnas", base: str = BASE_CONFIGURATION,
                       depth: int | None = None, dataset_json: str | os.PathLike | None = None,
                       upsampling: str = D.UPSAMPLING) -> PlansEdit:
    """Copy the plans at ``plans_path`` to ``output`` with configuration ``configuration`` added:
    ``genotype``'s network on ``base``'s preprocessed data (``inherits_from``), at
    ``stem_channels`` or, with ``match_nnunet_flops``, at the stem whose FLOPs are nearest to
    nnU-Net's own network for ``base`` at its patch size. ``dataset_json`` (default: the
    ``dataset.json`` beside the plans) gives the channels and labels. Nothing is written when
    any check fails; the file is written atomically.

    Args:
        plans_path: an nnU-Net v2 plans file (``nnUNetPlans.json``).
        genotype: the cells of the network to train.
        output: the plans file to write (default: ``nnUNetPlans_scnas.json`` beside
            ``plans_path``); never ``plans_path`` itself.
        stem_channels: the stem width; give it or ``match_nnunet_flops``, not both.
        match_nnunet_flops: choose the stem whose FLOPs are nearest to nnU-Net's own network.
        configuration: the name of the configuration to add.
        base: the configuration it inherits from (its preprocessed data).
        depth: isotropic down-samplings (default: nnU-Net's own strides, when the cells can take
            them).
        dataset_json: the dataset.json giving channels and labels (default: beside
            ``plans_path``).
        upsampling: ``trilinear`` or ``transposed``.
    """
    from scnas.build.stats import match_flops, network_flops, network_stats

    source = str(plans_path)
    if (stem_channels is None) == (not match_nnunet_flops):
        raise NNUNetError("give either --stem N or --match-flops (not both)")
    plans = read_json_document(plans_path, "plans file")
    check_plans(plans, source)
    output = Path(output) if output is not None else default_output(plans_path)
    if output.resolve() == Path(plans_path).resolve():
        raise NNUNetError("the output would replace the plans file itself; write the copy elsewhere (-o)",
                          source=str(output))
    if not output.name.endswith(".json") or output.stem == "":
        raise NNUNetError("the plans copy must be a .json file (its name without .json is nnU-Net's -p identifier)",
                          source=str(output))
    if configuration in plans["configurations"] and configuration != base:
        existing = plans["configurations"][configuration]
        if existing.get("architecture", {}).get("network_class_name") != NETWORK_CLASS:
            raise NNUNetError(f"configuration {configuration!r} exists and is not a scnas one; choose another --name",
                              source=source)
    if configuration == base:
        raise NNUNetError(f"--name {configuration!r} is the configuration it inherits from; choose another name",
                          source=source)
    base_configuration = resolved_configuration(plans, base, source)
    patch = check_base_configuration(base_configuration, base, source)
    strides = scnas_strides(base_configuration, base, patch, depth=depth, source=source)
    json_path = Path(dataset_json) if dataset_json is not None else Path(plans_path).with_name("dataset.json")
    dataset = read_json_document(json_path, "dataset.json")
    try:
        in_channels, num_classes = network_channels(plans, base, dataset)
    except (KeyError, TypeError, ValueError, AssertionError) as exc:
        raise NNUNetError(f"cannot read channels and labels: {type(exc).__name__} {exc}", source=str(json_path)) from None
    _, config = settings_from_arch_kwargs(in_channels, num_classes, genotype, stem_channels=stem_channels or 1,
                                          strides=strides, upsampling=upsampling)
    cost_config = config.model_copy(update={"deep_supervision": False})   # inference cost, as nnU-Net's is counted
    nnunet_params = nnunet_flops = None
    if match_nnunet_flops:
        nnunet_params, nnunet_flops = nnunet_network_cost(plans, base, dataset, source=source)
        stem_channels, flops = match_flops(genotype, nnunet_flops, cost_config, patch=patch)
        config = config.model_copy(update={"stem_channels": stem_channels})
    else:
        flops = network_flops(genotype, cost_config.model_copy(update={"stem_channels": stem_channels}), patch)
        config = config.model_copy(update={"stem_channels": stem_channels})
    with torch.device("meta"):   # refuses now what nnU-Net's trainer would refuse later
        SCNASUNetForNNUNet(in_channels, num_classes, genotype, stem_channels=stem_channels, strides=strides,
                           deep_supervision=True, upsampling=upsampling)
    params = network_stats(genotype, config, (2 * config.divisor,) * 3).params
    edited = dict(plans)
    edited["configurations"] = {**plans["configurations"],
                                configuration: scnas_configuration(genotype, stem_channels, strides, base=base,
                                                                   upsampling=upsampling)}
    edited["plans_name"] = output.stem   # nnU-Net names result folders TRAINER__PLANS__CONFIG from it
    atomic_write_text(output, json.dumps(edited, indent=4) + "\n")
    return PlansEdit(output, configuration, base, dataset=plans["dataset_name"], plans_identifier=output.stem,
                     stem_channels=stem_channels, depth=config.depth,
                     patch=patch, in_channels=in_channels, num_classes=num_classes, params=params, flops=flops,
                     nnunet_params=nnunet_params, nnunet_flops=nnunet_flops)


# ---------------------------------------------------------------------------------------------
# From nnU-Net's checkpoint back to scnas


def load_nnunet_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """nnU-Net's ``checkpoint_final.pth`` (a pickle) read with ``torch.load(weights_only=True)``:
    plain containers, tensors and the few types nnU-Net puts there (numpy scalars in its
    training log) are accepted, nothing that can run code."""
    import numpy as np

    try:
        from numpy._core.multiarray import scalar
    except ImportError:   # numpy < 2
        from numpy.core.multiarray import scalar

    check_input_file(path, NNUNetError)
    # a numpy scalar pickles as scalar(dtype, bytes): data, not code
    allowed = [scalar, np.dtype, *{type(np.dtype(t)) for t in (np.float16, np.float32, np.float64, np.int32, np.int64)}]
    try:
        with torch.serialization.safe_globals(allowed):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:   # pickle and zip errors of every kind, and refused globals
        raise NNUNetError(f"not an nnU-Net checkpoint torch can read safely ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:300]})", source=str(path)) from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("network_weights"), dict) \
            or not isinstance(checkpoint.get("init_args"), dict):
        raise NNUNetError("not an nnU-Net v2 checkpoint (no network_weights / init_args)", source=str(path))
    return checkpoint


def network_from_checkpoint(checkpoint: dict[str, Any], source: str) -> SCNASUNet:
    """The scnas network (eval mode) that an nnU-Net checkpoint of a scnas configuration holds."""
    init = checkpoint["init_args"]
    plans, name = init.get("plans"), init.get("configuration")
    try:
        architecture = plans["configurations"][name]["architecture"]
    except (KeyError, TypeError):
        raise NNUNetError(f"init_args do not hold configuration {name!r} with an architecture", source=source) from None
    if architecture.get("network_class_name") != NETWORK_CLASS:
        raise NNUNetError(f"configuration {name!r} trained {architecture.get('network_class_name')!r}, not a scnas "
                          f"network ({NETWORK_CLASS})", source=source)
    weights = {key.removeprefix("_orig_mod."): value for key, value in checkpoint["network_weights"].items()}
    try:
        in_channels, num_classes = weights["stem.0.weight"].shape[1], weights["out.weight"].shape[0]
    except KeyError as exc:
        raise NNUNetError(f"network_weights lack {exc.args[0]!r}", source=source) from None
    genotype, config = settings_from_arch_kwargs(in_channels, num_classes, **architecture["arch_kwargs"])
    model = build_network(genotype, config)
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        raise NNUNetError(f"network_weights do not fit the genotype's network: {str(exc).splitlines()[0]}",
                          source=source) from None
    return model.eval()


def checkpoint_to_model_file(checkpoint_path: str | os.PathLike, output: str | os.PathLike) -> SCNASUNet:
    """Write the network of nnU-Net's checkpoint as a scnas model file (safetensors with the
    genotype and build settings; nnU-Net's preprocessing is not scnas's, so none is recorded)."""
    from scnas.build.model_file import save_model

    checkpoint = load_nnunet_checkpoint(checkpoint_path)
    model = network_from_checkpoint(checkpoint, str(checkpoint_path))
    init = checkpoint["init_args"]
    save_model(model, output, extra={"nnunet_configuration": str(init.get("configuration")),
                                     "nnunet_plans": str(init["plans"].get("plans_name")),
                                     "nnunet_trainer": str(checkpoint.get("trainer_name")),
                                     "nnunet_epochs": str(checkpoint.get("current_epoch"))})
    return model
