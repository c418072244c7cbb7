"""Publishing to the Hugging Face Hub (scripts/export.py --push-to-hub / --hub-model, app/hub.py),
tested without the internet: tests/hub_standin.py is a local HTTP server speaking the part of
the Hub's API that huggingface_hub's create_repo and upload_folder use (on its plain commit +
LFS path: HF_HUB_DISABLE_XET=1), and keeps what it receives. What it received is then run: the
Space's own app.py in a subprocess (torch made unimportable) answers a prediction, and the model
repository's safetensors + config.json give the checkpoint's top-1; the card's YAML parses and
its figures are the run's.

    .venv/bin/python -m pytest tests/test_hub.py        # ~1 min on the 2-core CPU

Nothing here reaches the real Hub (README "Publish" says what was and was not tried there).
"""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from app.predictor import Predictor
from conftest import PY, ROOT, make_test_checkpoint, run_main
from hub_standin import HubStandIn

TOKENS = {'hf_alice': 'alice', 'hf_bob': 'bob'}


@pytest.fixture(scope='module')
def hub():
    with HubStandIn(tokens=TOKENS) as standin:
        yield standin


@pytest.fixture(scope='module')
def small_ckpt(tmp_path_factory) -> Path:
    """An untrained checkpoint outside any run folder: what the failure cases export."""
    return make_test_checkpoint(tmp_path_factory.mktemp('hubckpt') / 'model.pt', width=8)


def free_port() -> int:
    """A port nothing listens on (closed again at once): an unreachable Hub."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def hub_env(hub_url: str, tmp_path: Path, token: str | None) -> dict:
    """The environment of a publishing process: the stand-in as the Hub (HF_ENDPOINT), a home of
    its own (no saved login), the plain upload path the stand-in speaks."""
    return {'HF_ENDPOINT': hub_url, 'HF_HOME': str(tmp_path / 'hf-home'), 'HF_HUB_DISABLE_XET': '1',
            'HF_TOKEN': token, 'HUGGING_FACE_HUB_TOKEN': None, 'HF_HUB_DISABLE_TELEMETRY': '1'}


@pytest.fixture
def in_process_hub(monkeypatch, tmp_path):
    """For in-process runs: huggingface_hub read its settings at import, so they are set on its
    constants too (no saved login, the plain upload path, the stand-in for its own look-ups)."""
    from huggingface_hub import constants

    def use(hub_url: str, token: str | None) -> None:
        for key, value in hub_env(hub_url, tmp_path, token).items():
            if value is None:
                monkeypatch.delenv(key, raising=False)
            else:
                monkeypatch.setenv(key, value)
        monkeypatch.setattr(constants, 'ENDPOINT', hub_url)
        monkeypatch.setattr(constants, 'HF_TOKEN_PATH', str(tmp_path / 'hf-home' / 'token'))
        monkeypatch.setattr(constants, 'HF_HUB_DISABLE_XET', True)
    return use


def listed(folder: Path) -> list[str]:
    return json.loads((folder / 'export.json').read_text())['files']


def snapshot(folder: Path) -> dict[str, bytes]:
    return {f: (folder / f).read_bytes() for f in listed(folder)}


def card_of(text: str) -> tuple[dict, str]:
    _, header, body = text.split('---\n', 2)
    return yaml.safe_load(header), body


def test_one_command_publishes_space_and_model_repo_and_what_arrived_runs(baseline_run, hub, tmp_path):
    """`python scripts/export.py best.pt --push-to-hub alice/NAME --hub-model alice/NAME --private`
    as a process (HF_ENDPOINT read from its environment): both repositories are created (the
    Space with the gradio SDK), private, and hold exactly the files written locally (the large
    ones through LFS); the URLs are printed. Then what the stand-in received runs: the Space's
    app.py answers a prediction through Gradio's API like the checkpoint's, the model
    repository's safetensors + config.json give the checkpoint's logits and top-1 on the test
    images, its card's ONNX Runtime snippet prints the predictor's top-5, and the card's YAML
    parses with the run's figures. Catches: an upload of the wrong folder or of files the export
    did not write, a Space without its SDK, a card whose metrics are not the run's, a model repo
    that does not rebuild the model."""
    run_dir, summary, _ = baseline_run
    best = run_dir / 'best.pt'
    space, model = tmp_path / 'space', tmp_path / 'model'
    env = {**os.environ, **hub_env(hub.url, tmp_path, 'hf_alice')}
    r = subprocess.run([PY, ROOT / 'scripts' / 'export.py', best, '--push-to-hub', 'alice/cifar-demo',
                        '--hub-model', 'alice/cifar-demo', '--private', '--out', space, '--model-out', model],
                       capture_output=True, text=True, timeout=300, cwd=ROOT,
                       env={k: v for k, v in env.items() if v is not None})
    assert r.returncode == 0, r.stderr[-3000:]
    assert f'Space: {hub.url}/spaces/alice/cifar-demo' in r.stdout.splitlines()
    assert f'model repository: {hub.url}/alice/cifar-demo' in r.stdout.splitlines()

    got_space, got_model = hub.repo('space', 'alice/cifar-demo'), hub.repo('model', 'alice/cifar-demo')
    assert got_space.sdk == 'gradio' and got_space.private and got_model.private
    for repo, folder in ((got_space, space), (got_model, model)):
        assert len(repo.commits) == 1
        assert {k: v for k, v in repo.files.items() if k != '.gitattributes'} == snapshot(folder)
    assert sorted(listed(model)) == ['README.md', 'config.json', 'export.json', 'model.onnx', 'model.safetensors']
    assert {'model.onnx', 'model.safetensors'} <= set(got_model.commits[0]['lfs'])
    assert ('POST', '/api/validate-yaml', 200) in hub.calls  # the cards' YAML went through the Hub's check
    assert 'models:\n- alice/cifar-demo\n' in got_space.files['README.md'].decode()  # the Space links the model

    received_space, received_model = tmp_path / 'received-space', tmp_path / 'received-model'
    hub.write_out('space', 'alice/cifar-demo', received_space)
    hub.write_out('model', 'alice/cifar-demo', received_model)
    reference = Predictor(best)

    # the model repository: safetensors + config.json give the checkpoint's logits, so its top-1
    from app.quantize import load_split
    data_dir = Path(json.loads((received_model / 'config.json').read_text())['config']['data']['test_path']).parent
    test_x, test_y = load_split(data_dir, 'test')
    rebuilt = Predictor(received_model)
    x, _ = reference.preprocess(list(test_x))
    want, got = reference.logits(x), rebuilt.logits(x)
    assert np.array_equal(want, got)
    assert (got.argmax(1) == test_y).mean() == (want.argmax(1) == test_y).mean()

    # the card: YAML the Hub's own parser reads, the run's figures, the usage snippet runs
    from huggingface_hub import ModelCard
    text = (received_model / 'README.md').read_text()
    meta, body = card_of(text)
    results = {e.metric_name: e for e in ModelCard(text).data.eval_results}
    best_record = json.loads((run_dir / 'metrics.jsonl').read_text().splitlines()[summary['best_epoch'] - 1])
    assert results['Top-1 accuracy'].metric_value == summary['best_top1'] == best_record['test_top1']
    assert results['Top-5 accuracy'].metric_value == best_record['test_top5']
    assert results['Top-1 accuracy'].dataset_split == 'test' and results['Top-1 accuracy'].dataset_args == \
        {'images': len(test_y), 'official_test_set': False}
    assert meta['library_name'] == 'pytorch' and meta['license'] == 'mit' and meta['datasets'] == ['uoft-cs/cifar100']
    assert {'image-classification', 'safetensors', 'onnx', 'resnet18'} <= set(meta['tags'])
    assert f'{summary["total_seconds"]:.1f} s from process start' in body
    target = f'time to {summary["target_top1"]:.2%} top-1'
    assert target in body and (f'{summary["time_to_target_s"]:.1f} s' if summary['time_to_target_s'] is not None
                               else 'not reached') in body.split(target)[1].splitlines()[0]
    img = tmp_path / 'photo.png'
    Image.fromarray(np.asarray(test_x[3])).resize((57, 41)).save(img)
    snippet = re.search(r'```python\n(.*?)```', body, re.S).group(1)
    snippet = snippet.replace('folder = snapshot_download("alice/cifar-demo")', f'folder = {str(received_model)!r}')
    snippet = snippet.replace('from huggingface_hub import snapshot_download\n', '').replace('photo.jpg', str(img))
    r = subprocess.run([PY, '-c', snippet], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    served = Predictor(received_model / 'model.onnx')  # the same runtime: equal top-5 means equal input
    assert eval(r.stdout) == [name for name, _ in served.predict(img).classes]
    assert served.predict(img).label == reference.predict(img).label

    # the Space: its own app.py, as the Space runs it (no arguments, torch unimportable)
    from app.loadtest import serve_app
    from gradio_client import Client, handle_file
    blocker = tmp_path / 'no-torch'
    blocker.mkdir()
    (blocker / 'sitecustomize.py').write_text("import sys\nsys.modules['torch'] = None\n")
    with serve_app(None, app_file=received_space / 'app.py',
                   env={'PYTHONPATH': str(blocker), 'MODEL_PATH': ''}) as url:
        client = Client(url, verbose=False, download_files=False, analytics_enabled=False)
        label, _, status = client.predict(handle_file(img), api_name='/predict')
        client.close()
    assert [c['label'] for c in label['confidences']] == [n for n, _ in served.predict(img).classes]
    assert status == ''


def failure_cases(hub_url: str, tmp_path: Path) -> list[tuple[str, dict, HubStandIn | None, str]]:
    """(name, settings, a stand-in of its own or None, what the one line must say)."""
    return [('no token', {'token': None}, None, 'no Hugging Face token to publish'),
            ('rejected token', {'token': 'hf_wrong'}, None, 'rejected the token'),
            ('unreachable', {'token': 'hf_alice', 'url': f'http://127.0.0.1:{free_port()}'}, None,
             'cannot reach the Hub at'),
            ('lost mid-upload', {'token': 'hf_alice'}, HubStandIn(TOKENS, drop='/commit/'),
             'lost the connection to the Hub at'),
            ('refused', {'token': 'hf_bob'}, None, 'answered 403')]


def test_failures_are_one_line_exit_2_and_leave_the_folders(small_ckpt, hub, in_process_hub, tmp_path):
    """No token, a rejected one, an unreachable Hub, a connection lost mid-upload (after the LFS
    objects went up, at the commit) and the Hub refusing (bob writing into alice's namespace):
    each one line on stderr, exit 2, naming the repository and the endpoint (and how to log in
    where that is the problem), no traceback, nothing committed; the written folders stay whole
    and serve. A second run, with the Hub back, uploads them. Catches: a token check skipped, a
    network error escaping as a traceback, a folder removed or half-written on failure."""
    space, model = tmp_path / 'space', tmp_path / 'model'
    args = ['export', small_ckpt, '--push-to-hub', 'alice/demo', '--hub-model', 'alice/demo-model',
            '--out', space, '--model-out', model]
    first = None
    for name, settings, own, says in failure_cases(hub.url, tmp_path):
        standin = own.start() if own is not None else hub
        url = settings.get('url', standin.url)
        in_process_hub(url, settings['token'])
        try:
            code, out, err = run_main(*args)
        finally:
            if own is not None:
                own.stop()
        assert code == 2 and len(err.splitlines()) == 1 and 'Traceback' not in err, (name, err)
        line = err.strip()
        assert line.startswith('error: ') and says in line and url in line, (name, line)
        assert 'alice/demo' in line and str(model) in line, (name, line)
        if name in ('no token', 'rejected token'):
            assert '`hf auth login`' in line and 'HF_TOKEN' in line and 'nothing was uploaded' in line
        if name == 'lost mid-upload':
            assert own.objects and not own.repos[('model', 'alice/demo-model')].commits  # LFS went up, no commit
        assert not any(hub.repos[k].commits for k in (('model', 'alice/demo-model'), ('space', 'alice/demo'))
                       if k in hub.repos), name
        files = snapshot(space), snapshot(model)
        first = first or files
        assert {k: v for k, v in files[1].items() if k != 'export.json'} == \
            {k: v for k, v in first[1].items() if k != 'export.json'}  # rewritten the same, never removed
        assert Predictor(model).predict(np.zeros((32, 32, 3), np.uint8)).label  # whole: it serves
    in_process_hub(hub.url, 'hf_alice')
    (model / 'notes.txt').write_text('mine, not the export\'s')  # stays local: only the listed files go up
    code, out, err = run_main(*args)
    assert code == 0, err
    got = hub.repo('model', 'alice/demo-model').files
    assert got['model.safetensors'] == (model / 'model.safetensors').read_bytes() and 'notes.txt' not in got


def test_saved_login_updates_existing_repos_and_bad_ids_stop_first(small_ckpt, hub, in_process_hub, tmp_path):
    """The token `hf auth login` saved (no HF_TOKEN) is used; publishing again updates the repos
    (a second commit, create_repo's "already exists" taken as fine), --private or not; a repo
    id that is not USER/NAME stops before anything is written."""
    in_process_hub(hub.url, None)
    token_file = tmp_path / 'hf-home' / 'token'
    token_file.parent.mkdir(parents=True)
    token_file.write_text('hf_alice\n')
    for _ in range(2):
        code, out, err = run_main('export', small_ckpt, '--hub-model', 'alice/again',
                                  '--model-out', tmp_path / 'model')
        assert code == 0, err
        assert f'model repository: {hub.url}/alice/again' in out.splitlines()
    assert len(hub.repo('model', 'alice/again').commits) == 2 and not hub.repo('model', 'alice/again').private
    for bad in ('just-a-name', 'alice/bad name', 'a/b/c'):
        code, _, err = run_main('export', small_ckpt, '--push-to-hub', bad, '--out', tmp_path / 'nothing')
        assert code == 2 and len(err.splitlines()) == 1 and f'--push-to-hub {bad!r}' in err, err
        assert not (tmp_path / 'nothing').exists()


@pytest.mark.parametrize('overrides, says', [
    ([], ['SGD (Nesterov) momentum 0.9, peak LR 0.4', 'linear schedule']),
    (['training.optimizer=adamw', 'training.lr=0.002', 'training.schedule=onecycle'],
     ['AdamW (betas [0.9, 0.999]), peak LR 0.002', 'onecycle schedule']),
    (['training.optimizer=muon', 'training.schedule=cosine'],
     ['Muon for the hidden conv weights (peak LR 0.02, momentum 0.95', 'and SGD (Nesterov) momentum 0.9, peak LR 0.4',
      'cosine schedule']),
])
def test_the_cards_recipe_names_the_runs_optimizer_and_schedule(overrides, says, tmp_path):
    """The card's recipe line from the checkpoint's config as the trainer saves it: the optimizer
    it trained with (not always SGD) and ``training.schedule`` (not the old ``lr_schedule``: every
    card said 'None schedule')."""
    from app.modelcard import RunInfo, model_card
    from training.config import load_config, to_dict
    ckpt = torch.load(make_test_checkpoint(tmp_path / 'm.pt'), weights_only=True)
    ckpt['config'] = to_dict(load_config('rn18', overrides))
    text = model_card(ckpt, RunInfo(), 'alice/m', files={})
    recipe = next(line for line in text.splitlines() if 'recipe' in line)
    assert all(s in recipe for s in says) and 'None' not in recipe, recipe
