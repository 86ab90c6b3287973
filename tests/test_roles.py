"""Roles for any transformers model (issue 10): a zoo of tiny models beyond the eight role tables.

Every attention/FFN projection gets the role its naming means; the ``lora`` recipe places at least as many sites as
peft's default mapping; ``all-linear`` exactly as many as peft's; layer numbers are block-list indices (T5);
fused QKV slices follow the config's head counts; a merged LoRA equals its run.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from conftest import randomise
from zoo import ZOO, build, inputs, main_output

from pelt_cli import recipe as rc
from pelt_cli.errors import RecipeError
from pelt_cli.insert import insert_recipe
from pelt_cli.roles import fused_slices, layer_index
from pelt_cli.surgery import is_linear
from pelt_cli.targets import select, view

FAMILIES = list(ZOO)
GOLDEN = Path(__file__).parent / "golden"

LLAMA = {
    "attn.q": "self_attn.q_proj",
    "attn.k": "self_attn.k_proj",
    "attn.v": "self_attn.v_proj",
    "attn.o": "self_attn.o_proj",
    "ffn.gate": "mlp.gate_proj",
    "ffn.up": "mlp.up_proj",
    "ffn.down": "mlp.down_proj",
}
ATTN = {k: v for k, v in LLAMA.items() if k.startswith("attn.")}
BART = {
    "attn.q": "q_proj",
    "attn.k": "k_proj",
    "attn.v": "v_proj",
    "attn.o": "out_proj",
    "ffn.up": "fc1",
    "ffn.down": "fc2",
}
BERT = {
    "attn.q": "attention.self.query",
    "attn.k": "attention.self.key",
    "attn.v": "attention.self.value",
    "attn.o": "attention.output.dense",
    "ffn.up": "intermediate.dense",
    "ffn.down": "output.dense",
}
FUSED = {"attn.qkv": "query_key_value", "attn.o": "dense", "ffn.up": "dense_h_to_4h", "ffn.down": "dense_4h_to_h"}
# family: the on-disk path suffix each role's module ends with (the longest matching suffix decides)
EXPECT: dict[str, dict[str, str]] = {
    "gemma": LLAMA,
    "gemma2": LLAMA,
    "qwen3": LLAMA,
    "mistral": LLAMA,
    "stablelm": LLAMA,
    "olmo": LLAMA,
    "phi": {**BART, "attn.o": "self_attn.dense"},
    "phi3": {"attn.qkv": "qkv_proj", "attn.o": "o_proj", "ffn.up": "gate_up_proj", "ffn.down": "down_proj"},
    "falcon": FUSED,
    "falcon-new": FUSED,
    "gpt_neox": FUSED,
    "bloom": FUSED,
    "opt": BART,
    "bart": BART,
    "clip": BART,
    "siglip": BART,
    "gptj": {**BART, "ffn.up": "fc_in", "ffn.down": "fc_out"},
    "starcoder2": {**ATTN, "ffn.up": "mlp.c_fc", "ffn.down": "mlp.c_proj"},
    "mixtral": ATTN,  # experts are fused 3-D parameters and the router is not a Linear: neither is a LoRA site
    "qwen2_moe": {
        **LLAMA,
        "ffn.gate": "shared_expert.gate_proj",
        "ffn.up": "shared_expert.up_proj",
        "ffn.down": "shared_expert.down_proj",
    },
    "t5": {
        "attn.q": "q",
        "attn.k": "k",
        "attn.v": "v",
        "attn.o": "o",
        "ffn.up": "DenseReluDense.wi",
        "ffn.down": "DenseReluDense.wo",
    },
    "distilbert": {
        "attn.q": "q_lin",
        "attn.k": "k_lin",
        "attn.v": "v_lin",
        "attn.o": "out_lin",
        "ffn.up": "ffn.lin1",
        "ffn.down": "ffn.lin2",
    },
    "albert": {
        "attn.q": "attention.query",
        "attn.k": "attention.key",
        "attn.v": "attention.value",
        "attn.o": "attention.dense",
        "ffn.up": "ffn",
        "ffn.down": "ffn_output",
    },
    "electra": BERT,
    "xlm-roberta": BERT,
    "deberta-v2": {**BERT, "attn.q": "query_proj", "attn.k": "key_proj", "attn.v": "value_proj"},
    "mpnet": {**BERT, "attn.q": "attn.q", "attn.k": "attn.k", "attn.v": "attn.v", "attn.o": "attn.o"},
    "wav2vec2": {**BART, "ffn.up": "feed_forward.intermediate_dense", "ffn.down": "feed_forward.output_dense"},
}
UNROLED = {"deberta-v2": ("pos_key_proj", "pos_query_proj"), "qwen2_moe": ("shared_expert_gate",)}
BLOCK = {
    "t5": {"encoder", "decoder", "cross-attention"},
    "bart": {"encoder", "decoder", "cross-attention"},
    "clip": {"vision"},
    "siglip": {"vision"},
    "wav2vec2": {"audio"},
}
ENCODERS = {"distilbert", "albert", "electra", "deberta-v2", "mpnet", "xlm-roberta"}
MERGE = list(ZOO)  # every family: a merged LoRA loads with plain from_pretrained and equals the run


def _meta(family: str):
    with torch.device("meta"):
        return build(family)


def _expected(disk: str, table: dict[str, str]) -> str | None:
    hits = [(len(suffix), role) for role, suffix in table.items() if disk == suffix or disk.endswith("." + suffix)]
    return max(hits)[1] if hits else None


@pytest.mark.parametrize("family", FAMILIES)
def test_every_projection_gets_the_role_its_naming_means(family: str) -> None:
    model = _meta(family)
    mv = view(model)
    mods = dict(model.named_modules())
    seen = set()
    for s in mv.sites:
        if s.layer is None or not is_linear(mods[s.module]):
            continue
        leaf = s.disk_module.rsplit(".", 1)[-1]
        if leaf in UNROLED.get(family, ()):
            continue
        want = _expected(s.disk_module, EXPECT[family])
        assert s.role == want, (s.disk_module, s.role, want)
        assert s.how in ("table", "inferred")
        seen.add(s.role)
    assert seen == set(EXPECT[family]), (seen, set(EXPECT[family]))
    kinds = {s.block for s in mv.sites if s.role.startswith(("attn.", "ffn.")) and s.layer is not None}
    want_kinds = BLOCK.get(family, {"encoder"} if family in ENCODERS else {"decoder"})
    assert kinds == want_kinds, kinds


def _peft_sites(family: str, target_modules: object = None) -> tuple[set[str], int]:
    """The modules peft's LoRA wraps as Linear/Conv1D layers (paths without peft's prefix), and how many LoRA
    layers it made in all (more on mixture-of-experts decoders: peft 0.21 also wraps the router and the 3-D expert
    parameters, which pelt's lora, a Linear/Conv1D method, does not)."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.layer import Linear

    model = build(family)
    cfg = LoraConfig(target_modules=target_modules) if target_modules else LoraConfig()
    peft_model = get_peft_model(model, cfg)
    lin = {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if type(m) is Linear}
    return lin, sum(1 for n, _ in peft_model.named_modules() if n.endswith(".lora_A"))


def _pelt_sites(family: str, targets: list[str]) -> int:
    recipe = rc.loads(f"name: t\ninserts:\n  - method: lora\n    targets: {targets}\n    params: {{rank: 1}}\n")
    rows = insert_recipe(_meta(family), recipe)
    return len({r.site for r in rows})


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_and_all_linear_against_peft(family: str) -> None:
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULT

    mt = build(family).config.model_type
    lin, total = _peft_sites(family, "all-linear")
    assert _pelt_sites(family, ["all-linear"]) == len(lin)
    assert total == len(lin) or "moe" in mt or mt == "mixtral"
    mv = view(_meta(family))
    lora = {r.site for r in insert_recipe(mv.model, rc.load("lora"))}
    assert lora
    if mt in PEFT_DEFAULT:  # cross-check: peft's default targets have pelt roles; its attention ones are lora's
        peft_default, _ = _peft_sites(family, PEFT_DEFAULT[mt])
        roles = {s.module: s.role for s in mv.sites}
        assert all(roles[m] != "unknown" for m in peft_default), {m: roles[m] for m in peft_default}
        attn = {m for m in peft_default if roles[m] in ("attn.q", "attn.v", "attn.qkv")}
        assert attn <= lora and len(lora) >= len(attn) > 0


def test_layer_numbering_is_the_block_list_index() -> None:
    mv = view(_meta("t5"))
    sites, problems = select(mv, ["attn.q"], layers=(1,))
    assert not problems and len(sites) == 3  # encoder self, decoder self, decoder cross
    assert all(".block.1." in s.disk_module for s in sites)
    assert layer_index("encoder.block.3.layer.1.SelfAttention.q") == 3
    assert layer_index("transformer.h.2.self_attention.dense") == 2
    assert layer_index("wav2vec2.feature_extractor.conv_layers.0.conv") is None
    bart = view(_meta("bart"))
    assert {s.layer for s in bart.sites if s.role == "attn.q"} == {0, 1}


@pytest.mark.parametrize(
    ("family", "q", "v"),
    [
        ("gpt_neox", [(0, 8), (24, 32), (48, 56), (72, 80)], [(16, 24), (40, 48), (64, 72), (88, 96)]),
        ("falcon", [(0, 32)], [(40, 48)]),  # multi-query: one k and one v head
        ("falcon-new", [(0, 16), (32, 48)], [(24, 32), (56, 64)]),  # 2 kv groups of [q q k v]
        ("phi3", [(0, 32)], [(48, 64)]),  # GQA: q 4 heads, k and v 2 heads of 8
    ],
)
def test_fused_slices_follow_the_config(family: str, q: list, v: list) -> None:
    model = _meta(family)
    mv = view(model)
    site = next(s for s in mv.sites if s.role == "attn.qkv")
    out = model.get_submodule(site.module).weight.shape[0]
    cfg = model.config.to_dict()
    assert fused_slices(cfg, out, ["q"]) == q and fused_slices(cfg, out, ["v"]) == v
    sites, _ = select(mv, ["attn.q", "attn.v"])
    assert {s.parts for s in sites} == {("q", "v")}
    whole, _ = select(mv, ["attn.qkv", "attn.q"])
    assert {s.parts for s in whole} == {None}


def test_gpt2_plain_lora_uses_fused_slices(tiny_models_built: dict) -> None:
    model = tiny_models_built["gpt2"]
    with torch.device("meta"):
        skel = type(model)(model.config)
    rows = insert_recipe(skel, rc.load("lora"))
    assert len(rows) == 2 and all(r.role == "attn.qkv" for r in rows)
    branch = skel.get_submodule(rows[0].modules[0])
    assert branch.slices == [(0, 32), (64, 96)]


def test_target_sets_and_messages() -> None:
    mv = view(_meta("gpt_neox"))
    attn, _ = select(mv, ["all-attention"])
    ffn, _ = select(mv, ["all-ffn"])
    assert {s.role for s in attn} == {"attn.qkv", "attn.o"} and {s.role for s in ffn} == {"ffn.up", "ffn.down"}
    _, problems = select(mv, ["ffn.gate"])
    assert "its roles are" in problems[0] and "attn.qkv" in problems[0] and "'**.{" in problems[0]
    recipe = rc.loads("name: t\ninserts:\n  - method: lora\n    targets: [ffn.gate]\n")
    with pytest.raises(RecipeError) as e:
        insert_recipe(_meta("gpt_neox"), recipe)
    assert "dense_h_to_4h" in str(e.value)


def test_unknown_structure_still_has_roles() -> None:
    """A model class pelt has no table for and with odd names: roles from the naming in its blocks."""
    from torch import nn

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attention = nn.ModuleDict({"Wq": nn.Linear(8, 8), "Wv": nn.Linear(8, 8), "wo": nn.Linear(8, 8)})
            self.ffn = nn.ModuleDict({"w1": nn.Linear(8, 16), "w3": nn.Linear(8, 16), "w2": nn.Linear(16, 8)})

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList([Block(), Block()])

    mv = view(Net())
    roles = {s.disk_module: s.role for s in mv.sites}
    assert roles["blocks.1.attention.Wq"] == "attn.q" and roles["blocks.0.attention.wo"] == "attn.o"
    assert roles["blocks.0.ffn.w1"] == "ffn.gate" and roles["blocks.0.ffn.w3"] == "ffn.up"
    assert roles["blocks.0.ffn.w2"] == "ffn.down"


def _save(family: str, out: Path) -> Path:
    build(family).save_pretrained(out)
    return out


@pytest.mark.parametrize("family", MERGE)
def test_merged_lora_equals_run(tmp_path: Path, family: str) -> None:
    import transformers as tf

    from pelt_cli.apply import apply
    from pelt_cli.merge import merge_run
    from pelt_cli.run import load_run

    base = _save(family, tmp_path / "base")
    apply(rc.load("lora"), base, tmp_path / "run")
    randomise(tmp_path / "run")
    model, _ = load_run(tmp_path / "run")
    merge_run(tmp_path / "run", tmp_path / "merged")
    merged = getattr(tf, ZOO[family][1]).from_pretrained(tmp_path / "merged")
    plain = getattr(tf, ZOO[family][1]).from_pretrained(base)
    with torch.no_grad():
        x = inputs(family)
        a, b = main_output(model.eval()(**x)), main_output(merged.eval()(**x))
        c = main_output(plain.eval()(**x))
    assert (a - c).abs().max().item() > 1e-4
    assert (a - b).abs().max().item() <= 1e-5


@pytest.mark.parametrize("family", ["t5", "gpt_neox", "distilbert"])
def test_golden_inspect(tmp_path: Path, family: str) -> None:
    from pelt_cli.io.checkpoint import open_checkpoint
    from pelt_cli.sites import sites

    base = _save(family, tmp_path / "base")
    rows = sites(open_checkpoint(base))
    text = "".join(f"{s.name}\t{s.role}\t{s.how or '-'}\t{s.layer}\t{s.block}\n" for s in rows)
    path = GOLDEN / f"roles-{family}.tsv"
    if os.environ.get("PELT_UPDATE_GOLDEN") == "1":
        path.write_text(text)
    assert text == path.read_text(), f"{path.name} differs (PELT_UPDATE_GOLDEN=1 regenerates)"


def test_ia3_on_fused_layers_follows_the_layout(tmp_path: Path) -> None:
    """IA³ scales the k|v block of a contiguous fused layer (GQA widths from the config), refuses interleaved ones."""
    import transformers as tf

    from pelt_cli.apply import apply
    from pelt_cli.merge import merge_run
    from pelt_cli.run import load_run

    with pytest.raises(RecipeError, match="not one block after q"):
        insert_recipe(build("gpt_neox"), rc.load("ia3"))
    base = _save("phi3", tmp_path / "base")
    apply(rc.load("ia3"), base, tmp_path / "run")
    randomise(tmp_path / "run", others=0.2)
    model, meta = load_run(tmp_path / "run")
    qkv = next(m for n, m in model.named_modules() if n.endswith("qkv_proj.pelt_ia3"))
    cfg = model.config
    assert qkv.fixed == cfg.num_attention_heads * (cfg.hidden_size // cfg.num_attention_heads)  # the q part
    merge_run(tmp_path / "run", tmp_path / "merged")
    merged = tf.Phi3ForCausalLM.from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        x = inputs("phi3")
        assert (main_output(model.eval()(**x)) - main_output(merged.eval()(**x))).abs().max().item() <= 1e-5
