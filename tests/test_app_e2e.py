"""End-to-end tests of the Gradio app: real servers on 127.0.0.1, driven by a headless
browser (Debian's chromium + chromedriver through selenium) and by gradio_client, plus the
200-request load test at concurrency 8, the no-checkpoint page and the exported Space folders.

Two servers are shared by the module: the repository's ``app/app.py`` in its default mode
(``torch.compile``d model: the test run pays 10-40 s of compilation once), and the folder
``scripts/export.py --onnx --space`` writes, started with ``import torch`` made impossible.

    .venv/bin/python -m pytest tests/test_app_e2e.py      # ~45 s on the 2-core CPU

Browser tests skip (with the reason) when selenium, /usr/bin/chromium or /usr/bin/chromedriver
is missing; selenium-manager is never used (it would try to download a driver).
"""
from __future__ import annotations

import json
import shutil
import tempfile
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app.export import export
from app.loadtest import launch_in_thread, run_load, serve_app
from app.predictor import Predictor
from conftest import ROOT, run_main

NO_COMPILE = {'COMPILE_MODEL': '0'}  # for the apps started only to check one thing
# The load test's floors, chosen from measurements on the 2-core EPYC (docs/BENCHMARKS.md
# "Export / ONNX"): idle, 200 requests at concurrency 8 run at 25-47 req/s (torch eager to
# ONNX Runtime) with p95 0.23-0.47 s; with two CPU-bound processes competing for both cores,
# 11-19 req/s (torch eager) and 13-28 req/s (ONNX), p95 0.34-0.93 s. The floors sit at about
# half the worst contended figures, so a busy CI machine passes while a per-request stall of
# >= ~150 ms (a model reload, a recompile, a sleep) or a request stuck for seconds fails.
MIN_THROUGHPUT_RPS = 6.0
MAX_P95_MS = 3000.0

CHROMIUM, CHROMEDRIVER = Path('/usr/bin/chromium'), Path('/usr/bin/chromedriver')
TRAIN_HINT = 'python scripts/train.py --config rn18.yaml'


@pytest.fixture(scope='module')
def ckpt(full_size_ckpt) -> Path:
    return full_size_ckpt


@pytest.fixture(scope='module')
def reference(ckpt) -> Predictor:
    """The same checkpoint in this process, to know what the page should show."""
    return Predictor(ckpt)


@pytest.fixture(scope='module')
def images(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp('upload')
    rng = np.random.default_rng(0)
    out = {}
    for i in range(4):
        out[f'good{i}'] = d / f'good{i}.png'
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(out[f'good{i}'])
    out['photo'] = d / 'photo.jpg'
    Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)).save(out['photo'])
    out['corrupt'] = d / 'corrupt.png'
    out['corrupt'].write_bytes(b'\x89PNG\r\n\x1a\n' + b'definitely not image data' * 40)
    out['empty'] = d / 'empty.png'
    out['empty'].write_bytes(b'')
    out['text'] = d / 'notes.txt'
    out['text'].write_text('hello, I am not an image\n')
    out['huge'] = d / 'huge.png'
    Image.new('1', (10000, 10000)).save(out['huge'])  # 100 MP, 12 kB
    out['anim'] = d / 'anim.gif'
    frames = [Image.fromarray(np.full((40, 40, 3), c, np.uint8)) for c in (0, 128, 255)]
    frames[0].save(out['anim'], save_all=True, append_images=frames[1:], duration=100, loop=0)
    return out


@pytest.fixture(scope='module')
def app_url(ckpt):
    """The repository's app as `python app/app.py --checkpoint X` runs it: its default mode,
    which compiles the model (COMPILE_MODEL unset). Up to 5 minutes: a cold compile cache."""
    with serve_app(ckpt, env={'COMPILE_MODEL': None}, timeout=300) as url:
        yield url


@pytest.fixture(scope='module')
def torch_blocker(tmp_path_factory) -> Path:
    """A folder to put first on PYTHONPATH: its sitecustomize makes `import torch` fail."""
    d = tmp_path_factory.mktemp('no_torch')
    (d / 'sitecustomize.py').write_text(
        "import sys\nsys.modules['torch'] = None  # importing torch now raises ImportError\n")
    return d


@pytest.fixture(scope='module')
def onnx_space(ckpt, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp('spaces') / 'onnx-space'
    export(ckpt, out, onnx=True, space=True, log=lambda *_: None)
    return out


@pytest.fixture(scope='module')
def space_url(onnx_space, torch_blocker):
    """The exported --onnx --space folder run as a Space runs it (`python app.py`, no
    arguments), in an interpreter where torch cannot be imported."""
    env = {'PYTHONPATH': str(torch_blocker), 'MODEL_PATH': ''}
    with serve_app(None, app_file=onnx_space / 'app.py', env=env) as url:
        yield url


@pytest.fixture(params=['repo-app', 'onnx-space'])
def served(request) -> str:
    """The browser tests run against both servers."""
    return request.getfixturevalue({'repo-app': 'app_url', 'onnx-space': 'space_url'}[request.param])


def make_client(url):
    import ssl
    from gradio_client import Client
    return Client(url, verbose=False, download_files=False, analytics_enabled=False,
                  ssl_verify=ssl.create_default_context())  # see app.loadtest.run_load


# --------------------------------------------------------------------------- browser

@pytest.fixture(scope='module')
def browser():
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip('selenium is not installed (pip install selenium)')
    for exe in (CHROMIUM, CHROMEDRIVER):
        if not exe.is_file():
            pytest.skip(f'{exe} not found (apt-get install chromium chromium-driver)')
    profile = tempfile.mkdtemp(prefix='chromium-profile-')
    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for arg in ('--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
                '--disable-background-networking', '--disable-component-update', '--disable-sync',
                f'--user-data-dir={profile}', '--window-size=1280,1600'):
        opts.add_argument(arg)
    # an explicit driver path: selenium-manager is never asked to download anything
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=opts)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def open_page(driver, url):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait
    driver.get(url)
    WebDriverWait(driver, 60).until(
        EC.presence_of_element_located((By.CSS_SELECTOR, '#image input[type=file]')))


def upload(driver, path: Path):
    from selenium.webdriver.common.by import By
    driver.find_element(By.CSS_SELECTOR, '#image input[type=file]').send_keys(str(path))


def shown_labels(driver) -> list[str]:
    from selenium.webdriver.common.by import By
    return [e.text for e in driver.find_elements(
        By.CSS_SELECTOR, '#top5 [data-testid$="-confidence-set"] dt')]


def wait_for(driver, cond, timeout=60):
    from selenium.webdriver.support.ui import WebDriverWait
    return WebDriverWait(driver, timeout, poll_frequency=0.2).until(lambda d: cond(d))


def text_of(driver, elem_id: str) -> str:
    from selenium.webdriver.common.by import By
    return driver.find_element(By.ID, elem_id).text


def test_browser_upload_shows_top5(served, browser, reference, images):
    open_page(browser, served)
    panel = text_of(browser, 'model-info')
    assert 'resnet18' in panel and '11,220,132' in panel and '75.12%' in panel and '13m 32s' in panel
    upload(browser, images['photo'])
    labels = wait_for(browser, lambda d: (lambda ls: ls if len(ls) == 5 else None)(shown_labels(d)))
    expect = reference.predict(images['photo'], topk=5)
    assert labels == [n for n, _ in expect.classes]  # the five, in descending order
    assert f'Superclass: {expect.superclass}' in text_of(browser, 'superclass')


def test_browser_bad_upload_shows_message_and_app_keeps_serving(served, browser, reference, images):
    open_page(browser, served)
    upload(browser, images['corrupt'])
    status = wait_for(browser, lambda d: text_of(d, 'status') or None)
    assert 'Could not classify this image' in status and 'corrupt.png: corrupt or unreadable' in status
    assert shown_labels(browser) == []
    open_page(browser, served)  # a new visitor: the server is still up and answering
    upload(browser, images['good1'])
    labels = wait_for(browser, lambda d: (lambda ls: ls if len(ls) == 5 else None)(shown_labels(d)))
    assert labels == [n for n, _ in reference.predict(images['good1']).classes]
    assert text_of(browser, 'status') == ''


# --------------------------------------------------------------------------- API and load

def test_bad_inputs_through_the_api_give_messages(app_url, images, reference):
    client = make_client(app_url)
    expected = {'corrupt': 'corrupt.png: corrupt or unreadable', 'empty': 'empty.png: the file is empty',
                'text': 'notes.txt: not an image',
                'huge': 'huge.png: 10000x10000 pixels (100 megapixels) is too large'}
    from gradio_client import handle_file
    for key, msg in expected.items():
        label, sup, status = client.predict(handle_file(images[key]), api_name='/predict')
        assert 'Could not classify this image' in status and msg in status, (key, status)
        assert not (label or {}).get('confidences') and sup == ''
    label, sup, status = client.predict(handle_file(images['anim']), api_name='/predict')
    assert len(label['confidences']) == 5
    assert 'animated image: classified the first frame' in status
    label, _, status = client.predict(handle_file(images['good2']), api_name='/predict')
    assert [c['label'] for c in label['confidences']] == \
        [n for n, _ in reference.predict(images['good2']).classes]
    assert status == ''
    client.close()


def test_app_default_mode_compiles_and_predicts(app_url, reference, images):
    """The app as started without COMPILE_MODEL=0 serves a torch.compile'd model (the model
    panel says so) and its top-5 match the eager model's. Catches: the default turned off,
    or a compile failure silently falling back to eager."""
    with urllib.request.urlopen(app_url + '/config', timeout=10) as r:
        config = r.read().decode()
    assert 'BatchNorm folded, compiled' in config
    client = make_client(app_url)
    from gradio_client import handle_file
    for key in ('good0', 'photo'):
        label, _, _ = client.predict(handle_file(images[key]), api_name='/predict')
        assert [c['label'] for c in label['confidences']] == \
            [n for n, _ in reference.predict(images[key]).classes]
    client.close()


def test_load_200_predictions_at_concurrency_8(app_url, images):
    """200 requests at concurrency 8: no errors, at least MIN_THROUGHPUT_RPS and p95 within
    MAX_P95_MS (how they were chosen: top of this file). Catches: a per-request stall (a
    0.2 s sleep in the handler: ~4 req/s), or a queue that drops requests."""
    goods = [str(images[f'good{i}']) for i in range(4)]
    result = run_load(app_url, goods, n=200, concurrency=8)
    print(f"\nload test: {result['n']} requests, concurrency {result['concurrency']}: "
          f"{result['errors']} errors, p50 {result['p50_ms']} ms, p95 {result['p95_ms']} ms, "
          f"{result['throughput_rps']} req/s")
    assert result['errors'] == 0, result['error_examples']
    assert result['throughput_rps'] >= MIN_THROUGHPUT_RPS, result
    assert result['p95_ms'] <= MAX_P95_MS, result


def test_loadtest_script_writes_json(app_url, images, tmp_path):
    out = tmp_path / 'lt.json'
    code, stdout, err = run_main('loadtest_app', '--url', app_url, '-n', '16', '--concurrency', '4',
                                 '--images', images['good0'], '--out', out)
    assert code == 0, err
    assert '16 requests at concurrency 4: 0 errors' in stdout
    data = json.loads(out.read_text())
    assert data['errors'] == 0 and data['n'] == 16 and data['p50_ms'] <= data['p95_ms']


# --------------------------------------------------------------------------- no model, CLI, Space

@pytest.fixture
def first_port_taken(monkeypatch):
    """The next free_port() returns a port another socket is listening on (what losing the
    race between picking a port and binding it looks like), later ones are really free."""
    import socket
    import app.loadtest as loadtest
    real = loadtest.free_port
    holder = socket.socket()
    holder.bind(('127.0.0.1', 0))
    holder.listen()
    ports = [holder.getsockname()[1]]
    monkeypatch.setattr(loadtest, 'free_port', lambda host='127.0.0.1': ports.pop() if ports else real(host))
    yield holder.getsockname()[1]
    holder.close()


def test_app_main_without_any_model_says_how_to_train(tmp_path, torch_blocker, first_port_taken):
    """`python app.py` with no --checkpoint, no MODEL_PATH, no model beside it and no runs/:
    it starts, the page and every prediction say how to train one. Catches: main() crashing
    (or exiting) when resolve_checkpoint finds nothing. Its first port is taken: serve_app
    must start it again on another (catches: no retry on a lost free-port race)."""
    from app.export import MODEL_FILES, SPACE_MODULES
    bare = tmp_path / 'bare'
    (bare / 'model').mkdir(parents=True)
    for name in SPACE_MODULES['common'] + SPACE_MODULES['onnx'] + SPACE_MODULES['torch']:
        shutil.copy(ROOT / 'app' / name, bare / name)
    for name in MODEL_FILES['onnx']:  # the shared facts every Space holds (no torch)
        shutil.copy(ROOT / 'model' / name, bare / 'model' / name)
    env = {'MODEL_PATH': '', 'PYTHONPATH': str(torch_blocker)}  # torch: not needed, not loaded
    with serve_app(None, app_file=bare / 'app.py', env=env) as url:
        assert not url.endswith(f':{first_port_taken}')
        with urllib.request.urlopen(url + '/config', timeout=10) as r:
            config = r.read().decode()
        assert 'No trained model found' in config and TRAIN_HINT in config
        client = make_client(url)
        from gradio_client import handle_file
        label, _, status = client.predict(handle_file(str(ROOT / 'app' / 'README.md')),
                                          api_name='/predict')
        assert 'No model loaded' in status and TRAIN_HINT in status
        client.close()


def test_without_checkpoint_in_the_browser(browser, first_port_taken):
    """In process, on a second try: the first port launch_in_thread picks is taken."""
    from app.app import build_app
    from selenium.webdriver.common.by import By
    demo = build_app(None, examples=[])
    url = launch_in_thread(demo)
    assert not url.endswith(f':{first_port_taken}')
    try:
        open_page(browser, url)
        text = browser.find_element(By.ID, 'no-model').text
        assert 'No trained model found' in text and TRAIN_HINT in text
    finally:
        demo.close()


def test_app_bad_model_file_is_a_one_line_error(tmp_path, capsys):
    from app.app import main
    corrupt = tmp_path / 'corrupt.onnx'
    corrupt.write_bytes(b'\x08\x07 not an onnx model' * 30)
    for path, msg in ((tmp_path / 'missing.pt', 'no such checkpoint file'),
                      (corrupt, 'not a readable ONNX model')):
        assert main(['--checkpoint', str(path), '--no-compile']) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f'error: {path}: {msg}') and len(err.splitlines()) == 1, err


def test_app_options_and_examples(tmp_path, monkeypatch):
    from app.app import build_app, find_examples, parse_args
    monkeypatch.delenv('GRADIO_SERVER_NAME', raising=False)
    monkeypatch.delenv('GRADIO_SERVER_PORT', raising=False)
    args = parse_args([])
    assert (args.host, args.port, args.checkpoint) == ('127.0.0.1', 7860, None)
    args = parse_args(['--host', '0.0.0.0', '--port', '8080', '--checkpoint', 'x.pt'])
    assert (args.host, args.port, args.checkpoint) == ('0.0.0.0', 8080, 'x.pt')
    monkeypatch.setenv('GRADIO_SERVER_NAME', '0.0.0.0')  # what a Space sets
    assert parse_args([]).host == '0.0.0.0'
    empty, full = tmp_path / 'a', tmp_path / 'b'
    empty.mkdir(), full.mkdir()
    for i in range(3):
        Image.new('RGB', (32, 32)).save(full / f'0000{i}_apple.png')
    found = find_examples([empty, full])
    assert [Path(f).name for f in found] == [f'0000{i}_apple.png' for i in range(3)]
    types = [c['type'] for c in build_app(None, examples=found).config['components']]
    assert 'dataset' in types  # the examples gallery
    types = [c['type'] for c in build_app(None, examples=[]).config['components']]
    assert 'dataset' not in types


def test_load_predictor_explicit_vs_implicit(tmp_path, monkeypatch, ckpt):
    from app.app import load_predictor
    from app.predictor import ModelFileError
    garbage = tmp_path / 'garbage.pt'
    garbage.write_bytes(b'not a checkpoint')
    with pytest.raises(ModelFileError, match='not a readable checkpoint'):
        load_predictor(str(garbage))  # --checkpoint: fail fast (exit 2 in main)
    monkeypatch.setenv('MODEL_PATH', str(garbage))  # found implicitly: serve, and say why not
    predictor, problem = load_predictor(None)
    assert predictor is None and 'could not be loaded' in problem and TRAIN_HINT in problem
    monkeypatch.setenv('MODEL_PATH', str(ckpt))
    predictor, problem = load_predictor(None)
    assert problem is None and predictor.path == ckpt and predictor.backend.name == 'torch'


def test_uploaded_file_payloads(tmp_path):
    import base64
    from app.app import uploaded_file
    from app.predictor import ImageError
    assert uploaded_file(None) == (None, '')
    assert uploaded_file({'path': '/tmp/gradio/abc/cat.png', 'orig_name': 'my cat.png'}) == \
        ('/tmp/gradio/abc/cat.png', 'my cat.png')
    assert uploaded_file({'path': '/tmp/gradio/abc/cat.png'}) == ('/tmp/gradio/abc/cat.png', 'cat.png')
    assert uploaded_file('/x/y.jpg') == ('/x/y.jpg', 'y.jpg')
    data = b'\x89PNG fake'
    url = 'data:image/png;base64,' + base64.b64encode(data).decode()
    assert uploaded_file({'path': None, 'url': url}) == (data, 'pasted image')
    with pytest.raises(ImageError, match='invalid base64'):
        uploaded_file({'path': None, 'url': 'data:image/png;base64,@@@'})
    with pytest.raises(ImageError, match='no file'):
        uploaded_file({'path': None, 'url': None})


def test_exported_torch_space_runs_on_its_own(tmp_path, ckpt, images, reference):
    """The folder `scripts/export.py --space` writes (app modules, model/, model.pt) started as
    a Space starts it: `python app.py`, no arguments, nothing from the repository on the path."""
    space = tmp_path / 'space'
    export(ckpt, space, space=True, log=lambda *_: None)
    assert (space / 'model' / 'checkpoint.py').is_file() and not (space / 'model.onnx').exists()
    env = {'MODEL_PATH': '', 'PYTHONPATH': '', **NO_COMPILE}
    with serve_app(None, app_file=space / 'app.py', env=env) as url:
        client = make_client(url)
        from gradio_client import handle_file
        label, _, _ = client.predict(handle_file(images['good3']), api_name='/predict')
        assert [c['label'] for c in label['confidences']] == \
            [n for n, _ in reference.predict(images['good3']).classes]
        client.close()


def test_exported_onnx_space_needs_no_torch(onnx_space, space_url, images, reference):
    """The --onnx --space folder holds no torch code and no model.pt, its requirements name no
    torch, and (served with torch unimportable) it predicts what the torch model predicts."""
    names = {p.name for p in onnx_space.iterdir()}
    assert {'app.py', 'predictor.py', 'model.onnx', 'requirements.txt', 'README.md'} <= names
    assert not names & {'model.pt', 'torch_backend.py', 'export.py', 'loadtest.py'}
    assert sorted(p.name for p in (onnx_space / 'model').iterdir()) == ['__init__.py', 'errors.py', 'project.py']
    reqs = (onnx_space / 'requirements.txt').read_text()
    pins = [line for line in reqs.splitlines() if '==' in line and not line.startswith('#')]
    assert 'onnxruntime==1.32.0' in pins and not any(p.startswith('torch') for p in pins)
    assert (onnx_space / 'README.md').read_text().startswith('---\ntitle: ')
    client = make_client(space_url)
    from gradio_client import handle_file
    label, _, _ = client.predict(handle_file(images['photo']), api_name='/predict')
    assert [c['label'] for c in label['confidences']] == \
        [n for n, _ in reference.predict(images['photo']).classes]
    with urllib.request.urlopen(space_url + '/config', timeout=10) as r:
        assert 'ONNX Runtime' in r.read().decode()
    client.close()
