"""int8 ONNX for ``scripts/export.py --int8``: static quantization (ONNX Runtime's QDQ format,
per-channel int8 weights, uint8 activations) calibrated on training images, and kept only if it
classifies the test split about as well as the float32 model it came from.

Why opt-in: float32 ONNX Runtime is bound by the CPU's float32 peak (~6.5 ms per image on two
cores, docs/BENCHMARKS.md "Export / ONNX"); int8 runs the same network ~3x faster but moves the
logits, so it is checked on accuracy (labelled test images), not on logit differences.

Both checks need the converted arrays of the model's dataset (``<name>_{train,test}.npy`` in
``data_beton/<name>/``, written by ``scripts/write_datasets.py``): :data:`CALIBRATION_IMAGES` training images, seeded, set the
activation ranges; every test image is classified by the float32 and the int8 model; the export
fails (nothing kept) if int8's top-1 is more than :data:`INT8_MAX_TOP1_DROP` below float32's.
Export-time only: the served Space needs nothing from here (an int8 ``model.onnx`` is a plain
ONNX file for ``app/onnx_backend.py``).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from model.fileio import DiskFullError, is_disk_full  # export time only: never in a Space
from model.errors import UserError

INT8_MAX_TOP1_DROP = 0.01  # absolute top-1 (1 point); measured -0.06 points on cpu_small's model
CALIBRATION_IMAGES = 512
BATCH = 500


class QuantizeError(UserError, ValueError):
    """One line for the user (``app.export`` turns it into an ``ExportError``)."""


@dataclass(frozen=True)
class Int8Check:
    images: int  # test images classified by both models
    calibration_images: int
    top1_float32: float
    top1_int8: float
    top1_agreement: float  # share of images with the same top-1 class
    max_top1_drop: float = INT8_MAX_TOP1_DROP

    @property
    def drop(self) -> float:
        return self.top1_float32 - self.top1_int8

    def line(self) -> str:
        return (f'int8 checked on {self.images} test images (calibrated on {self.calibration_images} '
                f'training images): top-1 {self.top1_int8:.2%} vs float32 {self.top1_float32:.2%} '
                f'(allowed drop {self.max_top1_drop:.1%}), same top-1 on {self.top1_agreement:.1%}')


def load_split(data_dir: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images N x S x S x 3, labels) from the ``<name>_<split>.npy`` the manifest in
    ``data_dir`` names, checked by the data side's one array check
    (``ffcv_pipeline.data.check_arrays``; numpy and torch only)."""
    from ffcv_pipeline.archive import DatasetError
    from ffcv_pipeline.data import check_arrays
    from ffcv_pipeline.writer import manifest_dataset, read_manifest
    try:
        m = read_manifest(data_dir)
        if m is None:
            raise DatasetError(f'{data_dir}: no manifest.json; --int8 needs the converted arrays '
                               f'of the model\'s dataset (run `python scripts/write_datasets.py`)')
        ds = manifest_dataset(m, data_dir)
        path = Path(data_dir) / ds.file(split, 'npy')
        arrays = check_arrays(path, dataset=ds, reader='--int8 (calibration and the accuracy check)')
    except DatasetError as e:
        raise QuantizeError(f'{e} (or give --data-dir the folder it wrote)') from None
    if not len(arrays):
        raise QuantizeError(f'{path}: holds no images; run `python scripts/write_datasets.py --force`')
    return np.asarray(arrays['image']), np.asarray(arrays['label'], dtype=np.int64)


def _batches(predictor, images: np.ndarray):
    for i in range(0, len(images), BATCH):
        yield predictor.preprocess(list(images[i:i + BATCH]))[0]


def _predict(predictor, images: np.ndarray) -> np.ndarray:
    return np.concatenate([predictor.logits(x).argmax(1) for x in _batches(predictor, images)])


def quantize_int8(float32_onnx: Path, out: Path, data_dir: Path, *, max_top1_drop: float = INT8_MAX_TOP1_DROP,
                  seed: int = 0, log: Callable[[str], None] = print) -> Int8Check:
    """Write the int8 model of ``float32_onnx`` to ``out`` and check it (:class:`QuantizeError`
    if its test top-1 falls more than ``max_top1_drop`` below float32's; ``out`` is then left for
    the caller to discard)."""
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from .predictor import Predictor
    train_x, _ = load_split(data_dir, 'train')
    test_x, test_y = load_split(data_dir, 'test')
    reference = Predictor(float32_onnx)
    pick = np.sort(np.random.default_rng(seed).choice(len(train_x), min(CALIBRATION_IMAGES, len(train_x)),
                                                      replace=False))

    class Calibration(CalibrationDataReader):
        def __init__(self):
            self.batches = ({'input': x} for x in _batches(reference, train_x[pick]))

        def get_next(self):
            return next(self.batches, None)

    prepared = out.with_name(out.name + '.prep.onnx')
    try:
        # shape inference and graph clean-up first, as ONNX Runtime's quantization guide advises
        quant_pre_process(str(float32_onnx), str(prepared), skip_symbolic_shape=True)
        quantize_static(str(prepared), str(out), Calibration(), quant_format=QuantFormat.QDQ,
                        per_channel=True, weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8)
    except OSError as e:  # onnx.save on a full disk: one line, not a traceback
        if is_disk_full(e):
            raise DiskFullError(out, e) from None
        raise
    finally:
        prepared.unlink(missing_ok=True)
    log(f'quantized to int8 ({len(pick)} calibration images); classifying {len(test_x)} test images '
        f'with both models')
    want, got = _predict(reference, test_x), _predict(Predictor(out), test_x)
    check = Int8Check(images=len(test_x), calibration_images=len(pick),
                      top1_float32=float((want == test_y).mean()), top1_int8=float((got == test_y).mean()),
                      top1_agreement=float((want == got).mean()), max_top1_drop=max_top1_drop)
    if check.drop > max_top1_drop + 1e-9:  # exactly at the bar is kept (1.0 - 0.99 > 0.01 in floats)
        raise QuantizeError(f'int8 loses too much accuracy: {check.line()}; export without --int8 '
                            f'(float32 ONNX) instead')
    return check
