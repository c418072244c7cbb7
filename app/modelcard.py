"""The model card (``README.md``) of a published model repository: the Hub's YAML metadata
(library, tags, dataset, license, ``model-index`` with the measured top-1/top-5 and the split
they were measured on), then how the model was trained, the time to target and how to use it.
Everything comes from the checkpoint and, when it sits in its run folder, the run's
``summary.json`` and ``metrics.jsonl`` (and the converted data's ``manifest.json``, which says
whether the test split is the official one).

    run = read_run('runs/<run>/best.pt', ckpt)
    text = model_card(ckpt, run, repo_id='user/cifar100-resnet18', files=[...])

The figures are the run's own, as measured during training (with its test-time augmentation);
nothing is re-measured here. Standard library and PyYAML only.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent


def dataset_of(ckpt: dict) -> dict:
    """The checkpoint's dataset value as a dict (``ffcv_pipeline.datasets``: older checkpoints
    have none and are CIFAR-100's); its ``hub_id`` names the dataset on the Hub."""
    from ffcv_pipeline.datasets import checkpoint_dataset  # standard library only
    return checkpoint_dataset(ckpt).to_dict()


@dataclass
class RunInfo:
    """What the run folder of a checkpoint says about it (each part may be missing)."""
    summary: dict | None = None
    records: list[dict] = field(default_factory=list)  # metrics.jsonl, one per evaluated epoch
    manifest: dict | None = None  # the converted data's manifest.json
    folder: Path | None = None

    def record(self, epoch: int | None) -> dict:
        return next((r for r in self.records if r.get('epoch') == epoch), {})


def _read_json(path: Path):
    with contextlib.suppress(OSError, ValueError):
        return json.loads(path.read_text())
    return None


def read_run(checkpoint: str | os.PathLike, ckpt: dict) -> RunInfo:
    """The run folder's summary, metrics and the data's manifest, for ``checkpoint`` (a file in
    ``runs/<run>/``); what is missing or unreadable stays empty (an exported file has no run)."""
    path = Path(checkpoint)
    folder = path if path.is_dir() else path.parent
    info = RunInfo(folder=folder if (folder / 'summary.json').is_file() else None)
    info.summary = _read_json(folder / 'summary.json')
    with contextlib.suppress(OSError, ValueError):  # else none (RunInfo's default)
        info.records = [json.loads(line) for line in (folder / 'metrics.jsonl').read_text().splitlines() if line.strip()]
    test_path = ((ckpt.get('config') or {}).get('data') or {}).get('test_path')
    if test_path:
        info.manifest = _read_json(Path(test_path).parent / 'manifest.json')
    return info


def space_license() -> str:
    """The license the Space's README header (app/README.md) declares: one source for both."""
    header = yaml.safe_load((HERE / 'README.md').read_text().split('---\n')[1])
    return str(header.get('license', 'mit'))


def _pct(v) -> str:
    return f'{v:.2%}' if isinstance(v, (int, float)) and math.isfinite(v) else 'n/a'


def _secs(v) -> str:
    return f'{v:.1f} s' if isinstance(v, (int, float)) and math.isfinite(v) else 'n/a'


def results(ckpt: dict, run: RunInfo) -> dict:
    """The published weights' test figures: top-1/top-5 at the checkpoint's epoch (the
    checkpoint's own metrics, which are the run's metrics.jsonl record of that epoch), the
    split, its size and whether it is the official test set."""
    m = ckpt.get('metrics') or {}
    rec = run.record(ckpt.get('epoch'))
    source = (run.manifest or {}).get('source') or {}
    test = ((run.manifest or {}).get('splits') or {}).get('test') or {}
    tcfg = (ckpt.get('config') or {}).get('training') or {}
    views = (['horizontal flip'] if tcfg.get('tta') else []) + \
        ([f'{tcfg["tta_translate"]}-px translations'] if tcfg.get('tta_translate') else [])
    return {'top1': m.get('test_top1', rec.get('test_top1')), 'top5': m.get('test_top5', rec.get('test_top5')),
            'epoch': ckpt.get('epoch'), 'epochs_planned': m.get('epochs_planned'),
            'split': 'test', 'images': rec.get('test_images') or test.get('count'),
            'official': source.get('official'), 'source_md5': source.get('md5'), 'tta': views,
            'ema': bool(tcfg.get('ema'))}


def card_metadata(ckpt: dict, run: RunInfo, repo_id: str, *, license: str | None = None) -> dict:
    """The card's YAML header as a dict (``model-index`` as the Hub reads it)."""
    ds = dataset_of(ckpt)
    hub_dataset = ds.get('hub_id')
    arch = ckpt['model_config'].get('arch')
    r = results(ckpt, run)
    meta: dict = {'library_name': 'pytorch', 'license': license or space_license(),
                  'pipeline_tag': 'image-classification',
                  'tags': ['image-classification', 'pytorch', 'safetensors', 'onnx', str(arch), str(ds['name']), 'ffcv']}
    if hub_dataset:
        meta['datasets'] = [hub_dataset]
    metrics = [{'type': 'accuracy', 'value': r['top1'], 'name': 'Top-1 accuracy'}] if r['top1'] is not None else []
    if r['top5'] is not None and metrics:
        metrics.append({'type': 'top_5_accuracy', 'value': r['top5'], 'name': 'Top-5 accuracy'})
    if metrics:
        meta['metrics'] = ['accuracy']
        dataset = {'name': ds.get('title', ds['name']), 'type': hub_dataset or ds['name'], 'split': r['split']}
        args = {k: v for k, v in (('images', r['images']), ('official_test_set', r['official'])) if v is not None}
        if args:
            dataset['args'] = args
        meta['model-index'] = [{'name': repo_id.split('/')[-1], 'results': [{
            'task': {'type': 'image-classification', 'name': 'Image Classification'},
            'dataset': dataset, 'metrics': metrics}]}]
    return meta


def _optimizer(t: dict) -> str:
    """``training.optimizer`` (``training/optim.py``: older configs have none and are SGD) in words."""
    sgd = (f'SGD{" (Nesterov)" if t.get("nesterov") else ""} momentum {t.get("momentum")}, peak LR {t.get("lr")}, '
           f'weight decay {t.get("weight_decay")}')
    name = t.get('optimizer', 'sgd')
    if name == 'adamw':
        return f'AdamW (betas {t.get("adam_betas")}), peak LR {t.get("lr")}, weight decay {t.get("weight_decay")}'
    if name == 'muon':
        return (f'Muon for the hidden conv weights (peak LR {t.get("muon_lr")}, momentum {t.get("muon_momentum")}, '
                f'weight decay {t.get("muon_weight_decay")}) and {sgd} for the rest')
    return sgd if name == 'sgd' else f'{name}, peak LR {t.get("lr")}'


def _training_rows(ckpt: dict, run: RunInfo) -> list[tuple[str, str]]:
    cfg, s = ckpt.get('config') or {}, run.summary or {}
    t, d, a = cfg.get('training') or {}, cfg.get('data') or {}, cfg.get('augment') or {}
    rows = []
    if s.get('config'):
        rows.append(('config', f'`{s["config"]}` (the resolved config rides in config.json)'))
    if t:
        schedule = t.get('schedule') or t.get('lr_schedule')  # the key's name before training.schedule
        rows.append(('recipe', f'{t.get("epochs")} epochs, batch {d.get("batch_size")}, {_optimizer(t)} '
                               f'({t.get("warmup_epochs")} warm-up epochs, {schedule} schedule), '
                               f'label smoothing {t.get("label_smoothing")}'
                               + (f', EMA of the weights ({t["ema"]})' if t.get('ema') else '')))
    if a:
        rows.append(('augmentation', ', '.join(p for p in (
            'horizontal flip' if a.get('flip') else '', f'{a["translate"]}-px translate' if a.get('translate') else '',
            f'{a["cutout"]}-px cutout' if a.get('cutout') else '') if p) or 'none'))
    if s:
        hw = s.get('gpu') or s.get('device')
        procs = s.get('world_size') or 1
        rows.append(('hardware', f'{hw}, {s.get("precision")}' + (f', {procs} processes (DDP)' if procs > 1 else '')))
        rows.append(('software', ', '.join(p for p in (
            f'torch {s["torch_version"]}' if s.get('torch_version') else '',
            f'{s.get("loader")} loader' + (f' (ffcv {s["ffcv_version"]})' if s.get('ffcv_version') else '')) if p)))
        rows.append(('wall-clock', f'{_secs(s.get("total_seconds"))} from process start to the end of the run; '
                                   f'median {s.get("median_train_images_per_s")} training images/s'))
        target = s.get('target_top1')
        if s.get('time_to_target_s') is not None:
            rows.append((f'time to {_pct(target)} top-1', f'**{_secs(s["time_to_target_s"])}** from process start '
                                                           f'(imports, set-up and JIT included; epoch '
                                                           f'{s.get("epoch_reached_target")}), '
                                                           f'{_secs(s.get("train_seconds_to_target"))} of training loops'))
        elif target is not None:
            rows.append((f'time to {_pct(target)} top-1', f'not reached (best {_pct(s.get("best_top1"))})'))
    return rows


def usage(repo_id: str, ckpt: dict) -> str:
    """How to use the published files: with this project, and with ONNX Runtime alone. The
    second snippet runs as it is (the tests run it against a downloaded copy)."""
    return f'''## How to use it

With the project this model comes from (its predictor and Gradio app take the folder):

```bash
hf download {repo_id} --local-dir {repo_id.split('/')[-1]}
python scripts/predict.py photo.jpg --checkpoint {repo_id.split('/')[-1]}             # torch: model.safetensors + config.json
python scripts/predict.py photo.jpg --checkpoint {repo_id.split('/')[-1]}/model.onnx  # ONNX Runtime, no torch
python app/app.py --checkpoint {repo_id.split('/')[-1]}                               # the web app
```

With ONNX Runtime alone (`pip install onnxruntime pillow numpy huggingface_hub`):

```python
import json
import numpy as np
import onnxruntime as ort
from PIL import Image
from huggingface_hub import snapshot_download

folder = snapshot_download("{repo_id}")
config = json.load(open(f"{{folder}}/config.json"))
session = ort.InferenceSession(f"{{folder}}/model.onnx")
size, norm = config["image_size"], config["normalization"]
img = Image.open("photo.jpg").convert("RGB")
w, h = img.size
if (w, h) != (size, size):  # centre square crop, then resize, as the model's app does
    s = min(w, h)
    img = img.resize((size, size), Image.BICUBIC, box=((w - s) / 2, (h - s) / 2, (w + s) / 2, (h + s) / 2),
                     reducing_gap=3)
x = np.asarray(img, np.float32) * np.float32(norm["scale"] / 255)  # pixels on the scale of mean/std
x = (x - np.float32(norm["mean"])) * (np.float32(1) / np.float32(norm["std"]))
logits = session.run(None, {{"input": x.transpose(2, 0, 1)[None]}})[0][0]
top5 = np.argsort(-logits)[:5]
print([config["class_names"][i] for i in top5])
```

The input is N x 3 x {ckpt.get('image_size', 32)} x {ckpt.get('image_size', 32)} float32 (`input`), the output
N x {len(ckpt['class_names'])} logits (`logits`); `config.json` holds the class names, the
normalization and the architecture from which `model.safetensors` rebuilds the torch model.
'''


def model_card(ckpt: dict, run: RunInfo, repo_id: str, *, files: dict[str, str] | None = None,
               parameters: int | None = None, license: str | None = None) -> str:
    """The whole ``README.md``: YAML header, results, training, usage, files."""
    meta = card_metadata(ckpt, run, repo_id, license=license)
    ds = dataset_of(ckpt)
    title = ds.get('title', ds['name'])
    cfg = ckpt['model_config']
    r = results(ckpt, run)
    arch = f'{cfg.get("arch")} (width {cfg.get("width", 64)})'
    n = len(ckpt['class_names'])
    lines = ['---', yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).rstrip(), '---', '',
             f'# {title} classifier: {arch}', '',
             f'A {arch}{f" with {parameters:,} parameters" if parameters else ""}, trained from scratch on '
             f'{title} ({n} classes, {ckpt.get("image_size", 32)}x{ckpt.get("image_size", 32)} images) with the '
             f'cifar100-ffcv project (how this one was trained: below). Published with `scripts/export.py --hub-model` '
             f'from the run\'s checkpoint.', '',
             '## Results', '']
    if r['top1'] is not None:
        when = f'epoch {r["epoch"]}' + (f' of {r["epochs_planned"]}' if r['epochs_planned'] else '')
        lines += ['| split | images | top-1 | top-5 |', '| --- | --- | --- | --- |',
                  f'| {r["split"]} | {r["images"] if r["images"] is not None else "n/a"} | {_pct(r["top1"])} | '
                  f'{_pct(r["top5"])} |', '',
                  f'Measured by the training run at {when} (the weights published here'
                  + (', an exponential moving average of the trained ones' if r['ema'] else '') + ')'
                  + (f', with test-time augmentation ({" and ".join(r["tta"])}): the predictor and the '
                     f'ONNX model run one view, which may score a little lower' if r['tta'] else '') + '.']
        if r['official'] is False:
            lines.append(f'The test split is that of a non-official archive (md5 {r["source_md5"]}), '
                         f'not the official {title} test set: these figures are not comparable with '
                         f'published results on it.')
        elif r['official'] is None:
            lines.append('Whether the test split is the official one is not known (the converted data\'s '
                         'manifest was not found when this card was written).')
    else:
        lines.append('The checkpoint carries no test figures.')
    rows = _training_rows(ckpt, run)
    lines += ['', '## Training', '']
    if rows:
        lines += ['| | |', '| --- | --- |'] + [f'| {k} | {v} |' for k, v in rows]
    else:
        lines.append('The run folder (summary.json, metrics.jsonl) was not found when this card was written; '
                     'config.json holds the training config the checkpoint recorded.')
    lines += ['', usage(repo_id, ckpt)]
    if files:
        lines += ['## Files', '', '| file | what |', '| --- | --- |'] + [f'| `{k}` | {v} |' for k, v in files.items()]
    return '\n'.join(lines).rstrip() + '\n'
