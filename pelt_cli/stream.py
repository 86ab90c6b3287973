"""The streaming half of ``pelt merge``: one pass over the base checkpoint, tensor by tensor.

Each output tensor is read through the header index, folded in fp32 if a module acts on it
(:func:`pelt_cli.methods.fold_tensor`), cast and written through :class:`~pelt_cli.io.writer.ShardedWriter`;
untouched tensors are copied inside the kernel (``copy_file_range``), like ``cp``. Peak memory is two tensor slots.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pelt_cli.errors import PeltError
from pelt_cli.io.checkpoint import Checkpoint
from pelt_cli.io.fingerprint import tensor_digest
from pelt_cli.io.header import PICKLE_SUFFIXES, SINGLE_NAME, TensorInfo, TensorSpec
from pelt_cli.io.reader import TensorReader
from pelt_cli.io.writer import ShardedWriter, plan_shards, shard_names, tensor_bytes
from pelt_cli.methods import FoldOp, fold_tensor

FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


class Workspace:
    """Reused fp32 and output buffers for folding, so streaming a checkpoint does not fault in fresh pages per
    tensor: the source bytes are decoded into an fp32 buffer, folded in place, and cast into an output buffer."""

    def __init__(self) -> None:
        import torch

        self.f32 = torch.empty(0, dtype=torch.float32)
        self.out = bytearray(0)

    def fold(self, data: Any, info: TensorInfo, ops: list[FoldOp], spec: TensorSpec) -> memoryview:
        """The output bytes of one tensor: ``data`` (its stored bytes) folded by ``ops``, cast to ``spec.dtype``."""
        import torch

        from pelt_cli.io.header import torch_dtype

        n = info.numel
        if not n:
            return memoryview(b"")
        if self.f32.numel() < n:
            self.f32 = torch.empty(n, dtype=torch.float32)
        src = torch.frombuffer(data, dtype=torch_dtype(info.dtype), count=n).view(info.shape)
        w = self.f32[:n].view(info.shape)
        w.copy_(src)
        w = fold_tensor(w, ops)
        if spec.dtype == "F32" and w.is_contiguous():
            return tensor_bytes(w)
        if len(self.out) < spec.nbytes:
            self.out = bytearray(spec.nbytes)
        out = torch.frombuffer(self.out, dtype=torch_dtype(spec.dtype), count=n).view(info.shape)
        out.copy_(w)
        return memoryview(self.out)[: spec.nbytes]


def stream_tensors(
    ckpt: Checkpoint,
    specs: list[TensorSpec],
    source: dict[str, str],
    disk_ops: dict[str, list[FoldOp]],
    need: set[str],
    w: ShardedWriter,
    report: Any,
    src_digests: dict[str, str] | None,
    out_digests: dict[str, str] | None,
) -> None:
    """Write every output tensor, in a two-stage pipeline on two cores.

    A worker thread reads (and hashes, and folds) tensor i+1 into one of two buffer slots while this thread writes
    tensor i from the other (``pread``/``pwrite``, hashing and torch ops release the GIL). Untouched tensors (same
    dtype, no fold) are copied inside the kernel instead, and hashed in chunks when a digest is wanted, so the
    buffers are sized by the largest *folded* tensor.
    """
    from concurrent.futures import ThreadPoolExecutor

    size = max((ckpt.tensors[n].nbytes for n in need), default=0)
    slots = [(bytearray(size), Workspace()) for _ in range(2)]

    def prepare(i: int, reader: TensorReader) -> tuple[Any, str | None, bool]:
        spec = specs[i]
        src = source[spec.name]
        if src not in need:  # copied by the kernel; hashed here in 16 MiB chunks if a digest is wanted
            wanted = src_digests is not None or out_digests is not None
            return None, tensor_digest(ckpt.tensors[src]) if wanted else None, False
        buf, work = slots[i % 2]
        data: Any = reader.read_bytes(src, into=buf)
        digest = hashlib.blake2b(data, digest_size=16).hexdigest() if src_digests is not None else None
        todo = disk_ops.get(spec.name)
        if todo or spec.dtype != ckpt.tensors[src].dtype:
            data = work.fold(data, ckpt.tensors[src], todo or [], spec)
        return data, digest, bool(todo)

    with ThreadPoolExecutor(1) as pool, TensorReader(ckpt) as ahead, TensorReader(ckpt) as here:
        pending = pool.submit(prepare, 0, ahead) if specs else None
        for i, spec in enumerate(specs):
            if pending is None:
                raise PeltError(f"internal: no read queued for tensor {i} ({spec.name})")
            data, digest, folded = pending.result()
            # slot (i+1) % 2 last held tensor i-1, already written: the worker may refill it now
            pending = pool.submit(prepare, i + 1, ahead) if i + 1 < len(specs) else None
            src = source[spec.name]
            if data is None:  # untouched: a kernel-side copy, like cp (output bytes = source bytes)
                w.copy_range(spec.name, *here.locate(src)[:2])
                if out_digests is not None:
                    out_digests[spec.name] = digest
            else:
                w.write_bytes(spec.name, data)
                if out_digests is not None:
                    out_digests[spec.name] = hashlib.blake2b(data, digest_size=16).hexdigest()
            if digest is not None and src_digests is not None:
                src_digests[src] = digest
            report.tensors_folded += folded
            report.tensors_written += 1
            report.bytes_written += spec.nbytes


@dataclass
class OutputPlan:
    """A merge's planned output: config, shards (specs in order) and file names, each output tensor's base tensor
    (``source``), folds by output name, untied tensors, and tensors written from memory (``added``, e.g. a head)."""

    config: dict
    shards: list[list[TensorSpec]]
    names: list[str]
    source: dict[str, str]
    disk_ops: dict[str, list[FoldOp]]
    untied: list[str] = field(default_factory=list)
    added: dict[str, Any] = field(default_factory=dict)

    @property
    def specs(self) -> list[TensorSpec]:
        """Every output tensor, shard by shard."""
        return [s for shard in self.shards for s in shard]

    @property
    def streamed(self) -> list[TensorSpec]:
        """The output tensors that come from the base checkpoint."""
        return [s for s in self.specs if s.name not in self.added]


def layout(
    ckpt: Checkpoint,
    extra: dict[str, str],
    out_dtype: str | None,
    max_shard_size: int | None,
    rename: dict[str, str] | None = None,
    added: list[TensorSpec] | None = None,
) -> tuple[list[list[TensorSpec]], list[str], dict[str, str]]:
    """Output shards (specs in order) and file names; ``source`` maps each output tensor to its base tensor.

    Args:
        ckpt: the base checkpoint (its shard layout is kept unless ``max_shard_size`` re-shards).
        extra: more output tensors, each a copy of a base tensor (output name → base name; untied weights).
        out_dtype: the output dtype of floating tensors (None: the base's).
        max_shard_size: re-shard to at most this many bytes per file.
        rename: base name → output name; base tensors not in it are left out (a task model's checkpoint).
        added: tensors written from memory, placed in the last shard.
    """
    source: dict[str, str] = {}
    groups: list[list[TensorSpec]] = []
    for f in ckpt.files:
        group = []
        for info in sorted((t for t in ckpt.tensors.values() if t.file == f), key=lambda t: t.begin):
            own = [info.name] if rename is None else [rename[info.name]] if info.name in rename else []
            for name in own + [t for t, s in extra.items() if s == info.name and t not in ckpt.tensors]:
                dt = out_dtype if out_dtype and info.dtype in FLOAT_DTYPES else info.dtype
                group.append(TensorSpec(name, dt, info.shape))
                source[name] = info.name
        if group:
            groups.append(group)
    if added:
        groups[-1].extend(added)
    if max_shard_size:
        shards = plan_shards([s for g in groups for s in g], max_shard_size)
        return shards, shard_names(len(shards)), source
    names = (
        [SINGLE_NAME]
        if len(groups) == 1 and not ckpt.sharded
        else [f.name for f in ckpt.files if any(t.file == f for t in ckpt.tensors.values())]
    )
    return groups, names, source


def side_files(directory: Path) -> list[Path]:
    """Everything beside the weights that a merged checkpoint needs: config, tokenizer, processor, generation."""
    keep = []
    for p in sorted(directory.iterdir()):
        if not p.is_file() or p.name.startswith(".") or p.name == "config.json":
            continue
        if p.suffix == ".safetensors" or p.name.endswith(".index.json") or p.suffix in PICKLE_SUFFIXES:
            continue
        keep.append(p)
    return keep
