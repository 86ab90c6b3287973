"""The fuzz harness (issue 11): seeded, in process, fast. Mutated recipes, safetensors headers, shard indexes,
config.json and data files must each give exit 0 or 2 with one error line, never a traceback, leave no temp file
and leave the input unchanged.

Sizes: ``PELT_FUZZ_N`` recipe cases (default 1,000, spread over every bundled recipe, every 20th also validated
against a tiny model), N/2 checkpoint cases (every 4th also ``inspect --verify``), 3N/10 data files. A failure
prints the case's kind, number and seed (``PELT_FUZZ_SEED``, default 0), so it reproduces alone.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import tiny_models
import yaml
from conftest import pelt_main
from fuzz import (
    MAX_LINE,
    built_once,
    case_rng,
    checked,
    cli_problem,
    fuzz_n,
    join_safetensors,
    leftovers,
    mutate_bytes,
    mutate_text,
    mutate_tree,
    run_case,
    snapshot,
    split_safetensors,
)

REPO = Path(__file__).resolve().parent.parent
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))
N = fuzz_n()
RECIPE_KEYS = [
    "name",
    "description",
    "families",
    "seed",
    "inserts",
    "train",
    "method",
    "targets",
    "layers",
    "blocks",
    "params",
    "rank",
    "alpha",
    "dropout",
    "length",
    "modules",
    "gate",
    "reduction",
    "epochs",
    "lr",
    "max_steps",
]
HEADER_KEYS = ["dtype", "shape", "data_offsets", "__metadata__", "format", "weight_map", "metadata"]


@pytest.fixture(autouse=True)
def _fast_cli() -> Iterator[None]:
    with built_once():
        yield


def report(kind: str, failures: list[tuple[int, str]], total: int) -> None:
    """Fail with the first failures (case number and what went wrong), else pass."""
    shown = "\n".join(f"  {kind} case {i}: {problem}" for i, problem in failures[:8])
    assert not failures, f"{len(failures)} of {total} {kind} cases failed (PELT_FUZZ_SEED reproduces):\n{shown}"


# ------------------------------------------------------------------------------------------------ recipes


def mutated_recipe(i: int) -> tuple[str, bytes]:
    """Case ``i``: a bundled recipe (round robin) mutated as a YAML tree, as text or as bytes."""
    rng = case_rng("recipe", i)
    src = RECIPES[i % len(RECIPES)]
    text = src.read_text()
    pick = rng.random()
    if pick < 0.5:
        tree = mutate_tree(rng, yaml.safe_load(text), keys=RECIPE_KEYS)
        out = yaml.safe_dump(tree, sort_keys=False, allow_unicode=rng.random() < 0.5)
        raw = (mutate_text(rng, out) if rng.random() < 0.2 else out).encode()
    elif pick < 0.85:
        raw = mutate_text(rng, text).encode()
    else:
        raw = mutate_bytes(rng, text.encode())
    return src.name, raw


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny BERT and GPT-2 checkpoints (the recipes' families), saved once."""
    root = tmp_path_factory.mktemp("fuzzmodels")
    return {fam: tiny_models.save(fam, root / fam) for fam in ("bert", "gpt2")}


def test_fuzz_recipes(tmp_path: Path, models: dict[str, Path]) -> None:
    work = tmp_path / "work"
    work.mkdir()
    model_before = {fam: snapshot(p) for fam, p in models.items()}
    failures: list[tuple[int, str]] = []
    codes = {0: 0, 2: 0}
    for i in range(N):
        name, raw = mutated_recipe(i)
        path = work / name
        path.write_bytes(raw)
        before = snapshot(work)
        args = ["validate", str(path)]
        if i % 20 == 0:
            args.append(str(models["gpt2" if "gpt2" in name else "bert"]))
        r, problem = checked(lambda args=args: pelt_main(*args), lambda r: cli_problem(r, multi=True))
        if problem is None and snapshot(work) != before:
            problem = f"input changed or files left: {leftovers(before, work)}"
        if problem:
            failures.append((i, problem))
        if r is not None:
            codes[r.returncode] = codes.get(r.returncode, 0) + 1
        path.unlink()
    assert {fam: snapshot(p) for fam, p in models.items()} == model_before
    report("recipe", failures, N)
    assert codes[0] >= N // 50 and codes[2] >= N // 2, codes  # the mutations reach both valid and refused recipes


# ------------------------------------------------------------------------------------------------ checkpoints


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny BERT saved single-file and sharded (with its index), the originals of every checkpoint case."""
    root = tmp_path_factory.mktemp("fuzzckpt")
    model = tiny_models.build("bert")
    model.save_pretrained(root / "single")
    model.save_pretrained(root / "sharded", max_shard_size="40KB")
    return {"single": root / "single", "sharded": root / "sharded"}


def _mild(rng: Any, header: dict) -> dict:
    """A change that keeps a well-formed file: new metadata, an extra empty tensor, or two same-shape tensors'
    bytes swapped (the file still loads; only the values move)."""
    op = rng.randrange(3)
    if op == 0:
        header["__metadata__"] = {"format": "pt", rng.choice(["x", "note", "é"]): rng.choice(["", "1", "a" * 50])}
    elif op == 1:
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        header[rng.choice(["extra.weight", "bert.extra", "x"])] = {
            "dtype": "F32",
            "shape": [0],
            "data_offsets": [end, end],
        }
    else:
        by_shape: dict[str, list[str]] = {}
        for k, v in header.items():
            if k != "__metadata__":
                by_shape.setdefault(json.dumps(v["shape"]), []).append(k)
        pair = rng.choice([names for names in by_shape.values() if len(names) > 1])
        a, b = rng.sample(pair, 2)
        header[a]["data_offsets"], header[b]["data_offsets"] = header[b]["data_offsets"], header[a]["data_offsets"]
    return header


def _mutate_header_file(rng: Any, raw: bytes) -> bytes:
    if rng.random() < 0.2:
        header, data = split_safetensors(raw)
        return join_safetensors(_mild(rng, header), data)
    if rng.random() < 0.75:
        header, data = split_safetensors(raw)
        return join_safetensors(mutate_tree(rng, header, keys=HEADER_KEYS), data)
    n = 8 + int.from_bytes(raw[:8], "little")
    cut = min(len(raw), n + rng.choice([0, 8, 64]))
    return mutate_bytes(rng, raw[:cut]) + raw[cut:]


def mutated_checkpoint(i: int, work: dict[str, Path]) -> tuple[Path, Path]:
    """Case ``i``: damage one file of a working copy; returns ``(checkpoint dir, damaged file)``."""
    rng = case_rng("checkpoint", i)
    pick = rng.random()
    if pick < 0.55:
        d, f = work["single"], work["single"] / "model.safetensors"
        f.write_bytes(_mutate_header_file(rng, f.read_bytes()))
    elif pick < 0.8:
        d, f = work["sharded"], work["sharded"] / "model.safetensors.index.json"
        doc = json.loads(f.read_text())
        f.write_text(json.dumps(mutate_tree(rng, doc, keys=HEADER_KEYS)) if rng.random() < 0.8 else "")
        if rng.random() < 0.3:
            f.write_bytes(mutate_bytes(rng, f.read_bytes()))
    elif pick < 0.92:
        d = work["sharded"]
        f = rng.choice(sorted(d.glob("*.safetensors")))
        f.write_bytes(_mutate_header_file(rng, f.read_bytes()))
    else:
        d, f = work["single"], work["single"] / "config.json"
        f.write_text(json.dumps(mutate_tree(rng, json.loads(f.read_text()), keys=["model_type", "architectures"])))
    return d, f


def test_fuzz_checkpoints(tmp_path: Path, checkpoints: dict[str, Path]) -> None:
    n = max(1, N // 2)
    work = {k: Path(shutil.copytree(v, tmp_path / k)) for k, v in checkpoints.items()}
    failures: list[tuple[int, str]] = []
    verified = 0
    for i in range(n):
        d, damaged = mutated_checkpoint(i, work)
        before = snapshot(tmp_path)
        problem = run_case(lambda d=d: pelt_main("inspect", str(d), "--format", "json"), cli_problem)
        if problem is None and i % 4 == 0:
            r, problem = checked(lambda d=d: pelt_main("inspect", str(d), "--verify", "--format", "json"), cli_problem)
            verified += r is not None and r.returncode == 0
        if problem is None and snapshot(tmp_path) != before:
            problem = f"input changed or files left: {leftovers(before, tmp_path)}"
        if problem:
            failures.append((i, f"{damaged.name}: {problem}"))
        shutil.copy(checkpoints[d.name] / damaged.name, damaged)  # restore for the next case
    report("checkpoint", failures, n)
    assert verified >= 1  # some mutations (metadata, key order) keep a loadable checkpoint


def test_fuzz_verified_checkpoints_apply_cleanly(tmp_path: Path, checkpoints: dict[str, Path]) -> None:
    """Whatever ``inspect --verify`` passes, ``apply`` must load (exit 0) or refuse in one line: never a
    transformers or safetensors traceback. A sample of header cases that verify, applied for real."""
    work = {k: Path(shutil.copytree(v, tmp_path / k)) for k, v in checkpoints.items()}
    failures: list[tuple[int, str]] = []
    applied = 0
    for i in range(max(1, N // 2)):
        if applied >= max(3, N // 100):
            break
        d, damaged = mutated_checkpoint(i, work)
        if damaged.read_bytes() != (checkpoints[d.name] / damaged.name).read_bytes():
            r, problem = checked(lambda d=d: pelt_main("inspect", str(d), "--verify", "--format", "json"), cli_problem)
            if problem:
                failures.append((i, f"{damaged.name}: inspect --verify: {problem}"))
            elif r.returncode == 0:
                applied += 1
                out = tmp_path / f"run{i}"
                before = snapshot(d)
                problem = run_case(lambda d=d, out=out: pelt_main("apply", "lora", str(d), "-o", str(out)), cli_problem)
                if problem is None and snapshot(d) != before:
                    problem = "input changed"
                if problem:
                    failures.append((i, f"{damaged.name}: {problem}"))
                shutil.rmtree(out, ignore_errors=True)
        shutil.copy(checkpoints[d.name] / damaged.name, damaged)
    report("apply-after-verify", failures, applied)
    assert not [p for p in tmp_path.iterdir() if ".pelt-tmp" in p.name]


# ------------------------------------------------------------------------------------------------ data files

ROWS = [{"text": f"row {i} was {'good' if i % 2 else 'bad'}", "label": "pos" if i % 2 else "neg"} for i in range(12)]


def _base_data(suffix: str) -> str:
    if suffix == ".jsonl":
        return "".join(json.dumps(r) + "\n" for r in ROWS)
    if suffix == ".json":
        return json.dumps(ROWS, indent=1)
    sep = "\t" if suffix == ".tsv" else ","
    return f"text{sep}label\n" + "".join(f"{r['text']}{sep}{r['label']}\n" for r in ROWS)


def mutated_data(i: int) -> tuple[str, bytes]:
    """Case ``i``: a JSONL, JSON-array, CSV or TSV file mutated as rows (a tree), text or bytes."""
    rng = case_rng("data", i)
    suffix = [".jsonl", ".json", ".csv", ".tsv"][i % 4]
    text = _base_data(suffix)
    pick = rng.random()
    if pick < 0.3 and suffix in (".jsonl", ".json"):
        rows = mutate_tree(rng, ROWS, keys=["text", "label", "audio", "text_a", "text_b"])
        if suffix == ".json":
            return suffix, json.dumps(rows).encode()
        lines = [json.dumps(r) for r in rows] if isinstance(rows, list) else [json.dumps(rows)]
        return suffix, "\n".join(lines).encode()
    if pick < 0.75:
        return suffix, mutate_text(rng, text).encode()
    return suffix, mutate_bytes(rng, text.encode())


def test_fuzz_data_files(tmp_path: Path) -> None:
    from pelt_cli.data import load_data
    from pelt_cli.errors import PeltError

    n = max(1, 3 * N // 10)
    failures: list[tuple[int, str]] = []
    loaded = 0

    def check(outcome: Any) -> str | None:
        if isinstance(outcome, PeltError):
            if outcome.exit_code != 2:
                return f"exit {outcome.exit_code}: {outcome}"
            if "\n" in str(outcome) or len(str(outcome)) > MAX_LINE:
                return f"error of several lines or over {MAX_LINE} characters: {str(outcome)[:300]}"
        return None

    def attempt(path: Path) -> Callable[[], Any]:
        def call() -> Any:
            try:
                return load_data(path)
            except PeltError as e:
                return e

        return call

    for i in range(n):
        suffix, raw = mutated_data(i)
        path = tmp_path / f"train{suffix}"
        path.write_bytes(raw)
        before = snapshot(tmp_path)
        problem = run_case(attempt(path), check)
        if problem is None and snapshot(tmp_path) != before:
            problem = f"input changed or files left: {leftovers(before, tmp_path)}"
        if problem:
            failures.append((i, f"{path.name}: {problem}"))
        loaded += path.exists() and not isinstance(attempt(path)(), Exception)
        path.unlink()
    report("data", failures, n)
    assert loaded >= n // 20  # the mutations reach files that load as well as files that are refused
