"""An analytic FLOP count of the recovery (`bench recover`, parts b and e): two FLOPs per
multiply-add; norms, RoPE, softmax and the elementwise work are left out (a few percent at 7B
shapes)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import numpy as np

from robust_u1_jax.models import bagel as bagel_lib

if TYPE_CHECKING:
  from robust_u1_jax.inference import recovery as recovery_lib


def context_tokens(rows: bagel_lib.SequenceInputs) -> int:
  return int(np.sum(np.asarray(rows.token_kind) != bagel_lib.PAD, axis=1).max())



def token_flops(llm) -> float:
  """Matmul FLOPs of one token through one expert of every decoder layer."""
  d, ff = llm.hidden_size, llm.intermediate_size
  q, kv = llm.num_heads * llm.head_dim, llm.num_kv_heads * llm.head_dim
  return 2.0 * llm.num_layers * (d * q + 2 * d * kv + q * d + 3 * d * ff)


def pair_flops(llm) -> float:
  """Attention FLOPs of one (query, key) pair over every layer: q.k and p.v, all heads."""
  return 4.0 * llm.num_layers * llm.num_heads * llm.head_dim


def step_flops(llm, block: int, keys: int) -> float:
  """One denoising call of `block` tokens, each through its own expert, against `keys` keys
  (cache slots + the block)."""
  return block * (token_flops(llm) + keys * pair_flops(llm))


def attention_share(llm, block: int, keys: int) -> float:
  """The attention's share of `step_flops`: what grows with the context."""
  return block * keys * pair_flops(llm) / step_flops(llm, block, keys)


def _visible_pairs(rows: bagel_lib.SequenceInputs) -> int:
  """(query, key) pairs the packed mask allows over the rows (numpy: no device work)."""
  from robust_u1_jax.models import attention_mask

  layout = jax.tree.map(np.asarray, rows.layout)
  with jax.default_device(jax.devices("cpu")[0]):
    return int(np.asarray(attention_mask.packed_mask(layout)).sum())


def recovery_flops(config: bagel_lib.BagelConfig, inputs: recovery_lib.RecoveryInputs,
                   moves: int, branches: int = 3) -> dict[str, float]:
  """Analytic FLOPs of one image's recovery, without the VAE.

  floor: each token through its own expert once, each query against the keys the mask lets it
    see, the ViT once; what any implementation of these shapes must compute.
  library: what this implementation computes: each token through its own expert too (the rows'
    expert buffers are bounded, `bagel.bound_experts`: the code before ran the understanding
    expert over every token of the noisy block as well), every query against all cache slots of
    the stacked branches (the short text-only context padded to the longest), the ViT once per
    context that holds the image.
  """
  llm, vit = config.llm, config.vit
  contexts = [inputs.full, inputs.no_text, inputs.no_image][:branches]
  tokens = [context_tokens(r) for r in contexts]
  block = int(inputs.noisy.token_kind.shape[1])
  n_latent = int(inputs.noisy.latent_seq_index.shape[1])
  n_vit = int(inputs.full.vit_patches.shape[1])
  # Denoising: `moves` calls, each answering every branch.
  d_linear = moves * branches * block * token_flops(llm)
  d_attention = moves * sum(block * (k + block) for k in tokens) * pair_flops(llm)
  d_attention_lib = moves * branches * block * (max(tokens) + block) * pair_flops(llm)
  heads = moves * branches * n_latent * 2 * 2 * config.latent_channels * llm.hidden_size
  # Prefill of each context (its rows padded to their longest: one image, no padding here).
  p_linear = sum(tokens) * token_flops(llm)
  p_attention = sum(_visible_pairs(r) for r in contexts) * pair_flops(llm)
  p_attention_lib = sum(int(r.token_kind.shape[1]) ** 2 for r in contexts) * pair_flops(llm)
  # The ViT: its layers, its attention over the one image's patches, the patch embedding and the
  # connector to the LLM width.
  h = vit.hidden_size
  vit_flops = n_vit * (2 * vit.num_layers * (4 * h * h + 2 * h * vit.mlp_dim)
                       + 2 * vit.patch_dim * h + 2 * (h * llm.hidden_size + llm.hidden_size ** 2))
  vit_flops += 4 * vit.num_layers * h * n_vit ** 2
  vit_runs = sum(int(r.vit_patches.shape[1]) > 0 for r in contexts)
  parts = {"denoise_linear": d_linear, "denoise_attention": d_attention, "heads": heads,
           "prefill_linear": p_linear, "prefill_attention": p_attention, "vit": vit_flops}
  floor = sum(parts.values())
  library = (d_linear + p_linear + d_attention_lib + heads + p_attention_lib
             + vit_runs * vit_flops)
  return {**parts, "floor": floor, "library": library,
          "step_floor": (d_linear + d_attention + heads) / moves,
          "step_library": (d_linear + d_attention_lib + heads) / moves,
          "tokens": tuple(tokens), "block": block, "n_vit": n_vit, "n_latent": n_latent}

