"""Downloads by name from a loopback Hub (the `resolve` endpoint plus a second host for large files): cache layout,
transformers reading that cache, tokens, resume, checksums, revisions, processes downloading at once, a hostile
mirror, a full disk, and every failure's message."""
import contextlib
import errno
import hashlib
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.error import URLError
from urllib.parse import unquote, urlsplit

import pytest
import torch
import transformers

import minbert
import minbert.hub
from minbert.loading import CheckpointError, default_model, hf_cache_dir, repo_cache_dir
from conftest import TINY, VOCAB, random_batch
from test_model import assert_close_on_tokens, hf_config

REPO = "org/tiny"
TOKEN = "hf_loopback_secret"
LARGE = (".safetensors", ".bin")  # served like LFS files: a redirect to the storage host


def git_sha1(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def sha256(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


class Server:
    """A ThreadingHTTPServer on 127.0.0.1:<free port> that records every request and lets `answer(handler)` reply."""

    def __init__(self, answer):
        self.requests: list[tuple[str, str, dict]] = []  # (method, path, headers)
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests.append((self.command, self.path, dict(self.headers)))
                answer(self)

            do_HEAD = do_GET

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True).start()  # quick shutdown

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def reply(handler: BaseHTTPRequestHandler, status: int, headers: dict, body: bytes = b"", cut: int | None = None,
          pace: float = 0.0):
    """Status, headers (None: left out) and (for a GET) the body, in ten pieces `pace` seconds apart; `cut` sends
    only that many bytes, then the connection closes. A client that hangs up ends the reply."""
    handler.send_response(status)
    for key, value in {"Content-Length": len(body), **headers}.items():
        if value is not None:
            handler.send_header(key, str(value))
    handler.end_headers()
    if handler.command == "GET":
        body = body[:cut]
        step = max(1, -(-len(body) // 10))  # ten pieces
        try:
            for start in range(0, len(body), step):
                handler.wfile.write(body[start:start + step])
                handler.wfile.flush()
                time.sleep(pace)
        except ConnectionError:
            pass


class FakeHub:
    """The Hub's resolve endpoint: small files answered with their git-SHA-1 ETag, large ones with X-Linked-Etag and
    a 302 to a second server (another port) that serves them with Range support; 404 for missing files and repos,
    401 for a private repo without the token, 307 for a renamed repo. `tamper` makes it a broken or hostile mirror."""

    def __init__(self):
        self.trees: dict[tuple[str, str], dict[str, bytes]] = {}  # (repo, commit) -> files
        self.refs: dict[tuple[str, str], str] = {}  # (repo, branch or tag) -> commit
        self.private: set[str] = set()
        self.renamed: dict[str, str] = {}
        self.corrupt: set[str] = set()  # file names served with one byte flipped
        self.drop_once = False  # the storage host closes the connection halfway through the next full download
        self.ignore_range = False  # the storage host answers every GET with 200 and the whole file
        self.pace = 0.0  # seconds between the ten pieces of a body from the storage host
        self.tamper = None  # (host "hub" or "storage", headers, body) -> (headers, body) it sends instead
        self.hub, self.storage = Server(self.answer_hub), Server(self.answer_storage)
        self.url = self.hub.url

    def add(self, repo: str, files: dict[str, bytes], revision: str = "main") -> str:
        commit = hashlib.sha1(f"{repo}@{revision}".encode()).hexdigest()
        self.trees[repo, commit], self.refs[repo, revision] = files, commit
        return commit

    def body(self, filename: str, content: bytes) -> bytes:
        return bytes([content[0] ^ 1]) + content[1:] if filename in self.corrupt else content

    def answer_hub(self, h: BaseHTTPRequestHandler) -> None:
        repo, revision, filename = re.fullmatch(r"/(.+)/resolve/([^/]+)/(.+)", urlsplit(h.path).path).groups()
        revision = unquote(revision)
        if repo in self.renamed:
            return self.reply("hub", h, 307, {"Location": f"/{self.renamed[repo]}/resolve/{revision}/{filename}"})
        if repo in self.private and h.headers.get("Authorization") != f"Bearer {TOKEN}":
            return self.reply("hub", h, 401, {"X-Error-Code": "RepositoryNotFound"})
        commit = self.refs.get((repo, revision), revision)
        if (repo, commit) not in self.trees:
            return self.reply("hub", h, 404, {"X-Error-Code": "RepositoryNotFound"})
        content = self.trees[repo, commit].get(filename)
        if content is None:
            return self.reply("hub", h, 404, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": commit})
        if filename.endswith(LARGE):
            return self.reply("hub", h, 302, {"X-Repo-Commit": commit, "X-Linked-Etag": f'"{sha256(content)}"',
                                              "X-Linked-Size": len(content),
                                              "Location": f"{self.storage.url}/{repo}/{commit}/{filename}?signature=x"})
        weak = "W/" if filename.endswith(".txt") else ""  # the Hub may mark an ETag as weak
        self.reply("hub", h, 200, {"X-Repo-Commit": commit, "ETag": f'{weak}"{git_sha1(content)}"'},
                   self.body(filename, content))

    def answer_storage(self, h: BaseHTTPRequestHandler) -> None:
        repo, commit, filename = urlsplit(h.path).path[1:].rsplit("/", 2)
        content = self.body(filename, self.trees[repo, commit][filename])
        start = 0 if self.ignore_range else int(re.fullmatch(r"bytes=(\d+)-", h.headers.get("Range", "bytes=0-"))[1])
        headers = {"Content-Range": f"bytes {start}-{len(content) - 1}/{len(content)}"} if start else {}
        cut = len(content) // 2 if self.drop_once and not start else None  # Content-Length says all, the body stops
        self.drop_once = self.drop_once and cut is None
        self.reply("storage", h, 206 if start else 200, headers, content[start:], cut)

    def reply(self, host: str, h: BaseHTTPRequestHandler, status: int, headers: dict, body: bytes = b"",
              cut: int | None = None) -> None:
        if self.tamper:
            headers, body = self.tamper(host, {"Content-Length": len(body), **headers}, body)
        reply(h, status, headers, body, cut, self.pace if host == "storage" else 0.0)

    def requests(self) -> list[tuple[str, str, dict]]:
        return self.hub.requests + self.storage.requests

    def close(self):
        self.hub.close()
        self.storage.close()


@pytest.fixture(scope="module")
def hf_model() -> transformers.BertModel:
    torch.manual_seed(5)
    return transformers.BertModel(hf_config()).eval()


@pytest.fixture(scope="module")
def checkpoint(hf_model, tmp_path_factory) -> dict[str, bytes]:
    """The files of a Hub BERT repo: transformers' config.json and model.safetensors, plus a vocab.txt."""
    directory = tmp_path_factory.mktemp("hub-files")
    hf_model.save_pretrained(directory)
    (directory / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    return {f: (directory / f).read_bytes() for f in ("config.json", "model.safetensors", "vocab.txt")}


@pytest.fixture
def hub(tmp_path, monkeypatch, checkpoint):
    """A loopback Hub serving REPO, with HF_HOME in tmp_path, HF_ENDPOINT at the Hub and no token or offline mode."""
    fake = FakeHub()
    fake.add(REPO, checkpoint)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_ENDPOINT", fake.url)
    for name in ("HF_HUB_CACHE", "HF_TOKEN", "HF_TOKEN_PATH", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    yield fake
    fake.close()


class Hung(BaseException):
    """What `deadline` raises: a BaseException, so that no except clause of the library takes it for its own."""


@contextlib.contextmanager
def deadline(seconds: float):
    """Raise Hung in the block once it has run for `seconds` (SIGALRM: the main thread only)."""
    def hung(signum, frame):
        raise Hung(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def python(code: str, **kwargs) -> subprocess.Popen:
    """A child Python running `code` with this process's environment (the fixture's HF_* variables)."""
    path = os.pathsep.join(filter(None, [str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    return subprocess.Popen([sys.executable, "-c", code], env=env, text=True, **kwargs)


def assert_matches(model: minbert.BertModel, hf_model) -> None:
    batch = random_batch(TINY["vocab_size"])
    with torch.no_grad():
        assert_close_on_tokens(model(**batch), hf_model(**batch), batch["attention_mask"])


def snapshot_of(repo: str, commit: str) -> Path:
    return repo_cache_dir(repo) / "snapshots" / commit


def test_download_then_load_matches_transformers(hub, hf_model, capsys):
    assert_matches(minbert.BertModel.from_pretrained(REPO), hf_model)
    assert re.search(r"model\.safetensors: 100%.*B/s", capsys.readouterr().err)  # a progress bar for the large file
    tok = minbert.Tokenizer.from_pretrained(REPO)
    assert tok.convert_ids_to_tokens(tok(["the dog plays"])["input_ids"][0].tolist()) == \
        ["[CLS]", "the", "dog", "plays", "[SEP]"]
    with pytest.warns(UserWarning, match="no masked-LM head"):
        minbert.BertForMaskedLM.from_pretrained(REPO)


def test_second_load_makes_no_request(hub, hf_model):
    minbert.BertModel.from_pretrained(REPO)
    seen = len(hub.requests())
    assert_matches(minbert.BertModel.from_pretrained(REPO), hf_model)
    minbert.Tokenizer.from_pretrained(REPO)
    assert len(hub.requests()) == seen


@pytest.mark.parametrize("cache_env", ["HF_HOME", "HF_HUB_CACHE"])
def test_cache_layout_is_hugging_faces(hub, checkpoint, monkeypatch, tmp_path, cache_env):
    if cache_env == "HF_HUB_CACHE":
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    minbert.BertModel.from_pretrained(REPO)
    commit = hub.refs[REPO, "main"]
    folder = (tmp_path / "hf" / "hub" if cache_env == "HF_HOME" else tmp_path / "hub-cache") / "models--org--tiny"
    etags = {"config.json": git_sha1(checkpoint["config.json"]), "vocab.txt": git_sha1(checkpoint["vocab.txt"]),
             "model.safetensors": sha256(checkpoint["model.safetensors"])}
    assert sorted(p.name for p in (folder / "blobs").iterdir()) == sorted(etags.values())
    for filename, etag in etags.items():
        assert os.readlink(folder / "snapshots" / commit / filename) == f"../../blobs/{etag}"
        assert (folder / "blobs" / etag).read_bytes() == checkpoint[filename]
    assert sorted(p.name for p in (folder / "snapshots").iterdir()) == [commit]
    assert (folder / "refs" / "main").read_text() == commit
    assert sorted(p.name for p in (folder / ".no_exist" / commit).iterdir()) == ["tokenizer.json",
                                                                                "tokenizer_config.json"]


def test_partial_snapshot_gets_only_what_is_missing(hub, checkpoint):
    """A cache transformers filled for a tokenizer (config.json, vocab.txt): the tokenizer loads offline, the model
    downloads its weights into the same snapshot."""
    commit = hub.refs[REPO, "main"]
    snapshot = snapshot_of(REPO, commit)
    snapshot.mkdir(parents=True)
    for filename in ("config.json", "vocab.txt"):
        (snapshot / filename).write_bytes(checkpoint[filename])
    (repo_cache_dir(REPO) / "refs").mkdir()
    (repo_cache_dir(REPO) / "refs" / "main").write_text(commit)
    minbert.Tokenizer.from_pretrained(REPO)
    assert hub.requests() == []
    minbert.BertModel.from_pretrained(REPO)
    assert [p for m, p, _ in hub.hub.requests if m == "GET"] == [f"/{REPO}/resolve/{commit}/model.safetensors"]
    assert os.readlink(snapshot / "model.safetensors") == f"../../blobs/{sha256(checkpoint['model.safetensors'])}"


def test_transformers_loads_the_cache_minbert_filled(hub, hf_model, monkeypatch):
    ours = minbert.BertModel.from_pretrained(REPO)
    seen = len(hub.requests())
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    theirs = transformers.BertModel.from_pretrained(REPO, cache_dir=hf_cache_dir(), local_files_only=True).eval()
    assert_matches(ours, theirs)
    assert_matches(minbert.BertModel.from_pretrained(REPO), hf_model)  # offline with the cache filled works
    assert len(hub.requests()) == seen


def test_token_goes_to_the_hub_and_never_to_the_storage_host(hub, monkeypatch, hf_model):
    hub.private.add(REPO)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert_matches(minbert.BertModel.from_pretrained(REPO), hf_model)
    assert hub.hub.requests and all(h.get("Authorization") == f"Bearer {TOKEN}" for _, _, h in hub.hub.requests)
    assert [m for m, _, _ in hub.storage.requests] == ["GET"]  # the HEAD does not follow the redirect
    assert not any(k.lower() == "authorization" for _, _, h in hub.storage.requests for k in h)


@pytest.mark.parametrize("where", ["HF_HOME/token", "HF_TOKEN_PATH"])
def test_token_file_of_huggingface_cli_login(hub, monkeypatch, tmp_path, where):
    hub.private.add(REPO)
    file = tmp_path / "hf" / "token" if where == "HF_HOME/token" else tmp_path / "elsewhere" / "my-token"
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(TOKEN + "\n")
    if where == "HF_TOKEN_PATH":
        monkeypatch.setenv("HF_TOKEN_PATH", str(file))
    minbert.BertModel.from_pretrained(REPO)
    assert hub.hub.requests[0][2]["Authorization"] == f"Bearer {TOKEN}"


@pytest.mark.parametrize("repo", [REPO, "org/nothing-here"])
def test_private_without_token_or_unknown_repo(hub, repo):
    hub.private.add(REPO)
    with pytest.raises(CheckpointError) as err:
        minbert.BertModel.from_pretrained(repo)
    msg = str(err.value)
    assert f"model {repo!r} not found on the Hub or private/gated" in msg and "HF_TOKEN" in msg and "\n" not in msg
    assert len(hub.requests()) == 1 and not repo_cache_dir(repo).exists()


@pytest.mark.parametrize("ignore_range", [False, True], ids=["resumed", "restarted"])
def test_dropped_connection_resumes_with_range(hub, hf_model, checkpoint, ignore_range):
    hub.drop_once, hub.ignore_range = True, ignore_range  # a 200 to a Range request: the file starts over
    assert_matches(minbert.BertModel.from_pretrained(REPO), hf_model)
    size = len(checkpoint["model.safetensors"])
    assert [h.get("Range") for _, _, h in hub.storage.requests] == [None, f"bytes={size // 2}-"]
    blob = repo_cache_dir(REPO) / "blobs" / sha256(checkpoint["model.safetensors"])
    assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name


@pytest.mark.parametrize("filename", ["model.safetensors", "config.json"])
def test_checksum_mismatch_leaves_nothing_in_the_cache(hub, filename, checkpoint):
    hub.corrupt.add(filename)
    with pytest.raises(CheckpointError, match=f"download of {filename} of model 'org/tiny' is corrupt") as err:
        minbert.BertModel.from_pretrained(REPO)
    assert "\n" not in str(err.value)
    folder = repo_cache_dir(REPO)
    blobs = {p.name for p in (folder / "blobs").iterdir()}
    assert not any(name.endswith(".incomplete") for name in blobs)
    assert sha256(checkpoint[filename]) not in blobs and git_sha1(checkpoint[filename]) not in blobs
    assert not (folder / "snapshots").exists() and not (folder / "refs").exists()


def test_offline_with_an_empty_cache(hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="'org/tiny' not found in the Hugging Face cache .*HF_HUB_OFFLINE=1"):
        minbert.Tokenizer.from_pretrained(REPO)
    assert hub.requests() == []


def test_unreachable_endpoint(hub, monkeypatch):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setenv("HF_ENDPOINT", closed)
    with pytest.raises(CheckpointError) as err:
        minbert.BertModel.from_pretrained(REPO)
    msg = str(err.value)
    assert f"{closed} could not be reached" in msg and "HF_HUB_OFFLINE=1" in msg and "'org/tiny'" in msg
    assert "\n" not in msg


def test_pytorch_model_bin_when_there_is_no_safetensors(hub, hf_model, checkpoint):
    buffer = io.BytesIO()
    torch.save(hf_model.state_dict(), buffer)
    weights = buffer.getvalue()
    commit = hub.add("org/old", {"config.json": checkpoint["config.json"], "pytorch_model.bin": weights})
    assert_matches(minbert.BertModel.from_pretrained("org/old"), hf_model)
    assert os.readlink(snapshot_of("org/old", commit) / "pytorch_model.bin") == f"../../blobs/{sha256(weights)}"
    assert (repo_cache_dir("org/old") / ".no_exist" / commit / "model.safetensors").is_file()
    assert not any("model.safetensors" in path for method, path, _ in hub.requests() if method == "GET")


def test_missing_weights(hub, checkpoint):
    hub.add("org/config-only", {"config.json": checkpoint["config.json"]})
    with pytest.raises(CheckpointError, match="'org/config-only' has no model.safetensors or pytorch_model.bin"):
        minbert.BertModel.from_pretrained("org/config-only")


def test_revision_gets_its_own_snapshot_and_ref(hub, checkpoint):
    v2 = hub.add(REPO, {**checkpoint, "config.json": json.dumps({**TINY, "hidden_dropout_prob": 0.25}).encode()},
                 revision="v2")
    main = hub.refs[REPO, "main"]
    assert minbert.BertModel.from_pretrained(REPO).config.hidden_dropout_prob == 0.0
    model = minbert.BertModel.from_pretrained(REPO, revision="v2", attn_implementation="eager")
    assert model.config.hidden_dropout_prob == 0.25 and model.config.attn_implementation == "eager"
    refs = repo_cache_dir(REPO) / "refs"
    assert (refs / "main").read_text() == main and (refs / "v2").read_text() == v2
    assert snapshot_of(REPO, v2).is_dir() and snapshot_of(REPO, main).is_dir()
    seen = len(hub.requests())
    assert minbert.BertModel.from_pretrained(REPO, revision=v2).config.hidden_dropout_prob == 0.25
    minbert.Tokenizer.from_pretrained(REPO, revision="v2")
    assert len(hub.requests()) == seen


def test_legacy_name_follows_the_hubs_redirect_and_becomes_the_default(hub, hf_model, checkpoint):
    assert default_model() == "minilm"  # nothing cached: the default never asks the Hub
    assert hub.requests() == []
    hub.add("google-bert/bert-base-uncased", checkpoint)
    hub.renamed["bert-base-uncased"] = "google-bert/bert-base-uncased"
    assert_matches(minbert.BertModel.from_pretrained("bert-base-uncased"), hf_model)
    heads = [p for m, p, _ in hub.hub.requests if m == "HEAD"]
    assert heads[:2] == ["/bert-base-uncased/resolve/main/config.json",  # answered 307, followed on the same host
                         "/google-bert/bert-base-uncased/resolve/main/config.json"]
    assert (hf_cache_dir() / "models--bert-base-uncased" / "refs" / "main").is_file()
    assert default_model() == "bert-base-uncased"


def test_paths_never_go_to_the_hub(hub, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    with pytest.raises(CheckpointError, match="'runs/typo' not found: no directory"):
        minbert.BertModel.from_pretrained("runs/typo")
    minbert.Tokenizer.from_pretrained("minilm")
    assert hub.requests() == []


RACER = """
import os, sys
import minbert.hub
print("ready", flush=True)
for cache in sys.stdin:  # one download per line, into the cache it names
    os.environ["HF_HUB_CACHE"] = cache.strip()
    try:
        print(minbert.hub.download("org/tiny"), flush=True)
    except minbert.CheckpointError as err:
        print(err, flush=True)
"""


def test_processes_downloading_at_once_take_turns(hub, checkpoint, tmp_path):
    """Two processes (torchrun ranks) fill one empty cache at once, three times over: both get the whole model, each
    file is fetched once, and the second waits for the first's download of the weights under the blob's lock."""
    hub.pace = 0.05  # half a second for the weights: the two downloads overlap
    logs = [tmp_path / f"stderr{i}" for i in range(2)]
    procs = [python(RACER, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log.open("w")) for log in logs]
    try:
        with deadline(60):
            assert [p.stdout.readline() for p in procs] == ["ready\n"] * 2
            for round in range(3):
                cache = tmp_path / f"cache{round}"
                for p in procs:  # both start the moment they read the line
                    p.stdin.write(f"{cache}\n")
                    p.stdin.flush()
                snapshot = cache / "models--org--tiny" / "snapshots" / hub.refs[REPO, "main"]
                answers = [p.stdout.readline() for p in procs]
                assert answers == [f"{snapshot}\n"] * 2, "".join(log.read_text() for log in logs)[-3000:]
                assert {f: (snapshot / f).read_bytes() for f in checkpoint} == checkpoint
    finally:
        for p in procs:
            p.kill()
            p.wait()
    gets = Counter(path for method, path, _ in hub.requests() if method == "GET")
    assert len(gets) == 4 and set(gets.values()) == {3}  # once a round: 3 files, and the weights' redirect
    waits = "".join(log.read_text() for log in logs)
    assert "minbert: waiting for another process to download model.safetensors of model 'org/tiny'" in waits
    assert "Traceback" not in waits


def test_a_killed_downloader_leaves_no_lock_behind(hub, checkpoint):
    """The blob's lock is the OS's: a process killed in the middle of the download holds it no more, and the next
    download takes it and resumes the partial file."""
    weights = os.urandom(3 << 20)  # the download writes 1 MiB at a time
    hub.add("org/big", {"config.json": checkpoint["config.json"], "model.safetensors": weights})
    hub.pace = 0.3  # three seconds for the weights: the child is killed after the first MiB
    partial = repo_cache_dir("org/big") / "blobs" / f"{sha256(weights)}.incomplete"
    child = python("import minbert.hub; minbert.hub.download('org/big')", stderr=subprocess.DEVNULL)
    try:
        with deadline(30):
            while not (partial.is_file() and partial.stat().st_size):
                time.sleep(0.01)
    finally:
        child.kill()
        child.wait()
    hub.pace, kept = 0.0, partial.stat().st_size
    with deadline(10):
        snapshot = minbert.hub.download("org/big")
    assert (snapshot / "model.safetensors").read_bytes() == weights
    assert [h.get("Range") for _, _, h in hub.storage.requests] == [None, f"bytes={kept}-"]


@pytest.mark.parametrize("lie", ["body longer than announced", "Content-Length is not the HEAD's size",
                                 "no size announced, body past the ceiling"])
def test_a_body_of_the_wrong_size_is_refused_and_deleted(hub, checkpoint, monkeypatch, lie):
    """A mirror that sends more than it announced (8 MB past a small file), or announces another size in the GET than
    in the HEAD, is refused, not retried, and the partial file deleted."""
    size = len(checkpoint["model.safetensors"])
    monkeypatch.setattr(minbert.hub, "CEILING", size + 1000)  # a ceiling within the test's reach
    pad = bytes(8 << 20)
    changes = {  # host -> (headers changed, bytes appended to the body)
        "body longer than announced": {"storage": ({"Content-Length": None}, pad)},
        "Content-Length is not the HEAD's size": {"storage": ({"Content-Length": size + 5}, b"12345")},
        "no size announced, body past the ceiling": {"hub": ({"X-Linked-Size": None}, b""),
                                                     "storage": ({"Content-Length": None}, pad)},
    }[lie]
    hub.tamper = lambda host, headers, body: ({**headers, **changes[host][0]}, body + changes[host][1]) \
        if host in changes else (headers, body)
    why = {"body longer than announced": f"sent more than the {size} bytes announced",
           "Content-Length is not the HEAD's size": f"sent a Content-Length for {size + 5} bytes where its HEAD said "
                                                    f"{size}",
           "no size announced, body past the ceiling": f"sent more than {size + 1000} bytes (the most minbert takes "
                                                       "when no size is announced)"}[lie]
    with deadline(10), pytest.raises(CheckpointError) as err:
        minbert.BertModel.from_pretrained(REPO)
    url = f"{hub.url}/{REPO}/resolve/{hub.refs[REPO, 'main']}/model.safetensors"
    assert str(err.value) == f"minbert: {url} {why}; the download of model 'org/tiny' was refused and deleted: " \
                             f"{hub.url} does not serve it like the Hugging Face Hub (check HF_ENDPOINT)"
    assert len(hub.storage.requests) == 1
    assert [p.name for p in (repo_cache_dir(REPO) / "blobs").iterdir()] == [git_sha1(checkpoint["config.json"])]


@pytest.mark.parametrize("target", ["file:///etc/passwd", "fifo", "ftp://127.0.0.1:9/model.safetensors", "data:,x"])
def test_redirects_go_to_http_only(hub, tmp_path, target):
    """The redirect of the weights to a local file (a FIFO would hang the download), FTP or data: is refused; the
    opener has no handler for them either."""
    if target == "fifo":
        os.mkfifo(tmp_path / "fifo")
        target = (tmp_path / "fifo").as_uri()
    hub.tamper = lambda host, headers, body: ({**headers, "Location": target} if "Location" in headers else headers,
                                              body)
    with deadline(10), pytest.raises(CheckpointError) as err:
        minbert.BertModel.from_pretrained(REPO)
    source = f"{hub.url}/{REPO}/resolve/{hub.refs[REPO, 'main']}/model.safetensors"
    assert str(err.value) == f"minbert: refusing {target} (a redirect from {source}): only http and https URLs are " \
                             f"fetched; check HF_ENDPOINT ({hub.url})"
    assert hub.storage.requests == []
    with deadline(10), pytest.raises(URLError, match="unknown url type"):
        minbert.hub._OPENER.open(target, timeout=1)


@pytest.mark.parametrize("endpoint", ["file:///etc", "huggingface.co"])
def test_endpoint_must_be_http(hub, monkeypatch, endpoint):
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    with pytest.raises(CheckpointError) as err:
        minbert.BertModel.from_pretrained(REPO)
    assert str(err.value) == f"minbert: refusing {endpoint}/{REPO}/resolve/main/config.json: only http and https " \
                             f"URLs are fetched; check HF_ENDPOINT ({endpoint})"


FILE_SIZE_LIMIT = """
import resource, signal, sys
import minbert.hub
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing
resource.setrlimit(resource.RLIMIT_FSIZE, (16384, 16384))  # config.json and vocab.txt fit, the weights do not
try:
    minbert.hub.download("org/tiny")
except minbert.CheckpointError as err:
    print(err)
    sys.exit(1)
"""


def test_a_file_size_limit_during_the_download(hub, checkpoint):
    """A write the kernel refuses (EFBIG past RLIMIT_FSIZE) is a one-line error naming the cache; no partial file
    is left behind."""
    child = python(FILE_SIZE_LIMIT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = child.communicate(timeout=60)
    folder = repo_cache_dir(REPO)
    assert child.returncode == 1 and "Traceback" not in err
    assert re.fullmatch(rf"minbert: cannot write model 'org/tiny' into the Hugging Face cache {re.escape(str(folder))}"
                        rf": {os.strerror(errno.EFBIG)}; free disk space or make it writable, or set HF_HUB_CACHE to "
                        r"another folder\n", out)
    assert [p.name for p in (folder / "blobs").iterdir()] == [git_sha1(checkpoint["config.json"])]


@pytest.fixture(params=[("size=64k", errno.ENOSPC), ("ro", errno.EROFS), (None, errno.ENOTDIR)],
                ids=["full", "read-only", "not-a-folder"])
def broken_cache(request, tmp_path):
    """(cache folder, the error writing to it): a 64 KiB tmpfs, a read-only one, or a path through a file."""
    options, code = request.param
    folder = tmp_path / "disk"
    if options is None:
        folder.write_text("a file where the cache's folder should be")
        yield folder / "hub", code
        return
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield folder, code
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_a_cache_that_cannot_be_written(hub, monkeypatch, broken_cache):
    """A full disk, a read-only one or a file in the way: a one-line error naming the cache, no partial file left."""
    folder, code = broken_cache
    monkeypatch.setenv("HF_HUB_CACHE", str(folder))
    with pytest.raises(CheckpointError) as err:
        minbert.BertModel.from_pretrained(REPO)
    cache = re.escape(str(repo_cache_dir(REPO)))
    assert re.fullmatch(rf"minbert: cannot write model 'org/tiny' into the Hugging Face cache {cache}( \(.+\))?: "
                        rf"{os.strerror(code)}; free disk space or make it writable, or set HF_HUB_CACHE to another "
                        "folder", str(err.value))
    assert not [p for p in folder.rglob("*") if p.name.endswith(".incomplete")]


@pytest.mark.parametrize("revision", ["../..", "../../../../outside", "<tmp>/outside", "a/../b", "a//b", "v1/", "",
                                      ".", ".hidden", "a\\b", "a\0b", "main\n"])
def test_revision_with_path_parts_is_refused(hub, checkpoint, tmp_path, revision):
    """Even when the Hub would serve it, a revision that is not a branch, tag or commit name is refused before any
    request or write (refs/<revision> would land outside the cache)."""
    revision = revision.replace("<tmp>", str(tmp_path))  # an absolute path
    hub.add(REPO, checkpoint, revision=revision)
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(CheckpointError) as err:
        minbert.BertModel.from_pretrained(REPO, revision=revision)
    assert str(err.value).startswith(f"minbert: revision {revision!r} of model 'org/tiny' is not a branch, tag or "
                                     "commit name") and "\n" not in str(err.value)
    assert hub.requests() == [] and sorted(tmp_path.rglob("*")) == before


@pytest.mark.parametrize("revision", ["refs/pr/1", "feature/x", "v1.0"])
def test_revision_with_slashes_like_huggingface_hub(hub, checkpoint, revision):
    """A branch such as refs/pr/1 is stored in refs/refs/pr/1, where transformers finds it too."""
    commit = hub.add(REPO, checkpoint, revision=revision)
    minbert.BertModel.from_pretrained(REPO, revision=revision)
    assert (repo_cache_dir(REPO) / "refs" / revision).read_text() == commit
    seen = len(hub.requests())
    minbert.Tokenizer.from_pretrained(REPO, revision=revision)
    config = transformers.BertConfig.from_pretrained(REPO, revision=revision, cache_dir=hf_cache_dir(),
                                                     local_files_only=True)
    assert config.hidden_size == TINY["hidden_size"] and len(hub.requests()) == seen


@pytest.mark.parametrize("header, value", [("X-Repo-Commit", "../../../../outside"), ("ETag", '"../../../outside"'),
                                           ("X-Linked-Etag", '"../../../outside"'), ("X-Linked-Size", "12abc")])
def test_hub_headers_are_checked_before_they_name_files(hub, tmp_path, header, value):
    """The commit and etag the Hub answers become folder and file names: anything but a hash is refused."""
    hub.tamper = lambda host, headers, body: ({**headers, header: value} if header in headers else headers, body)
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(CheckpointError, match=r"answered without a valid commit hash \(X-Repo-Commit\), etag or size"):
        minbert.BertModel.from_pretrained(REPO)
    assert sorted(tmp_path.rglob("*")) == before
