"""Models for the predict and eval tests, built once per test session (shared by test_predict and test_eval).

A tiny BERT classifier (``BertForSequenceClassification``, labels neg/pos, MiniLM's tokenizer) with runs of every
method on it, its LoRA run merged and exported, and a tiny LLaMA causal LM with a word-level tokenizer.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import tiny_models
import torch

METHODS = ["lora", "adapter", "prefix", "ia3", "unipelt", "unipelt-softmax"]
WORDS = ["good", "bad", "film", "the", "was", "really", "quite", "dull", "great", "story", "plot", "fun", "sad"]
_built: dict[str, Path] = {}


def once(key: str, build: Callable[[], Path]) -> Path:
    """``build()``'s path, built at most once per test session."""
    if key not in _built:
        _built[key] = build()
    return _built[key]


def single_thread() -> Iterator[None]:
    """Run torch on one thread meanwhile (the fixtures' use): tiny models are fastest so, and do not stall when other
    processes share the cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def shared_root(factory: Any) -> Path:
    """The directory every model of this module goes into (one per session)."""
    return once("root", lambda: factory.mktemp("predict"))


def classifier_base(root: Path, minilm: Path) -> Path:
    """A tiny ``BertForSequenceClassification`` (hidden 32, 2 layers, labels neg/pos) with MiniLM's tokenizer; its
    weights spread wider than the default init so that scores differ between rows."""

    def build() -> Path:
        import transformers

        torch.manual_seed(0)
        labels = dict(id2label={0: "neg", 1: "pos"}, label2id={"neg": 0, "pos": 1})
        cfg = tiny_models.config("bert", vocab_size=30522, initializer_range=0.2, **labels)
        model = transformers.BertForSequenceClassification(cfg)
        tok = transformers.AutoTokenizer.from_pretrained(str(minilm))
        with torch.no_grad():
            model.classifier.weight.normal_(0, 0.3)
            logits = model.eval()(**tok([r["text"] for r in sentences(64, 99)], padding=True, return_tensors="pt"))
            model.classifier.bias.copy_(-logits.logits.median(0).values)  # about half the rows each label
        d = root / "classifier"
        model.save_pretrained(d)
        for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
            shutil.copy(minilm / f, d / f)
        return d

    return once("classifier", build)


def method_run(root: Path, minilm: Path, method: str) -> Path:
    """A run of the bundled recipe ``method`` on :func:`classifier_base`, every inserted tensor randomised."""
    from conftest import make_run

    return once(
        f"run-{method}", lambda: make_run(method, classifier_base(root, minilm), root / f"run-{method}", others=0.1)
    )


def merged_lora(root: Path, minilm: Path) -> Path:
    """The LoRA run merged by ``pelt merge`` (a plain ``BertForSequenceClassification`` checkpoint)."""
    from pelt_cli.merge import merge_run

    def build() -> Path:
        merge_run(method_run(root, minilm, "lora"), root / "merged-lora")
        return root / "merged-lora"

    return once("merged-lora", build)


def causal_lm(root: Path) -> Path:
    """The tiny ``LlamaForCausalLM`` of tiny_models (vocabulary 100) with a word-level tokenizer of 100 tokens
    (``<unk> <s> </s>`` and words; no pad token)."""

    def build() -> Path:
        import tiny_models
        from tokenizers import Tokenizer, models, pre_tokenizers, processors
        from transformers import PreTrainedTokenizerFast

        vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", *WORDS, *[f"w{i}" for i in range(87)]])}
        tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
        d = root / "llama"
        tiny_models.build("llama").save_pretrained(d)
        PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
        ).save_pretrained(d)
        return d

    return once("llama", build)


def decoder_classifier(root: Path, family: str) -> Path:
    """A tiny ``LlamaForSequenceClassification`` or ``GPT2ForSequenceClassification`` (labels neg/pos, head weights
    spread) with :func:`causal_lm`'s word-level tokenizer: decoders pool the last token that is not padding."""

    def build() -> Path:
        import tiny_models
        import transformers

        config = tiny_models.build(family).config
        config.update({"num_labels": 2, "id2label": {0: "neg", 1: "pos"}, "label2id": {"neg": 0, "pos": 1}})
        cls = getattr(transformers, f"{'Llama' if family == 'llama' else 'GPT2'}ForSequenceClassification")
        torch.manual_seed(0)
        model = cls(config)
        with torch.no_grad():
            model.score.weight.normal_(0, 1.0)
        model.save_pretrained(root / f"{family}-cls")
        for f in causal_lm(root).glob("tokenizer*"):
            shutil.copy(f, root / f"{family}-cls" / f.name)
        return root / f"{family}-cls"

    return once(f"{family}-cls", build)


def sentences(n: int, seed: int = 0, labels: bool = False) -> list[dict[str, Any]]:
    """``n`` rows of 1 to 12 words (seeded), with a ``label`` (pos when "good"/"great"/"fun" occurs) if asked."""
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(1, 12))]
        row: dict[str, Any] = {"text": " ".join(words)}
        if labels:
            row["label"] = "pos" if {"good", "great", "fun"} & set(words) else "neg"
        rows.append(row)
    return rows


def trained_lora(root: Path, tiny_bert: Path, sentiment: tuple[Path, Path]) -> tuple[Path, Path]:
    """A LoRA run on a bare tiny BERT (``BertModel``) trained as a classifier by ``pelt train`` (so its head is the
    ``BertForSequenceClassification`` pelt adds), and that run merged: ``(run, merged)``."""
    from pelt_cli import recipe
    from pelt_cli.apply import apply
    from pelt_cli.merge import merge_run
    from pelt_cli.train import TrainConfig, train_run

    def build() -> Path:
        run = apply(recipe.load("lora"), tiny_bert, root / "trained-lora")
        cfg = TrainConfig(epochs=1, batch_size=16, lr=2e-2, warmup=0.0, patience=0, max_length=24)
        train_run(run, str(sentiment[0]), str(sentiment[1]), cfg)
        merge_run(run, root / "trained-lora-merged")
        return run

    run = once("trained-lora", build)
    return run, root / "trained-lora-merged"
