"""The datasets, each one value: what every other part of the project knows about its data.

    from ffcv_pipeline.datasets import get_dataset
    ds = get_dataset('cifar10')      # name, title, class names, image size, mean/std, download
    ds.num_classes, ds.image_size    # 10, 32
    ds.file('train')                 # 'cifar10_train.beton'  (in data_beton/cifar10/)

A :class:`Dataset` is written into ``manifest.json`` beside the ``.beton`` files (``to_dict``)
and into every checkpoint; the loaders, the trainer, the predictor, the app and export read it
from there (``from_dict``), never from constants. The built-in datasets are the entries of
:data:`BUILTIN` below -- a third one in the CIFAR pickle layout is one more entry here (plus its
tests). A user's own images need no entry: ``write_datasets.py --image-folder DIR`` makes the
value from the folder names (classes, sorted), the size asked for and the training split's
mean/std, and stores it in the manifest.

Standard library only: the converter, both loaders and the app's torch-free side import it.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, replace
from typing import Mapping

from model.project import DATA_DIR  # noqa: F401  (standard library only) <root>/data_beton/<name>/
SPLITS = ('train', 'test')
NAME_PATTERN = re.compile(r'^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$')  # folder and file names stay plain


@dataclass(frozen=True)
class PickleLayout:
    """How an archive in CIFAR's python layout is organised: pickled dicts holding an N x (3*H*W)
    uint8 ``data`` array (R plane, G plane, B plane per row) and a list of labels."""
    folder: str  # the folder inside the archive ('cifar-100-python')
    train: tuple[str, ...]  # members concatenated, in order, into the training split
    test: tuple[str, ...]
    meta: str  # the member with the class names
    labels: str  # the labels' key in a data member
    names: str  # the class names' key in the meta member
    superclass_labels: str | None = None
    superclass_names: str | None = None

    @property
    def members(self) -> tuple[str, ...]:
        return (*self.train, *self.test, self.meta)


@dataclass(frozen=True)
class Download:
    url: str
    md5: str

    @property
    def archive_name(self) -> str:
        return self.url.rsplit('/', 1)[-1]


@dataclass(frozen=True)
class Dataset:
    name: str  # folder and file names, ``data.dataset``, ``--dataset``
    title: str  # what people read ('CIFAR-100')
    class_names: tuple[str, ...]
    image_size: int  # pixels per side (square RGB images)
    mean: tuple[float, float, float]  # per RGB channel, on the 0-255 scale (training split)
    std: tuple[float, float, float]
    superclass_names: tuple[str, ...] | None = None  # optional label hierarchy
    superclass_of: tuple[int, ...] | None = None  # superclass_of[class] -> superclass index
    # where fixed by the dataset (the official split); like how it is fetched, not part of what a
    # dataset is: a built-in read back from a file equals the built-in (and hashes)
    split_sizes: Mapping[str, int] | None = field(default=None, compare=False)
    hub_id: str | None = None  # the dataset's id on the Hugging Face Hub (a published model card names it)
    download: Download | None = field(default=None, compare=False)  # how to fetch it, or None
    layout: PickleLayout | None = field(default=None, compare=False)  # how its archive is read

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def has_superclasses(self) -> bool:
        return self.superclass_names is not None and self.superclass_of is not None

    def file(self, split: str, kind: str = 'beton') -> str:
        """File name of a split: ``<name>_<split>.beton`` or (``kind='npy'``) its uint8 arrays."""
        return f'{self.name}_{split}.{kind}'

    def to_dict(self) -> dict:
        """The JSON form (manifest.json, checkpoints, the ONNX metadata, config.json)."""
        d = asdict(self)
        for key in ('download', 'layout', 'split_sizes'):
            d.pop(key)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: Mapping, what: str) -> 'Dataset':
        """Read what :meth:`to_dict` wrote; ``ValueError`` naming ``what`` if it is not that."""
        try:
            ds = cls(name=str(d['name']), title=str(d.get('title') or d['name']),
                     class_names=tuple(str(n) for n in d['class_names']),
                     image_size=int(d['image_size']),
                     mean=tuple(float(m) for m in d['mean']), std=tuple(float(s) for s in d['std']),
                     superclass_names=_tuple_or_none(d.get('superclass_names'), str),
                     superclass_of=_tuple_or_none(d.get('superclass_of'), int),
                     hub_id=d.get('hub_id'))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f'{what}: not a dataset description ({type(e).__name__}: {e})') from None
        ds.check(what)
        builtin = BUILTIN.get(ds.name)  # keep how a built-in is fetched (not stored in files)
        return replace(ds, download=builtin.download, layout=builtin.layout) if builtin else ds

    def check(self, what: str) -> None:
        """The invariants everything downstream relies on; ``ValueError`` naming ``what``."""
        if not NAME_PATTERN.match(self.name):
            raise ValueError(f'{what}: dataset name {self.name!r} must be letters, digits, _ . - '
                             f'(at most 64)')
        if self.num_classes < 2:
            raise ValueError(f'{what}: a dataset needs at least 2 classes, {self.name} has {self.num_classes}')
        if self.image_size < 8:
            raise ValueError(f'{what}: image size {self.image_size} is below 8 pixels')
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f'{what}: mean/std must be 3 values each, std > 0 (got {self.mean}, {self.std})')
        if (self.superclass_names is None) != (self.superclass_of is None):
            raise ValueError(f'{what}: superclass names and the class -> superclass map come together')
        if self.has_superclasses and (len(self.superclass_of) != self.num_classes or not all(
                0 <= s < len(self.superclass_names) for s in self.superclass_of)):
            raise ValueError(f'{what}: the class -> superclass map needs one index in '
                             f'[0, {len(self.superclass_names) - 1}] per class')

    def difference(self, other: 'Dataset') -> str | None:
        """What makes ``other`` another dataset than this one (for one-line errors), or None."""
        if other.name != self.name:
            return f'{other.name} ({other.title}), not {self.name}'
        if other.image_size != self.image_size:
            return f'{other.image_size}x{other.image_size} images, not {self.image_size}x{self.image_size}'
        if other.class_names != self.class_names:
            return f'{other.num_classes} other classes' if other.num_classes != self.num_classes \
                else 'other class names'
        return None

    def describe(self) -> str:
        sup = f', {len(self.superclass_names)} superclasses' if self.has_superclasses else ''
        return f'{self.title} ({self.num_classes} classes{sup}, {self.image_size}x{self.image_size})'


def _tuple_or_none(v, kind):
    return None if v is None else tuple(kind(x) for x in v)


# --- the built-in datasets ------------------------------------------------------------------------
# Official downloads: https://www.cs.toronto.edu/~kriz/cifar.html. Mean/std: the usual training-set
# statistics on the 0-255 scale (the loaders normalize uint8 pixels directly: (x - mean) / std).

CIFAR100 = Dataset(
    name='cifar100', title='CIFAR-100', image_size=32,
    mean=(129.304, 124.070, 112.434), std=(68.170, 65.392, 70.418),
    class_names=(
        'apple', 'aquarium_fish', 'baby', 'bear', 'beaver', 'bed', 'bee', 'beetle', 'bicycle',
        'bottle', 'bowl', 'boy', 'bridge', 'bus', 'butterfly', 'camel', 'can', 'castle',
        'caterpillar', 'cattle', 'chair', 'chimpanzee', 'clock', 'cloud', 'cockroach', 'couch',
        'crab', 'crocodile', 'cup', 'dinosaur', 'dolphin', 'elephant', 'flatfish', 'forest', 'fox',
        'girl', 'hamster', 'house', 'kangaroo', 'keyboard', 'lamp', 'lawn_mower', 'leopard', 'lion',
        'lizard', 'lobster', 'man', 'maple_tree', 'motorcycle', 'mountain', 'mouse', 'mushroom',
        'oak_tree', 'orange', 'orchid', 'otter', 'palm_tree', 'pear', 'pickup_truck', 'pine_tree',
        'plain', 'plate', 'poppy', 'porcupine', 'possum', 'rabbit', 'raccoon', 'ray', 'road',
        'rocket', 'rose', 'sea', 'seal', 'shark', 'shrew', 'skunk', 'skyscraper', 'snail', 'snake',
        'spider', 'squirrel', 'streetcar', 'sunflower', 'sweet_pepper', 'table', 'tank',
        'telephone', 'television', 'tiger', 'tractor', 'train', 'trout', 'tulip', 'turtle',
        'wardrobe', 'whale', 'willow_tree', 'wolf', 'woman', 'worm'),
    superclass_names=(
        'aquatic_mammals', 'fish', 'flowers', 'food_containers', 'fruit_and_vegetables',
        'household_electrical_devices', 'household_furniture', 'insects', 'large_carnivores',
        'large_man-made_outdoor_things', 'large_natural_outdoor_scenes',
        'large_omnivores_and_herbivores', 'medium_mammals', 'non-insect_invertebrates', 'people',
        'reptiles', 'small_mammals', 'trees', 'vehicles_1', 'vehicles_2'),
    superclass_of=(  # fixed by the dataset's hierarchy
        4, 1, 14, 8, 0, 6, 7, 7, 18, 3, 3, 14, 9, 18, 7, 11, 3, 9, 7, 11, 6, 11, 5, 10, 7, 6, 13,
        15, 3, 15, 0, 11, 1, 10, 12, 14, 16, 9, 11, 5, 5, 19, 8, 8, 15, 13, 14, 17, 18, 10, 16, 4,
        17, 4, 2, 0, 17, 4, 18, 17, 10, 3, 2, 12, 12, 16, 12, 1, 9, 19, 2, 10, 0, 1, 16, 12, 9, 13,
        15, 13, 16, 19, 2, 4, 6, 19, 5, 5, 8, 19, 18, 1, 2, 15, 6, 0, 17, 8, 14, 13),
    split_sizes={'train': 50_000, 'test': 10_000}, hub_id='uoft-cs/cifar100',
    download=Download('https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz',
                      'eb9058c3a382ffc7106e4002c42a8d85'),
    layout=PickleLayout(folder='cifar-100-python', train=('train',), test=('test',), meta='meta',
                        labels='fine_labels', names='fine_label_names',
                        superclass_labels='coarse_labels', superclass_names='coarse_label_names'),
)

CIFAR10 = Dataset(
    name='cifar10', title='CIFAR-10', image_size=32,
    mean=(125.307, 122.950, 113.865), std=(62.993, 62.089, 66.705),
    class_names=('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship',
                 'truck'),
    split_sizes={'train': 50_000, 'test': 10_000}, hub_id='uoft-cs/cifar10',
    download=Download('https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz',
                      'c58f30108f718f92721af3b95e74349a'),
    layout=PickleLayout(folder='cifar-10-batches-py',
                        train=tuple(f'data_batch_{i}' for i in range(1, 6)), test=('test_batch',),
                        meta='batches.meta', labels='labels', names='label_names'),
)

BUILTIN: dict[str, Dataset] = {d.name: d for d in (CIFAR100, CIFAR10)}
DEFAULT = CIFAR100.name  # data.dataset's default, what `make run` converts and trains
# manifest.json before datasets were values (format 2) held CIFAR-100 only
LEGACY = CIFAR100.name


def get_dataset(name: str) -> Dataset:
    """A built-in dataset by name; ``ValueError`` listing the known ones."""
    if name not in BUILTIN:
        raise ValueError(f'unknown dataset {name!r}; built in: {", ".join(sorted(BUILTIN))} '
                         f'(your own images: write_datasets.py --image-folder DIR)')
    return BUILTIN[name]


def checkpoint_dataset(ckpt: Mapping) -> Dataset:
    """The dataset a checkpoint's model was trained on: its ``dataset`` entry, or (checkpoints
    from before datasets were values) CIFAR-100 with the checkpoint's class names."""
    if ckpt.get('dataset'):
        return Dataset.from_dict(ckpt['dataset'], 'checkpoint')
    return replace(BUILTIN[LEGACY], class_names=tuple(ckpt.get('class_names') or BUILTIN[LEGACY].class_names))
