"""Model FLOPs (robust_u1_jax/flops.py): the attended pairs are the mask's, the per-part counts are
XLA's for the same shapes, and the backward follows the trainable set."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from robust_u1_jax import flops
from robust_u1_jax.models import attention_mask, bagel, qwen2_mot, vae as vae_lib
from robust_u1_jax.training import reasoning, sft

BLOCKS = [("latent", 6), ("vit", 5), ("text", 4), ("noisy", 6), ("text", 3)]


def _mask_pairs(samples):
  fields = {k: [] for k in ("sample_id", "block_id", "causal", "noisy")}
  first = 0
  for s, blocks in enumerate(samples):
    kinds = [("image" if k in ("vit", "latent") else k, n) for k, n in blocks]
    one = attention_mask.layout_from_blocks(kinds, sample_id=s, first_block_id=first)
    first += len(blocks)
    for k, v in one.items():
      fields[k].append(v)
  layout = attention_mask.Layout(**{k: jnp.concatenate(v)[None] for k, v in fields.items()})
  return int(attention_mask.packed_mask(layout).sum())


def test_block_pairs_are_the_masks_attended_pairs():
  samples = [BLOCKS, [("vit", 7), ("text", 5), ("noisy", 4)]]
  assert sum(flops.block_pairs(b) for b in samples) == _mask_pairs(samples)
  with pytest.raises(ValueError, match="block kind"):
    flops.block_pairs([("image", 3)])


def test_rows_work_reads_tokens_pairs_and_images_from_host_rows():
  fields = {k: [] for k in ("sample_id", "block_id", "causal", "noisy")}
  kinds, segments, first = [], [], 0
  for s, blocks in enumerate([BLOCKS, [("vit", 7), ("text", 5)]]):
    one = attention_mask.layout_from_blocks(
        [("image" if k in ("vit", "latent") else k, n) for k, n in blocks], sample_id=s,
        first_block_id=first)
    first += len(blocks)
    for k, v in one.items():
      fields[k].append(v)
    for k, n in blocks:
      kinds += [bagel.LATENT if k in ("latent", "noisy") else bagel.VIT if k == "vit"
                else bagel.TEXT] * n
  pad = 3
  for k, fill in (("sample_id", -1), ("block_id", first), ("causal", False), ("noisy", False)):
    fields[k].append(np.full(pad, fill, fields[k][0].dtype))
  layout = attention_mask.Layout(**{k: np.concatenate(v)[None] for k, v in fields.items()})
  segments = np.array([[1] * 5 + [2] * 7 + [0] * 4])
  inputs = bagel.SequenceInputs(
      text_ids=None, token_kind=np.array([kinds + [bagel.PAD] * pad]), source_index=None,
      positions=None, layout=layout, vit_patches=None, vit_position_ids=None,
      vit_segment_ids=segments, latent_position_ids=None, latent_seq_index=None,
      latent_image_index=None)
  w = flops.rows_work(inputs, pixels_per_token=256)
  assert (w.und_tokens, w.gen_tokens, w.velocity_tokens) == (5 + 4 + 3 + 7 + 5, 12, 6)
  assert w.pairs == _mask_pairs([BLOCKS, [("vit", 7), ("text", 5)]])
  assert w.vit_images == (5, 7) and w.encode_images == (6 * 256, 6 * 256)


def _xla_flops(fn, *args):
  return jax.jit(fn).lower(*args).cost_analysis()["flops"]


def test_expert_and_attention_counts_match_xla():
  """One expert over T tokens with a full mask: the matmuls and attention are XLA's count up to
  the elementwise work left out (norms, RoPE, softmax: a few percent at this width). XLA's cost
  analysis counts the body of the layers' scan (a while loop) once, whatever the layer count."""
  c = qwen2_mot.LLMConfig(vocab_size=64, hidden_size=256, intermediate_size=1024, num_layers=2,
                          num_heads=4, num_kv_heads=2, head_dim=64)
  model = nnx.eval_shape(lambda: qwen2_mot.Qwen2MoT(c, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(model)
  t = 128
  x = jax.ShapeDtypeStruct((1, t, c.hidden_size), jnp.float32)
  pos = jax.ShapeDtypeStruct((1, t), jnp.int32)
  mask = jax.ShapeDtypeStruct((1, t, t), jnp.bool_)
  counted = _xla_flops(lambda s, x, p, m: nnx.merge(graphdef, s)(x, p, m, "gen"),
                       state, x, pos, mask)
  mc = bagel.BagelConfig.tiny()
  mc = dataclasses.replace(mc, llm=c)
  ours = flops.step_flops(mc, [flops.Work(0, t, t * t, backward=False)], ())
  assert ours["backward"] == 0
  per_layer = (ours["llm"] + ours["attention"]) / c.num_layers
  assert 0.93 < per_layer / counted <= 1.0


def test_vae_counts_match_xla():
  config = vae_lib.VAEConfig.tiny()
  model = nnx.eval_shape(lambda: vae_lib.AutoEncoder(config, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(model)
  image = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  latent = jax.ShapeDtypeStruct((1, 8, 8, config.z_channels), jnp.float32)
  encode = _xla_flops(lambda s, x: nnx.merge(graphdef, s).encoder(x), state, image)
  decode = _xla_flops(lambda s, z: nnx.merge(graphdef, s).decoder(z), state, latent)
  # Group norms and SiLUs are a larger share at these tiny widths than in FLUX's VAE.
  assert 0.7 < flops.vae_flops(config, 64 * 64, True) / encode <= 1.0
  assert 0.7 < flops.vae_flops(config, 64 * 64, False) / decode <= 1.0


def test_backward_follows_the_trainable_set():
  mc = bagel.BagelConfig.bagel_7b()
  work = [flops.sample_work(BLOCKS, 256, logit_tokens=3)]
  expert = flops.expert_flops_per_token(mc.llm)
  und, gen = 5 + 4 + 3, 12
  frozen = flops.step_flops(mc, work, ())
  assert frozen["backward"] == 0 and frozen["trainable_parts"] == ()
  stage1 = flops.step_flops(mc, work, sft.GENERATION_PARAMS)
  assert set(stage1["trainable_parts"]) == {"gen", "latent_in", "time", "velocity_head"}
  # Understanding tokens: forward + activation gradient; generation tokens: + weight gradient.
  assert stage1["llm"] == pytest.approx(expert * (2 * und + 3 * gen))
  assert stage1["attention"] == pytest.approx(3 * frozen["attention"])
  assert stage1["vit"] == frozen["vit"] and stage1["vae"] == frozen["vae"] > 0
  stage3 = flops.step_flops(mc, work, reasoning.UNDERSTANDING_PARAMS)
  assert stage3["llm"] == pytest.approx(expert * (3 * und + 2 * gen))
  # The connector trains (weight gradient), the ViT below it does not.
  assert frozen["vit"] < stage3["vit"] < 1.1 * frozen["vit"]
  assert stage3["total"] == pytest.approx(stage3["forward"] + stage3["backward"])
  assert flops.describe(stage3).startswith(f"{stage3['total']:.3g} FLOP")
