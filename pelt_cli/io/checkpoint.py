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
from pelt_cli.io.guard import kind_of, load_json, require_regular
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
        CheckpointError: missing path, no weights, a pickle checkpoint, or a path that is not a regular file or a
            directory (a FIFO, a device, a socket, a symlink loop).
    """
    p = Path(path)
    if not os.path.lexists(p):
        raise CheckpointError(
            f"{p}: no such file or directory",
            hint="give a directory, a .safetensors file or a short name (pelt inspect --help lists them)",
        )
    if kind_of(p, CheckpointError) == "file":
        if p.suffix in PICKLE_SUFFIXES:
            raise _refuse_pickle(p)
        if p.name.endswith(".index.json"):
            return resolve_files(p.parent)
        if p.suffix != ".safetensors":
            raise CheckpointError(f"{p}: not a .safetensors file (suffix {p.suffix or 'none'!r})")
        return p, [p], False
    for name in (INDEX_NAME, SINGLE_NAME):
        if os.path.lexists(p / name):
            require_regular(p / name, "a regular file", CheckpointError)
    if (p / INDEX_NAME).is_file():
        return p, _index_files(p / INDEX_NAME), True
    if (p / SINGLE_NAME).is_file():
        return p, [p / SINGLE_NAME], False
    try:
        entries = sorted(p.iterdir())
    except OSError as e:
        raise CheckpointError(f"{p}: cannot list the directory ({e.strerror or e})") from None
    found = [f for f in entries if f.suffix == ".safetensors"]
    if found:
        return p, found, len(found) > 1
    if any(f.suffix in PICKLE_SUFFIXES for f in entries):
        raise _refuse_pickle(p)
    raise CheckpointError(f"{p}: no weights found (expected model.safetensors, {INDEX_NAME} or *.safetensors)")


def _load_json(p: Path, what: str) -> Any:
    return load_json(p, what, CheckpointError, expect=dict)


def read_index(index_path: Path) -> dict[str, str]:
    """The ``weight_map`` of a shard index, checked: an object of tensor name → shard file name in the same folder.

    Raises:
        CheckpointError: not a JSON object, no ``weight_map``, or a value that is not a plain file name.
    """
    doc = _load_json(index_path, "shard index")
    wm = doc.get("weight_map")
    if not isinstance(wm, dict) or not wm:
        raise CheckpointError(f"{index_path}: shard index has no 'weight_map' object")
    for name, shard in wm.items():
        if not isinstance(shard, str) or not shard or shard in (".", "..") or "/" in shard or "\\" in shard:
            raise CheckpointError(
                f"{index_path}: weight_map[{name!r}] is {json.dumps(shard)[:60]}; expected a shard file name "
                'in the same folder, e.g. "model-00001-of-00002.safetensors"'
            )
    return wm


def _index_files(index_path: Path) -> list[Path]:
    wm = read_index(index_path)
    names = list(dict.fromkeys(wm.values()))
    files = [index_path.parent / n for n in names]
    missing = [f.name for f in files if not os.path.lexists(f)]
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
    if os.path.lexists(directory / "config.json"):
        config = _load_json(directory / "config.json", "config.json")
        check_config(config, directory / "config.json")
    return Checkpoint(root=root, files=files, tensors=tensors, metadata=metadata, config=config, sharded=sharded)


def _check_index(index_path: Path, tensors: dict[str, TensorInfo]) -> None:
    wm = read_index(index_path)
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


# config.json sizes that build the model: positive integers wherever they appear (sub-configs included).
CONFIG_SIZES = {
    "num_hidden_layers",
    "hidden_size",
    "num_attention_heads",
    "intermediate_size",
    "vocab_size",
    "max_position_embeddings",
    "num_key_value_heads",
    "n_layer",
    "n_head",
    "n_embd",
    "n_positions",
    "n_inner",
    "d_model",
    "encoder_layers",
    "decoder_layers",
    "encoder_attention_heads",
    "decoder_attention_heads",
    "encoder_ffn_dim",
    "decoder_ffn_dim",
    "head_dim",
    "num_channels",
    "image_size",
    "patch_size",
    "num_mel_bins",
}


CONFIG_COUNTS = {"type_vocab_size", "num_labels"}  # may be 0 (DeBERTa-v2 has no token types)


def check_config(doc: Any, where: Path, depth: int = 0) -> None:
    """The JSON types of the ``config.json`` keys that decide the model's structure: ``model_type`` a string,
    ``architectures`` a list of strings, every size in :data:`CONFIG_SIZES` a positive integer and every count in
    :data:`CONFIG_COUNTS` a non-negative one (or null), in the config and its sub-configs (``text_config``, …).

    Raises:
        CheckpointError: the first key of the wrong type, named with its path.
    """
    prefix = "" if depth == 0 else "(sub-config) "
    if "model_type" in doc and not isinstance(doc["model_type"], str):
        raise CheckpointError(f"{where}: {prefix}model_type is {json.dumps(doc['model_type'])[:60]}; expected a string")
    archs = doc.get("architectures")
    if archs is not None and (not isinstance(archs, list) or not all(isinstance(a, str) for a in archs)):
        raise CheckpointError(f"{where}: {prefix}architectures is {json.dumps(archs)[:60]}; expected a list of names")
    for key, value in doc.items():
        least = 1 if key in CONFIG_SIZES else 0 if key in CONFIG_COUNTS else None
        bad = least is not None and value is not None
        if bad and (not isinstance(value, int) or isinstance(value, bool) or value < least):
            want = "a positive integer" if least else "an integer ≥ 0"
            raise CheckpointError(f"{where}: {prefix}{key} is {json.dumps(value)[:60]}; expected {want}")
        if isinstance(value, dict) and depth < 3:
            check_config(value, where, depth + 1)
