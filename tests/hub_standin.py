"""A local HTTP server standing in for the Hugging Face Hub's API, as far as ``huggingface_hub``'s
``whoami``, ``create_repo`` and ``upload_folder`` use it (huggingface_hub 2.4, its plain
commit path: ``HF_HUB_DISABLE_XET=1``; with hf_xet the file contents would go to a xet storage
service this server does not speak). It keeps what it was sent, so a test can run what the Hub
received.

    hub = HubStandIn(tokens={'hf_alice': 'alice'}).start()     # hub.url -> http://127.0.0.1:PORT
    ... HF_ENDPOINT=hub.url ... upload ...
    hub.repos[('space', 'alice/demo')].files                   # {path: bytes} of its main branch
    hub.stop()

The calls it answers (read from huggingface_hub's hf_api.py, _commit_api.py and lfs.py):
  GET  /api/whoami-v2                                   the token's account (401 for unknown tokens)
  POST /api/repos/create                                {name, organization, type, sdk, visibility}
  POST /api/validate-yaml                               the README's YAML header, parsed for real
  POST /api/{type}s/{repo}/preupload/{rev}              per file: 'lfs' or 'regular' upload mode
  POST /{spaces/}{repo}.git/info/lfs/objects/batch      where to PUT each LFS object (and verify it)
  PUT  /lfs-objects/{oid}                               the object's bytes, checked against its sha256
  POST /lfs-verify/{oid}                                that the object arrived
  POST /api/{type}s/{repo}/commit/{rev}                 ndjson: header, file (base64), lfsFile, deleted*
  GET  /api/{type}s/{repo}[/revision/{rev}]             repo_info
Every call but the storage PUT needs ``Authorization: Bearer <token>`` of an account that owns
the namespace. ``drop`` (a path fragment) makes the server hang up on matching requests without
an answer, as a connection lost mid-upload; ``refuse`` ({fragment: (status, message)}) answers
them with an error.
"""
from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import yaml

# What the Hub's default .gitattributes routes through LFS (a subset: the types we upload)
LFS_PATTERNS = ('*.onnx', '*.safetensors', '*.pt', '*.pth', '*.bin', '*.png', '*.jpg', '*.npy', '*.gz')
REGULAR_MAX = 10 * 2**20  # larger files go through LFS whatever they are
TYPE_PREFIX = {'model': '', 'space': 'spaces/', 'dataset': 'datasets/'}


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool = False
    sdk: str | None = None
    files: dict[str, bytes] = field(default_factory=dict)
    commits: list[dict] = field(default_factory=list)  # {'oid', 'summary', 'added': [...], 'lfs': [...]}

    @property
    def sha(self) -> str:
        return self.commits[-1]['oid'] if self.commits else '0' * 40


class HubStandIn:
    def __init__(self, tokens: dict[str, str] | None = None, *, drop: str | None = None,
                 refuse: dict[str, tuple[int, str]] | None = None):
        self.tokens = dict(tokens or {})  # token -> account name
        self.drop, self.refuse = drop, dict(refuse or {})
        self.repos: dict[tuple[str, str], Repo] = {}
        self.objects: dict[str, bytes] = {}  # LFS storage: sha256 -> bytes
        self.calls: list[tuple[str, str, int]] = []  # (method, path, status)
        self.lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    # ------------------------------------------------------------------ life
    def start(self) -> 'HubStandIn':
        hub = self

        class Handler(_Handler):
            standin = hub
        self._server = ThreadingHTTPServer(('127.0.0.1', 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    @property
    def url(self) -> str:
        return f'http://127.0.0.1:{self._server.server_address[1]}'

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # ------------------------------------------------------------------ what it holds
    def repo(self, repo_type: str, repo_id: str) -> Repo:
        return self.repos[(repo_type, repo_id)]

    def write_out(self, repo_type: str, repo_id: str, folder) -> None:
        """The repository's files as a folder (what a clone of it would hold)."""
        from pathlib import Path
        for path, data in self.repo(repo_type, repo_id).files.items():
            target = Path(folder) / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)


def _is_lfs(path: str, size: int, sample: bytes) -> bool:
    return any(fnmatch.fnmatch(path, p) for p in LFS_PATTERNS) or size > REGULAR_MAX or b'\0' in sample


class _Handler(BaseHTTPRequestHandler):
    standin: HubStandIn
    protocol_version = 'HTTP/1.1'  # keep-alive, as httpx expects

    def log_message(self, *args):  # quiet: the test reads hub.calls instead
        pass

    # ------------------------------------------------------------------ plumbing
    def _body(self) -> bytes:
        if self.headers.get('Transfer-Encoding', '').lower() == 'chunked':
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b';')[0].strip() or b'0', 16)
                if size == 0:
                    while self.rfile.readline() not in (b'\r\n', b'\n', b''):
                        pass
                    return b''.join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get('Content-Length') or 0))

    def _send(self, status: int, payload=None, *, headers: dict | None = None) -> None:
        data = b'' if payload is None else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header('Content-Type', 'application/json')
        self.send_header('Content-Length', str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)
        with self.standin.lock:
            self.standin.calls.append((self.command, self.path, status))

    def _error(self, status: int, message: str, code: str | None = None) -> None:
        self._send(status, {'error': message}, headers={'X-Error-Code': code} if code else None)

    def _account(self) -> str | None:
        auth = self.headers.get('Authorization', '')
        return self.standin.tokens.get(auth[len('Bearer '):]) if auth.startswith('Bearer ') else None

    def _handle(self) -> None:
        hub, path = self.standin, self.path.split('?')[0]
        body = self._body()
        if hub.drop and hub.drop in path:  # a connection lost mid-request: no answer at all
            with hub.lock:
                hub.calls.append((self.command, self.path, 0))
            self.close_connection = True
            self.connection.shutdown(2)
            return
        for fragment, (status, message) in hub.refuse.items():
            if fragment in path:
                return self._error(status, message)
        if path == '/api/agent-harnesses':  # huggingface_hub's best-effort look-up: not served here
            return self._error(404, 'not served by the stand-in')
        if self.command == 'PUT' and path.startswith('/lfs-objects/'):  # storage: the URL is the credential
            return self._put_object(path.rsplit('/', 1)[1], body)
        account = self._account()
        if account is None:
            return self._error(401, 'Invalid credentials in Authorization header')
        if path == '/api/whoami-v2' and self.command == 'GET':
            return self._send(200, {'type': 'user', 'name': account, 'orgs': [],
                                    'auth': {'type': 'access_token', 'accessToken': {'role': 'write'}}})
        if path == '/api/repos/create' and self.command == 'POST':
            return self._create(account, json.loads(body))
        if path == '/api/validate-yaml' and self.command == 'POST':
            return self._validate_yaml(json.loads(body))
        if path.startswith('/lfs-verify/') and self.command == 'POST':
            oid = json.loads(body)['oid']
            return self._send(200, {}) if oid in hub.objects else self._error(404, f'object {oid} not found')
        if m := re.fullmatch(r'/(spaces/|datasets/)?([^/]+/[^/]+)\.git/info/lfs/objects/batch', path):
            return self._lfs_batch(account, {'spaces/': 'space', 'datasets/': 'dataset'}.get(m.group(1), 'model'),
                                   m.group(2), json.loads(body))
        if m := re.fullmatch(r'/api/(model|space|dataset)s/([^/]+/[^/]+)/(preupload|commit)/([^/]+)', path):
            repo = self._repo(account, m.group(1), m.group(2))
            if repo is None:
                return None
            return (self._preupload(repo, json.loads(body)) if m.group(3) == 'preupload'
                    else self._commit(repo, body))
        if m := re.fullmatch(r'/api/(model|space|dataset)s/([^/]+/[^/]+)(/revision/[^/]+)?', path):
            repo = self._repo(account, m.group(1), m.group(2), write=False)
            if repo is not None:
                self._send(200, {'id': repo.repo_id, 'sha': repo.sha, 'private': repo.private, 'sdk': repo.sdk,
                                 'siblings': [{'rfilename': p} for p in sorted(repo.files)]})
            return None
        return self._error(404, f'no such endpoint in the stand-in: {self.command} {path}')

    do_GET = do_POST = do_PUT = do_HEAD = _handle

    # ------------------------------------------------------------------ the API
    def _repo(self, account: str, repo_type: str, repo_id: str, *, write: bool = True) -> Repo | None:
        repo = self.standin.repos.get((repo_type, repo_id))
        if repo is None or (repo.private and repo_id.split('/')[0] != account):
            self._error(404, 'Repository not found', 'RepoNotFound')
            return None
        if write and repo_id.split('/')[0] != account:
            self._error(403, f'You don\'t have the rights to write to {repo_id}')
            return None
        return repo

    def _create(self, account: str, req: dict) -> None:
        repo_type = req.get('type') or 'model'
        namespace = req.get('organization') or account
        repo_id = f'{namespace}/{req["name"]}'
        url = f'{self.standin.url}/{TYPE_PREFIX[repo_type]}{repo_id}'
        if namespace != account:
            return self._error(403, f'You don\'t have the rights to create a {repo_type} under the namespace "{namespace}"')
        if repo_type == 'space' and req.get('sdk') not in ('gradio', 'docker', 'static', 'streamlit'):
            return self._error(400, 'Invalid sdk')
        with self.standin.lock:
            exists = (repo_type, repo_id) in self.standin.repos
            if not exists:
                self.standin.repos[(repo_type, repo_id)] = self._new_repo(repo_type, repo_id, req)
        if exists:
            return self._send(409, {'error': f'You already created this {repo_type} repo', 'url': url})
        return self._send(200, {'url': url, 'name': repo_id, 'id': repo_id})

    @staticmethod
    def _new_repo(repo_type: str, repo_id: str, req: dict) -> Repo:
        """A new repository as the Hub makes one: with a .gitattributes routing binaries to LFS."""
        repo = Repo(repo_type, repo_id, private=req.get('visibility') == 'private' or bool(req.get('private')),
                    sdk=req.get('sdk'))
        repo.files['.gitattributes'] = ''.join(f'{p} filter=lfs diff=lfs merge=lfs -text\n'
                                               for p in LFS_PATTERNS).encode()
        return repo

    def _validate_yaml(self, req: dict) -> None:
        text = req.get('content', '')
        if not text.startswith('---\n'):
            return self._send(200, {'errors': [], 'warnings': [{'message': 'empty or missing yaml metadata'}]})
        try:
            meta = yaml.safe_load(text.split('---\n')[1])
            if not isinstance(meta, dict):
                raise ValueError('the metadata is not a mapping')
        except (yaml.YAMLError, ValueError) as e:
            return self._send(400, {'errors': [{'message': f'Invalid YAML: {e}'}], 'warnings': []})
        return self._send(200, {'errors': [], 'warnings': []})

    def _preupload(self, repo: Repo, req: dict) -> None:
        files = []
        for f in req['files']:
            sample = base64.b64decode(f.get('sample', ''))
            files.append({'path': f['path'], 'uploadMode': 'lfs' if _is_lfs(f['path'], f['size'], sample) else 'regular',
                          'shouldIgnore': False, 'oid': None})
        return self._send(200, {'files': files, 'commitOid': repo.sha})

    def _lfs_batch(self, account: str, repo_type: str, repo_id: str, req: dict) -> None:
        if self._repo(account, repo_type, repo_id) is None:
            return None
        base, objects = self.standin.url, []
        for o in req['objects']:
            entry = {'oid': o['oid'], 'size': o['size'], 'authenticated': True}
            if o['oid'] not in self.standin.objects:
                entry['actions'] = {'upload': {'href': f'{base}/lfs-objects/{o["oid"]}'},
                                    'verify': {'href': f'{base}/lfs-verify/{o["oid"]}'}}
            objects.append(entry)
        return self._send(200, {'transfer': 'basic', 'objects': objects, 'hash_algo': 'sha256'})

    def _put_object(self, oid: str, data: bytes) -> None:
        if hashlib.sha256(data).hexdigest() != oid:
            return self._error(400, f'sha256 of the body is not {oid}')
        with self.standin.lock:
            self.standin.objects[oid] = data
        return self._send(200)

    def _commit(self, repo: Repo, body: bytes) -> None:
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        header = next((x['value'] for x in lines if x['key'] == 'header'), {})
        files, added, lfs = dict(repo.files), [], []
        for item in lines:
            key, value = item['key'], item['value']
            if key == 'file':
                files[value['path']] = base64.b64decode(value['content'])
                added.append(value['path'])
            elif key == 'lfsFile':
                if value['oid'] not in self.standin.objects:
                    return self._error(400, f'LFS object {value["oid"]} of {value["path"]} was never uploaded')
                files[value['path']] = self.standin.objects[value['oid']]
                added.append(value['path'])
                lfs.append(value['path'])
            elif key == 'deletedFile':
                files.pop(value['path'], None)
            elif key == 'deletedFolder':
                files = {p: d for p, d in files.items() if not p.startswith(value['path'].rstrip('/') + '/')}
        oid = hashlib.sha1(json.dumps(sorted((p, hashlib.sha256(d).hexdigest()) for p, d in files.items())).encode()
                           + repo.sha.encode()).hexdigest()
        with self.standin.lock:
            repo.files = files
            repo.commits.append({'oid': oid, 'summary': header.get('summary'), 'added': added, 'lfs': lfs})
        url = f'{self.standin.url}/{TYPE_PREFIX[repo.repo_type]}{repo.repo_id}/commit/{oid}'
        return self._send(200, {'success': True, 'commitOid': oid, 'commitUrl': url, 'hookOutput': ''})
