"""A checkpoint read from its headers: a ``.safetensors`` file, a directory with ``model.safetensors``, or a
sharded directory with its index (cross-checked against the shard headers).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pelt_cli.errors import CheckpointError
from pelt_cli.io.header import INDEX_NAME, PICKLE_SUFFIXES, SINGLE_NAME, TensorInfo, read_header


@dataclass
class Checkpoint:
    """A safetensors checkpoint read from its headers only."""

    root: Path
    files: list[Path]
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] = field(default_factory=dict)
    config: dict[str, Any] | None = None
    sharded: bool = False

    @property
    def directory(self) -> Path:
        """The directory holding the weights (and config.json, tokenizer files, …)."""
        return self.root if self.root.is_dir() else self.root.parent

    @property
    def total_params(self) -> int:
        """Number of elements over all tensors on disk."""
        return sum(t.numel for t in self.tensors.values())

    @property
    def total_bytes(self) -> int:
        """Bytes of tensor data over all tensors on disk."""
        return sum(t.nbytes for t in self.tensors.values())


def _refuse_pickle(p: Path) -> CheckpointError:
    return CheckpointError(
        f"{p}: pickle checkpoint refused: pelt never executes pickles, it reads safetensors only",
        hint='convert once in a trusted environment: python -c "from transformers import AutoModel; '
        f"AutoModel.from_pretrained('{p if p.is_dir() else p.parent}').save_pretrained('OUT')\" "
        "(saves model.safetensors)",
    )


def resolve_files(path: str | os.PathLike[str]) -> tuple[Path, list[Path], bool]:
    """Find the safetensors files of a checkpoint path.

    Args:
        path: a ``.safetensors`` file, a directory with ``model.safetensors``, or a sharded directory.

    Returns:
        ``(root, files, sharded)``.

    Raises:
        CheckpointError: missing path, no weights, or a pickle checkpoint.
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointError(
            f"{p}: no such file or directory",
            hint="give a directory, a .safetensors file or a short name (pelt inspect --help lists them)",
        )
    if p.is_file():
        if p.suffix in PICKLE_SUFFIXES:
            raise _refuse_pickle(p)
        if p.name.endswith(".index.json"):
            return resolve_files(p.parent)
        if p.suffix != ".safetensors":
            raise CheckpointError(f"{p}: not a .safetensors file (suffix {p.suffix or 'none'!r})")
        return p, [p], False
    if (p / INDEX_NAME).is_file():
        return p, _index_files(p / INDEX_NAME), True
    if (p / SINGLE_NAME).is_file():
        return p, [p / SINGLE_NAME], False
    found = sorted(p.glob("*.safetensors"))
    if found:
        return p, found, len(found) > 1
    if any(f.suffix in PICKLE_SUFFIXES for f in p.iterdir()):
        raise _refuse_pickle(p)
    raise CheckpointError(f"{p}: no weights found (expected model.safetensors, {INDEX_NAME} or *.safetensors)")


def _load_json(p: Path, what: str) -> Any:
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{p}: {what} is not valid JSON ({e})") from None


def _index_files(index_path: Path) -> list[Path]:
    doc = _load_json(index_path, "shard index")
    wm = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(wm, dict) or not wm:
        raise CheckpointError(f"{index_path}: shard index has no 'weight_map' object")
    names = list(dict.fromkeys(wm.values()))
    files = [index_path.parent / n for n in names]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(f"{index_path}: shard(s) listed in the index are missing: {', '.join(missing)}")
    return files


def open_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Read every header of a checkpoint and cross-check the shard index. Reads no tensor data.

    Args:
        path: a ``.safetensors`` file, a directory with ``model.safetensors``, or a sharded directory.

    Returns:
        The checkpoint's tensor table and config (``config.json`` when present).

    Raises:
        CheckpointError: any problem with the files, reported with the path.
    """
    root, files, sharded = resolve_files(path)
    tensors: dict[str, TensorInfo] = {}
    metadata: dict[str, str] = {}
    for f in files:
        h = read_header(f)
        for name, info in h.tensors.items():
            if name in tensors:
                raise CheckpointError(f"{f}: tensor {name!r} also appears in {tensors[name].file.name}")
            tensors[name] = info
        metadata.update(h.metadata)
    if sharded and (root / INDEX_NAME).is_file():
        _check_index(root / INDEX_NAME, tensors)
    directory = root if root.is_dir() else root.parent
    config = None
    if (directory / "config.json").is_file():
        config = _load_json(directory / "config.json", "config.json")
    return Checkpoint(root=root, files=files, tensors=tensors, metadata=metadata, config=config, sharded=sharded)


def _check_index(index_path: Path, tensors: dict[str, TensorInfo]) -> None:
    wm: dict[str, str] = _load_json(index_path, "shard index")["weight_map"]
    missing = [k for k in wm if k not in tensors]
    if missing:
        raise CheckpointError(
            f"{index_path}: {len(missing)} tensor(s) in the index are in no shard header, e.g. {missing[0]!r}"
        )
    wrong = [k for k, f in wm.items() if tensors[k].file.name != f]
    if wrong:
        k = wrong[0]
        raise CheckpointError(f"{index_path}: index puts {k!r} in {wm[k]} but it is in {tensors[k].file.name}")
    extra = [k for k in tensors if k not in wm]
    if extra:
        raise CheckpointError(f"{index_path}: {len(extra)} tensor(s) are missing from the index, e.g. {extra[0]!r}")
