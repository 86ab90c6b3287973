"""Hugging Face Hub ids as MODEL: ``org/name[@revision]``.

Resolved offline from the local Hugging Face cache (``HF_HUB_CACHE``, ``HUGGINGFACE_HUB_CACHE``, ``HF_HOME``) to
the snapshot directory, or, for ``pelt inspect`` only, read over HTTP from ``config.json``, the shard index and
each shard's safetensors header (one 16 KB Range request per shard, as huggingface_hub's safetensors-metadata API
does with 100 KB; huggingface_hub's session, URLs, token and errors), so a large model inspects without
downloading its weights. huggingface_hub is imported inside functions: never on ``pelt --help``'s path.
"""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import CheckpointError, PeltError, UsageError
from .io.checkpoint import Checkpoint, resolve_files
from .io.header import INDEX_NAME, MAX_HEADER, SINGLE_NAME, TensorInfo, parse_header

_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9_])?"
HUB_ID = re.compile(rf"(?P<repo>{_PART}/{_PART})(?:@(?P<rev>[^\s@]+))?")
_PATH_START = ("/", "./", "../", "~", ".\\")
_FILE_SUFFIXES = (".safetensors", ".json", ".yaml", ".yml", ".bin", ".pt", ".pth", ".tar", ".gz")


class HubNotCached(CheckpointError):
    """A Hub id (or its revision) that the local Hugging Face cache does not hold with its weights."""


@dataclass(frozen=True)
class HubId:
    """A Hub model id and an optional revision (branch, tag or commit hash)."""

    repo_id: str
    revision: str | None = None

    def __str__(self) -> str:
        return self.repo_id + (f"@{self.revision}" if self.revision else "")

    @property
    def download(self) -> str:
        """The ``hf download`` command that puts this id in the cache."""
        return f"hf download {self.repo_id}" + (f" --revision {self.revision}" if self.revision else "")


def parse_hub_id(arg: str) -> HubId | None:
    """Read ``org/name[@revision]``; None for an argument that reads as a path rather than an id.

    Raises:
        UsageError: an argument shaped like an id (one ``/`` or an ``@``) that is not a valid one.
    """
    if arg.startswith(_PATH_START) or "\\" in arg or arg.lower().endswith(_FILE_SUFFIXES):
        return None
    if "@" not in arg and arg.count("/") != 1:
        return None
    m = HUB_ID.fullmatch(arg)
    bad = m is None or ".." in m["repo"] or "--" in m["repo"] or len(m["repo"].split("/")[1]) > 96
    if bad or (m["rev"] is not None and (".." in m["rev"] or m["rev"].startswith("/"))):
        raise UsageError(
            f"MODEL {arg!r}: no such file or directory, and not a Hub id (expected org/name or org/name@revision, "
            "letters, digits, '-', '_' and '.')"
        )
    return HubId(m["repo"], m["rev"])


def cache_dir() -> Path:
    """The Hugging Face hub cache, from the environment as it is now (as huggingface_hub reads it)."""
    env = os.environ
    home = env.get("HF_HOME") or os.path.join(
        env.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface"
    )
    hub = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")
    return Path(os.path.expandvars(os.path.expanduser(hub)))


def offline() -> bool:
    """Whether Hub requests are disabled (``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE``)."""
    flags = (os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or "").strip().upper()
    if flags in ("1", "ON", "YES", "TRUE"):
        return True
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def cached_ids(prefix: str = "") -> list[str]:
    """Model ids in the local cache starting with ``prefix`` (for shell completion; never raises)."""
    try:
        found = [p.name[len("models--") :].replace("--", "/", 1) for p in cache_dir().glob("models--*--*")]
    except OSError:
        return []
    return sorted(n for n in found if n.startswith(prefix))


def cached_snapshot(hub: HubId) -> Path:
    """The cached snapshot directory of ``hub``, offline, with its weights present.

    Raises:
        HubNotCached: the repo, the revision, or the snapshot's weights are not in the cache; the message gives
            the ``hf download`` command.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import IncompleteSnapshotError, LocalEntryNotFoundError

    cache = cache_dir()
    repo_dir = cache / ("models--" + hub.repo_id.replace("/", "--"))
    if not repo_dir.is_dir():
        raise HubNotCached(
            f"{hub}: no such file or directory, and not in the Hugging Face cache ({cache}); "
            f"download it first: {hub.download}"
        )
    try:
        snap = Path(snapshot_download(hub.repo_id, revision=hub.revision, cache_dir=cache, local_files_only=True))
    except IncompleteSnapshotError:
        raise HubNotCached(f"{hub}: the cached snapshot is incomplete; download it first: {hub.download}") from None
    except LocalEntryNotFoundError:
        have = ", ".join(_cached_revisions(repo_dir)) or "none"
        raise HubNotCached(
            f"{hub}: revision {hub.revision or 'main'!r} is not in the Hugging Face cache "
            f"(cached: {have}); download it first: {hub.download}"
        ) from None
    try:
        resolve_files(snap)
    except CheckpointError as e:
        raise HubNotCached(
            f"{hub}: the cached snapshot {snap} is incomplete ({e}); download it first: {hub.download}"
        ) from None
    return snap


def _cached_revisions(repo_dir: Path) -> list[str]:
    """Refs (branch and tag names) and the short hashes of snapshots without a ref, in the cache."""
    refs = repo_dir / "refs"
    names = sorted(str(p.relative_to(refs)) for p in refs.rglob("*") if p.is_file()) if refs.is_dir() else []
    pointed = {(refs / n).read_text().strip() for n in names}
    snaps = repo_dir / "snapshots"
    loose = sorted(p.name[:7] for p in snaps.iterdir() if p.name not in pointed) if snaps.is_dir() else []
    return names + loose


def remote_checkpoint(hub: HubId) -> Checkpoint:
    """Read a Hub model's ``config.json``, shard index and safetensors headers over HTTP; no weights are fetched.

    Each shard costs one Range request of :data:`FIRST_RANGE` bytes (a second one only for a longer header), and
    the header is validated as on disk, so the tensor table (dtypes, shapes, byte ranges) is the one the files
    would give. Files are ``org/name[@rev]/FILE``; nothing is written to the cache.

    Raises:
        CheckpointError: the repo or revision does not exist, or holds no safetensors weights.
        PeltError: the Hub could not be reached.
    """
    from concurrent.futures import ThreadPoolExecutor

    from huggingface_hub import constants

    endpoint = (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")
    with _hub_errors(hub, endpoint):
        config = _remote_json(hub, endpoint, "config.json")  # first: it tells a missing repo or revision apart
        index = _remote_json(hub, endpoint, INDEX_NAME)
        names = _shard_names(hub, index)
        with ThreadPoolExecutor(max_workers=min(8, len(names))) as pool:
            headers = list(pool.map(lambda n: _remote_header(hub, endpoint, n), names))
    tensors: dict[str, TensorInfo] = {}
    metadata: dict[str, str] = {}
    for shard_tensors, shard_meta in headers:
        tensors.update(shard_tensors)
        metadata.update(shard_meta)
    missing = [k for k in (index or {}).get("weight_map", {}) if k not in tensors]
    if missing:
        raise CheckpointError(
            f"{hub}: {len(missing)} tensor(s) in the Hub's shard index are in no shard header, e.g. {missing[0]!r}"
        )
    return Checkpoint(
        root=Path(str(hub)),
        files=[Path(f"{hub}/{n}") for n in names],
        tensors=tensors,
        metadata=metadata,
        config=config,
        sharded=index is not None,
    )


FIRST_RANGE = 16 * 1024  # bytes asked for first: the 8-byte length and, for most shards, the whole header


def _url(hub: HubId, endpoint: str, filename: str) -> str:
    from huggingface_hub import hf_hub_url

    return hf_hub_url(hub.repo_id, filename, revision=hub.revision, endpoint=endpoint)


def _get(url: str, first: int | None = None, last: int | None = None) -> Any:
    """GET ``url`` (bytes ``first..last`` when given), following the Hub's redirects; raises the Hub's errors."""
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    headers = build_hf_headers()
    if first is not None:
        headers["Range"] = f"bytes={first}-{last}"
    response = get_session().get(url, headers=headers, follow_redirects=True)
    hf_raise_for_status(response)
    return response


def _remote_json(hub: HubId, endpoint: str, filename: str) -> dict[str, Any] | None:
    """A small JSON file of the repo over HTTP (not cached); None when the repo has no such file."""
    from huggingface_hub.errors import RemoteEntryNotFoundError

    try:
        doc = _get(_url(hub, endpoint, filename)).json()
    except RemoteEntryNotFoundError:
        return None
    except ValueError as e:
        raise CheckpointError(f"{hub}: {filename} on the Hub is not valid JSON ({e})") from None
    return doc if isinstance(doc, dict) else None


def _shard_names(hub: HubId, index: dict[str, Any] | None) -> list[str]:
    """The safetensors files to read: the index's shards in order, or ``model.safetensors``."""
    if index is None:
        return [SINGLE_NAME]
    wm = index.get("weight_map")
    if not isinstance(wm, dict) or not wm:
        raise CheckpointError(f"{hub}: {INDEX_NAME} on the Hub has no 'weight_map' object")
    return list(dict.fromkeys(wm.values()))


def _remote_header(hub: HubId, endpoint: str, filename: str) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """One shard's header over HTTP Range requests, validated as :func:`~pelt_cli.io.header.read_header` does."""
    from huggingface_hub.errors import RemoteEntryNotFoundError

    url = _url(hub, endpoint, filename)
    try:
        r = _get(url, 0, FIRST_RANGE - 1)
    except RemoteEntryNotFoundError:
        raise CheckpointError(
            f"{hub}: the Hub repo has no {filename} (nor {INDEX_NAME}); pelt reads safetensors only"
        ) from None
    head, total = r.content, r.headers.get("Content-Range", "").rpartition("/")[2]
    size = int(total) if total.isdigit() else len(head)
    where = Path(f"{hub}/{filename}")
    if len(head) < 8:
        raise CheckpointError(f"{where}: truncated: {size} bytes, a safetensors file starts with an 8-byte length")
    (n,) = struct.unpack("<Q", head[:8])
    if n > MAX_HEADER or 8 + n > size:
        raise CheckpointError(f"{where}: header length {n} does not fit the file ({size} bytes)")
    raw = head[8 : 8 + n] if len(head) >= 8 + n else _get(url, 8, 8 + n - 1).content
    shard = parse_header(where, raw, size)
    return shard.tensors, shard.metadata


@contextmanager
def _hub_errors(hub: HubId, endpoint: str) -> Iterator[None]:
    """Turn huggingface_hub's errors into one-line pelt errors naming the id and the endpoint."""
    try:
        yield
    except PeltError:
        raise
    except Exception as exc:
        mapped = _mapped(hub, endpoint, exc)
        if mapped is None:
            raise
        raise mapped from None


def _mapped(hub: HubId, where: str, exc: Exception) -> PeltError | None:
    from huggingface_hub import errors as e

    if isinstance(exc, e.GatedRepoError):
        return CheckpointError(f"{hub}: gated on the Hub ({where}); accept its terms and log in: hf auth login")
    if isinstance(exc, e.RevisionNotFoundError):
        return CheckpointError(f"{hub}: no revision {hub.revision!r} on the Hub ({where})")
    if isinstance(exc, e.RepositoryNotFoundError):
        return CheckpointError(
            f"{hub}: no such file or directory, and no such model on the Hub ({where}; "
            "private models need: hf auth login)"
        )
    if isinstance(exc, (e.HfHubHTTPError, OSError)) or type(exc).__module__.startswith(("httpx", "httpcore")):
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return PeltError(f"{hub}: the Hub at {where} could not be read ({first}); for files on disk: {hub.download}")
    return None
