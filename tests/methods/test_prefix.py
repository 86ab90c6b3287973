"""Prefix tuning: the attention math against an eager reference, padding, GQA, caching, gates, reparam and baking."""

from __future__ import annotations

import copy

import pytest
import tiny_models
import torch

from pelt_cli import recipe, surgery, targets
from pelt_cli.errors import PeltError, RecipeError
from pelt_cli.methods import get
from pelt_cli.methods import prefix as pm

METHOD = get("prefix")
KV_ROLES = ("attn.k", "attn.qkv")
# (family, blocks) → every family with attention key projections; Whisper and Qwen2-Audio per block kind.
CASES = [
    ("bert", ()),
    ("roberta", ()),
    ("gpt2", ()),
    ("llama", ()),
    ("qwen2", ()),
    ("vit", ()),
    ("whisper", ("encoder",)),
    ("whisper", ("decoder",)),
    ("whisper", ("cross-attention",)),
    ("qwen2_audio", ("audio",)),
    ("qwen2_audio", ("decoder",)),
]


def sites_of(model, blocks=(), targets_=KV_ROLES):
    sites, _ = targets.select(targets.view(model), targets_, blocks=blocks)
    return sites


def apply(model, blocks=(), **params):
    sites = sites_of(model, blocks)
    p = METHOD.Params(**params)
    assert METHOD.check(model, p, sites) == []
    return METHOD.insert(model, p, sites)


def prefixes(model):
    return [m for n, m in model.named_modules() if n.endswith(pm.CHILD)]


def randomise(model, std=1.0, seed=3):
    """Give every prefix clearly non-zero values so that it changes the outputs."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in surgery.inserted_parameters(model).values():
            p.normal_(0, std)


def inputs(family, blocks=()):
    torch.manual_seed(0)
    if family == "whisper" or (family == "qwen2_audio" and "audio" in blocks):
        return {"input_features": torch.randn(2, 16, 200), "decoder_input_ids": torch.randint(0, 90, (2, 7))}
    if family == "vit":
        return {"pixel_values": torch.randn(2, 3, 16, 16)}
    return {"input_ids": torch.randint(0, 90, (2, 7)), "attention_mask": torch.ones(2, 7, dtype=torch.long)}


def run(model, family, blocks=(), **kw):
    x = inputs(family, blocks)
    if family == "qwen2_audio" and "audio" in blocks:  # the audio tower (a Whisper-style encoder) on its own
        return model.model.audio_tower(x["input_features"], **kw).last_hidden_state
    out = model(**x, **kw)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def expected_widths(model, site):
    """(k_width, v_width, d_e) read off the layers, independently of the method's own helper."""
    mod = surgery.get_module(model, site.module)
    if site.role == "attn.qkv":  # GPT-2 Conv1D c_attn: weight (in, 3·d)
        return mod.weight.shape[1] // 3, mod.weight.shape[1] // 3, mod.weight.shape[0]
    parent = surgery.get_module(model, site.module.rsplit(".", 1)[0])
    v = parent.value if hasattr(parent, "value") else parent.v_proj
    return mod.out_features, v.out_features, mod.in_features


# ------------------------------------------------------------------------------------------------ params and check


def test_length_zero_rejected_by_recipe():
    with pytest.raises(RecipeError) as e:
        recipe.loads("inserts: [{method: prefix, params: {length: 0}}]")
    msg = str(e.value)
    assert "length" in msg and "≥ 1" in msg


def test_check_accepts_key_sites_and_rejects_others():
    model = tiny_models.build("llama")
    assert METHOD.check(model, METHOD.Params(), sites_of(model)) == []
    gpt2 = tiny_models.build("gpt2")
    assert [s.role for s in sites_of(gpt2)] == ["attn.qkv", "attn.qkv"]
    assert METHOD.check(gpt2, METHOD.Params(), sites_of(gpt2)) == []
    bad = sites_of(model, targets_=("attn.q",))
    problems = METHOD.check(model, METHOD.Params(), bad)
    assert len(problems) == 2
    assert "model.layers.0.self_attn.q_proj" in problems[0] and "attn.q" in problems[0]


# ------------------------------------------------------------------------------------------------ every family


@pytest.mark.parametrize("family,blocks", CASES, ids=[f"{f}-{'-'.join(b) or 'all'}" for f, b in CASES])
def test_every_family_shape_counts_and_effect(family, blocks):
    base = tiny_models.build(family).eval()
    model = copy.deepcopy(base)
    sites = sites_of(model, blocks)
    assert sites
    ins = apply(model, blocks, length=5)
    assert len(ins) == len(sites)
    want = sum(5 * (k + v) for k, v, _ in (expected_widths(model, s) for s in sites))
    assert sum(p.numel() for p in surgery.inserted_parameters(model).values()) == want
    assert set(base.state_dict()) == {k for k in model.state_dict() if not surgery.is_inserted(k)}
    randomise(model)
    with torch.no_grad():
        y0, y = run(base, family, blocks), run(model, family, blocks)
    assert y.shape == y0.shape
    assert (y - y0).abs().max() > 1e-3  # the prefix is really used
    assert torch.isfinite(y).all()


def test_gqa_prefix_width_is_kv_width():
    for family in ("llama", "qwen2"):
        model = tiny_models.build(family)
        apply(model, length=4)
        for p in prefixes(model):
            assert p.key.shape == (4, 16) and p.value.shape == (4, 16)  # 2 kv heads × head_dim 8, not 32


def test_meta_skeleton_counts_equal_real():
    for family in ("bert", "gpt2", "llama", "whisper"):
        real = tiny_models.build(family)
        with torch.device("meta"):
            skeleton = type(real)(copy.deepcopy(real.config))
        for reparam in (False, True):
            r, s = copy.deepcopy(real), copy.deepcopy(skeleton)
            apply(r, length=3, reparam=reparam, reparam_hidden=8)
            apply(s, length=3, reparam=reparam, reparam_hidden=8)
            count = [sum(p.numel() for p in surgery.inserted_parameters(m).values()) for m in (r, s)]
            assert count[0] == count[1] > 0
            assert all(p.device.type == "meta" for p in surgery.inserted_parameters(s).values())


# ------------------------------------------------------------------------------------------------ reference math


def eager_prefix_attention(q, k, v, pk, pv, scale, allowed):
    """softmax(Q [P_k; K]^T · scale, masked) [P_v; V]; q, k, v [B,H,T,d], pk, pv [H,ℓ,d], allowed [T, ℓ+T]."""
    b = q.shape[0]
    k = torch.cat([pk.expand(b, -1, -1, -1), k], 2)
    v = torch.cat([pv.expand(b, -1, -1, -1), v], 2)
    w = (q @ k.transpose(-1, -2)) * scale
    w = w.masked_fill(~allowed, float("-inf")).softmax(-1)
    return w @ v


def test_bert_attention_matches_eager_reference():
    model = tiny_models.build("bert").eval()
    apply(model, length=3)
    randomise(model)
    att = model.bert.encoder.layer[0].attention.self
    pre = att.pelt_prefix
    torch.manual_seed(1)
    x = torch.randn(2, 7, 32)
    heads = lambda t: t.view(2, -1, 4, 8).transpose(1, 2)  # noqa: E731
    with torch.no_grad():
        got, _ = att(x)
        q, k, v = heads(att.query(x)), heads(att.key(x)), heads(att.value(x))
        pk, pv = (t.view(3, 4, 8).transpose(0, 1) for t in (pre.key, pre.value))
        ref = eager_prefix_attention(q, k, v, pk, pv, 8**-0.5, torch.ones(7, 10, dtype=torch.bool))
    assert (got - ref.transpose(1, 2).reshape(2, 7, 32)).abs().max() <= 1e-5


def rotate(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


@pytest.mark.parametrize("with_mask", [False, True])
def test_llama_attention_matches_eager_reference(with_mask):
    """GQA (4 query heads, 2 kv heads) with RoPE, causal: prefix keys are not rotated and always visible."""
    model = tiny_models.build("llama").eval()
    apply(model, length=3)
    randomise(model)
    att = model.model.layers[1].self_attn
    pre = att.pelt_prefix
    torch.manual_seed(1)
    x = torch.randn(2, 7, 32)
    pos = torch.arange(7)[None].expand(2, -1)
    cos, sin = model.model.rotary_emb(x, pos)
    causal = torch.ones(7, 7, dtype=torch.bool).tril()
    mask = torch.cat([torch.ones(7, 3, dtype=torch.bool), causal], -1)
    with torch.no_grad():
        got, _ = att(x, position_embeddings=(cos, sin), attention_mask=causal[None, None] if with_mask else None)
        q = att.q_proj(x).view(2, 7, 4, 8).transpose(1, 2)
        k = att.k_proj(x).view(2, 7, 2, 8).transpose(1, 2)
        v = att.v_proj(x).view(2, 7, 2, 8).transpose(1, 2)
        q, k = rotate(q, cos[:, None], sin[:, None]), rotate(k, cos[:, None], sin[:, None])
        pk, pv = (t.view(3, 2, 8).transpose(0, 1) for t in (pre.key, pre.value))
        rep = lambda t: t.repeat_interleave(2, dim=-3)  # noqa: E731  (kv head h serves query heads 2h, 2h+1)
        ref = eager_prefix_attention(q, rep(k), rep(v), rep(pk), rep(pv), 8**-0.5, mask)
        ref = att.o_proj(ref.transpose(1, 2).reshape(2, 7, 32))
    assert (got - ref).abs().max() <= 1e-5


def test_extend_mask_formats():
    float_mask = torch.tensor([[[[0.0, -1e9]]]])
    assert pm.extend_mask(float_mask, 2, 1, 2, True, torch.device("cpu")).tolist() == [[[[0.0, 0.0, 0.0, -1e9]]]]
    bool_mask = torch.tensor([[[[True, False]]]])
    assert pm.extend_mask(bool_mask, 1, 1, 2, True, torch.device("cpu")).tolist() == [[[[True, True, False]]]]
    assert pm.extend_mask(None, 2, 3, 3, False, torch.device("cpu")) is None
    m = pm.extend_mask(None, 2, 3, 3, True, torch.device("cpu"))
    assert m[0, 0].int().tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]


# ------------------------------------------------------------------------------------------------ padding and cache


@pytest.mark.parametrize("family", ["bert", "llama", "gpt2"])
def test_right_padding_matches_unpadded(family):
    model = tiny_models.build(family).eval()
    apply(model, length=4)
    randomise(model)
    torch.manual_seed(2)
    ids = torch.randint(0, 90, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 4:] = 0
    with torch.no_grad():
        padded = model(input_ids=ids, attention_mask=mask).logits
        alone = model(input_ids=ids[1:, :4]).logits
        first = model(input_ids=ids[:1]).logits
    assert (padded[1, :4] - alone[0]).abs().max() <= 1e-5
    assert (padded[0] - first[0]).abs().max() <= 1e-5


def test_left_padding_llama_with_position_ids():
    """Left padding adds no error beyond the base model's own: the prefix sees exactly the real tokens."""
    model = tiny_models.build("llama").eval()
    torch.manual_seed(2)
    ids = torch.randint(0, 90, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, :3] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)

    def gap() -> float:
        with torch.no_grad():
            padded = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[1, 3:]
            return (padded - model(input_ids=ids[1:, 3:]).logits[0]).abs().max().item()

    base_gap = gap()
    assert base_gap <= 1e-4  # the base model itself, left-padded: float rounding only
    apply(model, length=4)
    randomise(model)
    assert gap() <= base_gap + 1e-5


def test_llama_incremental_decoding_matches_full_forward():
    """With a KV cache the cache holds the un-prefixed keys; the prefix is prepended at every step."""
    model = tiny_models.build("llama").eval()
    apply(model, length=4)
    randomise(model)
    torch.manual_seed(2)
    ids = torch.randint(0, 90, (2, 7))
    with torch.no_grad():
        full = model(input_ids=ids).logits
        first = model(input_ids=ids[:, :5], use_cache=True)
        step = model(input_ids=ids[:, 5:6], past_key_values=first.past_key_values, use_cache=True)
        last = model(input_ids=ids[:, 6:], past_key_values=step.past_key_values, use_cache=True)
    assert (first.logits - full[:, :5]).abs().max() <= 1e-5
    assert (step.logits[:, 0] - full[:, 5]).abs().max() <= 1e-5
    assert (last.logits[:, 0] - full[:, 6]).abs().max() <= 1e-5


# ------------------------------------------------------------------------------------------------ training


def test_gradients_reach_only_the_prefix():
    for family, reparam in (("llama", False), ("gpt2", True), ("whisper", False)):
        model = tiny_models.build(family).train()
        apply(model, length=3, reparam=reparam, reparam_hidden=8)
        trainable, _ = surgery.freeze_base(model)
        assert trainable == sum(p.numel() for p in surgery.inserted_parameters(model).values())
        run(model, family).float().pow(2).mean().backward()
        for name, p in model.named_parameters():
            if surgery.is_inserted(name):
                assert p.grad is not None and p.grad.abs().sum() > 0, name
            else:
                assert p.grad is None, name


def test_train_mode_with_dropout():
    import transformers as tf

    for family, key in (
        ("bert", "attention_probs_dropout_prob"),
        ("gpt2", "attn_pdrop"),
        ("llama", "attention_dropout"),
        ("whisper", "attention_dropout"),
    ):
        cfg = copy.deepcopy(tiny_models.build(family).config)
        setattr(cfg, key, 0.3)
        model = getattr(tf, type(tiny_models.build(family)).__name__)(cfg).train()
        apply(model, length=3)
        x = inputs(family)
        y1, y2 = (model(**x).logits for _ in range(2))
        assert y1.shape[:2] == (2, 7) and torch.isfinite(y1).all()
        assert (y1 - y2).abs().max() > 0  # dropout is active
        y1.sum().backward()


def test_bf16_model():
    model = tiny_models.build("llama").to(torch.bfloat16).eval()
    apply(model, length=3)
    with torch.no_grad():
        y = run(model, "llama")
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()


# ------------------------------------------------------------------------------------------------ reparam, bake, gate


@pytest.mark.parametrize("family", ["bert", "llama", "gpt2"])
def test_reparam_counts_and_bake_keeps_outputs(family):
    model = tiny_models.build(family).eval()
    sites = sites_of(model)
    apply(model, length=4, reparam=True, reparam_hidden=16)
    want = 0
    for s in sites:
        k, v, d = expected_widths(model, s)
        want += 4 * d + d * 16 + 16 + 16 * (k + v) + (k + v)  # ℓ·d_e + d_e·h + h + h·(k+v) + (k+v), d_e = hidden
    assert sum(p.numel() for p in surgery.inserted_parameters(model).values()) == want
    with torch.no_grad():
        before = run(model, family)
        for p in prefixes(model):
            p.bake()
        after = run(model, family)
    assert (before - after).abs().max() <= 1e-6
    baked = sum(4 * (k + v) for k, v, _ in (expected_widths(model, s) for s in sites))
    assert sum(p.numel() for p in surgery.inserted_parameters(model).values()) == baked
    assert all(not p.reparam and not hasattr(p, "mlp") for p in prefixes(model))


def test_gate_scales_prefix_keys_and_values():
    gated = tiny_models.build("llama").eval()
    apply(gated, length=3)
    randomise(gated)
    scaled = copy.deepcopy(gated)
    g = torch.tensor([0.25, 0.8]).view(2, 1, 1, 1)
    for p in prefixes(gated):
        p.gate = lambda: g
    with torch.no_grad():
        y = run(gated, "llama")
        for p in prefixes(scaled):  # row b of the batch sees g[b]·P_k, g[b]·P_v
            p.key.mul_(0.25)
            p.value.mul_(0.25)
        y0 = run(scaled, "llama")
        for p in prefixes(scaled):
            p.key.mul_(0.8 / 0.25)
            p.value.mul_(0.8 / 0.25)
        y1 = run(scaled, "llama")
    assert (y[0] - y0[0]).abs().max() <= 1e-5 and (y[1] - y1[1]).abs().max() <= 1e-5
    assert (y[0] - y1[0]).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------------ installing


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama", "whisper", "vit", "qwen2_audio"])
def test_attention_function_without_prefix_is_sdpa(family):
    base = tiny_models.build(family).eval()
    model = copy.deepcopy(base)
    for m in model.modules():
        if hasattr(getattr(m, "config", None), "_attn_implementation"):
            pm.use_prefix_attention(m.config)
    assert {m.config._attn_implementation for m in model.modules() if hasattr(m, "config")} == {pm.ATTN_IMPL}
    with torch.no_grad():
        assert (run(base, family) - run(model, family)).abs().max() <= 1e-6


def test_detach_restores_base_and_switching_away_is_refused():
    base = tiny_models.build("llama").eval()
    model = copy.deepcopy(base)
    ins = apply(model, length=3)
    randomise(model)
    for i in ins:
        surgery.detach(model, i.site, pm.CHILD)
    with torch.no_grad():
        assert (run(base, "llama") - run(model, "llama")).abs().max() <= 1e-6
    apply(model, length=3)
    model.config._attn_implementation = "sdpa"
    with pytest.raises(PeltError, match="attention implementation"):
        run(model, "llama")


def test_applying_twice_is_refused():
    model = tiny_models.build("bert")
    apply(model)
    with pytest.raises(PeltError, match="applied twice"):
        apply(model)


# ------------------------------------------------------------------------------------------------ split route


def concatenated(q, k, v, pk, pv, gate, mask, causal):
    """The reference: sdpa over ``[g·P; K]`` built by concatenation (the route taken when autograd is on)."""
    b = q.shape[0]
    g = gate.reshape(-1, 1, 1, 1) if gate is not None else 1.0
    kk = torch.cat([(pk * g).expand(b, -1, -1, -1), k], 2)
    vv = torch.cat([(pv * g).expand(b, -1, -1, -1), v], 2)
    ext = pm.extend_mask(mask, pk.shape[1], q.shape[2], k.shape[2], causal, q.device)
    out = torch.nn.functional.scaled_dot_product_attention(q, kk, vv, attn_mask=ext)
    share = pm.prefix_share(q, kk, ext, pk.shape[1], q.shape[-1] ** -0.5)
    return out.transpose(1, 2), share


def split_case(name, dtype=torch.float32):
    torch.manual_seed(4)
    b, h, t, d, ell = 3, 4, 9, 8, 5
    q, k, v = (torch.randn(b, h, t, d, dtype=dtype) for _ in range(3))
    pk, pv = torch.randn(h, ell, d, dtype=dtype), torch.randn(h, ell, d, dtype=dtype)
    gate, mask, causal = None, None, False
    if name == "padded-bool":  # the second sequence padded after 4 tokens; the third's first query sees no key
        mask = torch.ones(b, 1, t, t, dtype=torch.bool)
        mask[1, ..., 4:] = False
        mask[2, :, 0] = False
    elif name == "additive":  # transformers' float masks: −inf or the dtype's minimum; one query sees no key
        mask = torch.zeros(b, 1, t, t, dtype=dtype)
        mask[0, ..., 6:] = torch.finfo(dtype).min
        mask[1, ..., 2:] = -torch.inf
        mask[2, :, 3] = -torch.inf
    elif name == "causal":
        causal = True
    elif name == "gated":
        gate = torch.tensor([0.0, 0.3, 1.0], dtype=dtype)
        mask = torch.ones(b, 1, 1, t, dtype=torch.bool)
        mask[0, ..., 7:] = False
    return q, k, v, pk, pv, gate, mask, causal


@pytest.mark.parametrize("name", ["plain", "padded-bool", "additive", "causal", "gated"])
def test_split_attention_equals_concatenated(name):
    """The log-sum-exp merge of sequence and prefix attention equals sdpa over the concatenated keys, share too."""
    q, k, v, pk, pv, gate, mask, causal = split_case(name)
    got, share = pm.split_attention(q, k, v, pk, pv, gate, mask, causal and mask is None, None)
    ref, ref_share = concatenated(q, k, v, pk, pv, gate, mask, causal)
    assert got.shape == (3, 9, 4, 8) and got.is_contiguous()
    assert (got - ref).abs().max() <= 1e-5
    assert share.shape == (3, 4, 9) and (share - ref_share).abs().max() <= 1e-5
    if name == "padded-bool":  # a query with no key of its own attends to the prefix alone
        assert (share[2, :, 0] - 1).abs().max() <= 1e-6


def test_split_attention_bf16_within_rounding():
    q, k, v, pk, pv, gate, mask, causal = split_case("padded-bool", torch.bfloat16)
    got, _ = pm.split_attention(q, k, v, pk, pv, gate, mask, False, None)
    ref, _ = concatenated(*(x.float() for x in (q, k, v, pk, pv)), gate, mask, causal)
    assert got.dtype == torch.bfloat16 and (got.float() - ref).abs().max() <= 3e-2


@pytest.mark.parametrize("family", ["bert", "llama", "gpt2"])
def test_split_route_taken_without_autograd_and_equal_to_the_concatenated_one(family, monkeypatch):
    """No-grad forwards take the split route, forwards that need gradients the concatenated one; outputs agree."""
    model = tiny_models.build(family).eval()
    apply(model, length=4)
    randomise(model)
    calls = []
    real = pm.split_attention
    monkeypatch.setattr(pm, "split_attention", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(2)
    ids = torch.randint(0, 90, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    with torch.no_grad():
        fast = model(input_ids=ids, attention_mask=mask).logits
    n_layers = len(prefixes(model))
    assert len(calls) == n_layers > 0
    slow = model(input_ids=ids, attention_mask=mask).logits
    assert len(calls) == n_layers and slow.requires_grad
    assert (fast[0] - slow[0]).abs().max() <= 1e-5
    assert (fast[1, :5] - slow[1, :5]).abs().max() <= 1e-5


def test_split_route_declines_what_it_cannot_compute():
    pre = pm.Prefix(2, 8, 8)
    q = k = v = torch.zeros(1, 2, 3, 4)
    with torch.no_grad():
        assert pm.split_route(pre, q, k, v, {}, causal=False)
        assert pm.split_route(pre, q, k[:, :1], v[:, :1], {}, causal=True)  # GQA: the keys are repeated
        assert not pm.split_route(pre, q, k[:, :, :2], v[:, :, :2], {}, causal=True)  # causal, keys ≠ queries
        assert not pm.split_route(pre, q, k, v, {"dropout": 0.1}, causal=False)
        assert not pm.split_route(pre, q, k, v, {"position_bias": torch.zeros(1)}, causal=False)
    assert not pm.split_route(pre, q, k, v, {}, causal=False)  # the prefix needs its gradient
