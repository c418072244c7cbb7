"""model.safetensors + config.json as a first-class model file (model/modelfile.py): the
predictor, scripts/predict.py, the app and scripts/export.py take the folder or either file as
they take a .pt, with the same predictions; and a model file whose weights do not fit what it
says it is stops each of them with one line naming the file and the first mismatching tensor.

    .venv/bin/python -m pytest tests/test_modelfile.py        # ~20 s on the 2-core CPU
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from app.predictor import ModelFileError, Predictor
from conftest import images_of, make_split, make_test_checkpoint, run_main
from model.checkpoint import CheckpointError, slim_checkpoint
from model.modelfile import CONFIG_NAME, WEIGHTS_NAME, load_model_file, save_model_folder


@pytest.fixture(scope='module')
def ckpt_path(tmp_path_factory) -> Path:
    return make_test_checkpoint(tmp_path_factory.mktemp('mf') / 'model.pt', width=8)


@pytest.fixture(scope='module')
def folder(ckpt_path, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp('repo') / 'model-repo'
    save_model_folder(slim_checkpoint(torch.load(ckpt_path, weights_only=True)), d)
    return d


@pytest.fixture(scope='module')
def test_images() -> tuple[np.ndarray, np.ndarray]:
    split = make_split(2, seed=2)  # the synthetic test split: 200 images, 2 per class
    return images_of(split), np.asarray(split['fine_labels'])


def top1_and_logits(model_file, images) -> tuple[float, np.ndarray]:
    p = Predictor(model_file, optimize=False)
    x, _ = p.preprocess(list(images[0]))
    logits = p.logits(x)
    return float((logits.argmax(1) == images[1]).mean()), logits


def test_folder_and_either_file_give_the_checkpoints_logits(ckpt_path, folder, test_images):
    """The folder, its model.safetensors and its config.json all load, as the torch backend,
    the very model of the .pt: identical logits on 200 images, so the same top-1. config.json
    names what rebuilds it. Catches: a loader that drops a tensor or BatchNorm statistics,
    metadata lost on the way (class names, normalization, metrics)."""
    want_top1, want = top1_and_logits(ckpt_path, test_images)
    for model_file in (folder, folder / WEIGHTS_NAME, folder / CONFIG_NAME):
        top1, got = top1_and_logits(model_file, test_images)
        assert top1 == want_top1 and np.array_equal(got, want), model_file
    config = json.loads((folder / CONFIG_NAME).read_text())
    assert config['model_config'] == {'arch': 'resnet18', 'num_classes': 100, 'width': 8}
    assert config['image_size'] == 32 and config['normalization']['scale'] == 255
    assert len(config['class_names']) == 100 and len(config['fine_to_coarse']) == 100
    assert config['weights'] == {'file': WEIGHTS_NAME, 'dtype': 'float32'}
    assert not {'model', 'optimizer', 'rng'} & set(config)
    a, b = Predictor(ckpt_path), Predictor(folder)
    assert b.backend.name == 'torch' and a.info() | {'checkpoint': None} == b.info() | {'checkpoint': None}


def test_predict_export_and_app_take_the_folder(ckpt_path, folder, tmp_path, test_images):
    """scripts/predict.py prints the same top-5 for the folder as for the .pt; scripts/export.py
    exports from it (its ONNX model agrees); the app loads it as --checkpoint."""
    from PIL import Image
    img = tmp_path / 'a.png'
    Image.fromarray(test_images[0][0]).save(img)
    outputs = []
    for model_file in (ckpt_path, folder, folder / CONFIG_NAME):
        code, out, err = run_main('predict', img, '--checkpoint', model_file, '--json')
        assert code == 0, err
        outputs.append([t['label'] for t in json.loads(out)['predictions'][0]['top']])
    assert outputs[0] == outputs[1] == outputs[2]
    code, _, err = run_main('export', folder, '--out', tmp_path / 'exp', '--onnx')
    assert code == 0, err
    assert Predictor(tmp_path / 'exp' / 'model.onnx').predict(img).indices[:5] == \
        Predictor(ckpt_path).predict(img).indices[:5]
    from app.app import load_predictor
    predictor, problem = load_predictor(str(folder))
    assert problem is None and predictor.predict(img).label == outputs[0][0]


def misfits(ckpt_path: Path, tmp_path: Path) -> list[tuple[Path, str]]:
    """Model files whose weights do not fit what they say, with the line each must give."""
    ckpt = torch.load(ckpt_path, weights_only=True)
    cases = []
    wide = tmp_path / 'wide.pt'  # the metadata says width 16, the weights are width 8
    torch.save({**ckpt, 'model_config': {**ckpt['model_config'], 'width': 16}}, wide)
    cases.append((wide, f'{wide}: weights do not fit the model its metadata describes (arch resnet18, num_classes 100, '
                        f'width 16): tensor stem.0.weight is 8 x 3 x 3 x 3 in the file, 16 x 3 x 3 x 3 in that model'))
    deeper = tmp_path / 'deeper.pt'  # another architecture
    torch.save({**ckpt, 'model_config': {**ckpt['model_config'], 'arch': 'resnet34'}}, deeper)
    cases.append((deeper, f'{deeper}: weights do not fit the model its metadata describes (arch resnet34, '
                          f'num_classes 100, width 8): tensor layers.2.conv1.weight is 16 x 8 x 3 x 3 in the file, '
                          f'8 x 8 x 3 x 3 in that model'))
    names = tmp_path / 'names.pt'  # 99 class names for the 100-output head
    torch.save({**ckpt, 'class_names': ckpt['class_names'][:99], 'fine_to_coarse': ckpt['fine_to_coarse'][:99]}, names)
    cases.append((names, f'{names}: 99 class names for a 100-class model (tensor fc.weight is 100 x 64)'))
    head = tmp_path / 'head10'  # safetensors + config.json: a 10-class config for a 100-class head
    save_model_folder(slim_checkpoint(ckpt), head)
    config = json.loads((head / CONFIG_NAME).read_text())
    config['model_config']['num_classes'] = 10
    config['class_names'], config['coarse_names'], config['fine_to_coarse'] = [f'c{i}' for i in range(10)], None, None
    (head / CONFIG_NAME).write_text(json.dumps(config))
    cases.append((head, f'{head}: weights do not fit the model its metadata describes (arch resnet18, num_classes 10, '
                        f'width 8): tensor fc.weight is 100 x 64 in the file, 10 x 64 in that model'))
    return cases


def test_misfit_weights_are_one_line_naming_file_and_tensor_everywhere(ckpt_path, tmp_path, capsys):
    """Predictor, predict.py, export.py and the app: one line, exit 2, naming the file and the
    first mismatching tensor (not torch's multi-line "Error(s) in loading state_dict for
    ResNet:"); export writes nothing. Catches: a check that runs after load_state_dict, a
    message without the file or the tensor, an export that half-writes its folder."""
    from app.app import main as app_main
    img = tmp_path / 'a.png'
    from PIL import Image
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(img)
    for bad, line in misfits(ckpt_path, tmp_path):
        with pytest.raises(ModelFileError) as e:
            Predictor(bad)
        assert str(e.value) == line and 'Error(s) in loading' not in str(e.value)
        code, out, err = run_main('predict', img, '--checkpoint', bad)
        assert (code, err) == (2, f'error: {line}\n'), bad
        out_dir = tmp_path / f'export-{bad.stem}'
        code, out, err = run_main('export', bad, '--out', out_dir, '--onnx', '--space')
        assert (code, err) == (2, f'error: {line}\n') and not out_dir.exists(), bad
        capsys.readouterr()
        assert app_main(['--checkpoint', str(bad), '--port', '1']) == 2
        assert capsys.readouterr().err == f'error: {line}\n'


def test_onnx_whose_class_names_do_not_fit_its_output(ckpt_path, tmp_path):
    """An .onnx file carrying metadata of another class count: one line naming the output."""
    import onnx
    from app.export import onnx_bytes
    from app.modelmeta import META_KEY
    proto = onnx.load_from_string(onnx_bytes(torch.load(ckpt_path, weights_only=True)))
    entry = next(p for p in proto.metadata_props if p.key == META_KEY)
    meta = json.loads(entry.value)
    meta['class_names'], meta['fine_to_coarse'] = meta['class_names'][:10], None
    meta['model_config'] = {'arch': 'resnet18', 'num_classes': 10, 'width': 8}  # consistent with the names
    entry.value = json.dumps(meta)
    bad = tmp_path / 'ten.onnx'
    onnx.save(proto, bad)
    with pytest.raises(ModelFileError, match=rf'^{bad}: 10 class names for a 100-class model '
                                             r'\(tensor logits is batch x 100\)$'):
        Predictor(bad)


def test_broken_or_foreign_pairs_are_one_line(folder, tmp_path):
    """A missing config.json, a config.json that is not ours or is newer, missing or corrupt
    weights, an empty folder: CheckpointError naming the file, one line each."""
    import shutil
    cases = []
    for name in ('no-config', 'foreign', 'newer', 'no-weights', 'corrupt'):
        shutil.copytree(folder, tmp_path / name)
    (tmp_path / 'no-config' / CONFIG_NAME).unlink()
    cases.append((tmp_path / 'no-config', f'{tmp_path / "no-config" / CONFIG_NAME}: no such file'))
    (tmp_path / 'foreign' / CONFIG_NAME).write_text('{"architectures": ["ViTForImageClassification"]}')
    cases.append((tmp_path / 'foreign', 'not a cifar100-ffcv-model config'))
    config = json.loads((folder / CONFIG_NAME).read_text())
    (tmp_path / 'newer' / CONFIG_NAME).write_text(json.dumps({**config, 'format_version': 99}))
    cases.append((tmp_path / 'newer', 'config format version 99 is newer'))
    (tmp_path / 'no-weights' / WEIGHTS_NAME).unlink()
    cases.append((tmp_path / 'no-weights', f'{tmp_path / "no-weights" / WEIGHTS_NAME}: no such weights file'))
    (tmp_path / 'corrupt' / WEIGHTS_NAME).write_bytes(b'\x08\x00\x00\x00\x00\x00\x00\x00{"a":1}')
    cases.append((tmp_path / 'corrupt', f'{tmp_path / "corrupt" / WEIGHTS_NAME}: not a readable safetensors file'))
    (tmp_path / 'empty').mkdir()
    cases.append((tmp_path / 'empty', 'a folder without model.safetensors and config.json'))
    for path, message in cases:
        with pytest.raises(CheckpointError) as e:
            load_model_file(path)
        assert message in str(e.value) and '\n' not in str(e.value), (path, str(e.value))
