"""Download a model from the Hugging Face Hub by name into the standard hub cache (standard library and tqdm only).

The protocol is huggingface_hub's: a HEAD on {endpoint}/{repo}/resolve/{revision}/{file} names the commit and the
file's etag (a large LFS file's SHA-256, else its git blob SHA-1); a GET fetches it into blobs/<etag>, which
snapshots/<commit>/<file> links to, and refs/<revision> records the commit, so transformers finds the files too.
Processes downloading at once (torchrun ranks) take turns per blob under huggingface_hub's lock
(.locks/<repo>/<etag>.lock); a mirror is held to http(s) URLs and to the sizes it announces.
"""
import errno
import hashlib
import os
import re
import shutil
import ssl
import sys
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from http.client import HTTPException, HTTPResponse
from pathlib import Path
from urllib.error import URLError
from urllib.parse import quote, urljoin, urlsplit

from tqdm.auto import tqdm

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

from .checkpoint import atomic_write, temporary_name
from .errors import CheckpointError
from .loading import TOKENIZER_FILES, WEIGHT_FILES, hf_home, repo_cache_dir

OPTIONAL_FILES = TOKENIZER_FILES + ("tokenizer_config.json",)  # fetched when the repo has them
TIMEOUT = 30  # seconds to connect, and to wait for each read
ATTEMPTS = 5  # per file; each retry after a dropped connection resumes with a Range request
MAX_REDIRECTS = 10
CHUNK = 1 << 20
CEILING = 16 << 30  # bytes taken from a file whose size neither the HEAD nor the GET announces
REDIRECT_CODES = (301, 302, 303, 307, 308)
NETWORK_ERRORS = (URLError, ConnectionError, TimeoutError, HTTPException, ssl.SSLError)
SHA256, SHA1 = re.compile(r"[0-9a-f]{64}"), re.compile(r"[0-9a-f]{40}")  # LFS etag; git etag and commit hash
DIGITS = re.compile(r"[0-9]+")
REVISION = re.compile(r"[\w-][\w.+-]*(/[\w-][\w.+-]*)*")  # '/'-separated names (refs/pr/1), none '.', '..' or empty
NO_FLOCK = (errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK)  # file systems mounted without locks (Lustre, some NFS)


def endpoint() -> str:
    """HF_ENDPOINT (a mirror), else https://huggingface.co."""
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def offline() -> bool:
    """HF_HUB_OFFLINE=1: the cache only, no request at all."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "on", "yes", "true")


def token() -> str | None:
    """HF_TOKEN, else the file `huggingface-cli login` writes: HF_TOKEN_PATH, default $HF_HOME/token."""
    if os.environ.get("HF_TOKEN"):
        return os.environ["HF_TOKEN"].strip()
    path = Path(os.environ.get("HF_TOKEN_PATH") or hf_home() / "token").expanduser()
    return (path.read_text().strip() or None) if path.is_file() else None


class Refused(CheckpointError):
    """A download whose bytes are wrong (too many, or not the etag's): its partial file is deleted."""


def check_revision(repo_id: str, revision: str) -> None:
    """Refuse a revision that is not a branch, tag or commit name, before it becomes the path refs/<revision>."""
    if not (isinstance(revision, str) and REVISION.fullmatch(revision)):
        raise CheckpointError(f"minbert: revision {revision!r} of model {repo_id!r} is not a branch, tag or commit "
                              "name ('/'-separated names of letters, digits and _-+., none starting with '.'); pass "
                              "one such as 'main', 'v1.0' or 'refs/pr/1'")


class _EveryStatus(urllib.request.HTTPErrorProcessor):
    """Hands back every response as it is: no HTTPError and no redirect following (`request` does that)."""

    def http_response(self, request, response):
        return response

    https_response = http_response


_OPENER = urllib.request.OpenerDirector()  # http and https only: no file:, ftp: or data: handler to be sent to
for _handler in (urllib.request.ProxyHandler({k: v for k, v in urllib.request.getproxies().items()
                                              if k in ("http", "https")}),
                 urllib.request.UnknownHandler(), urllib.request.HTTPHandler(), urllib.request.HTTPSHandler(),
                 _EveryStatus()):
    _OPENER.add_handler(_handler)


def request(url: str, headers: dict[str, str], method: str = "GET", other_hosts: bool = True) -> HTTPResponse:
    """The response to `url`, redirects followed by hand: Authorization is dropped once the host (scheme, host:port)
    changes, unlike urllib's own handler, and with other_hosts=False such a redirect is returned unfollowed. Only
    http(s) URLs are opened."""
    source = None
    for _ in range(MAX_REDIRECTS):
        if urlsplit(url).scheme not in ("http", "https"):
            via = f" (a redirect from {source})" if source else ""
            raise CheckpointError(f"minbert: refusing {url}{via}: only http and https URLs are fetched; check "
                                  f"HF_ENDPOINT ({endpoint()})")
        response = _OPENER.open(urllib.request.Request(url, headers=headers, method=method), timeout=TIMEOUT)
        if response.status not in REDIRECT_CODES or not response.headers.get("Location"):
            return response
        target = urljoin(url, response.headers["Location"])
        same_host = urlsplit(target)[:2] == urlsplit(url)[:2]
        if not (same_host or other_hosts):
            return response
        response.close()
        if not same_host:
            headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
        source, url = url, target
    raise CheckpointError(f"minbert: more than {MAX_REDIRECTS} redirects from {url}")


def digest(path: Path, linked: bool) -> str:
    """What the Hub's etag is: the SHA-256 of a linked (LFS) file, else the git blob SHA-1 of the file."""
    h = hashlib.sha256() if linked else hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def link(blob: Path, file: Path) -> None:
    """snapshots/<commit>/<file> as a relative symlink to ../../blobs/<etag>, or a copy where symlinks fail; made
    under a temporary name and renamed into place, so that processes linking at once all succeed."""
    tmp = temporary_name(file)
    try:
        tmp.symlink_to(os.path.relpath(blob, file.parent))
    except OSError:
        return atomic_write(file, lambda copy: shutil.copyfile(blob, copy))
    os.replace(tmp, file)


@contextmanager
def locked(path: Path, waiting: str):
    """An exclusive flock on `path` for the block, printing `waiting` if another process holds it; the OS drops it
    when its process ends, however it ends. No lock without fcntl (Windows) or on a file system without locks."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o666)  # read-only suffices, also for another user's lock file
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                print(waiting, file=sys.stderr, flush=True)
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError as err:
                if err.errno not in NO_FLOCK:
                    raise
        yield
    finally:
        os.close(fd)


@dataclass
class Remote:
    """What the Hub's HEAD says about one file."""
    commit: str
    etag: str
    size: int | None
    linked: bool  # an LFS file: served from another host, etag = SHA-256


class HubRepo:
    """One model repository on the Hub at one revision, and its folder in the local hub cache."""

    def __init__(self, repo_id: str, revision: str = "main"):
        check_revision(repo_id, revision)
        self.repo_id, self.revision = repo_id, revision
        self.folder = repo_cache_dir(repo_id)
        self.label = repr(repo_id) + ("" if revision == "main" else f" at revision {revision!r}")
        secret = token()
        auth = {"Authorization": f"Bearer {secret}"} if secret else {}
        self.headers = {"User-Agent": "minbert", "Accept-Encoding": "identity", **auth}

    def url(self, filename: str, revision: str) -> str:
        return f"{endpoint()}/{self.repo_id}/resolve/{quote(revision, safe='')}/{quote(filename)}"

    def not_cached(self, why: str) -> CheckpointError:
        return CheckpointError(f"minbert: model {self.label} not found in the Hugging Face cache ({self.folder}) "
                               f"and {why}")

    def not_on_hub(self) -> CheckpointError:
        return CheckpointError(f"minbert: model {self.label} not found on the Hub or private/gated "
                               f"({endpoint()}/{self.repo_id}): check the name, set HF_TOKEN (or run "
                               "huggingface-cli login) if you have access, or pass a checkpoint directory")

    def refused(self, url: str, why: str) -> Refused:
        return Refused(f"minbert: {url} {why}; the download of model {self.label} was refused and deleted: "
                       f"{endpoint()} does not serve it like the Hugging Face Hub (check HF_ENDPOINT)")

    def unwritable(self, err: OSError) -> CheckpointError:
        where = f" ({err.filename})" if err.filename else ""
        return CheckpointError(f"minbert: cannot write model {self.label} into the Hugging Face cache {self.folder}"
                               f"{where}: {err.strerror or err}; free disk space or make it writable, or set "
                               "HF_HUB_CACHE to another folder")

    def head(self, filename: str, revision: str) -> Remote | None:
        """The commit, etag and size of one file (None when the repo has no such file); same-host redirects (a
        renamed repo) are followed, the redirect of a large file to its storage host is not."""
        url = self.url(filename, revision)
        with request(url, self.headers, "HEAD", other_hosts=False) as response:
            status, headers = response.status, response.headers
        if status == 404:
            return None
        if status in (401, 403):
            raise self.not_on_hub()
        if status >= 400:
            raise CheckpointError(f"minbert: {url} answered {status} {response.reason}; try again later")
        linked = "X-Linked-Etag" in headers
        commit = headers.get("X-Repo-Commit", "")
        etag = (headers.get("X-Linked-Etag") or headers.get("ETag") or "").removeprefix("W/").strip('"')
        size = headers.get("X-Linked-Size") or (None if status in REDIRECT_CODES else headers.get("Content-Length"))
        if not (SHA1.fullmatch(commit) and (SHA256 if linked else SHA1).fullmatch(etag)
                and (size is None or DIGITS.fullmatch(size))):  # commit and etag become names in the cache
            raise CheckpointError(f"minbert: {url} answered without a valid commit hash (X-Repo-Commit), etag or "
                                  f"size: HF_ENDPOINT={endpoint()} does not look like a Hugging Face Hub")
        return Remote(commit, etag, int(size) if size else None, linked)

    def fetch(self, filename: str, remote: Remote) -> Path:
        """blobs/<etag>, downloaded unless there already, by one process at a time: into blobs/<etag>.incomplete,
        resumed after a dropped connection, checked against the etag and only then renamed. A refused or corrupt
        download, or one the disk has no room for, is deleted."""
        blob = self.folder / "blobs" / remote.etag
        lock = self.folder.parent / ".locks" / self.folder.name / f"{remote.etag}.lock"
        with locked(lock, f"minbert: waiting for another process to download {filename} of model {self.label}"):
            if blob.is_file():
                return blob
            partial = blob.with_name(blob.name + ".incomplete")
            partial.parent.mkdir(parents=True, exist_ok=True)
            try:
                with tqdm(desc=filename, total=remote.size, unit="B", unit_scale=True, unit_divisor=1024,
                          file=sys.stderr, disable=not remote.linked) as bar:
                    for attempt in range(1, ATTEMPTS + 1):
                        try:
                            self.get(self.url(filename, remote.commit), partial, remote.size, bar)
                            break
                        except NETWORK_ERRORS:
                            if attempt == ATTEMPTS:
                                raise
                actual = digest(partial, remote.linked)
                if actual != remote.etag:
                    kind = "sha256" if remote.linked else "git sha1"
                    raise Refused(f"minbert: the download of {filename} of model {self.label} is corrupt "
                                  f"({kind} {actual}, the Hub says {remote.etag}); it was deleted, try again")
            except NETWORK_ERRORS:
                raise  # the partial file stays for the next download to resume
            except (Refused, OSError):  # wrong bytes, or no room for them (ENOSPC, EFBIG): nothing to resume
                partial.unlink(missing_ok=True)
                raise
            os.replace(partial, blob)
        return blob

    def get(self, url: str, partial: Path, size: int | None, bar: tqdm) -> None:
        """One GET appending to `partial` the bytes it lacks (Range: bytes=N-); a server that ignores Range and
        answers 200 restarts the file. A body that ends early raises ConnectionError; one whose Content-Length
        differs from the HEAD's size, or that runs past it (past CEILING when no size is known), is refused."""
        offset = partial.stat().st_size if partial.is_file() else 0
        if offset and size is not None and offset >= size:
            return
        headers = {**self.headers, "Range": f"bytes={offset}-"} if offset else self.headers
        with request(url, headers) as response:
            if response.status not in (200, 206):
                raise CheckpointError(f"minbert: {url} answered {response.status} {response.reason}; try again later")
            offset = offset if response.status == 206 else 0
            length = response.headers.get("Content-Length") or ""
            total = offset + int(length) if DIGITS.fullmatch(length) else None
            if size is not None and total is not None and total != size:
                raise self.refused(url, f"sent a Content-Length for {total} bytes where its HEAD said {size}")
            expected = size if size is not None else total
            limit = CEILING if expected is None else expected
            with partial.open("r+b" if offset else "wb") as f:
                f.seek(offset)
                f.truncate()
                bar.reset(expected)
                bar.update(offset)
                while chunk := response.read(min(CHUNK, max(limit + 1 - f.tell(), 0))):  # one byte past the limit
                    f.write(chunk)
                    bar.update(len(chunk))
                if f.tell() > limit:
                    announced = f"the {limit} bytes announced" if expected is not None else \
                        f"{limit} bytes (the most minbert takes when no size is announced)"
                    raise self.refused(url, f"sent more than {announced}")
        received = partial.stat().st_size
        if expected is not None and received < expected:
            raise ConnectionError(f"the connection closed after {received} of {expected} bytes of {url}")

    def download(self) -> Path:
        """config.json, the weights (model.safetensors, else pytorch_model.bin) and the tokenizer files that exist,
        all of one commit and fetched unless its snapshot has them; the snapshot is filled once all are in blobs/."""
        config = self.head("config.json", self.revision)
        if config is None:
            raise self.not_on_hub()
        commit = config.commit
        remotes = {"config.json": config}
        for filename in WEIGHT_FILES:
            remotes[filename] = self.head(filename, commit)
            if remotes[filename]:
                break
        else:
            raise CheckpointError(f"minbert: model {self.label} has no {' or '.join(WEIGHT_FILES)} on the Hub "
                                  f"({endpoint()}/{self.repo_id}); minbert needs one of them")
        remotes.update({filename: self.head(filename, commit) for filename in OPTIONAL_FILES})
        snapshot = self.folder / "snapshots" / commit
        blobs = {filename: self.fetch(filename, remote) for filename, remote in remotes.items()
                 if remote and not (snapshot / filename).is_file()}
        return self.store(snapshot, blobs, [filename for filename, remote in remotes.items() if remote is None])

    def store(self, snapshot: Path, blobs: dict[str, Path], missing: list[str]) -> Path:
        """Link the blobs into the snapshot (snapshots/<commit>), record the missing files in .no_exist/<commit>/
        (as huggingface_hub does) and point refs/<revision> at the commit."""
        commit = snapshot.name
        snapshot.mkdir(parents=True, exist_ok=True)
        for filename, blob in blobs.items():
            link(blob, snapshot / filename)
        no_exist = self.folder / ".no_exist" / commit
        for filename in missing:
            no_exist.mkdir(parents=True, exist_ok=True)
            (no_exist / filename).touch()
        if self.revision != commit:
            atomic_write(self.folder / "refs" / self.revision, lambda tmp: Path(tmp).write_text(commit))
        return snapshot


def download(repo_id: str, revision: str = "main") -> Path:
    """Fetch a Hub model into the hub cache (HF_HUB_CACHE or HF_HOME) and return its snapshot folder; every failure
    (a bad revision before any request or write) is a one-line CheckpointError naming the model."""
    repo = HubRepo(repo_id, revision)
    if offline():
        raise repo.not_cached("HF_HUB_OFFLINE=1 forbids downloading it; unset HF_HUB_OFFLINE, or pass a checkpoint "
                              "directory or 'minilm'")
    try:
        return repo.download()
    except NETWORK_ERRORS as err:
        reason = getattr(err, "reason", None) or err
        raise repo.not_cached(f"{endpoint()} could not be reached ({reason}); check the connection or HF_ENDPOINT, "
                              "or set HF_HUB_OFFLINE=1 to use the cache only") from None
    except OSError as err:  # the network's are NETWORK_ERRORS: this one is the cache's (full, read-only, ...)
        raise repo.unwritable(err) from None
