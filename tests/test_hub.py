"""Downloads by name from a loopback Hub (the `resolve` endpoint plus a second host for large files): cache layout,
transformers reading that cache, tokens, resume, checksums, revisions and every failure's message."""
import hashlib
import io
import json
import os
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import torch
import transformers

import minbert
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


def reply(handler: BaseHTTPRequestHandler, status: int, headers: dict, body: bytes = b"", cut: int | None = None):
    """Status, headers and (for a GET) the body; `cut` sends only that many bytes, then the connection closes."""
    handler.send_response(status)
    for key, value in {"Content-Length": len(body), **headers}.items():
        handler.send_header(key, str(value))
    handler.end_headers()
    if handler.command == "GET":
        handler.wfile.write(body[:cut])


class FakeHub:
    """The Hub's resolve endpoint: small files answered with their git-SHA-1 ETag, large ones with X-Linked-Etag and
    a 302 to a second server (another port) that serves them with Range support; 404 for missing files and repos,
    401 for a private repo without the token, 307 for a renamed repo."""

    def __init__(self):
        self.trees: dict[tuple[str, str], dict[str, bytes]] = {}  # (repo, commit) -> files
        self.refs: dict[tuple[str, str], str] = {}  # (repo, branch or tag) -> commit
        self.private: set[str] = set()
        self.renamed: dict[str, str] = {}
        self.corrupt: set[str] = set()  # file names served with one byte flipped
        self.drop_once = False  # the storage host closes the connection halfway through the next full download
        self.ignore_range = False  # the storage host answers every GET with 200 and the whole file
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
            return reply(h, 307, {"Location": f"/{self.renamed[repo]}/resolve/{revision}/{filename}"})
        if repo in self.private and h.headers.get("Authorization") != f"Bearer {TOKEN}":
            return reply(h, 401, {"X-Error-Code": "RepositoryNotFound"})
        commit = self.refs.get((repo, revision), revision)
        if (repo, commit) not in self.trees:
            return reply(h, 404, {"X-Error-Code": "RepositoryNotFound"})
        content = self.trees[repo, commit].get(filename)
        if content is None:
            return reply(h, 404, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": commit})
        if filename.endswith(LARGE):
            return reply(h, 302, {"X-Repo-Commit": commit, "X-Linked-Etag": f'"{sha256(content)}"',
                                  "X-Linked-Size": len(content),
                                  "Location": f"{self.storage.url}/{repo}/{commit}/{filename}?signature=x"})
        weak = "W/" if filename.endswith(".txt") else ""  # the Hub may mark an ETag as weak
        reply(h, 200, {"X-Repo-Commit": commit, "ETag": f'{weak}"{git_sha1(content)}"'}, self.body(filename, content))

    def answer_storage(self, h: BaseHTTPRequestHandler) -> None:
        repo, commit, filename = urlsplit(h.path).path[1:].rsplit("/", 2)
        content = self.body(filename, self.trees[repo, commit][filename])
        start = 0 if self.ignore_range else int(re.fullmatch(r"bytes=(\d+)-", h.headers.get("Range", "bytes=0-"))[1])
        headers = {"Content-Range": f"bytes {start}-{len(content) - 1}/{len(content)}"} if start else {}
        cut = len(content) // 2 if self.drop_once and not start else None  # Content-Length says all, the body stops
        self.drop_once = self.drop_once and cut is None
        reply(h, 206 if start else 200, headers, content[start:], cut)

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
