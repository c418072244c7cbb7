"""The one training config schema (typed, with defaults), YAML files and dotted overrides.

    python scripts/train.py --config rn18.yaml --training.epochs 2 --data.batch_size 256

Precedence: schema defaults < YAML file < command-line overrides. A bare config name
(``rn18.yaml`` or ``rn18``) resolves in ``configs/``. Unknown keys and values of the wrong
type or outside the allowed set raise :class:`ConfigError` naming the key.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

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
    optimizer: str = 'sgd'  # sgd | adamw | muon (training/optim.py's registry)
    lr: float = 0.4  # peak LR for the configured batch size (no implicit scaling); with muon: of its SGD groups (head, BatchNorm, biases)
    schedule: str = 'linear'  # LR shape: linear | cosine (after the warm-up, to zero) | onecycle | piecewise (training/schedule.py); was lr_schedule
    schedule_points: List[List[float]] = field(default_factory=list)  # piecewise: [[fraction of training, LR multiplier], ...] from 0 to 1
    warmup_epochs: float = 3.0  # linear warm-up from 0 to `lr`, per iteration (onecycle: its rise from lr/25)
    momentum: float = 0.9  # sgd, and muon's SGD groups
    nesterov: bool = True
    weight_decay: float = 5e-4  # on conv/linear weights only (p.dim() >= 2)
    adam_betas: List[float] = field(default_factory=lambda: [0.9, 0.999])  # adamw
    muon_lr: float = 0.02  # muon: peak LR of the hidden conv/linear weights (Keller Jordan's default)
    muon_momentum: float = 0.95  # muon: Nesterov momentum of those weights
    muon_weight_decay: float = 0.0  # muon: decoupled weight decay of those weights
    label_smoothing: float = 0.1
    precision: str = 'auto'  # auto | bf16 | fp16 | fp32 (auto: bf16 if the GPU has it, else fp16; fp16 on MPS; on the CPU bf16 where native (AVX512-BF16/AMX), else fp32)
    compile: bool = False  # torch.compile the model (pays compile time up front)
    compile_mode: str = 'default'  # torch.compile mode: default | reduce-overhead | max-autotune | max-autotune-no-cudagraphs
    fused_sgd: bool = False  # torch's fused SGD kernel (one launch for all parameters) instead of foreach (sgd; muon's SGD groups)
    cuda_graph: bool = False  # capture the whole training step in a CUDA graph (CUDA only; bf16/fp32; one process; sgd)
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
    tensorboard: bool = False  # TensorBoard event files in the run folder (training/sinks/tensorboard.py; imported only when on)


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
    'training.precision': ('auto', 'bf16', 'fp16', 'fp32'),
    'training.compile_mode': ('default', 'reduce-overhead', 'max-autotune', 'max-autotune-no-cudagraphs'),
}
POSITIVE = ('data.batch_size', 'data.test_batch_size', 'training.epochs', 'model.num_classes',
            'model.width', 'training.eval_every', 'data.batches_ahead', 'training.ema_every')
NON_NEGATIVE = ('training.lr', 'training.warmup_epochs', 'training.weight_decay',
                'training.grad_clip', 'augment.translate', 'augment.cutout',
                'data.train_per_class', 'data.test_per_class', 'output.save_every',
                'training.momentum', 'training.tta_translate', 'training.muon_lr',
                'training.muon_momentum', 'training.muon_weight_decay')


def resolve_config_path(name: str | Path) -> Path:
    """A path as given if it exists, else a bare name looked up in ``configs/``."""
    p = Path(name)
    found = next((c for c in (p, CONFIG_DIR / p.name, CONFIG_DIR / f'{p.name}.yaml') if c.is_file()), None)
    if found is not None:
        return found
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
    out, rest = [], iter(args)
    for a in rest:
        if not a.startswith('--') or len(a) == 2:
            raise ConfigError(f'unexpected argument {a!r}; overrides look like --section.key VALUE')
        a = a[2:]
        if '=' not in a:
            value = next(rest, None)
            if value is None:
                raise ConfigError(f'override --{a} needs a value')
            a = f'{a}={value}'
        out.append(a)
    return out


def validate(cfg) -> None:
    for key, allowed in CHOICES.items():
        if (v := OmegaConf.select(cfg, key)) not in allowed:
            raise ConfigError(f'{key}: {v!r} is not one of {list(allowed)}')
    for keys, op, bad in ((POSITIVE, '>', lambda v: v <= 0), (NON_NEGATIVE, '>=', lambda v: v < 0)):
        for key in keys:
            if (v := OmegaConf.select(cfg, key)) is not None and bad(v):  # None: auto
                raise ConfigError(f'{key}: must be {op} 0, got {v}')
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
    _validate_optimizer(cfg.training)


def _validate_optimizer(tc) -> None:
    """The optimizer and schedule by registered name, their own keys, and the combinations
    the step cannot run (each refused in one line)."""
    from .optim import OPTIMIZERS
    from .schedule import SCHEDULES
    for key, names in (('optimizer', OPTIMIZERS), ('schedule', SCHEDULES)):
        if tc[key] not in names:
            raise ConfigError(f'training.{key}: {tc[key]!r} is not one of {sorted(names)}')
    entry, defaults = OPTIMIZERS[tc.optimizer], TrainingConfig()
    for key in sorted({k for e in OPTIMIZERS.values() for k in e.reads} - set(entry.reads)):
        if tc[key] != getattr(defaults, key):
            users = sorted(n for n, e in OPTIMIZERS.items() if key in e.reads)
            raise ConfigError(f'training.{key}: only read by training.optimizer {users}, not by '
                              f'{tc.optimizer!r}; leave it at its default ({getattr(defaults, key)!r})')
    if tc.fused_sgd and not entry.fused:
        raise ConfigError(f'training.fused_sgd: training.optimizer {tc.optimizer!r} has no SGD to fuse; '
                          f'set training.fused_sgd=false')
    if tc.cuda_graph and not entry.cuda_graph:
        raise ConfigError(f'training.cuda_graph: captures the fused SGD step only, not training.optimizer '
                          f'{tc.optimizer!r}; set training.cuda_graph=false')
    if len(tc.adam_betas) != 2 or not all(0 <= b < 1 for b in tc.adam_betas):
        raise ConfigError(f'training.adam_betas: two values in [0, 1), got {list(tc.adam_betas)}')
    if not 0 <= tc.muon_momentum < 1:
        raise ConfigError(f'training.muon_momentum: must lie in [0, 1), got {tc.muon_momentum}')
    pts = [list(p) for p in tc.schedule_points]
    if tc.schedule == 'piecewise' and not (
            len(pts) >= 2 and all(len(p) == 2 and p[1] >= 0 for p in pts) and pts[0][0] == 0
            and pts[-1][0] == 1 and all(a[0] < b[0] for a, b in zip(pts, pts[1:]))):
        raise ConfigError(f'training.schedule_points: piecewise needs [[0, s0], ..., [1, sN]] with rising '
                          f'fractions of training and multipliers >= 0, got {pts}')


RENAMED = {'training.lr_schedule': 'training.schedule'}  # old key -> new: old configs and checkpoints load


def _migrate(d, what: str):
    """``d`` (a file's or a checkpoint's config) with renamed keys under their new names."""
    for old, new in RENAMED.items():
        if (value := OmegaConf.select(d, old, default='__missing__')) == '__missing__':
            continue
        section, old_key = old.split('.')
        if OmegaConf.select(d, new, default=value) != value:
            raise ConfigError(f'{what}: {old} and {new} both given (the old name of {new}); keep one')
        del d[section][old_key]
        d[section][new.split('.')[1]] = value
    return d


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict | None = None):
    """Schema defaults < YAML file (or ``base``, e.g. a checkpoint's config) < ``overrides``
    (``['training.epochs=2', ...]``). Returns a typed, read-only OmegaConf object."""
    cfg = OmegaConf.structured(Config)
    if base is not None:
        cfg = _merge(cfg, _migrate(OmegaConf.create(base), 'checkpoint config'), 'checkpoint config')
    if path is not None:
        p = resolve_config_path(path)
        try:
            file_cfg = OmegaConf.load(p)
        except Exception as e:  # YAML syntax errors, duplicated keys, ...
            why = ' '.join(str(e).split())[:240]  # e.g. "found duplicate key 'epochs' ..."
            raise ConfigError(f'{p}: not a valid YAML config ({why})') from None
        cfg = _merge(cfg, _migrate(file_cfg, str(p)), str(p))
    for ov in overrides or []:
        key, sep, value = ov.partition('=')
        if key in RENAMED:
            key, ov = RENAMED[key], f'{RENAMED[key]}={value}'
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


def for_data(cfg, data):
    """``cfg`` with what the data decided for the keys left to it (model.num_classes, augment
    sizes: null = auto), recorded as they ran; :class:`ConfigError` for a key that does not fit
    the data (a TTA shift of half the image, a batch larger than the training images)."""
    size = data.dataset.image_size
    if cfg.training.tta_translate >= size // 2:
        raise ConfigError(f'training.tta_translate: must lie in [0, {size // 2 - 1}] for '
                          f'{size}x{size} images, got {cfg.training.tta_translate}')
    if len(data.train) == 0:
        raise ConfigError(f'data.batch_size {cfg.data.batch_size} exceeds the '
                          f'{data.train.num_samples} training images per process')
    return with_values(cfg, data.resolved)


def to_dict(cfg) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True)


def to_yaml(cfg) -> str:
    return OmegaConf.to_yaml(cfg)


# ---- what a resumed run may change (``train.py --resume CKPT --section.key VALUE``) ----------
# One place for the three lists; README "Stopping and resuming" documents them.
RESUME_REFUSED = {  # cannot work: one line naming the key, nothing starts
    **dict.fromkeys(('model.arch', 'model.width', 'model.num_classes'), "the checkpoint's weights have another shape"),
    'training.optimizer': "the checkpoint's optimizer state belongs to another optimizer",
    **dict.fromkeys(('data.batch_size', 'data.train_per_class'), 'the steps per epoch would change, and with them '
                    'the meaning of the saved step counter, LR schedule position and mid-epoch position'),
    **dict.fromkeys(('output.dir', 'output.name'), 'a resumed run continues in the folder of its checkpoint'),
}
RESUME_HARMLESS = (  # change nothing the run computes: accepted quietly
    'output.progress', 'output.plot', 'output.save_every', 'output.tensorboard', 'data.num_workers',
    'data.batches_ahead', 'data.os_cache', 'data.test_batch_size', 'training.target_top1',
    'data.resident_test',  # the same test images and counts either way (tests/test_time_budget.py)
)
# Every other key -- the schedule (training.epochs, lr, warm-up), the data paths, augment.*, the
# seed, the precision, and keys added later -- changes the run: accepted, with one line naming
# the keys and saying that the result differs from an uninterrupted run.


def _leaves(cfg) -> dict[str, Any]:
    """``{'section.key': value}``: the schema's sections hold no nested sections."""
    return {f'{s}.{k}': v for s, section in to_dict(cfg).items() for k, v in section.items()}


def resume_config(base: dict, overrides: list[str] | None, log=print):
    """The config of a run resumed from a checkpoint whose config is ``base``, with
    ``overrides``: :class:`ConfigError` for a change that cannot work (:data:`RESUME_REFUSED`),
    one logged line for changes that make it another run than the one it continues."""
    old = _leaves(load_config(None, None, base=base))
    cfg = load_config(None, overrides, base=base)
    new = _leaves(cfg)
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
    # the head's size comes from the data again, so that data of another dataset meets the
    # checkpoint's own check (state.restore: "trained on ..."), not a bare class-count mismatch
    return with_values(cfg, {'model.num_classes': None})
