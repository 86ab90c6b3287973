"""``pelt merge`` at the disk's speed: row-block folds equal whole-tensor folds bit for bit, and the pipelined stream
(workers, slots, write-behind, kernel copies) writes byte-identical checkpoints whatever its settings."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tiny_models
import torch
import transformers as tf
from conftest import make_run

from pelt_cli import fold, stream
from pelt_cli import recipe as rc
from pelt_cli.errors import PeltError
from pelt_cli.io import writer
from pelt_cli.io.checkpoint import open_checkpoint
from pelt_cli.io.fingerprint import tensor_digest
from pelt_cli.io.header import TensorSpec
from pelt_cli.io.reader import TensorReader, load_file
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
    """One read + fold thread per core this process may run on (its affinity, not the machine's count), at most 4
    (the writes have threads of their own)."""
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
    monkeypatch.setattr(fold, "BLOCK_ELEMS", 1 << 30)  # the light path's numpy folds (llama LoRA)
    monkeypatch.setattr(writer, "sync_range", lambda *a: False)
    serial = merge_run(run, tmp_path / "serial")
    # the fast way, stretched: 3 workers, blocks of 64 rows, write-behind waiting after every 4 KiB
    monkeypatch.setattr(stream, "stream_workers", lambda: 3)
    monkeypatch.setattr(stream, "BLOCK_ELEMS", 64 * 64)
    monkeypatch.setattr(fold, "BLOCK_ELEMS", 64 * 48)  # numpy blocks of 16-24 rows and a remainder
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


# ---------------------------------------------------------------------------------------------------- the light path

LORA_ALL = """name: lora-all
families: [llama]
inserts:
  - method: lora
    targets: [attn.q, attn.k, attn.v, attn.o, ffn.gate, ffn.up, ffn.down]
    params: {rank: 4, alpha: ALPHA}
"""
LIGHT_CHILD = (
    "import json, sys\n"
    "from pelt_cli.merge import merge_run\n"
    "r = merge_run(sys.argv[1], sys.argv[2])\n"
    "print(json.dumps([r.tensors_folded, r.tensors_written, 'torch' in sys.modules, 'transformers' in sys.modules]))"
)


def _tree(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({2: torch.int16, 4: torch.int32}[t.element_size()])


@pytest.mark.parametrize("alpha", [8, 12])  # α/r = 2 (exact: folded into B) and 3 (scaled after B A, as peft does)
def test_light_merge_needs_no_torch_and_equals_peft_bit_for_bit(
    wide_bases: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, alpha: int
) -> None:
    """LoRA on every projection of a BF16 llama: a fresh process merges it without importing torch or
    transformers; every folded weight equals peft's merge_and_unload bit for bit, and every output file equals the
    model path's (α/r = 3 included: both round the product before scaling and adding, as peft)."""
    peft = pytest.importorskip("peft")
    from pelt_cli import merge
    from pelt_cli.peft_format import export_peft
    from pelt_cli.run import load_base

    run = make_run(rc.loads(LORA_ALL.replace("ALPHA", str(alpha))), wide_bases["llama"], tmp_path / "run")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    p = subprocess.run(
        [sys.executable, "-c", LIGHT_CHILD, str(run), str(tmp_path / "light")], capture_output=True, text=True, env=env
    )
    assert p.returncode == 0, p.stderr[-2000:]
    folded, written, torch_loaded, tf_loaded = json.loads(p.stdout.splitlines()[-1])
    base = open_checkpoint(wide_bases["llama"])
    assert (folded, written, torch_loaded, tf_loaded) == (7, len(base.tensors), False, False)
    export_peft(run, tmp_path / "peft")
    theirs = peft.PeftModel.from_pretrained(load_base(wide_bases["llama"]), tmp_path / "peft").merge_and_unload()
    ours = open_checkpoint(tmp_path / "light")
    with TensorReader(ours) as r:
        for name, t in theirs.state_dict().items():
            if name in ours.tensors:
                mine = torch.frombuffer(r.read_bytes(name), dtype=t.dtype).view(t.shape)
                assert torch.equal(_bits(mine), _bits(t)), name
    assert len(ours.files) == len(base.files) > 2  # the base's shard layout (sharded at 100KB)
    monkeypatch.setattr(merge, "light_merge", lambda *a, **k: None)
    full = merge_run(run, tmp_path / "full")
    assert full.tensors_folded == 7
    assert _tree(tmp_path / "light") == _tree(tmp_path / "full")  # the model path rounds as peft does too


def _peft_math(w: torch.Tensor, branches: list[tuple[torch.Tensor, torch.Tensor, float]]) -> torch.Tensor:
    """peft's merge of one branch (W += (B A)·s in the weight's dtype); several: summed in fp32, cast once."""
    if len(branches) == 1:
        a, b, s = branches[0]
        out = w.clone()
        out += (b @ a) * s
        return out
    acc = w.to(torch.float32, copy=True)  # a copy even for an fp32 weight
    for a, b, s in branches:
        acc += (b @ a) * s
    return acc.to(w.dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(("shape", "scales"), [((300, 2048), [2.0]), ((77, 130), [3.0]), ((129, 64), [0.5, 16 / 12])])
def test_numpy_fold_equals_torch_bit_for_bit(dtype: torch.dtype, shape: tuple[int, int], scales: list[float]) -> None:
    """:mod:`pelt_cli.fold` against torch's own math: blocks with a remainder, a 2048-wide weight (padded sgemm
    rows), NaN (torch writes 0xFFFF in BF16, a quiet NaN in FP16), ±inf, several branches."""
    import numpy as np

    from pelt_cli.fold import Folder, LoraFold, fold_weight, storage_view

    g = torch.Generator().manual_seed(len(scales) + shape[0])
    w = (torch.randn(shape, generator=g) * 0.05).to(dtype)
    w[3, 5], w[4, 6], w[-1, -1] = float("nan"), float("inf"), -float("inf")
    branches = [
        (torch.randn(8, shape[1], generator=g) * 0.05, torch.randn(shape[0], 8, generator=g) * 0.05, s) for s in scales
    ]
    want = _peft_math(w, branches)
    code = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}[dtype]
    raw = bytearray(_bits(w).numpy().tobytes())
    src = storage_view(raw, code, shape)
    dst = np.empty_like(src)
    ops = [LoraFold(a.numpy(), b.numpy(), s) for a, b, s in branches]
    fold_weight(src, dst, code, ops, Folder(shape[1], step=32))  # 300 rows: 9 blocks of 32 and one of 12
    got = torch.from_numpy(dst.view(np.int16 if dtype != torch.float32 else np.int32).copy())
    assert torch.equal(got, _bits(want))
    fold_weight(src, src, code, ops)  # in place, default blocks
    assert bytes(raw) == bytes(got.numpy().tobytes())


def test_blas_threads_are_held_at_one_and_given_back() -> None:
    import numpy  # noqa: F401

    from pelt_cli.fold import blas_single_thread
    from pelt_cli.fold import blas_thread_counts as counts

    before = counts()
    assert before  # numpy's OpenBLAS is found in this process
    with blas_single_thread():
        assert counts() == [1] * len(before)
    assert counts() == before


@pytest.mark.parametrize(
    ("case", "kw"),
    [
        ("ia3", {}),
        ("gpt2", {}),  # Conv1D layers: weights stored (in, out)
        ("lora", {"out_dtype": "F32"}),
        ("lora", {"shard": 10**6}),
        ("lora-bad-shape", {}),
        ("lora-extra-tensor", {}),
    ],
)
def test_light_path_only_where_nothing_can_differ(
    wide_bases: dict[str, Path], tmp_path: Path, case: str, kw: dict
) -> None:
    """The light path takes plain LoRA on a known Linear family only; anything else goes to the model path."""
    from pelt_cli.merge_fast import light_merge
    from pelt_cli.run import ADAPTER_FILE

    family = "gpt2" if case == "gpt2" else "llama"
    recipe = {"ia3": "ia3", "gpt2": "lora-gpt2"}.get(case, "lora")
    run = make_run(rc.load(recipe), wide_bases[family], tmp_path / "run")
    args = {"out_dtype": None, "shard": None, **kw}
    if case.startswith("lora-"):
        assert light_merge(run, None, **args) is not None
        ad = load_file(run / ADAPTER_FILE)
        name = next(n for n in ad if n.endswith(".A"))
        ad[name if case == "lora-bad-shape" else "extra.weight"] = torch.zeros(3, 3)
        save_file(ad, run / ADAPTER_FILE)
    assert light_merge(run, None, **args) is None
