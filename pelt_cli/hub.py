"""Hugging Face Hub ids as MODEL: ``org/name[@revision]``.

Resolved offline from the local Hugging Face cache (``HF_HUB_CACHE``, ``HUGGINGFACE_HUB_CACHE``, ``HF_HOME``) to
the snapshot directory, or, for ``pelt inspect`` only, read over HTTP from the safetensors headers (a few KB per
shard, via huggingface_hub's safetensors-metadata API) and ``config.json``, so a large model inspects without
downloading its weights. huggingface_hub is imported inside functions: never on ``pelt --help``'s path.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import CheckpointError, PeltError, UsageError
from .io.checkpoint import Checkpoint, resolve_files
from .io.header import TensorInfo

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
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache = cache_dir()
    repo_dir = cache / ("models--" + hub.repo_id.replace("/", "--"))
    if not repo_dir.is_dir():
        raise HubNotCached(
            f"{hub}: no such file or directory, and not in the Hugging Face cache ({cache}); "
            f"download it first: {hub.download}"
        )
    try:
        snap = Path(snapshot_download(hub.repo_id, revision=hub.revision, cache_dir=cache, local_files_only=True))
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
    """Read a Hub model's safetensors headers (HTTP Range requests) and ``config.json``; no weights are fetched.

    Tensor offsets are relative to each shard's data region (the header length is not fetched); sizes, dtypes
    and shapes are exact. Every file is a name relative to the repo.

    Raises:
        CheckpointError: the repo or revision does not exist, or holds no safetensors weights.
        PeltError: the Hub could not be reached.
    """
    from huggingface_hub import HfApi

    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None)
    with _hub_errors(hub, api.endpoint):
        config = _remote_config(api, hub)  # first: it tells a missing repo or revision from a missing file
        meta = api.get_safetensors_metadata(hub.repo_id, revision=hub.revision)
    names = list(dict.fromkeys(meta.weight_map.values())) or list(meta.files_metadata)
    tensors: dict[str, TensorInfo] = {}
    metadata: dict[str, str] = {}
    for fname in names:
        fm = meta.files_metadata[fname]
        for name, t in fm.tensors.items():
            begin, end = t.data_offsets
            tensors[name] = TensorInfo(name, t.dtype, tuple(t.shape), Path(fname), begin, end)
        metadata.update(fm.metadata or {})
    return Checkpoint(
        root=Path(str(hub)),
        files=[Path(n) for n in names],
        tensors=tensors,
        metadata=metadata,
        config=config,
        sharded=meta.sharded,
    )


def _remote_config(api: Any, hub: HubId) -> dict[str, Any] | None:
    """``config.json`` fetched over HTTP (not cached); None when the repo has none."""
    from huggingface_hub import hf_hub_url
    from huggingface_hub.errors import RemoteEntryNotFoundError
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    url = hf_hub_url(hub.repo_id, "config.json", revision=hub.revision, endpoint=api.endpoint)
    response = get_session().get(url, headers=build_hf_headers(), follow_redirects=True)
    try:
        hf_raise_for_status(response)
    except RemoteEntryNotFoundError:
        return None
    try:
        doc = response.json()
    except ValueError as e:
        raise CheckpointError(f"{hub}: config.json on the Hub is not valid JSON ({e})") from None
    return doc if isinstance(doc, dict) else None


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
    if isinstance(exc, e.NotASafetensorsRepoError):
        return CheckpointError(
            f"{hub}: the Hub repo has no model.safetensors or model.safetensors.index.json "
            "(pelt reads safetensors only)"
        )
    if isinstance(exc, e.SafetensorsParsingError):
        return CheckpointError(f"{hub}: a safetensors header on the Hub does not parse ({exc})")
    if isinstance(exc, (e.HfHubHTTPError, OSError)) or type(exc).__module__.startswith(("httpx", "httpcore")):
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return PeltError(f"{hub}: the Hub at {where} could not be read ({first}); for files on disk: {hub.download}")
    return None
