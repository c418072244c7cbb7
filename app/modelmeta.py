"""What the app knows about a model, whatever file it came from: class names, the superclass
map, normalization, training results. Standard library only (no torch, no onnxruntime).

A training checkpoint (``model.checkpoint``) holds these as top-level keys; an exported ONNX
model carries the same keys as JSON in its ``metadata_props`` under :data:`META_KEY`
(``scripts/export.py`` writes it), so a torch-free app can show everything a checkpoint shows.
"""
from __future__ import annotations

import json
from pathlib import Path
from dataclasses import asdict, dataclass, field
from typing import Any

from model.errors import UserError  # standard library only: every Space has it
from model.project import DATA_DIR

META_KEY = 'cifar100_ffcv_meta'  # the ONNX metadata_props key holding the JSON below
META_FORMAT_VERSION = 2  # 2: + dataset
# What a checkpoint's top-level keys contribute (weights and resume state are not metadata).
CHECKPOINT_KEYS = ('model_config', 'class_names', 'coarse_names', 'fine_to_coarse',
                   'normalization', 'image_size', 'dataset', 'config', 'epoch', 'metrics',
                   'created', 'torch_version')


class ModelFileError(UserError, ValueError):
    """The model file (checkpoint or ONNX) is missing, unreadable, or not one of ours; the
    message names the file and the problem in one line."""


@dataclass(frozen=True)
class ModelMeta:
    class_names: list[str]
    normalization: dict  # {'mean': [r, g, b], 'std': [r, g, b], 'scale': 255}
    model_config: dict  # {'arch': 'resnet18', 'num_classes': 100, 'width': 64}
    parameters: int
    image_size: int  # pixels per side the model was trained at (the dataset's)
    coarse_names: list[str] | None = None  # superclasses, where the dataset has them
    fine_to_coarse: list[int] | None = None
    dataset: dict | None = None  # the dataset value (name, title, ...); None in older files
    config: dict = field(default_factory=dict)  # the resolved training config
    epoch: int | None = None
    metrics: dict = field(default_factory=dict)
    created: str | None = None
    torch_version: str | None = None

    @classmethod
    def from_checkpoint(cls, ckpt: dict, parameters: int) -> 'ModelMeta':
        return cls(parameters=int(parameters),
                   **{k: ckpt[k] for k in CHECKPOINT_KEYS if ckpt.get(k) is not None})

    def to_json(self) -> str:
        return json.dumps({'format_version': META_FORMAT_VERSION, **asdict(self)})

    @classmethod
    def from_json(cls, text: str, what: str) -> 'ModelMeta':
        """Parse what :meth:`to_json` wrote; :class:`ModelFileError` naming ``what`` if it
        is not that."""
        try:
            d = json.loads(text)
            if not isinstance(d, dict):
                raise ValueError('not a JSON object')
            version = d.pop('format_version', 0)
            if version > META_FORMAT_VERSION:
                raise ModelFileError(f'{what}: model metadata version {version} is newer than this '
                                     f'code supports ({META_FORMAT_VERSION}); update the code')
            return cls(**d)
        except ModelFileError:
            raise
        except (ValueError, TypeError) as e:  # bad JSON, unknown or missing fields
            raise ModelFileError(f'{what}: unreadable model metadata ({e})') from None

    def check(self, what: str) -> None:
        """The consistency the predictor relies on; :class:`ModelFileError` otherwise."""
        n = self.model_config.get('num_classes', len(self.class_names))
        if n != len(self.class_names):
            raise ModelFileError(f'{what}: {len(self.class_names)} class names for a {n}-class model')
        if self.fine_to_coarse is not None and len(self.fine_to_coarse) != len(self.class_names):
            raise ModelFileError(f'{what}: fine_to_coarse has {len(self.fine_to_coarse)} entries '
                                 f'for {len(self.class_names)} classes')
        if not {'mean', 'std'} <= set(self.normalization):
            raise ModelFileError(f'{what}: normalization lacks mean/std')
        if not isinstance(self.image_size, int) or self.image_size < 1:
            raise ModelFileError(f'{what}: image size {self.image_size!r} is not a number of pixels')

    @property
    def title(self) -> str:
        """The dataset's name for people ('CIFAR-10'), or '' where the file does not say."""
        return str((self.dataset or {}).get('title') or '')

    def info(self) -> dict[str, Any]:
        """The fields the model panel and ``predict.py --json`` show."""
        m, cfg = self.metrics or {}, self.model_config or {}
        return {'arch': cfg.get('arch'), 'width': cfg.get('width'), 'dataset': self.title or None,
                'image_size': self.image_size,
                'num_classes': len(self.class_names), 'parameters': self.parameters,
                'epoch': self.epoch, 'epochs_planned': m.get('epochs_planned'),
                'test_top1': m.get('test_top1'), 'test_top5': m.get('test_top5'),
                'best_top1': m.get('best_top1'), 'train_seconds': m.get('train_seconds'),
                'created': self.created, 'torch_version': self.torch_version}


def dataset_folders(root: str | Path, class_names) -> list[Path]:
    """The converted datasets under ``<root>/data_beton/`` whose classes are ``class_names`` (a
    model's): where its example images and test data are. Reads only their ``manifest.json``
    (either format: ``dataset.class_names``, or the older ``fine_label_names``)."""
    names, out = list(class_names), []
    for manifest in sorted(Path(root).glob(f'{DATA_DIR}/*/manifest.json')):
        try:
            m = json.loads(manifest.read_text())
            found = (m.get('dataset') or {}).get('class_names') or m.get('fine_label_names')
        except (OSError, ValueError, AttributeError):
            continue
        if found == names:
            out.append(manifest.parent)
    return out
