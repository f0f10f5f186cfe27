"""Key tables for the CLIP reward model, in open_clip/OpenAI and transformers `CLIPModel` naming.

open_clip fuses q/k/v into `attn.in_proj_weight` (3 * width, width) and `attn.in_proj_bias`.
Rules map one tensor to one parameter, so the fused tensors are presented to the key table as three
virtual keys `attn.in_proj_weight[q]`, `[k]`, `[v]` (row blocks of the fused tensor) on import, and
fused back on export. open_clip stores `visual.proj` and `text_projection` as (width, embed)
matrices applied as `x @ proj`, which is our kernel layout already; transformers stores them as
Linear weights.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np

from robust_u1_jax.checkpoints import key_table as kt
from robust_u1_jax.checkpoints import loader
from robust_u1_jax.checkpoints.tensor_files import TensorFiles
from robust_u1_jax.checkpoints.vit_keys import hf_encoder_rules, layer_norm_rules, linear_rules
from robust_u1_jax.models.clip import CLIP

NAMINGS = ("open_clip", "hf")
# The file the demo's CLIP part writes (open_clip naming), in its workdir's model/.
CLIP_FILE = "clip.safetensors"
_FUSED = re.compile(r"(.*\.attn\.in_proj_(?:weight|bias))")
_PARTS = ("q", "k", "v")
# Buffers and extras some checkpoints carry that the model does not use.
IGNORE = (r"text_model\.embeddings\.position_ids", r"vision_model\.embeddings\.position_ids",
          r"attn_mask", r"logit_bias", r"input_resolution", r"context_length", r"vocab_size")


def open_clip_block_rules(torch_prefix: str, flax_prefix: str) -> list[kt.Rule]:
  t, f = "resblocks.{i}.", "layers.{i}."
  rules = layer_norm_rules(t + "ln_1", f + "ln1") + layer_norm_rules(t + "ln_2", f + "ln2")
  for part in _PARTS:
    rules += [kt.Rule(f"{t}attn.in_proj_weight[{part}]", f"{f}attn.{part}.kernel", kt.LINEAR),
              kt.Rule(f"{t}attn.in_proj_bias[{part}]", f"{f}attn.{part}.bias")]
  rules += linear_rules(t + "attn.out_proj", f + "attn.o")
  rules += linear_rules(t + "mlp.c_fc", f + "mlp.fc1")
  rules += linear_rules(t + "mlp.c_proj", f + "mlp.fc2")
  return kt.prefixed(rules, torch_prefix, flax_prefix)


def clip_rules(naming: str, patch_size: int) -> list[kt.Rule]:
  """Rules from checkpoint keys to `CLIP` state paths (`visual.*`, `text.*`, `logit_scale`)."""
  if naming == "open_clip":
    return [
        kt.Rule("visual.conv1.weight", "visual.patch_embed.kernel", kt.conv_as_linear(patch_size)),
        kt.Rule("visual.class_embedding", "visual.class_embedding"),
        kt.Rule("visual.positional_embedding", "visual.pos_embedding"),
        *layer_norm_rules("visual.ln_pre", "visual.ln_pre"),
        *open_clip_block_rules("visual.transformer.", "visual.encoder."),
        *layer_norm_rules("visual.ln_post", "visual.ln_post"),
        kt.Rule("visual.proj", "visual.proj"),
        kt.Rule("token_embedding.weight", "text.token_embedding"),
        kt.Rule("positional_embedding", "text.pos_embedding"),
        *open_clip_block_rules("transformer.", "text.encoder."),
        *layer_norm_rules("ln_final", "text.ln_final"),
        kt.Rule("text_projection", "text.proj"),
        kt.Rule("logit_scale", "logit_scale"),
    ]
  if naming == "hf":
    return [
        kt.Rule("vision_model.embeddings.patch_embedding.weight", "visual.patch_embed.kernel",
                kt.conv_as_linear(patch_size)),
        kt.Rule("vision_model.embeddings.class_embedding", "visual.class_embedding"),
        kt.Rule("vision_model.embeddings.position_embedding.weight", "visual.pos_embedding"),
        *layer_norm_rules("vision_model.pre_layrnorm", "visual.ln_pre"),
        *kt.prefixed(hf_encoder_rules(), "vision_model.", "visual."),
        *layer_norm_rules("vision_model.post_layernorm", "visual.ln_post"),
        kt.Rule("visual_projection.weight", "visual.proj", kt.LINEAR),
        kt.Rule("text_model.embeddings.token_embedding.weight", "text.token_embedding"),
        kt.Rule("text_model.embeddings.position_embedding.weight", "text.pos_embedding"),
        *kt.prefixed(hf_encoder_rules(), "text_model.", "text."),
        *layer_norm_rules("text_model.final_layer_norm", "text.ln_final"),
        kt.Rule("text_projection.weight", "text.proj", kt.LINEAR),
        kt.Rule("logit_scale", "logit_scale"),
    ]
  raise ValueError(f"unknown CLIP naming {naming!r}; allowed: {NAMINGS}")


def detect_naming(keys) -> str:
  keys = set(keys)
  if "visual.conv1.weight" in keys:
    return "open_clip"
  if {"vision_model.embeddings.patch_embedding.weight", "visual_projection.weight"} <= keys:
    return "hf"
  raise kt.CheckpointError(
      "not a CLIP checkpoint: expected 'visual.conv1.weight' (open_clip / OpenAI naming) or "
      "'vision_model.embeddings.patch_embedding.weight' with 'visual_projection.weight' "
      f"(transformers CLIPModel naming); found keys such as {sorted(keys)[:5]}")


def split_fused(loaders: Mapping) -> dict:
  """Replaces each fused `in_proj_{weight,bias}` loader by three loaders of its q/k/v row blocks."""
  out = {}
  for key, load in loaders.items():
    if not _FUSED.fullmatch(key):
      out[key] = load
      continue
    for i, part in enumerate(_PARTS):
      def block(load=load, i=i):
        x = np.asarray(load())
        if x.shape[0] % 3:
          raise kt.CheckpointError(
              f"{key}: fused q/k/v tensor has {x.shape[0]} rows, not a multiple of 3")
        n = x.shape[0] // 3
        return x[i * n:(i + 1) * n]
      out[f"{key}[{part}]"] = block
  return out


def fuse_split(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Inverse of `split_fused` on exported arrays."""
  out, parts = {}, {}
  for key, x in tensors.items():
    m = re.fullmatch(r"(.*)\[([qkv])\]", key)
    if m:
      parts.setdefault(m.group(1), {})[m.group(2)] = x
    else:
      out[key] = x
  for key, p in parts.items():
    out[key] = np.concatenate([p[n] for n in _PARTS], axis=0)
  return out


def load_clip(source: loader.Source, model: CLIP, *, naming: str | None = None) -> str:
  """Loads open_clip/OpenAI or transformers CLIP weights into `model` in place.

  `source`: a .safetensors path, a sharded index.json, opened TensorFiles or a {key: array} dict.
  The naming is detected from the keys unless given; returns it. Errors name the key and file.
  """
  files = loader.open_tensors(source)
  naming = naming or detect_naming(files.keys())
  if naming == "open_clip":
    loaders = split_fused(files.loaders)
    file_of = {k: files.file_of.get(re.sub(r"\[[qkv]\]$", "", k), files.files) for k in loaders}
    files = TensorFiles(loaders, file_of)
  loader.load_into(model, files, clip_rules(naming, model.config.patch_size), ignore=IGNORE)
  return naming


def export_clip(model: CLIP, *, naming: str = "open_clip") -> dict[str, np.ndarray]:
  """{checkpoint key: numpy array} in open_clip or transformers naming."""
  out = loader.export_from(model, clip_rules(naming, model.config.patch_size))
  return fuse_split(out) if naming == "open_clip" else out
