"""Segment a NIfTI image with an scnas ONNX file, using only onnxruntime, nibabel and numpy.

    python predict_onnx_only.py model.onnx image.nii.gz out.nii.gz      # 4D (x, y, z, channel) or 3D image

Everything the model needs is read from the ONNX file's metadata (``preprocessing``): crop to
the nonzero region, resample to ``target_spacing``, z-normalise each channel inside the
nonzero mask, sliding window (50% overlap, Gaussian weights), argmax, back to the original
grid. Resampling here is linear (numpy has no splines); ``scnas predict`` uses cubic splines
for images, so where an image must be resampled the two can differ slightly. When the image
already has the model's spacing, they give the same labels.
"""

import itertools
import json
import sys

import nibabel as nib
import numpy as np
import onnxruntime as ort


def resize_linear(volume, shape):
    """Linear interpolation to ``shape`` (voxel centres aligned, edges clamped)."""
    for axis, size in enumerate(shape):
        n = volume.shape[axis]
        if n == size:
            continue
        position = np.clip((np.arange(size) + 0.5) * n / size - 0.5, 0, n - 1)
        low = np.floor(position).astype(int)
        high = np.minimum(low + 1, n - 1)
        weight = (position - low).reshape([-1 if a == axis else 1 for a in range(volume.ndim)])
        volume = np.take(volume, low, axis=axis) * (1 - weight) + np.take(volume, high, axis=axis) * weight
    return volume


def gaussian(patch):
    axes = [np.exp(-0.5 * ((np.arange(n) - (n - 1) / 2) / (n / 8)) ** 2) for n in patch]
    weights = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    weights = weights / weights.max()
    weights[weights == 0] = weights[weights > 0].min()
    return weights.astype(np.float32)


def starts(size, patch, overlap=0.5):
    if size <= patch:
        return [0]
    steps = int(np.ceil((size - patch) / (patch * (1 - overlap)))) + 1
    return [int(round(i * (size - patch) / (steps - 1))) for i in range(steps)]


def main(model_path, image_path, out_path):
    session = ort.InferenceSession(model_path, providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    prep = json.loads(meta["preprocessing"])
    classes = json.loads(meta["build_config"])["num_classes"]
    patch = tuple(prep["patch_size"])
    nifti = nib.load(image_path)
    data = np.asarray(nifti.dataobj, dtype=np.float32)
    image = np.moveaxis(data, -1, 0) if data.ndim == 4 else data[None]
    spacing = np.array(nifti.header.get_zooms()[:3], dtype=float)

    mask = np.any(image != 0, axis=0)
    box = [(int(np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))[0]),
            int(np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))[-1]) + 1) for axis in range(3)]
    crop = tuple(slice(a, b) for a, b in box)
    image, mask = image[(slice(None), *crop)], mask[crop]
    shape = tuple(max(1, int(round(n * s / t))) for n, s, t in zip(image.shape[1:], spacing, prep["target_spacing"]))
    means = [c[mask].mean() for c in image]
    stds = [max(c[mask].std(), 1e-8) for c in image]
    image = np.stack([resize_linear(c, shape) for c in image])
    mask = resize_linear(mask.astype(np.float32), shape) >= 0.5
    image = np.stack([np.where(mask, (c - m) / s, 0.0) for c, m, s in zip(image, means, stds)]).astype(np.float32)

    padded = [max(n, p) for n, p in zip(shape, patch)]
    volume = np.zeros((image.shape[0], *padded), np.float32)
    volume[(slice(None), *[slice(0, n) for n in shape])] = image
    weights = gaussian(patch)
    logits = np.zeros((classes, *padded), np.float32)
    total = np.zeros(padded, np.float32)
    for corner in itertools.product(*[starts(n, p) for n, p in zip(padded, patch)]):
        region = tuple(slice(c, c + p) for c, p in zip(corner, patch))
        out = session.run(None, {session.get_inputs()[0].name: volume[(slice(None), *region)][None]})[0][0]
        logits[(slice(None), *region)] += out * weights
        total[region] += weights
    label = (logits / total)[(slice(None), *[slice(0, n) for n in shape])].argmax(0)

    cropped_shape = tuple(b - a for a, b in box)
    restored = np.zeros(cropped_shape, np.uint8)
    for value in sorted(set(np.unique(label).tolist()) - {0}):   # per-label linear, as scnas does
        restored[resize_linear((label == value).astype(np.float32), cropped_shape) >= 0.5] = value
    result = np.zeros(nifti.shape[:3], np.uint8)
    result[crop] = restored
    header = nifti.header.copy()
    header.set_data_dtype(np.uint8)
    output = nib.Nifti1Image(result, nifti.affine, header)
    output.header.set_data_shape(result.shape)
    nib.save(output, out_path)


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    main(*sys.argv[1:])
