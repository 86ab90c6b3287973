"""Folds of ``pelt merge`` in numpy: bit for bit what torch (and so peft) computes, without importing torch.

A merge that only folds LoRA branches into plain ``Linear`` weights needs no model: the weights' bytes come from the
safetensors files, ``A`` and ``B`` from the run's adapter file. This module folds such a weight a block of rows at
a time, in a few numpy passes over a block that stays in the CPU cache:

* upcast: BF16 is the top half of an fp32 (``bits << 16``, exact); FP16 and FP32 as numpy converts them (exact);
* ``W += s · B A``: ``B A`` by the BLAS ``sgemm`` (one fused multiply-add per rank, in rank order: the bits MKL
  gives torch), scaled and added as peft does (``W + bf16?(s · (B A))`` with each step rounded to fp32; a power-of-two
  ``s`` is folded into ``B`` instead, which is exact);
* cast back: FP32 → BF16 rounds to nearest even, and every NaN becomes ``0xFFFF`` (what torch's vectorised cast
  writes); FP32 → FP16 by numpy (round to nearest even), NaNs quieted as torch quiets them.

The BLAS library's own threads are held at one while a merge runs (:func:`blas_single_thread`): the merge's workers
are the parallelism, and a pool of BLAS threads per small ``sgemm`` on top of them costs several times the work.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

FOLD_DTYPES = ("BF16", "F16", "F32")
BF16_NAN = 0xFFFF  # torch's vectorised fp32 → bf16 cast writes this for every NaN
F16_QUIET = 0x0200  # the quiet bit of an fp16 NaN (torch's cast sets it; numpy keeps a signalling payload)
BLOCK_ELEMS = 1 << 18  # about 1 MiB of fp32 per block: it stays in the CPU cache from upcast to cast
MIN_BLOCK_ROWS = 16
ROW_PAD = 16  # fp32 elements added to each buffer row (see Folder)
BLAS_SET = ("openblas_set_num_threads", "scipy_openblas_set_num_threads64_", "openblas_set_num_threads64_")
BLAS_GET = ("openblas_get_num_threads", "scipy_openblas_get_num_threads64_", "openblas_get_num_threads64_")
SGEMM = ("scipy_cblas_sgemm64_", "cblas_sgemm64_")  # ILP64 OpenBLAS (numpy's wheels): int64 arguments


def power_of_two(scale: float) -> bool:
    """Whether ``±scale`` is a power of two: multiplying an fp32 by it is exact (barring over/underflow)."""
    return scale != 0 and math.frexp(abs(scale))[0] == 0.5


@dataclass(frozen=True)
class LoraFold:
    """One LoRA branch to fold into a ``(out, in)`` weight: ``A`` (r × in) and ``B`` (out × r) in fp32, ``α/r``."""

    a: Any
    b: Any
    scale: float

    def exact_scale(self) -> bool:
        """Whether ``scale`` is a power of two (multiplying by it is exact, so it may go into ``B``)."""
        return power_of_two(self.scale)

    def prepared(self) -> tuple[Any, float | None]:
        """``(B', s')``: ``B`` with an exact scale folded in (``s'`` None), or ``B`` and the scale to apply."""
        import numpy as np

        if self.exact_scale():
            return self.b * np.float32(self.scale), None
        return self.b, self.scale


@dataclass(frozen=True)
class LazyLora:
    """A LoRA branch whose ``A`` and ``B`` stay on disk until its weight is folded: ``load()`` returns them in fp32.
    Memory then holds the branches of the weights being folded, not the whole adapter (a 70B model's adapter at a
    high rank is GBs)."""

    load: Callable[[], tuple[Any, Any]]
    scale: float

    def get(self) -> LoraFold:
        """The branch, read now."""
        a, b = self.load()
        return LoraFold(a, b, self.scale)


def resolved(ops: list[Any]) -> list[LoraFold]:
    """The branches with lazy ones read (:class:`LazyLora`)."""
    return [op.get() if isinstance(op, LazyLora) else op for op in ops]


def upcast(src: Any, dtype: str, out: Any) -> Any:
    """``out`` (uint32 view of fp32 rows) ← ``src`` (the stored rows, as uint16 for BF16/F16, fp32 for F32)."""
    import numpy as np

    if dtype == "BF16":
        np.left_shift(src, 16, out=out, dtype=np.uint32)  # bf16 = the top 16 bits of an fp32
    elif dtype == "F16":
        np.copyto(out.view(np.float32), src.view(np.float16))
    else:
        np.copyto(out, src.view(np.uint32))
    return out.view(np.float32)


def to_bf16(u: Any, out: Any, tmp: Any, flat: tuple[Any, Any] | None = None) -> None:
    """``out`` ← fp32 bits ``u`` rounded to BF16, nearest even (``u`` and ``tmp`` are overwritten). ``flat``: ``u``'s
    and ``tmp``'s whole buffers as 1-D arrays (rows with their padding): the passes run over them at full speed."""
    import numpy as np

    uf, tf = flat if flat is not None else (u, tmp)
    # bf16(x) = (x + 0x7FFF + lsb) >> 16, lsb = bit 16 of x
    np.right_shift(uf, 16, out=tf)
    np.bitwise_and(tf, 1, out=tf)
    tf += 0x7FFF
    uf += tf
    np.right_shift(u, 16, out=out, casting="unsafe")


def downcast(w: Any, dtype: str, out: Any, tmp: Any, nan: bool, flat: tuple[Any, Any] | None = None) -> None:
    """``out`` (the stored rows) ← fp32 rows ``w`` in ``dtype``, with torch's NaNs where ``nan`` says the rows may
    hold some; ``w`` may be overwritten (``flat``: see :func:`to_bf16`)."""
    import numpy as np

    mask = np.isnan(w) if nan else None
    if dtype == "BF16":
        to_bf16(w.view(np.uint32), out, tmp, flat)
        if mask is not None:
            out[mask] = BF16_NAN
    elif dtype == "F16":
        np.copyto(out.view(np.float16), w, casting="unsafe")
        if mask is not None:
            out[mask] |= F16_QUIET
    else:
        np.copyto(out.view(np.float32), w)


class Folder:
    """Folds weights of one width in row blocks; holds the fp32 block buffers (one folder per worker thread).

    Buffer rows are :data:`ROW_PAD` elements longer than a weight's: rows a power of two bytes apart (2048 columns)
    fall on the same CPU cache sets, which makes an ``sgemm`` into them about 2.5 times slower. Element-wise passes
    run over the whole buffers, padding included (numpy is 2-4 times slower on padded 2-D views); only the first and
    the last pass see the rows. Where numpy's OpenBLAS is found (:func:`sgemm_acc`), ``W += B' A`` is one ``sgemm``
    with β = 1 (for a power-of-two ``α/r``, folded into ``B'``): its fused multiply-adds and final add round as
    matmul-then-add does."""

    def __init__(self, cols: int, step: int | None = None) -> None:
        import numpy as np

        self.step = step or max(MIN_BLOCK_ROWS, BLOCK_ELEMS // max(1, cols) // MIN_BLOCK_ROWS * MIN_BLOCK_ROWS)
        self.cols, self.ld = cols, cols + ROW_PAD
        self.u = np.empty(self.step * self.ld, np.uint32)
        self.k = np.empty(self.step * self.ld, np.uint32)
        self.t = np.empty((self.step, self.ld), np.float32)[:, :cols]
        self.ones = np.ones(cols, np.float32)
        self.sums = np.empty(self.step, np.float32)

    def rows(self, buf: Any, h: int) -> Any:
        """The first ``h`` rows of a flat buffer, as a 2-D view without the padding."""
        return buf[: h * self.ld].reshape(h, self.ld)[:, : self.cols]

    def fold(self, src: Any, dst: Any, dtype: str, ops: list[LoraFold | LazyLora]) -> None:
        """``dst`` ← ``src`` (2-D stored rows, uint16 for BF16/F16, uint32 for F32) folded by ``ops`` in order;
        ``dst`` may be ``src``."""
        import numpy as np

        prepared = [(op.a, *op.prepared()) for op in resolved(ops)]
        gemm = sgemm_acc()
        n = src.shape[0]
        for r0 in range(0, n, self.step):
            r1 = min(n, r0 + self.step)
            h = r1 - r0
            w = upcast(src[r0:r1], dtype, self.rows(self.u, h))
            for a, b, s in prepared:  # W' = W + (α/r) B A
                if s is None and gemm is not None:
                    gemm(b[r0:r1], a, w)
                    continue
                t = np.matmul(b[r0:r1], a, out=self.t[:h])
                if s is not None:
                    t *= np.float32(s)
                w += t
            sums = np.matmul(w, self.ones, out=self.sums[:h])  # a NaN anywhere in a row makes its sum NaN
            flat = (self.u[: h * self.ld], self.k[: h * self.ld])
            downcast(w, dtype, dst[r0:r1], self.rows(self.k, h), bool(np.isnan(sums).any()), flat)


def fold_weight(src: Any, dst: Any, dtype: str, ops: list[LoraFold | LazyLora], folder: Folder | None = None) -> None:
    """Fold LoRA branches into one stored weight: ``dst = cast(W + Σ s · B A)``, bit-identical to peft's merge.

    Args:
        src: the weight's stored bytes as a 2-D array (uint16 for BF16/F16, uint32 for F32).
        dst: where the folded bytes go (same shape and dtype; may be ``src``).
        dtype: ``BF16``, ``F16`` or ``F32``.
        ops: the branches, in hook order (lazy ones are read now).
        folder: block buffers to reuse (one per thread), else new ones.
    """
    (folder or Folder(src.shape[1])).fold(src, dst, dtype, ops)


def storage_view(data: Any, dtype: str, shape: tuple[int, ...]) -> Any:
    """A writable numpy view of a tensor's stored bytes: uint16 for BF16/F16, uint32 for F32."""
    import numpy as np

    kind = np.uint32 if dtype == "F32" else np.uint16
    return np.frombuffer(data, dtype=kind, count=math.prod(shape)).reshape(shape)


@functools.cache
def sgemm_acc() -> Callable[[Any, Any, Any], None] | None:
    """``f(b, a, c)``: ``c += b @ a`` by one ``cblas_sgemm`` (β = 1) of numpy's OpenBLAS (fp32, row-major, each
    array's rows contiguous); None where that library is not found, or where a check on random data does not give
    matmul-then-add's bits. Only the 64-bit-integer symbols numpy's wheels export (``…sgemm64_``) are used: their
    argument types are known."""
    import numpy as np

    fn = next((getattr(lib, n) for _, lib in _blas_libs() for n in SGEMM if hasattr(lib, n)), None)
    if fn is None:
        return None
    i = ctypes.c_int64
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, i, i, i, ctypes.c_float, ctypes.c_void_p, i]
    fn.argtypes += [ctypes.c_void_p, i, ctypes.c_float, ctypes.c_void_p, i]
    fn.restype = None

    def acc(b: Any, a: Any, c: Any) -> None:
        (m, k), n = b.shape, a.shape[1]
        lb, la, lc = b.strides[0] // 4, a.strides[0] // 4, c.strides[0] // 4  # fp32 rows, in elements
        fn(101, 111, 111, m, n, k, 1.0, b.ctypes.data, lb, a.ctypes.data, la, 1.0, c.ctypes.data, lc)  # row-major

    rng = np.random.default_rng(0)
    b, a = rng.standard_normal((37, 8), dtype=np.float32), rng.standard_normal((8, 70), dtype=np.float32)
    c = rng.standard_normal((37, 80), dtype=np.float32)[:, :70]
    want = c + b @ a
    acc(b, a, c)
    return acc if np.array_equal(c, want) else None


def _blas_libs() -> list[tuple[str, Any]]:
    """``(path, library)`` of every OpenBLAS loaded in this process (numpy's own, once numpy is imported)."""
    try:
        with open("/proc/self/maps", encoding="utf-8") as f:
            paths = sorted({line.split()[-1] for line in f if "openblas" in line.lower() and ".so" in line})
    except OSError:
        return []
    out = []
    for path in paths:
        with contextlib.suppress(OSError):
            out.append((path, ctypes.CDLL(path)))
    return out


def _blas_calls() -> list[tuple[Any, Any]]:
    """``(set, get)`` thread-count functions of every OpenBLAS loaded in this process (numpy's own)."""
    calls = []
    for _, lib in _blas_libs():
        set_fn = next((getattr(lib, n) for n in BLAS_SET if hasattr(lib, n)), None)
        get_fn = next((getattr(lib, n) for n in BLAS_GET if hasattr(lib, n)), None)
        if set_fn is not None and get_fn is not None:
            get_fn.restype = ctypes.c_int
            calls.append((set_fn, get_fn))
    return calls


def blas_thread_counts() -> list[int]:
    """The thread count of every OpenBLAS loaded in this process (empty where none is found)."""
    return [get() for _, get in _blas_calls()]


@contextlib.contextmanager
def blas_single_thread() -> Iterator[None]:
    """numpy's BLAS held at one thread for a while (Linux, OpenBLAS; elsewhere nothing changes)."""
    import numpy  # noqa: F401  (loads the BLAS library)

    calls = _blas_calls()
    before = [get() for _, get in calls]
    for set_fn, _ in calls:
        set_fn(1)
    try:
        yield
    finally:
        for (set_fn, _), n in zip(calls, before, strict=True):
            set_fn(n)
