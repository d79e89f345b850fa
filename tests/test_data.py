"""Datasets: reading both dataset.json flavours, phantoms, preprocessing, splits, patches,
augmentation, the loader, and every kind of bad input."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from scnas.data import (Cache, DatasetError, PrepareSettings, architecture_split, check_dataset, fold_cases,
                        kfold_splits, load_case, prepare_dataset, read_dataset, read_splits, write_phantom_dataset,
                        write_splits)
from scnas.data.augment import (Augmentation, GaussianNoise, Gamma, IntensityScaleShift, RandomFlip, SpatialTransform,
                                default_augmentation)
from scnas.data.loader import PatchDataset
from scnas.data.patches import PatchSampler, extract_patch
from scnas.data.preprocess import label_to_original, resampled_shape

SETTINGS = PrepareSettings(target_spacing=(1.0, 1.0, 1.0))


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    return write_phantom_dataset(tmp_path_factory.mktemp("data") / "task", cases=6, channels=2, foreground_classes=2,
                                 shape=(20, 18, 10), spacing=(1.0, 1.0, 2.0), seed=3)


@pytest.fixture(scope="module")
def cache(phantom, tmp_path_factory):
    folder = tmp_path_factory.mktemp("cache") / "c"
    prepare_dataset(phantom, folder, SETTINGS, progress=False)
    return Cache(folder)


def test_phantom_reads_as_msd_with_labels_and_anisotropic_spacing(phantom):
    dataset = read_dataset(phantom)
    assert dataset.flavour == "msd" and dataset.num_channels == 2 and len(dataset.cases) == 6
    case = load_case(dataset, dataset.cases[0])
    assert case.image.shape == (2, 20, 18, 10) and case.spacing == (1.0, 1.0, 2.0)
    assert set(np.unique(case.label)) == {0, 1, 2} and np.all(case.image[:, case.label > 0] > 0)
    assert np.any(case.image == 0)  # zero background outside the body


def test_phantom_is_deterministic_and_nnunet_layout_holds_the_same_data(phantom, tmp_path):
    other = write_phantom_dataset(tmp_path / "v2", cases=6, channels=2, foreground_classes=2, shape=(20, 18, 10),
                                  spacing=(1.0, 1.0, 2.0), seed=3, layout="nnunetv2")
    a, b = read_dataset(phantom), read_dataset(other)
    assert b.flavour == "nnunetv2" and b.labels == a.labels and len(b.cases[0].images) == 2
    left, right = load_case(a, a.cases[2]), load_case(b, b.cases[2])
    assert np.array_equal(left.image, right.image) and np.array_equal(left.label, right.label)


def test_phantom_refuses_to_overwrite(phantom):
    with pytest.raises(DatasetError, match="already exists; choose another folder or pass --force"):
        write_phantom_dataset(phantom, cases=1)


def test_resource_fork_files_are_skipped(tmp_path):
    root = write_phantom_dataset(tmp_path / "t", cases=2, channels=1, foreground_classes=1, shape=(8, 8, 8), layout="nnunetv2")
    (root / "imagesTr" / "._phantom_000_0000.nii.gz").write_bytes(b"\x00\x05\x16\x07 resource fork")
    meta = json.loads((root / "dataset.json").read_text())
    assert [c.case_id for c in read_dataset(root).cases] == ["phantom_000", "phantom_001"]
    msd = write_phantom_dataset(tmp_path / "m", cases=2, channels=1, foreground_classes=1, shape=(8, 8, 8))
    meta = json.loads((msd / "dataset.json").read_text())
    meta["training"].append({"image": "./imagesTr/._phantom_000.nii.gz", "label": "./labelsTr/._phantom_000.nii.gz"})
    (msd / "dataset.json").write_text(json.dumps(meta))
    assert len(read_dataset(msd).cases) == 2


def test_prepare_shapes_spacing_and_crop_box(phantom, cache):
    dataset = read_dataset(phantom)
    for case in dataset.cases:
        original = load_case(dataset, case)
        record = cache.records[case.case_id]
        box = tuple(slice(a, b) for a, b in record["crop_box"])
        outside = original.image.copy()
        outside[(slice(None), *box)] = 0
        assert not outside.any()                                  # nothing nonzero is cropped away
        cropped = original.image[(slice(None), *box)]
        assert list(cropped.shape[1:]) == record["cropped_shape"]
        assert record["shape"] == list(resampled_shape(cropped.shape[1:], (1.0, 1.0, 2.0), (1.0, 1.0, 1.0)))
        assert record["shape"][2] == 2 * record["cropped_shape"][2]  # 2 mm -> 1 mm doubles the z axis
        stored = cache.load(case.case_id)
        assert stored.image.shape == (2, *record["shape"]) and stored.image.dtype == np.float16   # the default
        assert (cache.folder / f"{case.case_id}.b2nd").exists() and stored.label.dtype == np.int16


def test_labels_map_back_to_the_original_grid(phantom, cache):
    dataset = read_dataset(phantom)
    for case in dataset.cases:
        original = load_case(dataset, case).label
        restored = label_to_original(np.asarray(cache.load(case.case_id).label), cache.records[case.case_id])
        assert restored.shape == original.shape
        for value in (1, 2):
            a, b = restored == value, original == value
            assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.9    # down- and up-sampling z costs little


def test_mapping_back_is_exact_without_resampling(phantom, tmp_path):
    cache_dir = tmp_path / "same"
    prepare_dataset(phantom, cache_dir, PrepareSettings(target_spacing=(1.0, 1.0, 2.0)), progress=False)
    cache = Cache(cache_dir)
    dataset = read_dataset(phantom)
    for case in dataset.cases:
        original = load_case(dataset, case).label
        assert np.array_equal(label_to_original(np.asarray(cache.load(case.case_id).label),
                                                cache.records[case.case_id]), original)


def test_channels_are_z_normalised_inside_the_mask(cache):
    for case_id in cache.case_ids:
        image = np.asarray(cache.load(case_id).image)
        mask = np.any(image != 0, axis=0)
        for channel in image:
            assert abs(channel[mask].mean()) < 0.1 and abs(channel[mask].std() - 1) < 0.15


def test_voxels_outside_the_original_nonzero_mask_are_zero_and_inside_z_scored():
    """The mask is the input's: a voxel that is zero in every channel of the original image is 0
    after preprocessing (not -mean/std), and every other voxel is (value - mean) / std of the mask."""
    from scnas.data.dataset import LoadedCase
    from scnas.data.preprocess import preprocess_case

    rng = np.random.default_rng(2)
    image = (rng.normal(size=(2, 12, 10, 8)) * [[[[3.0]]], [[[0.5]]]] + [[[[40.0]]], [[[7.0]]]]).astype(np.float32)
    grid = np.indices((12, 10, 8))
    outside = ((grid[0] - 5.5) ** 2 + (grid[1] - 4.5) ** 2 + (grid[2] - 3.5) ** 2) > 16   # a ball: the box keeps corners
    outside[0, 0, 0] = outside[11, 9, 7] = False       # ... and the crop box stays the whole volume
    image[:, outside] = 0
    case = LoadedCase("ball", image, np.zeros((12, 10, 8), np.int16), affine=np.eye(4), spacing=(1.0, 1.0, 1.0))
    out = preprocess_case(case, PrepareSettings(target_spacing=(1.0, 1.0, 1.0)))["image"]
    assert out.shape == image.shape and outside.sum() > 200
    for original, normalised in zip(image, out):
        assert not normalised[outside].any()
        inside = original[~outside]
        np.testing.assert_allclose(normalised[~outside], (inside - inside.mean()) / inside.std(), rtol=1e-4, atol=1e-4)


def test_prepared_cases_are_skipped_and_other_settings_refused(phantom, cache):
    report = prepare_dataset(phantom, cache.folder, SETTINGS, progress=False)
    assert report.prepared == [] and len(report.skipped) == 6
    with pytest.raises(DatasetError, match="prepared with other settings"):
        prepare_dataset(phantom, cache.folder, PrepareSettings(target_spacing=(0.7, 0.7, 0.7)), progress=False)
    assert Cache(cache.folder).settings["target_spacing"] == [1.0, 1.0, 1.0]


def test_parallel_preparation_gives_the_same_cache(phantom, cache, tmp_path):
    prepare_dataset(phantom, tmp_path / "par", SETTINGS, workers=2, progress=False)
    other = Cache(tmp_path / "par")
    for case_id in cache.case_ids:
        assert np.array_equal(np.asarray(other.load(case_id).image), np.asarray(cache.load(case_id).image))


@pytest.mark.parametrize("count", [5, 6, 11, 23, 484])
def test_splits_equal_scikit_learns_kfold_as_nnunet_uses_it(count):
    from sklearn.model_selection import KFold

    ids = [f"case_{i:04d}" for i in np.random.default_rng(count).permutation(count)]
    ours = kfold_splits(ids)
    keys = sorted(ids)
    theirs = [{"train": [keys[i] for i in train], "val": [keys[i] for i in val]}
              for train, val in KFold(n_splits=5, shuffle=True, random_state=12345).split(keys)]
    assert ours == theirs


def test_splits_file_round_trip_and_errors(tmp_path, cache):
    splits = kfold_splits(cache.case_ids)
    assert cache.splits == splits                                          # prepare wrote nnU-Net's folds
    write_splits(tmp_path / "s.json", splits)
    assert read_splits(tmp_path / "s.json", cache.case_ids) == splits
    assert fold_cases(splits, 1) == (splits[1]["train"], splits[1]["val"])
    (tmp_path / "bad.json").write_text(json.dumps([{"train": ["a"], "val": ["a"]}]))
    with pytest.raises(DatasetError, match="cases in both train and val"):
        read_splits(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text(json.dumps([{"train": ["x"], "val": ["y"]}]))
    with pytest.raises(DatasetError, match="names cases this dataset does not have"):
        read_splits(tmp_path / "other.json", cache.case_ids)
    with pytest.raises(DatasetError, match="fold 7 does not exist"):
        fold_cases(splits, 7)


def test_architecture_split_is_four_to_one_seeded_and_disjoint():
    ids = [f"c{i}" for i in range(25)]
    weights, arch = architecture_split(ids, seed=4)
    assert len(arch) == 5 and len(weights) == 20 and not set(weights) & set(arch)
    assert architecture_split(ids, seed=4) == (weights, arch) != architecture_split(ids, seed=5)


@pytest.mark.parametrize("cases, share, expected", [
    # round and int differ (int would take one case fewer)
    (8, 0.2, 2), (9, 0.2, 2), (13, 0.2, 3), (14, 0.2, 3), (19, 0.2, 4), (24, 0.2, 5), (7, 0.25, 2), (6, 0.3, 2),
    # round and ceil differ
    (11, 0.2, 2), (16, 0.2, 3),
    # at least one case on each side
    (4, 0.1, 1), (2, 0.9, 1)])
def test_architecture_split_rounds_to_the_nearest_number_of_cases(cases, share, expected):
    ids = [f"c{i}" for i in range(cases)]
    weights, arch = architecture_split(ids, seed=0, architecture_share=share)
    assert len(arch) == expected and sorted(weights + arch) == sorted(ids)


def test_foreground_share_over_many_draws(cache):
    sampler = PatchSampler(cache, cache.case_ids, (4, 4, 4), foreground_share=1 / 3)
    rng = np.random.default_rng(0)
    draws = [sampler.sample(rng) for _ in range(900)]
    forced = [d for d in draws if d[2]]
    assert abs(len(forced) / len(draws) - 1 / 3) < 0.05
    assert all(label.any() for _, label, _ in forced)          # a forced patch contains foreground
    unforced_fg = np.mean([label.any() for _, label, forced_ in draws if not forced_])
    assert unforced_fg < 0.95                                   # random ones often do not


def test_patches_are_padded_where_a_case_is_smaller(cache):
    case = cache.load(cache.case_ids[0])
    size = tuple(n + 6 for n in case.image.shape[1:])
    image, label = extract_patch(case.image, case.label, (-3, -3, -3), size=size)
    assert image.shape == (2, *size) and not image[:, :3].any() and not label[:3].any()
    assert np.array_equal(image[:, 3:-3, 3:-3, 3:-3], case.image)
    sampler = PatchSampler(cache, cache.case_ids[:1], size)
    patch, _, _ = sampler.sample(np.random.default_rng(1))
    assert patch.shape == (2, *size)


def test_augmentation_is_seeded_and_keeps_image_and_label_aligned(cache):
    case = cache.load(cache.case_ids[0])
    image, label = (torch.from_numpy(a) for a in extract_patch(case.image, case.label, (0, 0, 0), size=(16, 16, 16)))
    pipeline = Augmentation(spatial=None, transforms=[RandomFlip(p=0.5), IntensityScaleShift(p=1.0), Gamma(p=1.0),
                                                      GaussianNoise(p=1.0)])
    recipe = pipeline.draw(np.random.default_rng(7), channels=2)
    assert len(recipe.steps) >= 3 and recipe.matrix is None
    a = pipeline.apply(image.clone(), label.clone(), recipe, size=(16, 16, 16))
    b = pipeline.apply(image.clone(), label.clone(), pipeline.draw(np.random.default_rng(7), 2), size=(16, 16, 16))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[0], image)
    assert a[0].shape == image.shape and set(a[1].unique().tolist()) <= set(label.unique().tolist())
    flipped_image, flipped_label = RandomFlip.apply(image, label, [0, 1, 2])
    assert torch.equal(flipped_label, label.flip(0, 1, 2)) and torch.equal(flipped_image, image.flip(1, 2, 3))
    gamma_image, _ = Gamma.apply(image.clone(), label, np.array([1.0, 1.0]))
    assert torch.allclose(gamma_image, image, atol=1e-5)                  # gamma 1 changes nothing


def test_deferred_patches_finish_as_the_worker_would(cache):
    """What a worker hands over for CUDA (the region as stored, the recipe) becomes, once
    finished where the batch goes, exactly the patch a worker augmenting itself gives."""
    from scnas.data.loader import RawBatch, RawPatch, to_device

    spatial_often = Augmentation(spatial=SpatialTransform(p=0.5))
    dataset = PatchDataset(cache, cache.case_ids, (8, 8, 8), samples_per_epoch=12, seed=5, augmentation=spatial_often)
    ready = [dataset[(1, i)] for i in range(12)]
    dataset.deferred = True
    raw = [dataset[(1, i)] for i in range(12)]
    assert all(isinstance(r, RawPatch) and r.image.dtype == torch.float16 for r in raw)   # as stored: half the bytes
    assert any(r.image.shape[1:] != (8, 8, 8) for r in raw)                              # rotated: the larger region
    x, y = to_device(RawBatch(raw), torch.device("cpu"), (8, 8, 8))
    assert torch.equal(x, torch.stack([r[0] for r in ready])) and torch.equal(y, torch.stack([r[1] for r in ready]))


def _rotation_case(size=(24, 20, 16)):
    """A volume whose image channel 0 is its label (a few boxes) and channel 1 a linear ramp."""
    label = np.zeros(size, np.int16)
    label[4:12, 5:15, 3:9], label[14:20, 2:8, 8:14], label[8:11, 12:18, 10:15] = 1, 2, 3
    ramp = np.broadcast_to(np.arange(size[0], dtype=np.float32)[:, None, None], size)
    return np.stack([label.astype(np.float32), ramp]), label


def test_spatial_transform_of_identity_reads_the_plain_patch():
    image, label = _rotation_case()
    size = (8, 8, 8)
    margin = SpatialTransform.margin(np.eye(3), size)
    assert margin == (1, 1, 1)
    start = (6, 5, 4)
    region = tuple(slice(s - m, s + p + m) for s, p, m in zip(start, size, margin))
    out_image, out_label = SpatialTransform.apply(torch.from_numpy(image[(slice(None), *region)].copy()),
                                                  torch.from_numpy(label[region].copy()), np.eye(3), size=size)
    inner = tuple(slice(s, s + p) for s, p in zip(start, size))
    assert torch.allclose(out_image, torch.from_numpy(image[(slice(None), *inner)]), atol=1e-5)
    assert torch.equal(out_label, torch.from_numpy(label[inner]))


@pytest.mark.parametrize("seed", range(6))
def test_rotated_label_stays_on_the_rotated_image(seed):
    """Under a random rotation and scaling the label is sampled where the image is: channel 0
    (the label as intensities, trilinear) agrees with the label (nearest) away from edges, the
    region read covers every sampled point (no zeros inside the volume) and the ramp channel
    moves as the matrix says."""
    image, label = _rotation_case((40, 40, 40))
    spatial = SpatialTransform(p=1.0, rotation=30.0, scale=(0.8, 1.25))
    matrix = spatial.draw(np.random.default_rng(seed))
    size = (16, 16, 16)
    margin = SpatialTransform.margin(matrix, size)
    start = tuple(12 - m for m in margin)
    assert all(s >= 0 and s + p + 2 * m <= 40 for s, p, m in zip(start, size, margin))  # fits in the volume
    region = tuple(slice(s, s + p + 2 * m) for s, p, m in zip(start, size, margin))
    out_image, out_label = SpatialTransform.apply(torch.from_numpy(image[(slice(None), *region)].copy()),
                                                  torch.from_numpy(label[region].copy()), matrix, size=size)
    agree = (out_image[0].round().to(torch.int16) == out_label).float().mean()
    assert agree > 0.9                     # differs only where trilinear blends two labels
    # The ramp (value = x index) at output voxel o equals x of centre + M (o - centre).
    centre_in = np.array([12 + 7.5] * 3)
    offsets = np.stack(np.meshgrid(*[np.arange(16) - 7.5] * 3, indexing="ij"), -1)
    expected = centre_in[0] + offsets @ matrix[0]
    assert np.allclose(out_image[1].numpy(), expected, atol=1e-3)


def test_loader_is_deterministic_whatever_the_workers(cache):
    """The loader training and search use (PatchLoader.epoch) gives the same batches with and
    without worker processes, and a different seed gives different ones."""
    from scnas.data.loader import PatchLoader

    def batches(workers, seed=3):
        dataset = PatchDataset(cache, cache.case_ids, (8, 8, 8), samples_per_epoch=8, seed=seed,
                               augmentation=default_augmentation())
        return [(x.clone(), y.clone()) for x, y in PatchLoader(dataset, batch_size=4, workers=workers).epoch(2)]
    plain, parallel = batches(0), batches(2)
    assert len(plain) == len(parallel) == 2 and plain[0][0].shape == (4, 2, 8, 8, 8) and plain[0][1].dtype == torch.int64
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(plain, parallel))
    assert not torch.equal(plain[0][0], batches(0, seed=4)[0][0])


def test_persistent_workers_follow_the_epoch_and_the_resume_step(cache):
    """One loader for a whole run: its persistent workers draw epoch e's patches when asked for
    epoch e (not the epoch they were started in), and a range of steps equals the same steps of
    the whole epoch (a resumed epoch starts where it stopped)."""
    from scnas.data.loader import PatchLoader

    dataset = PatchDataset(cache, cache.case_ids, (8, 8, 8), samples_per_epoch=8, seed=3,
                           augmentation=default_augmentation())
    loader = PatchLoader(dataset, batch_size=2, workers=2)
    first = [x.clone() for x, _ in loader.epoch(0)]
    second = [x.clone() for x, _ in loader.epoch(1)]
    tail = [x.clone() for x, _ in loader.epoch(1, start=2)]
    assert len(first) == len(second) == 4 and len(tail) == 2
    assert not torch.equal(first[0], second[0])
    assert all(torch.equal(a, b) for a, b in zip(second[2:], tail))
    dataset.set_epoch(1)
    assert torch.equal(second[0][0], dataset[0][0])     # the same draw in the main process


# ------------------------------------------------------------------ bad input


def _save(path, array, affine=None):
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), str(path))


@pytest.fixture
def broken(tmp_path):
    """A 12-case nnU-Net-layout dataset with a different fault in cases 1..11 (case 0 is fine)."""
    root = write_phantom_dataset(tmp_path / "broken", cases=12, channels=2, foreground_classes=2, shape=(10, 10, 8),
                                 spacing=(1.0, 1.0, 1.0), layout="nnunetv2")
    images, labels = root / "imagesTr", root / "labelsTr"
    (labels / "phantom_001.nii.gz").unlink()                                          # missing file
    data = (images / "phantom_002_0000.nii.gz").read_bytes()
    (images / "phantom_002_0000.nii.gz").write_bytes(data[: len(data) // 2])         # truncated
    (images / "phantom_003_0000.nii.gz").write_bytes(b"not gzip at all" * 10)         # not gzip
    _save(labels / "phantom_004.nii.gz", np.zeros((10, 10, 6), np.uint8))            # shape differs
    _save(labels / "phantom_005.nii.gz", np.zeros((10, 10, 8), np.uint8), np.diag([2.0, 1, 1, 1]))  # affine differs
    (images / "phantom_006_0001.nii.gz").unlink()                                     # a channel missing
    _save(labels / "phantom_007.nii.gz", np.full((10, 10, 8), 7, np.uint8))          # undeclared label 7
    nan = np.zeros((10, 10, 8), np.float32)
    nan[2, 2, 2] = np.nan
    _save(images / "phantom_008_0000.nii.gz", nan)                                    # NaN
    _save(images / "phantom_009_0000.nii.gz", np.zeros((10, 10, 8), np.float32))
    _save(images / "phantom_009_0001.nii.gz", np.zeros((10, 10, 8), np.float32))     # all zero
    _save(images / "phantom_010_0000.nii.gz", np.ones((10, 10), np.float32))          # 2D
    _save(labels / "phantom_011.nii.gz", np.full((10, 10, 8), 0.5, np.float32))      # float, non-integer
    return root


EXPECTED = {"phantom_001": "no such file", "phantom_002": "cannot read", "phantom_003": "cannot read",
            "phantom_004": "label shape (10, 10, 6) differs", "phantom_005": "label affine differs",
            "phantom_006": "no such file", "phantom_007": "label values [7] are not declared",
            "phantom_008": "NaN/Inf", "phantom_009": "all zero", "phantom_010": "2 dimensions",
            "phantom_011": "non-integer values"}


def test_check_lists_every_problem_in_one_pass(broken):
    count, lines = check_dataset(broken)
    assert count == 12 and len(lines) == len(EXPECTED)
    for case_id, words in EXPECTED.items():
        matching = [line for line in lines if case_id in line]
        assert len(matching) == 1 and words in matching[0], (case_id, matching)
    assert not any("phantom_000" in line for line in lines)


def test_check_command_exit_code_and_lines(cli, broken, phantom):
    result = cli("data", "check", broken)
    assert result.code == 1 and result.out.strip().endswith("12 case(s) checked: 11 problem(s)")
    assert cli("data", "check", phantom).code == 0


def test_prepare_names_the_failing_cases_and_keeps_the_good_ones(cli, broken, tmp_path):
    result = cli("data", "prepare", broken, "-o", tmp_path / "cache", "--spacing", "1", "1", "1")
    assert result.code == 1 and "Traceback" not in result.err
    assert len(result.err.strip().splitlines()) == len(EXPECTED)
    assert (tmp_path / "cache" / "phantom_000.json").exists() and not (tmp_path / "cache" / "cache.json").exists()
    with pytest.raises(DatasetError, match="preparation did not finish"):
        Cache(tmp_path / "cache")


def test_a_full_disk_stops_preparation_naming_the_case_and_keeps_finished_cases(phantom, tmp_path, monkeypatch):
    import errno

    import scnas.data.arrays as arrays

    real, writes = arrays.write_array, []

    def fill_up(path, array):
        if len(writes) == 4:     # case 0's image and label, case 1's image and label; then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        writes.append(path)
        return real(path, array)

    monkeypatch.setattr(arrays, "write_array", fill_up)
    with pytest.raises(DatasetError) as caught:
        prepare_dataset(phantom, tmp_path / "c", SETTINGS, workers=1, progress=False)
    message = str(caught.value)
    assert "case phantom_002: cannot write to the cache: No space left on device" in message
    assert "3 case(s) not started after that failure" in message
    assert sorted(p.name for p in (tmp_path / "c").glob("*.json")) == ["phantom_000.json", "phantom_001.json",
                                                                       "settings.json"]
    assert not list((tmp_path / "c").glob(".*.preparing")) and not list((tmp_path / "c").glob(".*.partial.b2nd"))
    monkeypatch.setattr(arrays, "write_array", real)
    report = prepare_dataset(phantom, tmp_path / "c", SETTINGS, workers=1, progress=False)
    assert report.skipped == ["phantom_000", "phantom_001"] and len(report.prepared) == 4


def test_a_dying_worker_is_named_by_its_case(phantom, tmp_path, monkeypatch):
    import os

    import scnas.data.preprocess as preprocess

    real = preprocess.preprocess_case

    def crash_on_three(case, settings):
        if case.case_id == "phantom_003":
            os._exit(9)          # as the out-of-memory killer would end it
        return real(case, settings)

    monkeypatch.setattr(preprocess, "preprocess_case", crash_on_three)   # the forked workers inherit it
    with pytest.raises(DatasetError, match=r"a preparation worker died .* preparing (one of )?[a-z_0-9, ]*phantom_003"):
        prepare_dataset(phantom, tmp_path / "c", SETTINGS, workers=2, progress=False)
    assert not list((tmp_path / "c").glob(".*.preparing"))


def test_a_version_1_cache_is_read_as_it_is_and_not_written_over(cache, tmp_path, phantom):
    """A cache written by scnas 0.13 (float32 .npy files) still reads; preparing into it says what to do."""
    old = tmp_path / "old"
    old.mkdir()
    header = json.loads((cache.folder / "cache.json").read_text())
    for case_id in cache.case_ids:
        stored = cache.load(case_id)
        np.save(old / f"{case_id}.npy", np.asarray(stored.image[:]).astype(np.float32))
        np.save(old / f"{case_id}_seg.npy", np.asarray(stored.label[:]))
        np.save(old / f"{case_id}_fg.npy", stored.foreground)
    (old / "cache.json").write_text(json.dumps({**header, "version": 1, "scnas_version": "0.13.0"}))
    (old / "splits_final.json").write_bytes((cache.folder / "splits_final.json").read_bytes())
    legacy = Cache(old)
    case = legacy.load(cache.case_ids[0])
    assert isinstance(case.image, np.memmap) and case.image.dtype == np.float32
    patch, _, _ = PatchSampler(legacy, legacy.case_ids, (8, 8, 8)).sample(np.random.default_rng(0))
    assert patch.shape == (2, 8, 8, 8)
    with pytest.raises(DatasetError, match=r"format v1 \(written by scnas 0.13.0\).*--force"):
        prepare_dataset(phantom, old, SETTINGS, progress=False)
    (old / "cache.json").write_text(json.dumps({**header, "version": 7}))
    with pytest.raises(DatasetError, match="v7 is not scnas-cache v1, v2, v3; prepare it again"):
        Cache(old)


def test_float32_storage_is_lossless_and_float16_close(phantom, cache, tmp_path):
    exact = tmp_path / "f32"
    prepare_dataset(phantom, exact, PrepareSettings(target_spacing=(1.0, 1.0, 1.0), image_dtype="float32"),
                    progress=False)
    lossless = Cache(exact)
    for case_id in cache.case_ids:
        full = np.asarray(lossless.load(case_id).image[:])
        half = np.asarray(cache.load(case_id).image[:]).astype(np.float32)
        assert full.dtype == np.float32
        assert np.abs(full - half).max() <= 2.0 ** -11 * np.abs(full).max() + 1e-7   # float16 rounding only
        assert np.array_equal(full == 0, half == 0)                                     # the mask survives


@pytest.mark.parametrize("content, words", [(None, "dataset.json: no such file"), ("{", "not valid JSON"),
                                            ('{"name": "x"}', "neither 'modality'"),
                                            ('{"channel_names": {"0": "CT"}, "labels": {"tumour": [1, 2]}}', "region")])
def test_bad_dataset_json(tmp_path, content, words):
    (tmp_path / "imagesTr").mkdir()
    if content is not None:
        (tmp_path / "dataset.json").write_text(content)
    with pytest.raises(DatasetError, match=words.replace("(", r"\(")):
        read_dataset(tmp_path)


def test_phantom_and_prepare_commands(cli, tmp_path):
    assert cli("data", "phantom", tmp_path / "p", "--cases", "5", "--shape", "12", "12", "8", "--channels", "1").code == 0
    result = cli("data", "prepare", tmp_path / "p", "-o", tmp_path / "c", "--spacing", "1", "1", "2")
    assert result.code == 0 and "prepared 5 case(s)" in result.out
    assert (tmp_path / "c" / "splits_final.json").exists()
    assert "skipped 5" in cli("data", "prepare", tmp_path / "p", "-o", tmp_path / "c", "--spacing", "1", "1", "2").out


def test_open_or_prepare_takes_a_cache_or_prepares_a_task_once(phantom, cache, tmp_path, monkeypatch):
    from scnas.data import open_or_prepare
    from scnas.data.cache import shared_cache_folder

    monkeypatch.setenv("SCNAS_CACHE", str(tmp_path / "shared"))
    assert open_or_prepare(cache.folder, (1.0, 1.0, 1.0)).folder == cache.folder
    assert open_or_prepare(phantom, (1.0, 1.0, 1.0), tmp_path / "new").folder == tmp_path / "new"
    notices = []
    prepared = open_or_prepare(phantom, (1.0, 1.0, 1.0), say=notices.append)
    assert prepared.folder == shared_cache_folder(phantom, SETTINGS) and prepared.folder.parent == tmp_path / "shared"
    assert prepared.case_ids == cache.case_ids and "preparing" in notices[0]
    stamps = {p.name: p.stat().st_mtime_ns for p in prepared.folder.glob("*.b2nd")}
    # a second command, other folds, a study: the same folder, nothing written again
    assert open_or_prepare(phantom, (1.0, 1.0, 1.0), say=notices.append).folder == prepared.folder
    assert {p.name: p.stat().st_mtime_ns for p in prepared.folder.glob("*.b2nd")} == stamps and len(notices) == 1
    assert len(list((tmp_path / "shared").iterdir())) == 1
    other = open_or_prepare(phantom, (2.0, 2.0, 2.0))         # other settings: another cache
    assert other.folder != prepared.folder and len(list((tmp_path / "shared").iterdir())) == 2
    with pytest.raises(DatasetError, match="neither a prepared cache .* nor a task folder"):
        open_or_prepare(tmp_path, (1.0, 1.0, 1.0))


def test_nifti_endings_are_stripped_by_one_helper_for_both_endings(tmp_path):
    from scnas.data.dataset import is_nifti, strip_nifti_ending
    from scnas.train.predict import find_cases

    assert [strip_nifti_ending(n) for n in ("a.nii.gz", "b.nii", "c.nii.gz.txt", "d_0001.nii")] == \
        ["a", "b", "c.nii.gz.txt", "d_0001"]
    assert [is_nifti(n) for n in ("a.nii.gz", "b.nii", "c.gz", "d.niix")] == [True, True, False, False]
    for name in ("x_0000.nii", "x_0001.nii.gz", "single.nii", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    cases = {case.case_id: [p.name for p in case.images] for case in find_cases(tmp_path)}
    assert cases == {"single": ["single.nii"], "x": ["x_0000.nii", "x_0001.nii.gz"]}


def test_phantom_classes_count_background_as_build_and_nnunet_do(cli, tmp_path):
    from scnas.data import read_dataset

    for given, labels in (([], 4), (["--classes", "2"], 2), (["--classes", "3"], 3)):
        out = tmp_path / f"p{labels}"
        result = cli("data", "phantom", out, "--cases", "2", "--shape", "12", "12", "8", "--channels", "1", *given)
        assert result.code == 0 and f"{labels} classes (labels 0..{labels - 1})" in result.out, result
        assert sorted(read_dataset(out).labels.values()) == list(range(labels))   # dataset.json: 0..K-1
        drawn = set()
        for path in sorted((out / "labelsTr").glob("*.nii.gz")):
            drawn |= set(np.unique(np.asarray(nib.load(path).dataobj)).astype(int).tolist())
        assert drawn == set(range(labels))   # every label appears, none beyond K-1
    assert cli("data", "phantom", tmp_path / "one", "--classes", "1").code == 2   # background alone: refused
