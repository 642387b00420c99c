"""Model weights from the hub: the files a backend reads, what the HF cache holds, and pulling the rest.

Each backend declares the repository files its `load()` reads (`BackendSpec.files`: glob patterns, one
weight format, no root-level single-file checkpoint the diffusers layout does not use). From there:

    plan        the hub's list of those files with their sizes, and which are already in the cache
    check_disk  refuse, before any byte is written, a pull that would not leave `I2V_MIN_FREE_DISK` free
    pull        huggingface_hub's own download (`snapshot_download`) of what is missing, with the bytes of
                all files reported as one count
    ensure      all three for one model, when its weights are not complete in the cache (the engine calls
                it before loading a backend, so `i2v generate` and the server's workers pull the same way)

What resumes (huggingface_hub 2.4): a connection cut mid-file is resumed in the same run with a Range
request for the rest; files already complete stay in the cache, so a pull that stops (an error, Ctrl-C)
continues with the missing files when run again. The partial file of an interrupted run is not kept
(huggingface_hub writes each download to a temporary file of its own and removes it on failure). Repos
stored with Xet download through hf_xet, which has its own retries; the same per-file rule holds.

The library reads its own variables: `HF_HOME` / `HF_HUB_CACHE` (where the cache is), `HF_ENDPOINT`
(a mirror), `HF_TOKEN` (gated repos), `HF_HUB_OFFLINE`.
"""

from __future__ import annotations

import shutil
import threading
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from .errors import I2VError, ModelUnavailable
from .progress import DownloadCallback, DownloadProgress, format_bytes


class WeightsUnavailable(ModelUnavailable):
    """The hub refused the weights (gated, private, missing) or the download failed; says what to do."""


class HubUnreachable(ModelUnavailable):
    """No answer from the hub (offline, DNS, a firewall)."""


class NotEnoughDisk(ModelUnavailable):
    """The weights would not fit in the HF cache's disk with `I2V_MIN_FREE_DISK` to spare."""


@dataclass(frozen=True)
class RepoFile:
    path: str
    size: int
    cached: bool  # in the HF cache at the planned revision


@dataclass(frozen=True)
class WeightsPlan:
    """One model's weights: the files its backend reads from `repo`, their sizes, what the cache has."""

    model: str
    repo: str
    revision: str | None  # the commit the sizes are of (None: only the cache was asked)
    patterns: tuple[str, ...]
    files: tuple[RepoFile, ...]

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def missing(self) -> tuple[RepoFile, ...]:
        return tuple(f for f in self.files if not f.cached)

    @property
    def missing_bytes(self) -> int:
        return sum(f.size for f in self.missing)

    @property
    def cached_bytes(self) -> int:
        return self.total_bytes - self.missing_bytes

    def summary(self) -> str:
        """`12 files, 23.9 GB; in the cache 4.1 GB; to fetch 19.8 GB`."""
        return (
            f"{len(self.files)} files, {format_bytes(self.total_bytes)}; in the cache "
            f"{format_bytes(self.cached_bytes)}; to fetch {format_bytes(self.missing_bytes)}"
        )


def hub_repo(source: str) -> str | None:
    """The hub repository of a model source (`org/name`), or None for a local folder."""
    if source.startswith(("/", ".", "~")) or Path(source).expanduser().exists():
        return None
    parts = source.split("/")
    return source if len(parts) == 2 and all(parts) else None


def hub_cache() -> Path:
    """Where huggingface_hub keeps downloads: `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else ~/.cache/huggingface/hub."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def snapshot_folder(repo: str, revision: str) -> Path:
    """The cache's folder of one commit of a repository, where from_pretrained reads its files."""
    from huggingface_hub.file_download import repo_folder_name

    return hub_cache() / repo_folder_name(repo_id=repo, repo_type="model") / "snapshots" / revision


def offline() -> bool:
    from huggingface_hub import constants

    return constants.is_offline_mode()


def plan(model: str, repo: str, patterns: tuple[str, ...], *, check_access: bool = True) -> WeightsPlan:
    """Ask the hub which of the backend's files `repo` has and how big they are, and the cache which it has.

    With `check_access`, when something is missing, one file's metadata is fetched too (a HEAD request),
    so a gated repo is refused here, before the disk check and before any download.
    """
    from huggingface_hub import HfApi, try_to_load_from_cache

    try:
        info = HfApi().model_info(repo, files_metadata=True)
    except Exception as exc:
        raise explain(exc, repo) from exc
    siblings = {s.rfilename: s for s in info.siblings or []}
    chosen = _select(siblings, patterns)
    if not chosen:
        raise WeightsUnavailable(
            f"{repo} has none of the files {model} loads ({', '.join(patterns)}): is it the right repository?"
        )
    files = tuple(
        RepoFile(
            path,
            siblings[path].size or 0,
            isinstance(try_to_load_from_cache(repo, path, revision=info.sha), str),
        )
        for path in chosen
    )
    result = WeightsPlan(model, repo, info.sha, patterns, files)
    if check_access and result.missing:
        _check_access(repo, result.missing[0].path, info.sha)
    return result


def cached_plan(model: str, repo: str, patterns: tuple[str, ...]) -> WeightsPlan | None:
    """The plan from the cache alone (the file list an earlier download cached); None if it has none."""
    from huggingface_hub import get_cached_repo_tree, try_to_load_from_cache
    from huggingface_hub.errors import CachedRepoTreeNotFoundError

    try:
        tree = {f.path: f for f in get_cached_repo_tree(repo)}
    except CachedRepoTreeNotFoundError:
        return None
    files = []
    revision = None
    for path in _select(tree, patterns):
        found = try_to_load_from_cache(repo, path)
        if isinstance(found, str):
            revision = Path(found).parts[-2 - path.count("/")]  # .../snapshots/<commit>/<path>
        files.append(RepoFile(path, tree[path].size or 0, isinstance(found, str)))
    return WeightsPlan(model, repo, revision, patterns, tuple(files)) if files else None


def free_disk() -> tuple[int, Path]:
    """Free bytes on the HF cache's disk (the nearest existing folder of its path), and that path."""
    folder = hub_cache()
    probe = next((p for p in (folder, *folder.parents) if p.exists()), Path("/"))
    return shutil.disk_usage(probe).free, folder


def check_disk(plans: list[WeightsPlan], reserve: int) -> None:
    """Refuse a pull that would leave less than `reserve` bytes free in the cache's disk."""
    needed = sum(p.missing_bytes for p in plans)
    if not needed:
        return
    free, folder = free_disk()
    if free - needed >= reserve:
        return
    keep = f", and I2V_MIN_FREE_DISK keeps {format_bytes(reserve)} free beside them" if reserve else ""
    raise NotEnoughDisk(
        f"not enough disk space for the weights of {', '.join(p.model for p in plans)}: they need "
        f"{format_bytes(needed)}, the HF cache at {folder} has {format_bytes(free)} free{keep}. "
        "Free some space, or put the cache on a disk with room by setting HF_HOME (e.g. "
        "HF_HOME=/data/huggingface; HF_HUB_CACHE for the hub cache alone)."
    )


def pull(plans: list[WeightsPlan], on_progress: DownloadCallback | None = None) -> None:
    """Download what the plans miss, with huggingface_hub; progress is one count over all their files."""
    from huggingface_hub import snapshot_download

    counter = _Counter(sum(p.missing_bytes for p in plans), on_progress)
    for planned in plans:
        if not planned.missing:
            continue
        counter.now_on(planned)
        try:
            snapshot_download(
                planned.repo, allow_patterns=list(planned.patterns), tqdm_class=partial(_CountingBar, counter)
            )
        except I2VError:  # a cancel from the progress callback, ours to pass on
            raise
        except Exception as exc:
            raise explain(exc, planned.repo, downloading=True) from exc
    counter.finish()


def ensure(
    model: str,
    source: str,
    patterns: tuple[str, ...],
    reserve: int,
    on_progress: DownloadCallback | None = None,
) -> WeightsPlan | None:
    """Pull a model's weights unless they are complete in the cache; returns what was pulled.

    Nothing happens for a local folder, with `HF_HUB_OFFLINE`, or when the cache's file list says every
    file is there (no request to the hub then). When the hub cannot be reached, loading goes ahead with
    what the cache has and fails with its own error if that is not enough.
    """
    repo = hub_repo(source)
    if repo is None or offline():
        return None
    known = cached_plan(model, repo, patterns)
    if known is not None and not known.missing:
        return None
    try:
        planned = plan(model, repo, patterns)
    except HubUnreachable:
        return None
    if not planned.missing:
        return None
    check_disk([planned], reserve)
    pull([planned], on_progress)
    return planned


def explain(exc: Exception, repo: str, *, downloading: bool = False) -> ModelUnavailable:
    """The hub's error as one that says what to do: accept the licence, set HF_TOKEN, check the name."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    page = f"{constants.ENDPOINT.rstrip('/')}/{repo}"
    token = "HF_TOKEN=hf_... (a read token of that account; or run `hf auth login`)"
    if isinstance(exc, GatedRepoError):
        return WeightsUnavailable(
            f"{repo} is gated: accept its licence on {page} while signed in to the hub, then give i2v "
            f"that account's token: {token}"
        )
    if isinstance(exc, RepositoryNotFoundError):
        return WeightsUnavailable(
            f"{repo} was not found on the hub ({_status(exc)}), or it is private or gated and no token "
            f"with access was sent: check the model reference (see `i2v models`); for a gated or private "
            f"repository accept its licence on {page} and set {token}"
        )
    if isinstance(exc, EntryNotFoundError) and not isinstance(exc, LocalEntryNotFoundError):
        return WeightsUnavailable(
            f"{repo} lacks a file its backend loads ({_first_line(exc)}): the repository's layout is not "
            "the one this backend reads; check the model reference"
        )
    if (
        isinstance(exc, HfHubHTTPError)
        and exc.response is not None
        and exc.response.status_code in (401, 403)
    ):
        return WeightsUnavailable(
            f"the hub refused {repo} ({_status(exc)}): set {token} for an account that may read it"
        )
    if downloading:
        response = getattr(exc, "response", None)
        what = f"HTTP {response.status_code} for {response.url}" if response is not None else None
        return WeightsUnavailable(
            f"downloading {repo} failed ({what or f'{type(exc).__name__}: {_first_line(exc)}'}); the files "
            "completed so far stay in the cache: run `i2v pull` again to fetch the rest"
        )
    if isinstance(exc, HfHubHTTPError) and exc.response is not None:
        return WeightsUnavailable(f"the hub answered {_status(exc)} for {repo}: {_first_line(exc)}")
    return HubUnreachable(
        f"cannot reach the hub at {constants.ENDPOINT} for {repo} ({type(exc).__name__}: {_first_line(exc)}); "
        "check the network, HF_ENDPOINT for a mirror, or HF_HUB_OFFLINE=1 to use only the cache"
    )


def _select(paths: Any, patterns: tuple[str, ...]) -> list[str]:
    from huggingface_hub.utils import filter_repo_objects

    return sorted(filter_repo_objects(list(paths), allow_patterns=list(patterns)))


def _check_access(repo: str, path: str, revision: str | None) -> None:
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    try:
        get_hf_file_metadata(hf_hub_url(repo, path, revision=revision))
    except Exception as exc:
        raise explain(exc, repo) from exc


def _status(exc: Any) -> str:
    response = getattr(exc, "response", None)
    return f"HTTP {response.status_code}" if response is not None else type(exc).__name__


def _first_line(exc: Exception) -> str:
    return next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)[:300]


class _Counter:
    """The bytes of every file of a pull as one count, reported at each new percent and at least once a
    second (leading edge, so the count before a stall is always reported); reports keep their order."""

    def __init__(self, total: int, on_progress: DownloadCallback | None) -> None:
        self.total, self.done = total, 0
        self._on_progress = on_progress
        self._lock = threading.Lock()
        self._percent, self._at = -1, 0.0
        self._model = self._repo = ""

    def now_on(self, planned: WeightsPlan) -> None:
        self._model, self._repo = planned.model, planned.repo
        self.add(0, force=True)

    def add(self, count: int, *, force: bool = False) -> None:
        with self._lock:
            self.done += count
            done = max(0, min(self.done, self.total))
            percent = 100 * done // self.total if self.total else 100
            now = time.monotonic()
            if not force and percent == self._percent and now - self._at < 1.0:
                return
            self._percent, self._at = percent, now
            if self._on_progress is not None:
                self._on_progress(DownloadProgress(self._model, self._repo, done, self.total))

    def finish(self) -> None:
        with self._lock:
            self.done = self.total
        self.add(0, force=True)


class _CountingBar:
    """What `snapshot_download` takes as its `tqdm_class`: instead of drawing, each byte bar adds to one count.

    snapshot_download makes a files bar (no unit), a bytes-written bar ("Reconstructing ...", which every
    file's download updates) and a network bar ("Downloading bytes", which would count the same bytes
    twice); only the bytes-written bar counts.
    """

    def __init__(self, counter: _Counter, *args: Any, **kwargs: Any) -> None:
        self._counter = counter
        desc = str(kwargs.get("desc") or "")
        self._counts = kwargs.get("unit") == "B" and not desc.startswith("Downloading bytes")
        self.n = kwargs.get("initial") or 0
        self.total = kwargs.get("total")
        self.format_dict: dict[str, Any] = {"rate": None}

    def update(self, n: float | None = 1) -> None:
        self.n += n or 0
        if self._counts and n:
            self._counter.add(int(n))

    def __enter__(self) -> _CountingBar:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def close(self) -> None:
        pass

    def refresh(self, *args: Any, **kwargs: Any) -> None:
        pass

    def set_description(self, *args: Any, **kwargs: Any) -> None:
        pass

    set_description_str = set_postfix_str = set_postfix = set_description
