"""Role inference on a 400-layer skeleton on the meta device (issue 10): budget 0.5 s.

Builds a LLaMA-style decoder (table roles) and a GPT-NeoX-style decoder (inferred roles, fused QKV) with 400
layers on ``meta``. Measured (best of 3, role cache cleared): role inference alone (role, how, layer and block of
every module's on-disk path, then a ``select`` of ``attn.q``/``attn.v``: fused slices on GPT-NeoX), judged
against the budget; and, for information, the whole :func:`pelt_cli.targets.view`, which also builds the key map
(transformers' own weight-conversion reversal, most of the time on GPT-NeoX). Prints seconds and ratios.

    python bench/bench_roles.py
"""

from __future__ import annotations

import time

BUDGET_S = 0.5
LAYERS = 400


def skeleton(kind: str):
    """A 400-layer model of ``kind`` (llama or gpt_neox) on the meta device."""
    import torch
    import transformers as tf

    common = dict(
        hidden_size=64, num_hidden_layers=LAYERS, num_attention_heads=4, intermediate_size=128, vocab_size=1000
    )
    with torch.device("meta"):
        if kind == "llama":
            return tf.LlamaForCausalLM(tf.LlamaConfig(num_key_value_heads=2, **common))
        return tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(**common))


def time_roles(model) -> tuple[float, float, int, int]:
    """Seconds for role inference + select and for the whole view + select (best of 3, role cache cleared), the
    sites seen and the sites selected."""
    from dataclasses import replace

    from pelt_cli.sites import block_of, layer_of, role_how
    from pelt_cli.targets import config_dict, select, view

    mv = view(model)
    best, whole, k = float("inf"), float("inf"), 0
    for _ in range(3):
        role_how.cache_clear()
        t = time.perf_counter()
        cfg = config_dict(model)
        fresh = []
        for s in mv.sites:
            role, how = role_how(s.disk_module, mv.family)
            fresh.append(
                replace(
                    s, role=role, how=how, layer=layer_of(s.disk_module), block=block_of(s.disk_module, mv.family, cfg)
                )
            )
        sites, _ = select(replace(mv, sites=fresh), ["attn.q", "attn.v"])
        best = min(best, time.perf_counter() - t)
        role_how.cache_clear()
        t = time.perf_counter()
        select(view(model), ["attn.q", "attn.v"])
        whole = min(whole, time.perf_counter() - t)
        k = len(sites)
    return best, whole, len(mv.sites), k


def main() -> None:
    """Print the timing of each skeleton and whether it is within the budget."""
    for kind in ("llama", "gpt_neox"):
        model = skeleton(kind)
        s, whole, n, k = time_roles(model)
        ok = "ok" if s <= BUDGET_S else "OVER BUDGET"
        print(
            f"{kind:9s} {LAYERS} layers: {n} sites, {k} selected; role inference {s:.3f} s "
            f"({s / BUDGET_S:.2f} of the {BUDGET_S} s budget) {ok}; whole view with key map {whole:.3f} s "
            f"({whole / BUDGET_S:.2f})"
        )


if __name__ == "__main__":
    main()
