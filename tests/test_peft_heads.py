"""PEFT with heads: ``export --peft`` of classification and causal-LM runs reloads in ``AutoPeftModelFor…``;
``import-peft`` of peft's own SEQ_CLS adapters (``modules_to_save``) and trained biases gives peft's outputs."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import tiny_models
import torch
import transformers
from conftest import hash_tree, make_run, outputs, pelt_main, randomise
from safetensors.torch import load_file

from pelt_cli import recipe as rc
from pelt_cli.apply import apply
from pelt_cli.merge import merge_run
from pelt_cli.peft_format import class_task_type, import_peft
from pelt_cli.run import Run, load_run
from pelt_cli.train import TrainConfig, train_run

peft = pytest.importorskip("peft")

STEPS = dict(epochs=1, batch_size=8, lr=1e-2, warmup=0.0, patience=0, max_length=16, max_steps=2)


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread, and do not stall when other processes share the cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def small_eval(sentiment: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 8 rows of the sentiment eval split (training here only has to move the weights)."""
    p = tmp_path_factory.mktemp("eval") / "eval.jsonl"
    p.write_text("".join(sentiment[1].read_text().splitlines(keepends=True)[:8]))
    return p


def _ids(n: int = 3, seq: int = 6, seed: int = 0, high: int = 40) -> torch.Tensor:
    """Token ids in ``[3, high)`` (no padding id): rows the word tokenizer's vocabulary and MiniLM's both cover."""
    return torch.randint(3, high, (n, seq), generator=torch.Generator().manual_seed(seed))


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Logits row by row (a decoder without a padding id classifies batches of one only)."""
    with torch.no_grad():
        return torch.cat([model.eval()(input_ids=row[None]).logits.float() for row in ids])


@pytest.fixture(scope="module")
def mlm_bert(tiny_dir: Path, words: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny ``BertForMaskedLM`` (no pooler: the classifier's pooler is part of the head) with the word tokenizer."""
    d = tmp_path_factory.mktemp("mlm") / "bert"
    shutil.copytree(tiny_dir / "bert", d)
    shutil.copytree(words, d, dirs_exist_ok=True)
    return d


@pytest.mark.parametrize(
    ("base", "recipe", "root", "modules"),
    [
        ("tiny_bert", "lora", "bert", ["classifier"]),
        ("tiny_bert", "ia3", "bert", ["classifier"]),
        ("mlm_bert", "lora", "", ["bert.pooler", "classifier"]),
        ("llama", "lora", "", ["score"]),
        ("llama", "ia3", "", ["score"]),
    ],
)
def test_classification_export_loads_in_auto_peft(
    request: pytest.FixtureRequest,
    tiny_dir: Path,
    words: Path,
    sentiment: tuple[Path, Path],
    small_eval: Path,
    tmp_path: Path,
    base: str,
    recipe: str,
    root: str,
    modules: list[str],
) -> None:
    path = tiny_dir / "llama" if base == "llama" else request.getfixturevalue(base)
    run = apply(rc.load(recipe), path, tmp_path / "run")
    train_run(
        run, str(sentiment[0]), str(small_eval), TrainConfig(**STEPS), tokenizer=str(words) if base == "llama" else None
    )
    randomise(run)  # LoRA B / IA³ l far from their start; the trained head as it is
    assert Run.open(run).head["root"] == root
    r = pelt_main("export", str(run), "-o", str(tmp_path / "bundle"), "--peft")
    assert r.returncode == 0, r.stderr
    cfg = json.loads((tmp_path / "bundle" / "adapter_config.json").read_text())
    assert cfg["task_type"] == "SEQ_CLS" and cfg["modules_to_save"] == modules
    assert cfg["base_model_name_or_path"] == str(path.resolve())
    assert all(t.startswith(root) for t in cfg["target_modules"])
    keys = load_file(tmp_path / "bundle" / "adapter_model.safetensors")
    assert all(k.startswith(f"base_model.model.{root}") for k in keys if "lora_" in k or "ia3_" in k)
    theirs = peft.AutoPeftModelForSequenceClassification.from_pretrained(str(tmp_path / "bundle"))
    ours, _ = load_run(run)
    ids = _ids(high=40)
    assert (_logits(ours, ids) - _logits(theirs, ids)).abs().max().item() <= 1e-5


@pytest.mark.parametrize(
    ("family", "recipe", "kind", "auto"),
    [
        ("llama", "lora", "CAUSAL_LM", "AutoPeftModelForCausalLM"),
        ("gpt2", "lora-gpt2", "CAUSAL_LM", "AutoPeftModelForCausalLM"),
        ("roberta", "ia3", "FEATURE_EXTRACTION", "AutoPeftModelForFeatureExtraction"),
    ],
)
def test_task_type_by_class_loads_in_auto_peft(
    tiny_dir: Path, tmp_path: Path, family: str, recipe: str, kind: str, auto: str
) -> None:
    run = make_run(recipe, tiny_dir / family, tmp_path / "run")
    r = pelt_main("export", str(run), "-o", str(tmp_path / "bundle"), "--peft")
    assert r.returncode == 0, r.stderr
    cfg = json.loads((tmp_path / "bundle" / "adapter_config.json").read_text())
    assert cfg["task_type"] == kind and cfg["modules_to_save"] is None
    assert cfg["base_model_name_or_path"] == str((tiny_dir / family).resolve())
    theirs = getattr(peft, auto).from_pretrained(str(tmp_path / "bundle"))
    ours, _ = load_run(run)
    assert (outputs(ours, family) - outputs(theirs, family)).abs().max().item() <= 1e-5


@pytest.mark.parametrize(
    ("cls", "config", "kind"),
    [
        ("T5ForConditionalGeneration", "T5Config", "SEQ_2_SEQ_LM"),
        ("BertModel", "BertConfig", "FEATURE_EXTRACTION"),
        ("BertForMaskedLM", "BertConfig", None),
        ("GPT2LMHeadModel", "GPT2Config", "CAUSAL_LM"),
        ("BertForSequenceClassification", "BertConfig", "SEQ_CLS"),
    ],
)
def test_task_type_of_a_class(cls: str, config: str, kind: str | None) -> None:
    with torch.device("meta"):
        model = getattr(transformers, cls)(getattr(transformers, config)(num_layers=1, num_hidden_layers=1))
    assert class_task_type(model) == kind


def _seq_cls(family: str, out: Path) -> torch.nn.Module:
    """A tiny sequence classifier (3 labels, padding id 0) saved into ``out``, and its bare base into
    ``out.parent / 'bare'``."""
    torch.manual_seed(0)
    common = dict(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, pad_token_id=0
    )
    if family == "llama":
        common["num_key_value_heads"] = 2
    config = (transformers.BertConfig if family == "bert" else transformers.LlamaConfig)(**common)
    labels = dict(id2label={0: "neg", 1: "neu", 2: "pos"}, label2id={"neg": 0, "neu": 1, "pos": 2})
    cls = "BertForSequenceClassification" if family == "bert" else "LlamaForSequenceClassification"
    model = getattr(transformers, cls)(type(config)(**common, **labels))
    model.save_pretrained(out)
    bare = type(model.base_model)(config)  # the base's config: no labels of its own
    bare.load_state_dict(model.base_model.state_dict())
    bare.save_pretrained(out.parent / "bare")
    return model


def _peft_adapter(model: torch.nn.Module, config: object, out: Path, seed: int = 3) -> torch.nn.Module:
    """``get_peft_model`` with every trainable tensor (LoRA B, the head, trained biases) randomised, saved to
    ``out``; the peft model."""
    pm = peft.get_peft_model(model, config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if p.requires_grad and "lora_A" not in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    pm.save_pretrained(out)
    return pm.eval()


def _padded(seed: int = 1) -> dict[str, torch.Tensor]:
    """Two rows, the second's last two tokens padding (id 0)."""
    ids = _ids(2, 7, seed, high=90)
    mask = torch.ones_like(ids)
    mask[1, -2:], ids[1, -2:] = 0, 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("family", ["bert", "llama"])
@pytest.mark.parametrize("onto", ["classifier", "bare"])
def test_import_seq_cls_adapter_with_its_head(tmp_path: Path, family: str, onto: str) -> None:
    model = _seq_cls(family, tmp_path / "classifier")
    targets = ["query", "value"] if family == "bert" else ["q_proj", "v_proj", "down_proj"]
    pm = _peft_adapter(
        model, peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=targets), tmp_path / "peft"
    )
    run = import_peft(tmp_path / "peft", tmp_path / onto, tmp_path / "run")
    ours, meta = load_run(run)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "classifier")
    head = meta["head"]
    prefix = "bert" if family == "bert" else "model"
    assert head["class"] == type(model).__name__ and head["root"] == ("" if onto == "classifier" else prefix)
    assert head["params"] == (["classifier.weight", "classifier.bias"] if family == "bert" else ["score.weight"])
    assert head["labels"] == (["neg", "neu", "pos"] if onto == "classifier" else ["LABEL_0", "LABEL_1", "LABEL_2"])
    batch = _padded()
    assert pelt_main("export", str(run), "-o", str(tmp_path / "again"), "--peft").returncode == 0  # back to peft
    again = peft.AutoPeftModelForSequenceClassification.from_pretrained(str(tmp_path / "again"), num_labels=3)
    with torch.no_grad():
        want, got = pm(**batch).logits, ours(**batch).logits
        assert (got - want).abs().max().item() <= 1e-6
        assert (got - model.eval()(**batch).logits).abs().max().item() > 1e-3  # not the base's own head and weights
        assert (again(**batch).logits - want).abs().max().item() <= 1e-6


@pytest.mark.parametrize(
    ("family", "bias", "count"), [("bert", "lora_only", 4), ("bert", "all", 18), ("qwen2", "all", 6)]
)
def test_import_trained_biases_is_exact(tiny_dir: Path, tmp_path: Path, family: str, bias: str, count: int) -> None:
    """Trained biases (q/v only, or every bias) become head parameters: the run, its merge and its export agree with
    peft. BERT: a SEQ_CLS adapter (the classifier saved too); Qwen2 (q/k/v biases): a CAUSAL_LM one."""
    if family == "bert":
        base, kind, auto, targets = tmp_path / "classifier", "SEQ_CLS", "SequenceClassification", ["query", "value"]
        _seq_cls("bert", base)
    else:
        base, kind, auto, targets = tiny_dir / "qwen2", "CAUSAL_LM", "CausalLM", ["q_proj", "v_proj"]
    model = getattr(transformers, f"AutoModelFor{auto}").from_pretrained(base)
    pm = _peft_adapter(
        model, peft.LoraConfig(task_type=kind, r=4, target_modules=targets, bias=bias), tmp_path / "peft"
    )
    assert any(k.endswith("base_layer.bias") for k in load_file(tmp_path / "peft" / "adapter_model.safetensors"))
    run = import_peft(tmp_path / "peft", base, tmp_path / "run")
    ours, meta = load_run(run)
    assert len([p for p in meta["head"]["params"] if p.endswith(".bias") and "classifier" not in p]) == count
    batch = _padded()
    merge_run(run, tmp_path / "merged")  # the biases are written as they are: the merge stays exact
    assert pelt_main("export", str(run), "-o", str(tmp_path / "again"), "--peft").returncode == 0  # back to peft
    assert json.loads((tmp_path / "again" / "adapter_config.json").read_text())["bias"] == bias
    with torch.no_grad():
        want = pm(**batch).logits
        assert (ours(**batch).logits - want).abs().max().item() <= 1e-6
        merged = getattr(transformers, f"AutoModelFor{auto}").from_pretrained(tmp_path / "merged")
        assert (merged(**batch).logits - want).abs().max().item() <= 1e-5
        again = getattr(peft, f"AutoPeftModelFor{auto}").from_pretrained(str(tmp_path / "again"))
        assert (again(**batch).logits - want).abs().max().item() <= 1e-6


def test_head_adapter_refusals_are_one_line(tiny_dir: Path, tmp_path: Path) -> None:
    _peft_adapter(
        _seq_cls("bert", tmp_path / "classifier"),
        peft.LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query"]),
        tmp_path / "seq",
    )
    lm = transformers.LlamaForCausalLM(tiny_models.config("llama"))
    lm.model.save_pretrained(tmp_path / "bare-llama")
    _peft_adapter(lm, peft.LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj"]), tmp_path / "lm")
    apply(rc.load("adapter"), tiny_dir / "bert", tmp_path / "adapter")
    before = hash_tree(tmp_path)
    cases = [
        ("seq", tiny_dir / "whisper", "no AutoModelForSequenceClassification class for whisper"),
        ("lm", tmp_path / "bare-llama", "LlamaModel has none"),
    ]
    for adapter, base, says in cases:
        r = pelt_main("import-peft", str(tmp_path / adapter), str(base), "-o", str(tmp_path / "run"))
        assert r.returncode == 2 and r.stderr.count("error:") == 1 and "Traceback" not in r.stderr
        assert says in r.stderr.splitlines()[0], r.stderr
    r = pelt_main("export", str(tmp_path / "adapter"), "-o", str(tmp_path / "b"), "--peft")
    assert r.returncode == 2 and "adapter at bert.encoder.layer.0.output.dense" in r.stderr
    assert "pelt export RUN -o DIR without --peft" in r.stderr  # the hint names the real command
    assert hash_tree(tmp_path) == before  # nothing written
