"""Prefix tuning (Li & Liang 2021): learned keys ``P_k`` and values ``P_v`` of length ℓ prepended in attention.

``attn(Q, [P_k; K], [P_v; V])``: every query also attends to the ℓ prefix positions; the output keeps its length.

Route. In transformers 5 each attention module of the supported families computes ``query``, ``key`` and ``value``
(``[B, heads, T, head_dim]``, RoPE applied, GQA keys with ``num_key_value_heads`` heads) and hands them to the
function registered under ``config._attn_implementation``. pelt registers :func:`prefix_attention` under
:data:`ATTN_IMPL` (``"pelt"``) in ``transformers.AttentionInterface``, with ``sdpa_mask`` under the same name in
``AttentionMaskInterface`` (so masks keep the sdpa format), and switches the configs of the attention modules that
receive a prefix to it. The function reads the module's ``pelt_prefix`` child: absent, it calls transformers' sdpa
function unchanged; present, it prepends the prefix to key and value, widens the mask and calls sdpa with
``is_causal=False``. No base module is replaced, and the base state dict is untouched (the implementation name is
not serialised by ``save_pretrained``). A forward pre-hook on each prefixed module refuses to run if the
implementation was switched away (the prefix would otherwise be silently ignored).

Hosting: the recipe selects key projections (``attn.k``, or GPT-2's fused ``attn.qkv``); the prefix is attached to
the projection's parent attention module (``…attention.self``, ``…self_attn``, Whisper's ``encoder_attn`` — there
the prefix is prepended to the cross-attention keys/values —, GPT-2's ``…attn``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pelt_cli import surgery
from pelt_cli.errors import PeltError
from pelt_cli.methods import Insertion, ModelSite, register

ATTN_IMPL = "pelt"
CHILD = "pelt_prefix"
ROLES = ("attn.k", "attn.qkv")
V_SIBLING = {"k_proj": "v_proj", "key": "value"}  # the key projection's name → its value sibling's name
# sdpa's CPU kernel, which also returns the log-sum-exp of each query's scores (None if this torch lacks it)
FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def prepend_prefix(prefix: torch.Tensor, states: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
    """``[g·P; S]``: a prefix ``[ℓ, heads·head_dim]`` put in front of ``states [B, heads, T, head_dim]`` (dim 2)."""
    b, heads, _, head_dim = states.shape
    p = prefix_heads(prefix, heads, head_dim, 1, states.dtype).unsqueeze(0).expand(b, -1, -1, -1)
    if gate is not None:
        p = p * gate.to(states.dtype)
    return torch.cat([p, states], dim=2)


def extend_mask(
    mask: torch.Tensor | None, length: int, q_len: int, kv_len: int, causal: bool, device: torch.device
) -> torch.Tensor | None:
    """The attention mask over ``[prefix; keys]``: every query may attend to all ℓ prefix positions.

    A bool mask (True = attend) is padded with True, an additive float mask with 0. Without a mask, a causal module
    gets an explicit bool mask (sdpa's ``is_causal`` would misalign once keys are longer than queries): query ``i``
    sees the prefix and keys ``j ≤ i`` (top-left aligned, as sdpa's ``is_causal``); a non-causal one needs none.
    """
    if mask is None:
        if not causal:
            return None
        tri = torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril()
        head = torch.ones(q_len, length, dtype=torch.bool, device=device)
        return torch.cat([head, tri], dim=-1)[None, None]
    pad_value = True if mask.dtype == torch.bool else 0.0
    pad = torch.full((*mask.shape[:-1], length), pad_value, dtype=mask.dtype, device=mask.device)
    return torch.cat([pad, mask], dim=-1)


class Prefix(nn.Module):
    """The learned prefix of one attention module: ``P_k [ℓ, k_width]`` and ``P_v [ℓ, v_width]``.

    Plain: ``P_k``, ``P_v`` are parameters (``key``, ``value``). Reparameterised (Li & Liang): an embedding
    ``E [ℓ, d_e]`` through ``Linear(d_e, hidden) → tanh → Linear(hidden, k_width + v_width)`` gives ``[P_k | P_v]``;
    :meth:`bake` replaces the embedding and MLP by the computed ``key`` and ``value`` for inference.

    Attributes:
        gate: None, or a callable (no arguments) returning a tensor broadcastable to ``[B, 1, 1, 1]`` that multiplies
            the prefix keys and values (UniPELT's gate ``G_P``). Default None.

    Args:
        length: ℓ, the number of prefix positions.
        k_width: width of the keys (``num_key_value_heads · head_dim``).
        v_width: width of the values.
        init_std: std of the normal init of ``P_k``/``P_v`` (or of ``E`` when reparameterised).
        reparam: whether to produce the prefix through the embedding and MLP.
        embed_dim: ``d_e``, the embedding width (pelt uses the hidden size of the model hosting the attention).
        hidden: width of the MLP's hidden layer.
    """

    def __init__(
        self,
        length: int,
        k_width: int,
        v_width: int,
        init_std: float = 0.02,
        reparam: bool = False,
        embed_dim: int = 0,
        hidden: int = 512,
    ) -> None:
        super().__init__()
        self.length, self.k_width, self.v_width, self.reparam = length, k_width, v_width, reparam
        self.gate: Any = None
        self.measuring = False  # set while evaluating: prefix_attention then records the attention on the prefix
        self._mass: torch.Tensor | None = None
        self._count = 0
        if reparam:
            self.embedding = nn.Parameter(torch.empty(length, embed_dim))
            self.mlp = nn.Sequential(nn.Linear(embed_dim, hidden), nn.Tanh(), nn.Linear(hidden, k_width + v_width))
            if self.embedding.device.type != "meta":
                nn.init.normal_(self.embedding, std=init_std)
        else:
            self.key = nn.Parameter(torch.empty(length, k_width))
            self.value = nn.Parameter(torch.empty(length, v_width))
            if self.key.device.type != "meta":
                nn.init.normal_(self.key, std=init_std)
                nn.init.normal_(self.value, std=init_std)

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(P_k [ℓ, k_width], P_v [ℓ, v_width])``."""
        if self.reparam:
            kv = self.mlp(self.embedding)  # [P_k | P_v] = MLP(E)
            return kv[:, : self.k_width], kv[:, self.k_width :]
        return self.key, self.value

    def extend(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Key and value states ``[B, kv_heads, T, head_dim]`` with the (gated) prefix prepended: ``T → ℓ + T``."""
        pk, pv = self()
        g = self.gate() if self.gate is not None else None
        return prepend_prefix(pk, key, g), prepend_prefix(pv, value, g)

    def start_measuring(self) -> None:
        """Record the share of attention the queries put on the prefix from now on (evaluation only: it costs an
        extra attention-score computation per forward)."""
        self.measuring, self._mass, self._count = True, None, 0

    def stop_measuring(self) -> float | None:
        """Stop recording; the mean share of attention on the prefix over the queries, heads and sequences seen
        (None: no forward since :meth:`start_measuring`)."""
        self.measuring = False
        return None if self._mass is None or not self._count else float(self._mass) / self._count

    @torch.no_grad()
    def record(self, share: torch.Tensor) -> None:
        """Add the per-query shares ``[B, heads, q]`` of one forward."""
        total = share.double().sum()
        self._mass = total if self._mass is None else self._mass + total
        self._count += share.numel()

    @torch.no_grad()
    def bake(self) -> Prefix:
        """Replace the embedding and MLP by the prefix they produce (plain ``key``/``value``); outputs are unchanged.

        The trainable parameters become ``key`` and ``value`` (``ℓ·(k_width + v_width)``). No-op when not
        reparameterised. Returns the module.
        """
        if not self.reparam:
            return self
        pk, pv = self()
        del self.embedding, self.mlp
        self.key = nn.Parameter(pk.detach().clone().contiguous())
        self.value = nn.Parameter(pv.detach().clone().contiguous())
        self.reparam = False
        return self


@torch.no_grad()
def prefix_share(
    query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, length: int, scaling: float, bias: Any = None
) -> torch.Tensor:
    """The attention mass each query puts on the first ``length`` key positions (the prefix), ``[B, heads, q]``.

    ``softmax(Q Kᵀ · scaling + mask [+ bias])`` summed over the prefix columns (GQA keys repeated to the query
    heads); a query whose keys are all masked counts 0.
    """
    rep = query.shape[1] // key.shape[1]
    k = key.float().repeat_interleave(rep, dim=1) if rep > 1 else key.float()
    scores = query.float() @ k.transpose(-1, -2) * scaling
    if bias is not None:
        scores = scores + bias.float()
    if mask is not None:
        scores = scores.masked_fill(~mask, -torch.inf) if mask.dtype == torch.bool else scores + mask.float()
    return scores.softmax(-1).nan_to_num(0.0)[..., :length].sum(-1)


def split_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    pk: torch.Tensor,
    pv: torch.Tensor,
    gate: torch.Tensor | None,
    mask: torch.Tensor | None,
    is_causal: bool,
    scaling: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``attn(Q, [g·P_k; K], [g·P_v; V])`` without building ``[P; K]``: the sequence and the prefix attended apart.

    ``attn(Q,[P_k;K],[P_v;V]) = w_K·attn(Q,K,V) + Σ_j w_j·P_v[j]``, ``[w_1..w_ℓ, w_K] = softmax(Q P_kᵀ·scale,
    lse_K)``: the sequence part is sdpa's own CPU kernel (the base's exact call, which also returns each query's
    log-sum-exp ``lse_K``), the prefix part ``[T, ℓ]`` scores per head. No copy of the keys and values, and the
    sequence attention keeps the base's length. ``query [B, H, T, D]``, ``key``/``value`` with ``H`` heads,
    ``pk``/``pv [H, ℓ, D]``, ``gate`` broadcastable to ``[B, 1, 1, 1]`` or None, ``mask`` bool (True = attend) or
    additive over the sequence keys. Returns the output ``[B, T, H, D]`` (contiguous, as transformers' attention
    functions return it) and each query's share of attention on the prefix, ``1 − w_K`` ``[B, H, T]``. No autograd:
    ``lse_K`` has no gradient in torch, so :func:`prefix_attention` takes this route only when nothing needs one.
    """
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    dead = None
    if mask is not None:
        dead = ~mask.any(-1) if mask.dtype == torch.bool else torch.isneginf(mask).all(-1)
        if mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=query.dtype, device=mask.device).masked_fill_(~mask, -torch.inf)
        else:
            mask = mask.to(query.dtype)
    out_k, lse_k = FLASH_CPU(query, key, value, 0.0, is_causal, attn_mask=mask, scale=scale)
    if dead is not None and bool(dead.any()):
        lse_k = lse_k.masked_fill(dead, -torch.inf)  # the kernel gives 0, not −inf, for a query with no key
    # per head, every query of the batch at once: [H, B·T, D] is a view of transformers' [B, T, H, D] layout, and
    # the prefix scores [H, ℓ, B·T] keep B·T contiguous for every reduction over ℓ
    b, h, t, _ = query.shape
    q = query.permute(1, 0, 2, 3).reshape(h, b * t, query.shape[-1])
    s = torch.bmm(pk.to(query.dtype) * scale, q.transpose(1, 2)).float()
    g = None
    if gate is not None:  # one gate per sequence, repeated over its T queries
        g = torch.broadcast_to(gate.float().reshape(-1), (b,)).repeat_interleave(t)
        s = s * g  # (g·P_k) Qᵀ
    lse = lse_k.float().permute(1, 0, 2).reshape(h, 1, b * t)
    top = torch.maximum(s.amax(1, keepdim=True), lse)
    e, e_k = torch.exp(s - top), torch.exp(lse - top)
    z = e.sum(1, keepdim=True) + e_k
    e.div_(z)  # the prefix positions' weights [H, ℓ, B·T]
    w_k = e_k.div_(z)  # the sequence's weight [H, 1, B·T]
    if g is not None:
        e.mul_(g)  # the gated values g·P_v
    out_p = torch.bmm(e.transpose(1, 2).to(pv.dtype), pv)  # [H, B·T, D]
    d = out_p.shape[-1]
    out = torch.empty(b, t, h, d, dtype=out_k.dtype, device=out_k.device)
    w = w_k.to(out_k.dtype).view(h, b, t, 1).permute(1, 2, 0, 3)  # [B, T, H, 1]
    torch.addcmul(out_p.view(h, b, t, d).permute(1, 2, 0, 3), out_k.transpose(1, 2), w, out=out)
    return out, 1.0 - w_k.view(h, b, t).transpose(0, 1)


def prefix_heads(prefix: torch.Tensor, heads: int, head_dim: int, groups: int, dtype: torch.dtype) -> torch.Tensor:
    """``[ℓ, kv_heads·head_dim]`` → ``[heads, ℓ, head_dim]``, each key/value head repeated for its ``groups`` query
    heads (GQA)."""
    kv_heads = heads // groups
    if prefix.shape[-1] != kv_heads * head_dim:
        raise PeltError(
            f"prefix width {prefix.shape[-1]} does not match the attention's {kv_heads} key/value heads "
            f"× head_dim {head_dim} = {kv_heads * head_dim}"
        )
    p = prefix.to(dtype).view(prefix.shape[0], kv_heads, head_dim).transpose(0, 1)
    return p.repeat_interleave(groups, dim=0) if groups > 1 else p


def split_route(
    prefix: Prefix, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kwargs: dict, causal: bool
) -> bool:
    """Whether :func:`split_attention` computes this call exactly: on the CPU kernel, without dropout, a position
    bias, a paged cache or a gradient to carry, and without a causal call whose keys outnumber its queries."""
    if FLASH_CPU is None or query.device.type != "cpu" or kwargs.get("dropout") or kwargs.get("softcap") is not None:
        return False
    if kwargs.get("position_bias") is not None or query.shape[1] % key.shape[1]:
        return False
    if causal and query.shape[2] != key.shape[2]:
        return False
    if torch.is_grad_enabled() and (
        query.requires_grad
        or key.requires_grad
        or value.requires_grad
        or any(p.requires_grad for p in prefix.parameters())
    ):
        return False
    return query.dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def split_call(
    prefix: Prefix, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: Any, **kw: Any
) -> tuple[torch.Tensor, None]:
    """:func:`prefix_attention` by :func:`split_attention` (``kw``: ``causal``, ``scaling``)."""
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    pk, pv = prefix()
    heads, head_dim = query.shape[1], query.shape[-1]
    pk = prefix_heads(pk, heads, head_dim, groups, query.dtype)
    pv = prefix_heads(pv, heads, value.shape[-1], groups, value.dtype)
    gate = prefix.gate() if prefix.gate is not None else None
    causal = kw["causal"] and query.shape[2] > 1 and mask is None
    out, share = split_attention(query, key, value, pk, pv, gate, mask, causal, kw.get("scaling"))
    if prefix.measuring:
        prefix.record(share)
    return out, None


def prefix_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, Any]:
    """transformers attention function ``pelt``: sdpa, with ``module.pelt_prefix`` (if any) prepended to K and V."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    prefix = module._modules.get(CHILD)
    if prefix is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if kwargs.get("cache") is not None:
        raise PeltError("prefix tuning does not support transformers' paged attention cache")
    is_causal = kwargs.pop("is_causal", None)
    causal = bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)
    if split_route(prefix, query, key, value, kwargs, causal):
        return split_call(prefix, query, key, value, attention_mask, causal=causal, scaling=kwargs.get("scaling"))
    q_len, kv_len = query.shape[2], key.shape[2]
    key, value = prefix.extend(key, value)
    attention_mask = extend_mask(attention_mask, prefix.length, q_len, kv_len, causal and q_len > 1, query.device)
    bias = kwargs.pop("position_bias", None)
    if bias is not None:
        kwargs["position_bias"] = torch.cat([bias.new_zeros(*bias.shape[:-1], prefix.length), bias], dim=-1)
    if prefix.measuring:
        scaling = kwargs.get("scaling") or query.shape[-1] ** -0.5  # sdpa's default when None
        share = prefix_share(query, key, attention_mask, prefix.length, scaling, kwargs.get("position_bias"))
        prefix.record(share)
    return sdpa_attention_forward(module, query, key, value, attention_mask, is_causal=False, **kwargs)


def register_attention() -> None:
    """Register :func:`prefix_attention` and sdpa's mask builder under :data:`ATTN_IMPL` (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_IMPL, prefix_attention)
    AttentionMaskInterface.register(ATTN_IMPL, sdpa_mask)


def use_prefix_attention(config: Any) -> None:
    """Switch a (sub-)config's attention implementation to ``pelt`` (registering it first)."""
    register_attention()
    if getattr(config, "_attn_implementation", None) != ATTN_IMPL:
        config._attn_implementation = ATTN_IMPL


def _guard(module: nn.Module, args: tuple) -> None:
    impl = getattr(getattr(module, "config", None), "_attn_implementation", None)
    if impl != ATTN_IMPL:
        raise PeltError(
            f"{type(module).__name__} has a prefix but its attention implementation is {impl!r}; "
            f"prefix tuning needs {ATTN_IMPL!r} (do not call set_attn_implementation after inserting)"
        )


def parent_path(site: str) -> str:
    """The attention module that owns a key projection: ``…self_attn.k_proj`` → ``…self_attn``."""
    return site.rsplit(".", 1)[0] if "." in site else ""


def kv_widths(model: nn.Module, site: ModelSite) -> tuple[int, int, int]:
    """``(d_e, k_width, v_width)`` for a key-projection site: input width, key width and value width."""
    mod = surgery.get_module(model, site.module)
    in_f, out_f, _ = surgery.features(mod)
    if site.role == "attn.qkv":
        parts = 2 if getattr(surgery.get_module(model, parent_path(site.module)), "is_cross_attention", False) else 3
        return in_f, out_f // parts, out_f // parts
    parent = surgery.get_module(model, parent_path(site.module))
    sibling = getattr(parent, V_SIBLING.get(site.module.rsplit(".", 1)[-1], ""), None)
    v_width = surgery.features(sibling)[1] if sibling is not None and surgery.is_linear(sibling) else out_f
    return in_f, out_f, v_width


@dataclass(frozen=True)
class PrefixParams:
    """Hyper-parameters of ``prefix``."""

    length: int = field(default=10, metadata={"min": 1, "help": "ℓ, prefix positions prepended to keys/values"})
    reparam: bool = field(default=False, metadata={"help": "produce the prefix by an MLP over an embedding"})
    reparam_hidden: int = field(default=512, metadata={"min": 1, "help": "hidden width of the reparam MLP"})
    init_std: float = field(default=0.02, metadata={"min": 0.0, "help": "std of the normal init of the prefix"})


@register
class PrefixMethod:
    """``prefix``: learned key/value prefixes in each selected attention module (selected by its key projection)."""

    name = "prefix"
    Params = PrefixParams
    default_targets = ("attn.k",)

    def check(self, model: nn.Module, params: PrefixParams, sites: list[ModelSite]) -> list[str]:
        """Sites must be key projections (attn.k, or fused attn.qkv) of modules on transformers' attention API."""
        problems = []
        for s in sites:
            if s.role not in ROLES:
                problems.append(
                    f"{s.disk_module} has role {s.role}; prefix selects attention key projections "
                    f"(role {' or '.join(ROLES)}) and acts on their attention module"
                )
                continue
            mod = surgery.get_module(model, s.module)
            if not surgery.is_linear(mod):
                problems.append(
                    f"{s.disk_module} is a {type(mod).__name__}; prefix expects a Linear or Conv1D key projection"
                )
                continue
            parent = surgery.get_module(model, parent_path(s.module))
            if not hasattr(getattr(parent, "config", None), "_attn_implementation"):
                problems.append(
                    f"{type(parent).__name__} above {s.disk_module} has no transformers config with an "
                    "attention implementation; prefix needs an attention module that calls "
                    "transformers' attention interface"
                )
                continue
            _, out_f, _ = surgery.features(mod)
            if s.role == "attn.qkv" and out_f % 3 and out_f % 2:
                problems.append(f"{s.disk_module} is a fused projection of width {out_f}; expected 2·d or 3·d")
        return problems

    def insert(self, model: nn.Module, params: PrefixParams, sites: list[ModelSite]) -> list[Insertion]:
        """Attach ``pelt_prefix`` to each selected key projection's attention module and switch it to ``pelt``."""
        out, seen = [], set()
        for s in sites:
            path = parent_path(s.module)
            if path in seen:
                continue
            seen.add(path)
            parent = surgery.get_module(model, path)
            weight = surgery.get_module(model, s.module).weight
            d_e, k_width, v_width = kv_widths(model, s)
            with torch.device(weight.device):
                prefix = Prefix(
                    params.length, k_width, v_width, params.init_std, params.reparam, d_e, params.reparam_hidden
                )
            child = surgery.attach(model, path, CHILD, prefix)
            use_prefix_attention(parent.config)
            surgery.hook_input(model, path, _guard)
            note = f"ℓ={params.length} on keys/values of {path} (k {k_width}, v {v_width})"
            out.append(Insertion(path, s.role, self.name, [child], note))
        return out
