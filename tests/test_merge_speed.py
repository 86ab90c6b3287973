"""``pelt merge`` at the disk's speed: row-block folds equal whole-tensor folds bit for bit, and the pipelined stream
(workers, slots, write-behind, kernel copies) writes byte-identical checkpoints whatever its settings."""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

import pytest
import tiny_models
import torch
import transformers as tf
from conftest import make_run

from pelt_cli import recipe as rc
from pelt_cli import stream
from pelt_cli.errors import PeltError
from pelt_cli.io import writer
from pelt_cli.io.checkpoint import open_checkpoint
from pelt_cli.io.fingerprint import tensor_digest
from pelt_cli.io.header import TensorSpec
from pelt_cli.io.writer import ShardedWriter, save_file
from pelt_cli.merge import merge_run
from pelt_cli.methods import FoldOp, fold_tensor
from pelt_cli.methods.ia3 import fold_input_scale, fold_output_scale
from pelt_cli.methods.lora import fold_lora


def _lora(out: int, inp: int, r: int, seed: int, **kw: object) -> FoldOp:
    g = torch.Generator().manual_seed(seed)
    width = sum(e - s for s, e in kw["slices"]) if kw.get("slices") else out  # type: ignore[union-attr]
    a, b = torch.randn(r, inp, generator=g) * 0.05, torch.randn(width, r, generator=g) * 0.05
    return FoldOp(functools.partial(fold_lora, a=a, b=b, scale=2.0, **kw))


def _out_scale(w: torch.Tensor, l: torch.Tensor, transposed: bool, rows: tuple[int, int] | None = None) -> torch.Tensor:  # noqa: E741
    return fold_output_scale(w, None, l, transposed, rows)[0]


def _scales(n: int, seed: int) -> torch.Tensor:
    return 1 + 0.1 * torch.randn(n, generator=torch.Generator().manual_seed(seed))


def _whole(src: torch.Tensor, ops: list[FoldOp], dtype: torch.dtype) -> torch.Tensor:
    """The pre-pipeline math: an fp32 copy of the whole tensor, folded, cast."""
    return fold_tensor(src.float().clone(), ops).to(dtype)


CASES = {  # name: (shape of the stored weight, folds as a function of it)
    "lora": ((1000, 333), lambda o, i: [_lora(o, i, 8, 1)]),
    "lora-llama-up": ((5504, 2048), lambda o, i: [_lora(o, i, 8, 2)]),
    "lora-llama-down": ((2048, 5504), lambda o, i: [_lora(o, i, 8, 3)]),
    "lora-rank16-two-branches": ((700, 129), lambda o, i: [_lora(o, i, 16, 4), _lora(o, i, 4, 5)]),
    "lora-fused-slices": ((960, 320), lambda o, i: [_lora(o, i, 8, 6, slices=[(320, 400), (640, 960)])]),
    "lora-conv1d": ((384, 1152), lambda o, i: [_lora(i, o, 8, 7, transposed=True)]),
    "lora-conv1d-slices": ((256, 768), lambda o, i: [_lora(i, o, 4, 8, transposed=True, slices=[(256, 768)])]),
    "ia3-output+input+lora": (
        (777, 300),
        lambda o, i: [
            FoldOp(functools.partial(fold_input_scale, l=_scales(i, 9), transposed=False), late=True),
            FoldOp(functools.partial(_out_scale, l=_scales(o, 10), transposed=False)),
            _lora(o, i, 8, 11),
        ],
    ),
    "ia3-conv1d": (
        (300, 640),
        lambda o, i: [
            FoldOp(functools.partial(fold_input_scale, l=_scales(o, 12), transposed=True), late=True),
            FoldOp(functools.partial(_out_scale, l=_scales(i, 13), transposed=True)),
        ],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("step", [None, 64, 192])
def test_row_block_fold_equals_whole_fold_bit_exactly(case: str, step: int | None) -> None:
    shape, make_ops = CASES[case]
    ops = make_ops(*shape)
    assert all(stream.row_wise(op) for op in ops)
    src = (torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.02).to(torch.bfloat16)
    want = _whole(src, ops, torch.bfloat16)
    assert (want.float() - src.float()).abs().max().item() > 1e-4  # the folds change the weight
    dst = torch.empty_like(src)
    stream.fold_rows(src, dst, ops, step)
    assert torch.equal(dst, want), (dst.float() - want.float()).abs().max().item()
    inplace = src.clone()  # the pipeline folds into the bytes it read
    stream.fold_rows(inplace, inplace, ops, step)
    assert torch.equal(inplace, want)
    wide = torch.empty(shape, dtype=torch.float32)  # a cast to another dtype (merge --dtype float32)
    stream.fold_rows(src, wide, ops, step)
    assert torch.equal(wide, fold_tensor(src.float().clone(), ops))


def test_block_rows_and_remainder() -> None:
    assert stream.block_rows((5504, 2048)) == 128  # 2**18 elements / 2048 columns
    assert stream.block_rows((2048, 5504)) == 64  # 47 rows rounded up to the floor of 64
    assert stream.block_rows((10, 7)) == stream.BLOCK_ELEMS // 7 // 64 * 64
    assert stream.block_rows((4096, 4096), elems=1 << 20) == 256
    seen: list[tuple[int, int]] = []

    def spy(w: torch.Tensor, rows: tuple[int, int]) -> torch.Tensor:
        seen.append(rows)
        assert w.shape[0] == rows[1] - rows[0]
        return w

    src = torch.zeros(1000, 8)
    stream.fold_rows(src, src.clone(), [FoldOp(spy)], step=300)
    assert seen == [(0, 300), (300, 600), (600, 1000)]  # the last block takes the 100-row remainder


def test_fold_without_rows_folds_the_whole_tensor() -> None:
    op = FoldOp(lambda w: w * 3)  # no rows= parameter: not row-wise
    assert not stream.row_wise(op)
    src = torch.arange(12, dtype=torch.bfloat16).reshape(3, 4)
    dst = torch.empty_like(src)
    stream.fold_rows(src, dst, [op], step=1)
    assert torch.equal(dst, src * 3)
    vec = torch.arange(5, dtype=torch.float16)  # 1-D (a bias): whole too
    out = torch.empty_like(vec)
    stream.fold_rows(vec, out, [op])
    assert torch.equal(out, vec * 3)


def test_torch_threads_restores_the_count() -> None:
    before = torch.get_num_threads()
    with stream.torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


@pytest.mark.parametrize(("cores", "workers"), [(1, 1), (2, 2), (3, 3), (4, 4), (9, 4), (64, 4)])
def test_stream_workers_follow_the_usable_cores(monkeypatch: pytest.MonkeyPatch, cores: int, workers: int) -> None:
    """One read + fold thread per core this process may run on (its affinity, not the machine's count), at most 4."""
    monkeypatch.setattr(stream.os, "sched_getaffinity", lambda _pid: set(range(cores)), raising=False)
    monkeypatch.setattr(stream.os, "cpu_count", lambda: 128)
    assert stream.stream_workers() == workers


def test_stream_workers_without_affinity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where there is no sched_getaffinity (not Linux): the CPU count, and 1 when it is unknown."""
    monkeypatch.delattr(stream.os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(stream.os, "cpu_count", lambda: 3)
    assert stream.stream_workers() == 3
    monkeypatch.setattr(stream.os, "cpu_count", lambda: None)
    assert stream.stream_workers() == 1


def _files(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.glob("*.safetensors"))}


@pytest.fixture(scope="module")
def wide_bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """BF16 tiny llama (hidden 128, FFN 320) and gpt2 (n_embd 128: Conv1D, fused QKV): weights of 128–320 rows."""
    root = tmp_path_factory.mktemp("wide")
    torch.manual_seed(0)
    llama = tiny_models.config("llama", hidden_size=128, intermediate_size=320, num_hidden_layers=1)
    tf.LlamaForCausalLM(llama).to(torch.bfloat16).save_pretrained(root / "llama", max_shard_size="100KB")
    gpt2 = tf.GPT2Config(vocab_size=100, n_positions=64, n_embd=128, n_layer=1, n_head=4)
    tf.GPT2LMHeadModel(gpt2).save_pretrained(root / "gpt2")
    return {"llama": root / "llama", "gpt2": root / "gpt2"}


@pytest.mark.parametrize(
    ("family", "recipe"), [("llama", "lora"), ("llama", "ia3"), ("gpt2", "lora-gpt2"), ("gpt2", "ia3-gpt2")]
)
def test_pipelined_merge_is_byte_identical_to_the_serial_whole_tensor_merge(
    wide_bases: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, family: str, recipe: str
) -> None:
    run = make_run(rc.load(recipe), wide_bases[family], tmp_path / "run")
    # the pre-pipeline way: one worker, whole-tensor folds, no write-behind
    sync_range = writer.sync_range
    monkeypatch.setattr(stream, "stream_workers", lambda: 1)
    monkeypatch.setattr(stream, "BLOCK_ELEMS", 1 << 30)
    monkeypatch.setattr(writer, "sync_range", lambda *a: False)
    serial = merge_run(run, tmp_path / "serial")
    # the fast way, stretched: 3 workers, blocks of 64 rows, write-behind waiting after every 4 KiB
    monkeypatch.setattr(stream, "stream_workers", lambda: 3)
    monkeypatch.setattr(stream, "BLOCK_ELEMS", 64 * 64)
    monkeypatch.setattr(writer, "sync_range", sync_range)
    monkeypatch.setattr(writer, "WRITE_BEHIND", 4096)
    monkeypatch.setattr(writer, "DIRECT_MIN", 4096)  # tensors of 8 KiB and up: their whole blocks with O_DIRECT
    monkeypatch.setattr(writer, "BOUNCE_BYTES", 3 * 4096)  # untouched ones copied 12 KiB at a time
    direct: list[int] = []
    finish = ShardedWriter.__exit__

    def spy(self: ShardedWriter, *exc: object) -> None:
        direct.append(self.direct_bytes)
        finish(self, *exc)

    monkeypatch.setattr(ShardedWriter, "__exit__", spy)
    fast = merge_run(run, tmp_path / "fast")
    assert serial.tensors_folded == fast.tensors_folded > 0
    assert direct[0] > 0 and direct[0] % writer.DIRECT_ALIGN == 0  # folded tensors' blocks skipped the cache (ext4)
    assert serial.bytes_written == fast.bytes_written == open_checkpoint(wide_bases[family]).total_bytes
    assert _files(tmp_path / "serial") == _files(tmp_path / "fast") != _files(wide_bases[family])
    ck = open_checkpoint(tmp_path / "fast")
    assert len(ck.files) == len(open_checkpoint(wide_bases[family]).files)


def test_stream_digests_match_the_written_and_the_source_bytes(wide_bases: dict[str, Path], tmp_path: Path) -> None:
    base = open_checkpoint(wide_bases["llama"])
    specs = [TensorSpec(n, i.dtype, i.shape) for n, i in base.tensors.items()]
    name = next(n for n, i in base.tensors.items() if len(i.shape) == 2 and i.shape[0] >= 128)
    ops = {name: [FoldOp(lambda w, rows: w.mul_(2))]}
    src_d: dict[str, str] = {}
    out_d: dict[str, str] = {}

    class Count:
        tensors_folded = tensors_written = bytes_written = 0

    rep = Count()
    with ShardedWriter(tmp_path / "out", specs) as w:
        source = {s.name: s.name for s in specs}
        stream.stream_tensors(base, specs, source, ops, {name}, w, rep, src_d, out_d, workers=2)
    out = open_checkpoint(tmp_path / "out")
    assert rep.tensors_written == len(specs) and rep.tensors_folded == 1
    assert src_d == {n: tensor_digest(i) for n, i in base.tensors.items()}
    assert out_d == {n: tensor_digest(i) for n, i in out.tensors.items()}
    assert out_d[name] != src_d[name] and all(out_d[n] == src_d[n] for n in out_d if n != name)


def test_a_failing_fold_stops_the_stream_and_leaves_nothing(wide_bases: dict[str, Path], tmp_path: Path) -> None:
    base = open_checkpoint(wide_bases["llama"])
    specs = [TensorSpec(n, i.dtype, i.shape) for n, i in base.tensors.items()]
    names = [n for n, i in base.tensors.items() if len(i.shape) == 2]

    def boom(w: torch.Tensor, rows: tuple[int, int]) -> torch.Tensor:
        raise PeltError("fold failed")

    ops = {n: [FoldOp(boom)] for n in names[1:]}

    class Count:
        tensors_folded = tensors_written = bytes_written = 0

    with pytest.raises(PeltError, match="fold failed"), ShardedWriter(tmp_path / "out", specs) as w:
        stream.stream_tensors(base, specs, {s.name: s.name for s in specs}, ops, set(ops), w, Count(), None, None)
    assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())


def test_write_behind_writes_the_same_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(0)
    tensors = {f"t{i}": torch.randn(300 + 37 * i, generator=g) for i in range(12)}
    save_file(tensors, tmp_path / "plain.safetensors")
    monkeypatch.setattr(writer, "WRITE_BEHIND", 3000)  # wait for (and drop) all but the last ~3 tensors
    specs = [TensorSpec(n, "F32", tuple(t.shape)) for n, t in tensors.items()]
    with ShardedWriter(tmp_path / "out", specs) as w:
        for n, t in tensors.items():
            w.write(n, t)
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (tmp_path / "plain.safetensors").read_bytes()
    fd = os.open(tmp_path / "plain.safetensors", os.O_RDONLY)
    try:
        assert writer.sync_range(fd, 0, 4096, writer.SYNC_WRITE)  # Linux: the call exists and works
    finally:
        os.close(fd)


def test_prefetch_advises_the_first_bytes_in_shard_order(wide_bases: dict[str, Path]) -> None:
    from pelt_cli.io.reader import prefetch

    ck = open_checkpoint(wide_bases["llama"])
    sizes = [f.stat().st_size for f in ck.files]
    assert len(sizes) > 2  # sharded at 100KB
    assert prefetch(ck) == sum(sizes)  # a small checkpoint: all of it
    assert prefetch(ck, nbytes=sizes[0] + 10) == sizes[0] + 10  # the first shard, then 10 bytes of the second


def test_direct_writes_need_matching_alignment_and_write_the_same_bytes(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    tensors = {
        "a": torch.randn(5, generator=g),
        "b": torch.randn(3 << 18, generator=g),
        "c": torch.randn(7, generator=g),
    }
    tensors["d"] = torch.randn(1 << 18, generator=g)
    save_file(tensors, tmp_path / "plain.safetensors")
    specs = [TensorSpec(n, "F32", tuple(t.shape)) for n, t in tensors.items()]
    with ShardedWriter(tmp_path / "out", specs) as w:
        for n, t in tensors.items():
            raw = writer.tensor_bytes(t)
            if n == "b":  # at its block offset in an aligned buffer: whole blocks go direct
                buf = writer.aligned_buffer(len(raw) + writer.DIRECT_ALIGN)
                shift = w.block_offset(n)
                buf[shift : shift + len(raw)] = raw
                w.write_bytes(n, buf[shift : shift + len(raw)])
            elif n == "d":  # one byte off: through the page cache
                buf = writer.aligned_buffer(len(raw) + writer.DIRECT_ALIGN)
                shift = (w.block_offset(n) + 1) % writer.DIRECT_ALIGN
                buf[shift : shift + len(raw)] = raw
                w.write_bytes(n, buf[shift : shift + len(raw)])
            else:
                w.write(n, t)
        direct = w.direct_bytes
    nb = tensors["b"].numel() * 4
    assert nb - 2 * writer.DIRECT_ALIGN < direct <= nb and direct % writer.DIRECT_ALIGN == 0
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (tmp_path / "plain.safetensors").read_bytes()
    assert writer.direct_split(100, 10000, 8192 + 100) == (3996, 4096)  # memory off the grid like the file
    assert writer.direct_split(100, 10000, 0) == (10000, 0)  # memory aligned, file not: no direct part
    assert writer.direct_split(4096, 100, 0) == (0, 0)  # less than a block
