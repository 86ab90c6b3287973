"""The streaming half of ``pelt merge``: one pass over the base checkpoint, tensor by tensor, at the disk's speed.

Each output tensor is read through the header index, folded in fp32 if a module acts on it, cast and written through
:class:`~pelt_cli.io.writer.ShardedWriter`; untouched tensors are copied by the writer (inside the kernel, like
``cp``, or block by block past the page cache). Reads, folds and writes of different tensors overlap: fold threads
(one per core) read and fold tensors ahead while writer threads write the folded ones (:func:`stream_tensors`); a
fold works on blocks of rows that stay in the CPU cache (numpy for LoRA, :mod:`pelt_cli.fold`; torch otherwise,
:func:`fold_rows`), and the writer sends whole disk blocks past the page cache (``O_DIRECT``) or starts their
write-back at once, so the final ``fsync`` has little left to do. Peak memory is a few tensor slots (the largest
folded tensor's stored bytes), plus at most 256 MiB of slots folded ahead.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import os
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pelt_cli.errors import PeltError
from pelt_cli.fold import Folder, LazyLora, LoraFold, blas_single_thread, fold_weight, storage_view
from pelt_cli.io.checkpoint import Checkpoint
from pelt_cli.io.fingerprint import tensor_digest
from pelt_cli.io.header import PICKLE_SUFFIXES, SINGLE_NAME, TensorInfo, TensorSpec
from pelt_cli.io.reader import TensorReader
from pelt_cli.io.writer import DIRECT_ALIGN, ShardedWriter, aligned_buffer, plan_shards, shard_names
from pelt_cli.methods import FoldOp, fold_tensor

FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
BLOCK_ELEMS = 1 << 18  # a fold block of about 1 MiB in fp32: it stays in the CPU cache from upcast to cast
MIN_BLOCK_ROWS = 64  # and never a sliver of a few rows (BLAS takes other code paths for those)
MAX_WORKERS = 4  # read + fold threads (one torch thread each)
WRITERS = 2  # threads that write folded tensors and copy untouched ones (the disk's queue)
SPARE_SLOTS = 6  # at most this many slots beyond one per fold and write thread: folded ahead while the disk is busy
AHEAD_BYTES = 256 << 20  # and at most this much memory in them
MAX_AHEAD = 32  # tensors queued ahead of the one being written


def row_wise(op: FoldOp) -> bool:
    """Whether a fold can work on a block of rows: its function takes ``rows=(r0, r1)`` (LoRA, IA³), meaning each row
    of the folded weight depends on the same row of the weight alone."""
    try:
        return "rows" in inspect.signature(op.fn).parameters
    except (TypeError, ValueError):
        return False


def block_rows(shape: tuple[int, ...], elems: int | None = None) -> int:
    """Rows per fold block of a 2-D tensor: about ``elems`` (default :data:`BLOCK_ELEMS`) elements, a multiple of
    :data:`MIN_BLOCK_ROWS` rows, at least that."""
    cols = max(1, shape[-1])
    return max(MIN_BLOCK_ROWS, (elems or BLOCK_ELEMS) // cols // MIN_BLOCK_ROWS * MIN_BLOCK_ROWS)


def fold_rows(src: Any, dst: Any, ops: list[FoldOp], step: int | None = None) -> None:
    """Write ``src`` folded by ``ops`` into ``dst``: ``dst = cast(fold(fp32(src)))``, a block of rows at a time.

    ``dst`` has ``src``'s shape and any float dtype; it may share ``src``'s memory (same item size: each block is
    read into an fp32 buffer before its rows are written). With row-wise folds (:func:`row_wise`) on a 2-D tensor the
    fp32 buffer is one block (``step`` rows, the last block taking the remainder up to ``2·step − 1``), and the result
    is bit-identical to folding the whole tensor; otherwise the whole tensor is folded (:func:`fold_tensor`).
    """
    import torch

    ordered = sorted(ops, key=lambda op: op.late)  # stable: hook order within each group, input scales last
    if src.dim() != 2 or not all(row_wise(op) for op in ordered):
        dst.copy_(fold_tensor(src, ordered))
        return
    n = src.shape[0]
    step = step or block_rows(tuple(src.shape))
    buf = torch.empty((min(n, 2 * step - 1), src.shape[1]), dtype=torch.float32)
    r0 = 0
    while r0 < n:
        r1 = n if n - r0 < 2 * step else r0 + step
        w = buf[: r1 - r0]
        w.copy_(src[r0:r1])
        for op in ordered:
            w = op.fn(w, rows=(r0, r1))
        dst[r0:r1].copy_(w)
        r0 = r1


class Slot:
    """One tensor's buffers in the pipeline, page-aligned: its stored bytes (folded in place when the output has the
    same item size) and, for a cast to a wider or narrower dtype, the output bytes. A tensor's bytes sit at its
    output's offset within a disk block (``shift``), so the writer can send its whole blocks past the page cache."""

    def __init__(self, in_bytes: int, out_bytes: int) -> None:
        self.inp = aligned_buffer(in_bytes + DIRECT_ALIGN)
        self.out = aligned_buffer(out_bytes + DIRECT_ALIGN) if out_bytes else memoryview(b"")

    def fold(self, data: Any, info: TensorInfo, ops: list[FoldOp], spec: TensorSpec, shift: int) -> memoryview:
        """The output bytes of one tensor: ``data`` (its stored bytes, at ``shift`` in ``inp``) folded and cast to
        ``spec.dtype``, at ``shift`` in ``inp`` (same item size) or ``out``."""
        import torch

        from pelt_cli.io.header import torch_dtype

        n = info.numel
        if not n:
            return memoryview(b"")
        src = torch.frombuffer(data, dtype=torch_dtype(info.dtype), count=n).view(info.shape)
        buf = self.inp if spec.nbytes == info.nbytes else self.out
        dst = torch.frombuffer(buf, dtype=torch_dtype(spec.dtype), count=n, offset=shift).view(info.shape)
        fold_rows(src, dst, ops)
        return buf[shift : shift + spec.nbytes]

    def fold_numpy(
        self, data: Any, info: TensorInfo, ops: list[LoraFold | LazyLora], folder: Folder, shift: int
    ) -> memoryview:
        """The output bytes of one weight folded by LoRA branches in numpy (:mod:`pelt_cli.fold`), in place at
        ``shift`` in ``inp`` where ``data``, its stored bytes, sits."""
        out = self.inp[shift : shift + info.nbytes]
        fold_weight(
            storage_view(data, info.dtype, info.shape),
            storage_view(out, info.dtype, info.shape),
            info.dtype,
            ops,
            folder,
        )
        return out


def numpy_fold(ops: list[Any], info: TensorInfo, spec: TensorSpec) -> bool:
    """Whether a tensor's folds run in numpy: LoRA branches (:class:`~pelt_cli.fold.LoraFold`, or
    :class:`~pelt_cli.fold.LazyLora` read when folded) only, on a 2-D weight kept in its dtype."""
    return (
        bool(ops)
        and all(isinstance(op, (LoraFold, LazyLora)) for op in ops)
        and spec.dtype == info.dtype
        and len(info.shape) == 2
    )


def needs_torch(ckpt: Checkpoint, specs: list[TensorSpec], source: dict[str, str], disk_ops: dict) -> bool:
    """Whether any output tensor is folded or cast by torch (else the stream never imports it)."""
    for s in specs:
        info, ops = ckpt.tensors[source[s.name]], disk_ops.get(s.name) or []
        if (ops or s.dtype != info.dtype) and not numpy_fold(ops, info, s):
            return True
    return False


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op threads set to ``n`` for a while (the pipeline's workers are the parallelism: intra-op
    threads on top of them oversubscribe the cores and spin)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def stream_workers() -> int:
    """Read + fold threads: the cores this process may use, at most :data:`MAX_WORKERS`."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(MAX_WORKERS, cores))


@dataclass
class Prepared:
    """A tensor written by a worker: its output bytes (None: already written), the digests of its source and output
    bytes (when wanted), and whether it was folded."""

    data: memoryview | None
    src_digest: str | None
    out_digest: str | None
    folded: bool


class _Stream:
    """The pipeline of :func:`stream_tensors`: worker threads read, hash and fold tensors ahead, each into a free
    slot; the calling thread writes them in order and hands their slots back."""

    def __init__(
        self, ckpt: Checkpoint, source: dict[str, str], disk_ops: dict, need: set[str], hashes: tuple, w: ShardedWriter
    ) -> None:
        self.ckpt, self.source, self.disk_ops, self.need, self.w = ckpt, source, disk_ops, need, w
        self.writers = ThreadPoolExecutor(WRITERS, thread_name_prefix="pelt-write")
        self.src_hash, self.out_hash = hashes
        self.local = threading.local()
        self.readers: list[TensorReader] = []

    def slots(self, specs: list[TensorSpec], n: int, spare: int = SPARE_SLOTS) -> list[Slot]:
        """``n`` slots sized for the largest tensor read into memory (and the largest output of another width), and
        up to ``spare`` more within :data:`AHEAD_BYTES` (at least one)."""
        ins = [
            (self.ckpt.tensors[self.source[s.name]].nbytes, s.nbytes) for s in specs if self.source[s.name] in self.need
        ]
        size = max((i for i, _ in ins), default=0)
        out = max((o for i, o in ins if o != i), default=0)
        spare = max(1, min(spare, AHEAD_BYTES // max(1, size + out)))
        return [Slot(size, out) for _ in range(n + spare if ins else 0)]

    def reader(self) -> TensorReader:
        """This thread's reader (each keeps its own open shard)."""
        r = getattr(self.local, "reader", None)
        if r is None:
            r = self.local.reader = TensorReader(self.ckpt)
            self.readers.append(r)
        return r

    def folder(self, cols: int) -> Folder:
        """This thread's numpy fold buffers for weights of ``cols`` columns."""
        folders = getattr(self.local, "folders", None)
        if folders is None:
            folders = self.local.folders = {}
        if cols not in folders:
            folders[cols] = Folder(cols)
        return folders[cols]

    def prepare(self, spec: TensorSpec, slot: Slot | None, shift: int) -> tuple[Prepared, Future]:
        """Read (at ``shift`` in the slot), hash and fold one tensor in a fold thread, then hand its write to the
        writers; untouched ones (no slot) are hashed if wanted and copied by a writer from the base file."""
        src = self.source[spec.name]
        info = self.ckpt.tensors[src]
        if slot is None:  # hashed here in 16 MiB chunks if a digest is wanted
            digest = tensor_digest(info) if self.src_hash or self.out_hash else None
            return Prepared(None, digest, digest, False), self.writers.submit(self.copy, spec.name, src)
        data: Any = self.reader().read_bytes(src, into=slot.inp[shift:])  # type: ignore[arg-type]
        digest = hashlib.blake2b(data, digest_size=16).hexdigest() if self.src_hash else None
        todo = self.disk_ops.get(spec.name) or []
        if todo and numpy_fold(todo, info, spec):
            data = slot.fold_numpy(data, info, todo, self.folder(info.shape[1]), shift)
        elif todo or spec.dtype != info.dtype:
            data = slot.fold(data, info, todo, spec, shift)
        out = hashlib.blake2b(data, digest_size=16).hexdigest() if self.out_hash else None
        return Prepared(None, digest, out, bool(todo)), self.writers.submit(self.w.write_bytes, spec.name, data)

    def copy(self, name: str, src: str) -> None:
        """Copy an untouched tensor from the base file (in a writer thread, with its own reader)."""
        self.w.copy_range(name, *self.reader().locate(src)[:2])

    def close(self) -> None:
        """Close every worker's reader."""
        for r in self.readers:
            r.close()


def stream_tensors(
    ckpt: Checkpoint,
    specs: list[TensorSpec],
    source: dict[str, str],
    disk_ops: dict[str, list[Any]],
    need: set[str],
    w: ShardedWriter,
    report: Any,
    src_digests: dict[str, str] | None,
    out_digests: dict[str, str] | None,
    workers: int | None = None,
) -> None:
    """Write every output tensor: fold threads read and fold tensors ahead on every core, writer threads write them
    (the disk works while the cores fold), this thread hands out slots and counts the written tensors in order.

    ``workers`` fold threads (default :func:`stream_workers`: one per core) each read a tensor into a free slot
    (``workers + WRITERS`` slots and a few spare, :meth:`_Stream.slots`), hash it and fold it (numpy for LoRA
    branches, :mod:`pelt_cli.fold`; torch in row blocks otherwise, one torch thread per worker), then hand it to one
    of :data:`WRITERS` writer threads (:meth:`ShardedWriter.write_bytes`: its whole blocks past the page cache, as
    the tensor sits in its slot at its output's offset within a disk block); the slot is free again once it is
    written. Untouched tensors (same dtype,
    no fold) take no slot: a writer copies them from the base file (:meth:`ShardedWriter.copy_range`). ``pread``,
    hashing, numpy, torch and the writes all release the GIL. Slots are sized by the largest tensor read into
    memory, so memory stays at a few tensors whatever the checkpoint's size.
    """
    n = workers or stream_workers()
    st = _Stream(ckpt, source, disk_ops, need, (src_digests is not None, out_digests is not None), w)
    uses_torch = needs_torch(ckpt, specs, source, disk_ops)  # a big process already: no slots folded far ahead
    free = st.slots(specs, n + WRITERS, 1 if uses_torch else SPARE_SLOTS)
    queue: deque[tuple[TensorSpec, Slot | None, Future]] = deque()
    todo = iter(specs)
    nxt = next(todo, None)
    pool = ThreadPoolExecutor(n, thread_name_prefix="pelt-fold")
    threads = torch_threads(1) if uses_torch else contextlib.nullcontext()
    try:
        with threads, blas_single_thread():
            while queue or nxt is not None:
                while nxt is not None and len(queue) < MAX_AHEAD and (free or source[nxt.name] not in need):
                    slot = free.pop() if source[nxt.name] in need else None
                    queue.append((nxt, slot, pool.submit(st.prepare, nxt, slot, w.block_offset(nxt.name))))
                    nxt = next(todo, None)
                if not queue:
                    raise PeltError(f"internal: no slot free for tensor {nxt.name if nxt else '?'}")
                spec, slot, fut = queue.popleft()
                prepared, written = fut.result()
                written.result()
                _count(spec, source[spec.name], prepared, report, src_digests, out_digests)
                if slot is not None:
                    free.append(slot)  # written: a fold thread may refill it now
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        st.writers.shutdown(wait=True, cancel_futures=True)
        st.close()


def _count(
    spec: TensorSpec,
    src: str,
    p: Prepared,
    report: Any,
    src_digests: dict[str, str] | None,
    out_digests: dict[str, str] | None,
) -> None:
    """Count one written tensor and keep its digests."""
    if out_digests is not None:
        out_digests[spec.name] = p.out_digest or ""
    if src_digests is not None and p.src_digest is not None:
        src_digests[src] = p.src_digest
    report.tensors_folded += p.folded
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
    disk_ops: dict[str, list[Any]]  # FoldOp (torch) or LoraFold (numpy) lists
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
