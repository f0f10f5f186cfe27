"""Key table for the Qwen2 / Qwen3 / BAGEL-MoT language model, and its import/export helpers.

On disk (transformers and BAGEL naming, without BAGEL's `language_model.` prefix, which callers
add with `key_table.prefixed`):
  model.embed_tokens.weight, model.norm.weight, model.norm_moe_gen.weight, lm_head.weight,
  model.layers.{i}.self_attn.{q,k,v,o}_proj[_moe_gen].{weight,bias},
  model.layers.{i}.self_attn.{q,k}_norm[_moe_gen].weight,
  model.layers.{i}.mlp[_moe_gen].{gate,up,down}_proj.weight,
  model.layers.{i}.{input,post_attention}_layernorm[_moe_gen].weight.
"""

from __future__ import annotations

import numpy as np

from robust_u1_jax.checkpoints import key_table as kt
from robust_u1_jax.checkpoints import loader

# Rotary tables are recomputed from the config; some exporters still save them as buffers.
IGNORE = (r"(.*\.)?rotary_emb\.inv_freq", r"(.*\.)?self_attn\.rotary_emb\..*")


def _expert_rules(suffix: str, expert: str, qk_norm: bool) -> list[kt.Rule]:
  t, f = "model.layers.{i}.", "layers.{i}." + expert + "."
  rules = [
      kt.Rule(t + f"input_layernorm{suffix}.weight", f + "input_norm.scale"),
      kt.Rule(t + f"post_attention_layernorm{suffix}.weight", f + "post_norm.scale"),
  ]
  for proj in ("q", "k", "v", "o"):
    rules.append(kt.Rule(t + f"self_attn.{proj}_proj{suffix}.weight", f + f"{proj}_proj.kernel",
                         kt.LINEAR))
    if proj != "o":
      rules.append(kt.Rule(t + f"self_attn.{proj}_proj{suffix}.bias", f + f"{proj}_proj.bias"))
  if qk_norm:
    rules += [kt.Rule(t + f"self_attn.q_norm{suffix}.weight", f + "q_norm.scale"),
              kt.Rule(t + f"self_attn.k_norm{suffix}.weight", f + "k_norm.scale")]
  for proj in ("gate", "up", "down"):
    rules.append(kt.Rule(t + f"mlp{suffix}.{proj}_proj.weight", f + f"mlp.{proj}_proj.kernel",
                         kt.LINEAR))
  return rules


def llm_rules(mot: bool, qk_norm: bool) -> list[kt.Rule]:
  """Rules for the Qwen2/BAGEL naming; BAGEL directories prefix them with 'language_model.'."""
  rules = [
      kt.Rule("model.embed_tokens.weight", "embed_tokens.embedding"),
      kt.Rule("model.norm.weight", "final_norm.und.scale"),
      kt.Rule("lm_head.weight", "lm_head.kernel", kt.LINEAR),
  ] + _expert_rules("", "und", qk_norm)
  if mot:
    rules += [kt.Rule("model.norm_moe_gen.weight", "final_norm.gen.scale")]
    rules += _expert_rules("_moe_gen", "gen", qk_norm)
  return rules


def _rules(model, torch_prefix: str) -> list[kt.Rule]:
  c = model.config
  return kt.prefixed(llm_rules(c.mot, c.qk_norm), torch_prefix)


def load_llm(source: loader.Source, model, *, torch_prefix: str = "") -> None:
  """Loads checkpoint tensors into `model` (a `Qwen2MoT`) in place, streamed one tensor at a
  time onto each parameter's current sharding and dtype.

  Args:
    source: a .safetensors / .index.json path, an opened TensorFiles, or a {key: array} dict.
    model: the target; its config decides which keys are required.
    torch_prefix: e.g. 'language_model.' for a BAGEL checkpoint; only keys under it are read, so
      one file holding several components can be passed as is. Without a prefix every key must
      belong to the LLM.
  Raises:
    CheckpointError naming the key and file on a missing, unexpected or misshapen tensor.
  """
  loader.load_into(model, source, _rules(model, torch_prefix), prefix=torch_prefix,
                   ignore=IGNORE)


def export_llm(model, *, torch_prefix: str = "") -> dict[str, np.ndarray]:
  """The model's parameters as {checkpoint key: numpy array} in PyTorch layout."""
  return loader.export_from(model, _rules(model, torch_prefix))
