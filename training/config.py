"""The one training config schema (typed, with defaults), YAML files and dotted overrides.

    python scripts/train.py --config rn18.yaml --training.epochs 2 --data.batch_size 256

Precedence: schema defaults < YAML file < command-line overrides. A bare config name
(``rn18.yaml`` or ``rn18``) resolves in ``configs/``. Unknown keys and values of the wrong
type or outside the allowed set raise :class:`ConfigError` naming the key.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from model.errors import UserError
from ffcv_pipeline.datasets import DEFAULT as DEFAULT_DATASET  # standard library only
from model.project import PROJECT_ROOT as ROOT, RUNS_DIR

CONFIG_DIR = ROOT / 'configs'


class ConfigError(UserError, ValueError):
    """A bad config file, key or value; one clear line."""


@dataclass
class DataConfig:
    # which converted dataset: its files in data_beton/<dataset>/ (built in: cifar100, cifar10;
    # or the --name of an --image-folder conversion). It only picks the default paths: what the
    # files hold (classes, image size, mean/std) comes from the manifest.json beside them.
    dataset: str = DEFAULT_DATASET  # cifar100
    train_path: Optional[str] = None  # null: data_beton/<dataset>/<dataset>_train.beton; relative paths: to the repo root
    test_path: Optional[str] = None  # null: data_beton/<dataset>/<dataset>_test.beton
    batch_size: int = 512  # per process (per GPU under torchrun)
    test_batch_size: int = 1024
    num_workers: int = -1  # FFCV JIT threads; -1 = all usable cores / processes per node
    loader: str = 'auto'  # ffcv | torchvision (a torch DataLoader, no ffcv needed) | auto: ffcv where it imports
    order: str = 'quasi_random'  # ffcv loader: quasi_random | random | sequential; random when distributed
    os_cache: bool = True  # let the OS page cache hold the .beton (fits in RAM: 170 MB)
    batches_ahead: int = 3
    # the test split as one uint8 tensor on the device, evaluated in batches of batch_size (no
    # second loader, no second JIT, no second cuDNN shape); null = auto: on while its pixels take
    # <= 1 GiB (CIFAR: 30 MB); false: a test loader of test_batch_size
    resident_test: Optional[bool] = None
    train_per_class: int = 0  # use only the first N training images of each class (0 = all)
    test_per_class: int = 0  # same for the test set (0 = all)


@dataclass
class AugmentConfig:
    flip: bool = True
    translate: Optional[int] = None  # max shift in pixels (pad-and-crop); 0 = off; null = auto: size/8 (4 at 32 px)
    cutout: Optional[int] = None  # square side in pixels; 0 = off; null = auto: size/4 (8 at 32 px)
    # Each key is one op of ffcv_pipeline/augment.py (its name); they apply in the order registered
    # there: flip, brightness, translate, cutout.
    brightness: float = 0.0  # scale every pixel by a factor uniform in [1-b, 1+b] (ColorJitter's brightness); 0 = off


@dataclass
class ModelConfig:
    arch: str = 'resnet18'
    num_classes: Optional[int] = None  # null: the dataset's (its manifest.json); set, it must match
    width: int = 64
    channels_last: Optional[bool] = None  # NHWC memory format; null = auto: on, except on MPS


@dataclass
class TrainingConfig:
    epochs: int = 20
    lr: float = 0.4  # peak learning rate for the configured batch size (no implicit scaling)
    lr_schedule: str = 'linear'  # decay after warm-up: linear | cosine (to zero)
    warmup_epochs: float = 3.0  # linear warm-up from 0 to `lr`, per iteration
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4  # on conv/linear weights only (p.dim() >= 2)
    label_smoothing: float = 0.1
    precision: str = 'auto'  # auto | bf16 | fp16 | fp32 (auto: bf16 if the GPU has it, else fp16; fp16 on MPS; on the CPU bf16 where native (AVX512-BF16/AMX), else fp32)
    compile: bool = False  # torch.compile the model (pays compile time up front)
    compile_mode: str = 'default'  # torch.compile mode: default | reduce-overhead | max-autotune | max-autotune-no-cudagraphs
    fused_sgd: bool = False  # torch's fused SGD kernel (one launch for all parameters) instead of foreach
    cuda_graph: bool = False  # capture the whole training step in a CUDA graph (CUDA only; bf16/fp32; one process)
    ema: float = 0.0  # weight averaging: EMA decay per optimizer step (0 = off); evaluated and exported when on
    ema_every: int = 1  # update the EMA every N optimizer steps (the decay is raised to the N-th power)
    grad_clip: float = 0.0  # max grad norm; 0 = off
    seed: int = 0  # weights, data order and augmentation
    deterministic: bool = False  # cuDNN deterministic algorithms, no autotuning: bit-exact GPU resumes, slower
    device: str = 'auto'  # auto (CUDA, else MPS, else CPU) | cuda | cuda:N | mps | cpu
    target_top1: float = 0.73  # the summary reports when test top-1 first reached this
    tta: bool = True  # evaluate with horizontal-flip test-time augmentation
    tta_translate: int = 0  # also evaluate views shifted this many pixels up-left and down-right (airbench); 0 = off
    eval_every: int = 1  # evaluate every N epochs (and always after the last)


@dataclass
class OutputConfig:
    dir: str = RUNS_DIR  # run folders go to <dir>/<name> (relative: to the repository root)
    name: str = ''  # default: <config name>-<YYYYmmdd-HHMMSS>
    save_every: int = 0  # also keep epoch_NNN.pt every N epochs; 0 = only last.pt and best.pt
    progress: Optional[bool] = None  # progress bar: null = only on a terminal, true/on, false/off
    plot: bool = True  # curves.png at the end


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    output: OutputConfig = field(default_factory=OutputConfig)


CHOICES = {
    'data.loader': ('auto', 'ffcv', 'torchvision'),
    'data.order': ('quasi_random', 'random', 'sequential'),
    'training.lr_schedule': ('linear', 'cosine'),
    'training.precision': ('auto', 'bf16', 'fp16', 'fp32'),
    'training.compile_mode': ('default', 'reduce-overhead', 'max-autotune', 'max-autotune-no-cudagraphs'),
}
POSITIVE = ('data.batch_size', 'data.test_batch_size', 'training.epochs', 'model.num_classes',
            'model.width', 'training.eval_every', 'data.batches_ahead', 'training.ema_every')
NON_NEGATIVE = ('training.lr', 'training.warmup_epochs', 'training.weight_decay',
                'training.grad_clip', 'augment.translate', 'augment.cutout',
                'data.train_per_class', 'data.test_per_class', 'output.save_every',
                'training.momentum', 'training.tta_translate')


def resolve_config_path(name: str | Path) -> Path:
    """A path as given if it exists, else a bare name looked up in ``configs/``."""
    p = Path(name)
    if p.is_file():
        return p
    for cand in (CONFIG_DIR / p.name, CONFIG_DIR / f'{p.name}.yaml'):
        if cand.is_file():
            return cand
    known = ', '.join(sorted(q.name for q in CONFIG_DIR.glob('*.yaml')))
    raise ConfigError(f'config {str(name)!r} not found (as a path or in configs/: {known})')


def _merge(base, other, what: str):
    try:
        return OmegaConf.merge(base, other)
    except OmegaConfBaseException as e:
        key = getattr(e, 'full_key', None) or '?'
        msg = str(e).splitlines()[0]
        if 'not in struct' in msg or 'Key' in type(e).__name__:
            raise ConfigError(f'{what}: unknown key {key!r}') from None
        raise ConfigError(f'{what}: bad value for {key!r}: {msg}') from None


def parse_overrides(args: list[str]) -> list[str]:
    """``['--training.epochs', '2', '--a.b=3']`` -> ``['training.epochs=2', 'a.b=3']``."""
    out, i = [], 0
    while i < len(args):
        a = args[i]
        if not a.startswith('--') or len(a) == 2:
            raise ConfigError(f'unexpected argument {a!r}; overrides look like --section.key VALUE')
        a = a[2:]
        if '=' in a:
            out.append(a)
            i += 1
        elif i + 1 < len(args):
            out.append(f'{a}={args[i + 1]}')
            i += 2
        else:
            raise ConfigError(f'override --{a} needs a value')
    return out


def validate(cfg) -> None:
    for key, allowed in CHOICES.items():
        v = OmegaConf.select(cfg, key)
        if v not in allowed:
            raise ConfigError(f'{key}: {v!r} is not one of {list(allowed)}')
    for key in POSITIVE:
        if (v := OmegaConf.select(cfg, key)) is not None and v <= 0:  # None: auto
            raise ConfigError(f'{key}: must be > 0, got {OmegaConf.select(cfg, key)}')
    for key in NON_NEGATIVE:
        if (v := OmegaConf.select(cfg, key)) is not None and v < 0:
            raise ConfigError(f'{key}: must be >= 0, got {OmegaConf.select(cfg, key)}')
    if not 0 <= cfg.training.label_smoothing < 1:
        raise ConfigError(f'training.label_smoothing: must lie in [0, 1), got {cfg.training.label_smoothing}')
    if not 0 <= cfg.training.ema < 1:
        raise ConfigError(f'training.ema: the decay must lie in [0, 1) (0 = off), got {cfg.training.ema}')
    if cfg.training.cuda_graph and cfg.training.compile:
        raise ConfigError('training.cuda_graph: captures the eager step; with training.compile use '
                          'training.compile_mode=reduce-overhead (compile\'s own CUDA graphs) instead')
    if cfg.training.warmup_epochs > cfg.training.epochs:
        raise ConfigError(f'training.warmup_epochs: {cfg.training.warmup_epochs} exceeds '
                          f'training.epochs {cfg.training.epochs}')
    from ffcv_pipeline.datasets import NAME_PATTERN
    if not NAME_PATTERN.match(cfg.data.dataset):
        raise ConfigError(f'data.dataset: {cfg.data.dataset!r} is not a dataset name (letters, digits, _ . -)')
    dev = cfg.training.device
    if not (dev in ('auto', 'cpu', 'cuda', 'mps') or (dev.startswith('cuda:') and dev[5:].isdigit())):
        raise ConfigError(f"training.device: {dev!r} is not one of ['auto', 'cpu', 'cuda', 'cuda:N', 'mps']")
    from model import ARCHS
    if cfg.model.arch not in ARCHS:
        raise ConfigError(f'model.arch: {cfg.model.arch!r} is not one of {sorted(ARCHS)}')


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict | None = None):
    """Schema defaults < YAML file (or ``base``, e.g. a checkpoint's config) < ``overrides``
    (``['training.epochs=2', ...]``). Returns a typed, read-only OmegaConf object."""
    cfg = OmegaConf.structured(Config)
    if base is not None:
        cfg = _merge(cfg, OmegaConf.create(base), 'checkpoint config')
    if path is not None:
        p = resolve_config_path(path)
        try:
            file_cfg = OmegaConf.load(p)
        except Exception as e:  # YAML syntax errors, duplicated keys, ...
            why = ' '.join(str(e).split())[:240]  # e.g. "found duplicate key 'epochs' ..."
            raise ConfigError(f'{p}: not a valid YAML config ({why})') from None
        cfg = _merge(cfg, file_cfg, str(p))
    for ov in overrides or []:
        key, sep, value = ov.partition('=')
        if not sep or not key:
            raise ConfigError(f'override {ov!r} must look like section.key=value')
        if OmegaConf.select(cfg, key, default='__missing__') == '__missing__' or '.' not in key:
            raise ConfigError(f'unknown key {key!r} (sections: {", ".join(Config.__dataclass_fields__)})')
        try:
            parsed = OmegaConf.from_dotlist([ov])
        except Exception as e:
            raise ConfigError(f'{key}: cannot parse {value!r} ({e})') from None
        cfg = _merge(cfg, parsed, f'--{key}')
    validate(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def with_values(cfg, values: dict[str, Any]):
    """``cfg`` (read-only) with ``values`` (``{'model.num_classes': 10, ...}``) set: what the
    data decided for the keys left to it (null = auto), so the run's config.yaml and checkpoints
    record what ran."""
    cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(
        [f'{k}={"null" if v is None else v}' for k, v in values.items()]))
    OmegaConf.set_readonly(cfg, True)
    return cfg


def to_dict(cfg) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True)


def to_yaml(cfg) -> str:
    return OmegaConf.to_yaml(cfg)


# ---- what a resumed run may change (``train.py --resume CKPT --section.key VALUE``) ----------
# One place for the three lists; README "Stopping and resuming" documents them.
RESUME_REFUSED = {  # cannot work: one line naming the key, nothing starts
    'model.arch': "the checkpoint's weights have another shape",
    'model.width': "the checkpoint's weights have another shape",
    'model.num_classes': "the checkpoint's weights have another shape",
    'data.batch_size': 'the steps per epoch would change, and with them the meaning of the saved '
                       'step counter, LR schedule position and mid-epoch position',
    'data.train_per_class': 'the steps per epoch would change, and with them the meaning of the saved '
                            'step counter, LR schedule position and mid-epoch position',
    'output.dir': 'a resumed run continues in the folder of its checkpoint',
    'output.name': 'a resumed run continues in the folder of its checkpoint',
}
RESUME_HARMLESS = (  # change nothing the run computes: accepted quietly
    'output.progress', 'output.plot', 'output.save_every', 'data.num_workers',
    'data.batches_ahead', 'data.os_cache', 'data.test_batch_size', 'training.target_top1',
    'data.resident_test',  # the same test images and counts either way (tests/test_time_budget.py)
)
# Every other key -- the schedule (training.epochs, lr, warm-up), the data paths, augment.*, the
# seed, the precision, and keys added later -- changes the run: accepted, with one line naming
# the keys and saying that the result differs from an uninterrupted run.


def _leaves(d: dict, prefix: str = '') -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_leaves(v, f'{prefix}{k}.'))
        else:
            out[f'{prefix}{k}'] = v
    return out


def resume_config(base: dict, overrides: list[str] | None, log=print):
    """The config of a run resumed from a checkpoint whose config is ``base``, with
    ``overrides``: :class:`ConfigError` for a change that cannot work (:data:`RESUME_REFUSED`),
    one logged line for changes that make it another run than the one it continues."""
    old = _leaves(to_dict(load_config(None, None, base=base)))
    cfg = load_config(None, overrides, base=base)
    new = _leaves(to_dict(cfg))
    changed = [k for k in new if old.get(k) != new[k]]
    refused = [k for k in changed if k in RESUME_REFUSED]
    if refused:
        k = refused[0]
        others = f' (also refused: {", ".join(refused[1:])})' if refused[1:] else ''
        raise ConfigError(f'--resume cannot change {k} ({old.get(k)!r} -> {new[k]!r}): '
                          f'{RESUME_REFUSED[k]}{others}; start a new run with --config instead')
    noted = [k for k in changed if k not in RESUME_HARMLESS]
    if noted:
        log('note: resuming with changed ' + ', '.join(f'{k} ({old.get(k)!r} -> {new[k]!r})' for k in noted)
            + ': the result will differ from an uninterrupted run')
    return cfg
