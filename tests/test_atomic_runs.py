"""A run changes as one unit (issue 11 item 5): kills at every rename of train, in-place prune and a --force
replace, each followed by a resume or rerun that gives the uninterrupted result bit for bit; the lock; the -o guard;
export's base check; non-finite training never kept; options out of range refused.

Kills are injected with ``PELT_TEST_KILL_AT_RENAME=N`` (pelt_cli.io.atomic ends the process with ``os._exit(137)``
right before its Nth rename) in a forked child: no interpreter start-up, so one kill and rerun costs one tiny train.
"""

from __future__ import annotations

import errno
import itertools
import json
import math
import os
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from conftest import _sentiment_rows, _write_jsonl, hash_tree, pelt_main
from safetensors.torch import load_file

from pelt_cli import recipe as rc
from pelt_cli.apply import apply
from pelt_cli.errors import CheckpointError, OutputBusy, TrainingError, UsageError
from pelt_cli.io import atomic
from pelt_cli.io.writer import save_file
from pelt_cli.prune import prune_run
from pelt_cli.run import ADAPTER_FILE, Run
from pelt_cli.train import TrainConfig, train_run
from pelt_cli.train_state import LAST_FILE, read_state, save_checkpoint

# 16 rows, batch 8: 2 optimizer steps an epoch; --save-every 1 adds a checkpoint after step 1 (mid-epoch)
CFG = dict(epochs=1, batch_size=8, lr=1e-2, warmup=0.0, patience=0, max_length=16, log_every=1, save_every=1)


def _child(fn: Callable[[], object], kill_at: int | None = None, log: Path | None = None) -> int:
    """Run ``fn`` in a forked child (with the kill or rename-log hook set); its exit code (137: killed by the hook)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            if kill_at is not None:
                os.environ[atomic.KILL_ENV] = str(kill_at)
            if log is not None:
                os.environ[atomic.LOG_ENV] = str(log)
            fn()
        except BaseException:  # noqa: BLE001 - any failure is the child's exit code
            code = 3
        os._exit(code)
    return _wait(pid)


def _wait(pid: int, limit: float = 120.0) -> int:
    """A child's exit code; a child still running after ``limit`` seconds is killed and the test fails."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError(f"child {pid} still running after {limit} s")


def _killed(fn: Callable[[], object], k: int) -> bool:
    """Run ``fn`` in a child killed right before its kth rename: True when it was, False when it ended first."""
    code = _child(fn, kill_at=k)
    assert code in (0, 137), f"the child failed (exit {code}) before its rename {k}"
    return code == 137


def _renames(fn: Callable[[], object], tmp: Path) -> list[str]:
    """The names renamed into, in order, by an uninterrupted ``fn`` (in a child)."""
    log = tmp / "renames.log"
    assert _child(fn, log=log) == 0
    return [line.split(" ", 1)[1] for line in log.read_text().splitlines()]


def _tensors(run: Path) -> dict[str, dict[str, torch.Tensor]]:
    out = {ADAPTER_FILE: load_file(run / ADAPTER_FILE)}
    for p in sorted((run / "train").glob("*.safetensors")) + sorted(run.glob("pruned.safetensors")):
        out[str(p.relative_to(run))] = load_file(p)
    return out


def _same(a: Path, b: Path) -> None:
    """Equal runs: every tensor file bit for bit, the eval and training rows of the metrics, the recipe."""
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    for f in ta:
        assert ta[f].keys() == tb[f].keys(), f
        for k in ta[f]:
            assert torch.equal(ta[f][k], tb[f][k]), (f, k)
    if (a / "metrics.jsonl").exists():
        rows = [[{k: v for k, v in json.loads(x).items() if k != "seconds"} for x in (r / "metrics.jsonl").open()]
                for r in (a, b)]  # fmt: skip
        assert rows[0] == rows[1]
    assert (a / "recipe.yaml").read_text().splitlines()[1:] == (b / "recipe.yaml").read_text().splitlines()[1:]


def _no_leftovers(run: Path) -> None:
    assert sorted(p.name for p in run.parent.iterdir() if p.name.startswith(f".{run.name}.")) == []
    assert [p.name for p in run.rglob(".*")] == []


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """One torch thread while this module runs: a forked child of a process whose OpenMP pool has threads hangs at
    its first parallel region (and parent and children must compute alike to compare bit for bit)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    d = tmp_path_factory.mktemp("small")
    return str(_write_jsonl(d / "train.jsonl", _sentiment_rows(16, 0))), str(
        _write_jsonl(d / "eval.jsonl", _sentiment_rows(8, 1))
    )


@pytest.fixture(scope="module")
def fresh(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained UniPELT run (gated: prune has something to rank after training)."""
    return apply(rc.load("unipelt"), tiny_bert, tmp_path_factory.mktemp("fresh") / "run")


def test_kill_at_every_rename_of_train_then_resume_is_bit_exact(fresh: Path, small: tuple, tmp_path: Path) -> None:
    ref = tmp_path / "ref"
    shutil.copytree(fresh, ref)
    names = _renames(lambda: train_run(ref, *small, TrainConfig(**CFG)), tmp_path)
    assert names.count("ref") == 2  # two commits: mid-epoch (--save-every 1, after step 1) and the epoch's end
    paths = set()
    for k in itertools.count(1):  # until a run has fewer renames than k (one may write a fingerprint cache more)
        run = tmp_path / f"k{k}" / "run"
        shutil.copytree(fresh, run)
        if not _killed(lambda run=run: train_run(run, *small, TrainConfig(**CFG)), k):
            break
        (run.parent / f".run.pelt-tmp-{os.getpid() + 10**6}").mkdir()  # a dead process's temporary (no such pid)
        Run.open(run)  # whole, whatever the kill point: a swap cut in the middle is rolled forward or back
        state = run / "train" / "state.pt"
        done = state.exists() and Run.open(run).meta.training["result"]["epochs_done"] == 1
        path = "done" if done else "resume" if state.exists() else "rerun"
        if path == "done":
            with pytest.raises(UsageError, match="already trained 1 epoch"):
                train_run(run, *small, TrainConfig(**CFG), resume=True)
        else:  # a file temporary a killed older pelt left inside the run goes with the next commit
            (run / f".adapter.safetensors.pelt-tmp-{os.getpid() + 10**6}").write_bytes(b"half")
            train_run(run, *small, TrainConfig(**CFG), resume=path == "resume")
        paths.add(path)
        _same(ref, run)
        _no_leftovers(run)
    assert k > 6 and paths == {"rerun", "resume", "done"}  # the mid-epoch (--save-every) resume among them


def test_kill_at_every_rename_of_prune_in_place_and_force_replace(
    fresh: Path, small: tuple, tiny_bert: Path, tmp_path: Path
) -> None:
    trained = tmp_path / "trained"
    shutil.copytree(fresh, trained)
    train_run(trained, *small, TrainConfig(**dict(CFG, save_every=0)))
    ref = tmp_path / "ref"
    shutil.copytree(trained, ref)
    names = _renames(lambda: prune_run(ref, keep_top_k=1), tmp_path)
    assert names[-2].startswith(".ref.pelt-old-") and names[-1] == "ref"  # the old run aside, the new one in
    for k in itertools.count(1):
        run = tmp_path / f"p{k}" / "run"
        shutil.copytree(trained, run)
        if not _killed(lambda run=run: prune_run(run, keep_top_k=1), k):
            break
        pruned = Run.open(run).meta.pruning is not None
        assert pruned or hash_tree(run) == hash_tree(trained)  # the old run, whole, or the new one
        if not pruned:
            prune_run(run, keep_top_k=1)
        _same(ref, run)
        _no_leftovers(run)

    old = apply(rc.load("lora"), tiny_bert, tmp_path / "old")  # what --force replaces
    new = tmp_path / "new"
    shutil.copytree(old, new)
    names = _renames(lambda: apply(rc.load("unipelt"), tiny_bert, new, force=True), tmp_path)
    assert names[-2].startswith(".new.pelt-old-") and names[-1] == "new"
    assert k > 3
    for k in itertools.count(1):
        out = tmp_path / f"f{k}" / "out"
        shutil.copytree(old, out)
        if not _killed(lambda out=out: apply(rc.load("unipelt"), tiny_bert, out, force=True), k):
            break
        method = Run.open(out).recipe.inserts[0].method  # the old run or the new one, whole
        assert method == "lora" and hash_tree(out) == hash_tree(old) or method == "unipelt"
        assert _child(lambda out=out: apply(rc.load("unipelt"), tiny_bert, out, force=True)) == 0
        _same(new, out)
        _no_leftovers(out)
    assert k > 3


def test_a_second_writer_is_refused_by_the_lock(fresh: Path, small: tuple, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(fresh, run)
    started, go = os.pipe(), os.pipe()

    def first() -> None:  # trains, holding the run's lock, and waits at its start for the second to be refused
        def event(e: dict) -> None:
            if e["kind"] == "start":
                os.write(started[1], b"s")
                os.read(go[0], 1)

        train_run(run, *small, TrainConfig(**CFG), on_event=event)

    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            first()
        finally:
            os._exit(0)
    assert os.read(started[0], 1) == b"s"
    r = pelt_main("train", str(run), "--data", small[0], "--eval", small[1], "--epochs", "1", "-q")
    assert r.returncode == 1 and r.stderr.startswith(f"error: {run}: in use by pelt process {pid}")
    with pytest.raises(OutputBusy, match=str(pid)):
        train_run(run, *small, TrainConfig(**CFG))
    os.write(go[1], b"g")
    assert _wait(pid) == 0
    assert Run.open(run).meta.training["result"]["steps"] == 2
    assert not atomic.lock_path(run).exists()  # released: the lock file goes with it
    with atomic.locked(run):  # and is free again
        assert atomic.lock_path(run).read_text().strip() == str(os.getpid())


def test_outputs_never_overlap_inputs(fresh: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "run"
    shutil.copytree(fresh, run)
    before, base = hash_tree(run), Run.open(run).meta.base.path
    monkeypatch.chdir(tmp_path)
    cases = [
        ("export", str(run), "-o", str(run), "--force"),
        ("export", str(run), "-o", str(run / "sub")),
        ("export", str(run), "-o", str(tmp_path), "--force"),
        ("merge", str(run), "-o", str(run), "--force"),
        ("merge", str(run), "-o", "-"),
        ("apply", "lora", base, "-o", "-"),
        ("apply", "lora", base, "-o", str(Path(base) / "sub")),
    ]
    for args in cases:
        r = pelt_main(*args)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) <= 2, (args, r.stderr)
        assert "the output would" in r.stderr or "not a stream" in r.stderr, (args, r.stderr)
    assert hash_tree(run) == before and not (tmp_path / "-").exists() and not (run / "sub").exists()
    assert not (Path(base) / "sub").exists()


def test_export_checks_the_base(fresh: Path, tiny_bert: Path, tmp_path: Path) -> None:
    base = tmp_path / "base"
    shutil.copytree(tiny_bert, base)
    run = apply(rc.load("lora"), base, tmp_path / "run")
    assert pelt_main("export", str(run), "-o", str(tmp_path / "b1")).returncode == 0
    weights = load_file(base / "model.safetensors")
    key = next(k for k in weights if k.endswith("query.weight"))
    weights[key][0, 0] += 1.0
    save_file(weights, base / "model.safetensors")
    r = pelt_main("export", str(run), "-o", str(tmp_path / "b2"))
    assert r.returncode == 2 and "not the base this run was made on" in r.stderr
    assert not (tmp_path / "b2").exists()


def test_non_finite_training_is_never_kept(
    fresh: Path, small: tuple, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    shutil.copytree(fresh, run)
    r = pelt_main("train", str(run), "--data", small[0], "--eval", small[1], "-b", "8", "--max-length", "16",
                  "--epochs", "3", "--lr", "1e6", "--max-grad-norm", "0", "--patience", "0", "-q")  # fmt: skip
    assert r.returncode == 1 and r.stderr.startswith("error: non-finite") and "Traceback" not in r.stderr
    for f in [run / ADAPTER_FILE, *(run / "train").glob("*.safetensors")]:
        assert all(bool(torch.isfinite(t).all()) for t in load_file(f).values()), f
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(x.get("eval_loss", 0.0)) and math.isfinite(x.get("loss", 0.0)) for x in rows)

    # an eval loss that is not finite (the weights still are): refused, the run keeps the epoch before
    import pelt_cli.train as train_module

    real, calls = train_module.evaluate, []

    def nan_at_epoch_2(*args: object, **kw: object) -> tuple:
        metrics, snap = real(*args, **kw)
        calls.append(1)
        return ({**metrics, "eval_loss": math.nan} if len(calls) == 2 else metrics), snap

    monkeypatch.setattr(train_module, "evaluate", nan_at_epoch_2)
    run = tmp_path / "run2"
    shutil.copytree(fresh, run)
    with pytest.raises(TrainingError, match=r"non-finite eval loss \(nan\) after epoch 2"):
        train_run(run, *small, TrainConfig(**dict(CFG, epochs=2, save_every=0)))
    result = Run.open(run).meta.training["result"]
    assert result["epochs_done"] == result["best_epoch"] == 1
    assert len([x for x in (run / "metrics.jsonl").read_text().splitlines() if "eval_loss" in x]) == 1

    # non-finite weights are never written, whatever the loss said
    model = Run.open(fresh).load_model()
    next(p for n, p in model.named_parameters() if p.requires_grad).data[0] = math.inf
    before = hash_tree(run)
    with pytest.raises(TrainingError, match="non-finite weights"):
        save_checkpoint(Run.open(run), model, {"epoch": 2, "step": 4}, [], None, best=True)
    assert hash_tree(run) == before


def test_a_full_disk_while_checkpointing_leaves_the_run_whole(
    fresh: Path, small: tuple, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    shutil.copytree(fresh, run)
    train_run(run, *small, TrainConfig(**dict(CFG, save_every=0)))
    before = hash_tree(run)

    def full(*args: object, **kw: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shutil, "copyfile", full)  # the new generation's last file
    opts = ["--data", small[0], "--eval", small[1], "-b", "8", "--max-length", "16", "--epochs", "2", "-q"]
    r = pelt_main("train", str(run), *opts, "--resume")
    assert (r.returncode, r.stderr) == (1, "error: No space left on device\n")
    monkeypatch.undo()
    assert hash_tree(run) == before
    _no_leftovers(run)
    assert pelt_main("train", str(run), *opts, "--resume").returncode == 0
    assert Run.open(run).meta.training["result"]["epochs_done"] == 2


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # the garbage state.pt
def test_resume_refuses_weights_of_another_step(fresh: Path, small: tuple, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(fresh, run)
    train_run(run, *small, TrainConfig(**dict(CFG, save_every=0)))
    last = run / "train" / LAST_FILE
    save_file(load_file(last), last, metadata={"pelt_checkpoint": "step1-000000000000"})
    with pytest.raises(CheckpointError, match="do not belong to the same step"):
        read_state(run, TrainConfig(**dict(CFG, epochs=2)), None)
    (run / "train" / "state.pt").write_bytes(b"\x80\x04garbage")
    with pytest.raises(CheckpointError, match="not a pelt training state"):
        read_state(run, TrainConfig(**dict(CFG, epochs=2)), None)


@pytest.mark.parametrize(
    "field,value",
    [
        ("max_steps", -2),
        ("max_steps", 0),
        ("max_grad_norm", -1.0),
        ("save_every", -1),
        ("lr", float("nan")),
        ("lr", float("inf")),
        ("gate_lambda", -0.1),
        ("gate_warmup", -1),
        ("scale_lr", 0.0),
        ("warmup", float("inf")),
        ("seed", -1),
    ],
)
def test_options_out_of_range_are_refused(field: str, value: float) -> None:
    flag = "--" + field.replace("_", "-")
    with pytest.raises(UsageError, match=f"^{flag} {value}: expected"):
        TrainConfig(**{field: value}).check()


def test_cli_refuses_out_of_range_in_one_line(fresh: Path, small: tuple) -> None:
    for args in (["--max-steps", "-2"], ["--max-grad-norm", "-1"], ["--save-every", "-3"]):
        r = pelt_main("train", str(fresh), "--data", small[0], *args)
        assert r.returncode == 2 and r.stderr.startswith(f"error: {args[0]} {args[1]}"), r.stderr
