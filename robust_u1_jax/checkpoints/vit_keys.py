"""Key tables for the SigLIP vision tower and the BAGEL connector, plus import/export.

Two on-disk namings:
  "hf":    transformers `SiglipVisionModel` / `SiglipModel` (keys under `vision_model.`, or bare
           as transformers 5 saves a SiglipVisionModel): `embeddings.patch_embedding` is a Conv2d
           (hidden, 3, p, p); its position table may cover fewer than S x S patches (27 x 27 for
           siglip-so400m-patch14-384): its rows are placed at `h * S + w` of ours, the rest zero.
  "bagel": BAGEL's `vit_model.vision_model.*`, where the patch embedding was converted to a Linear
           (hidden, 3 * p * p) over (row, column, channel), plus `connector.fc{1,2}`. The fixed
           `vit_pos_embed.pos_embed` table may be present or not; it is always rebuilt.

Flax paths are relative to `SiglipVisionTower` (`patch_embed`, `pos_embedding`, `encoder.layers.N`,
`post_ln`) and `Connector` (`fc1`, `fc2`); `hf_encoder_rules` is shared with CLIP's transformers
naming.
"""

from __future__ import annotations

import numpy as np

from robust_u1_jax.checkpoints import key_table as kt
from robust_u1_jax.checkpoints import loader
from robust_u1_jax.models.siglip import Connector, SiglipVisionTower

NAMINGS = ("hf", "bagel")
HF_PREFIX = "vision_model."
BAGEL_PREFIX = "vit_model.vision_model."
CONNECTOR_PREFIX = "connector."
# Keys of a full SigLIP checkpoint that the NaViT tower has no use for (pooling head, text tower).
HF_IGNORE = (r"(?:vision_model\.)?head\..*", r"text_model\..*", r"logit_scale", r"logit_bias")


def linear_rules(torch_name: str, flax_name: str, bias: bool = True) -> list[kt.Rule]:
  rules = [kt.Rule(f"{torch_name}.weight", f"{flax_name}.kernel", kt.LINEAR)]
  if bias:
    rules.append(kt.Rule(f"{torch_name}.bias", f"{flax_name}.bias"))
  return rules


def layer_norm_rules(torch_name: str, flax_name: str) -> list[kt.Rule]:
  return [kt.Rule(f"{torch_name}.weight", f"{flax_name}.scale"),
          kt.Rule(f"{torch_name}.bias", f"{flax_name}.bias")]


def hf_encoder_rules() -> list[kt.Rule]:
  """transformers `encoder.layers.N` (SigLIP, CLIP) <-> `vit.Encoder` (`encoder.layers.N`)."""
  t, f = "encoder.layers.{i}.", "encoder.layers.{i}."
  rules = layer_norm_rules(t + "layer_norm1", f + "ln1")
  rules += layer_norm_rules(t + "layer_norm2", f + "ln2")
  for a, b in (("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v"), ("out_proj", "o")):
    rules += linear_rules(t + "self_attn." + a, f + "attn." + b)
  rules += linear_rules(t + "mlp.fc1", f + "mlp.fc1") + linear_rules(t + "mlp.fc2", f + "mlp.fc2")
  return rules


def position_grid(max_patches_per_side: int) -> kt.Transform:
  """Square n x n position table -> our S x S one, rows placed at h * S + w (zeros elsewhere)."""
  s = max_patches_per_side

  def to_flax(x):
    n = int(round(np.sqrt(x.shape[0])))
    if n * n != x.shape[0] or n > s:
      # Left unchanged: the shape check then reports the mismatch with key and file.
      return x
    if n == s:
      return x
    out = np.zeros((s, s, x.shape[1]), x.dtype)
    out[:n, :n] = x.reshape(n, n, -1)
    return out.reshape(s * s, -1)

  return kt.Transform(f"position_grid{s}", to_flax, lambda x: x)


def siglip_rules(naming: str, patch_size: int, max_patches_per_side: int, *,
                 hf_prefix: str = HF_PREFIX) -> list[kt.Rule]:
  """Tower rules for one naming; torch keys carry the naming's full prefix.

  `hf_prefix`: "vision_model." for hub checkpoints (SiglipModel, and SiglipVisionModel as saved by
  transformers 4), "" for a SiglipVisionModel saved by transformers 5.
  """
  if naming not in NAMINGS:
    raise ValueError(f"unknown SigLIP naming {naming!r}; allowed: {NAMINGS}")
  if naming == "hf":
    patch = kt.Rule("embeddings.patch_embedding.weight", "patch_embed.kernel",
                    kt.conv_as_linear(patch_size))
    pos = kt.Rule("embeddings.position_embedding.weight", "pos_embedding",
                  position_grid(max_patches_per_side))
  else:
    patch = kt.Rule("embeddings.patch_embedding.weight", "patch_embed.kernel", kt.LINEAR)
    pos = kt.Rule("embeddings.position_embedding.weight", "pos_embedding")
  rules = [patch, kt.Rule("embeddings.patch_embedding.bias", "patch_embed.bias"), pos]
  rules += hf_encoder_rules() + layer_norm_rules("post_layernorm", "post_ln")
  return kt.prefixed(rules, hf_prefix if naming == "hf" else BAGEL_PREFIX, "")


def connector_rules() -> list[kt.Rule]:
  """BAGEL `connector.fc{1,2}` <-> `Connector` (`fc1`, `fc2`)."""
  return kt.prefixed(linear_rules("fc1", "fc1") + linear_rules("fc2", "fc2"), CONNECTOR_PREFIX, "")


def detect_naming(keys) -> tuple[str, str]:
  """(naming, prefix of the tower's keys) from a checkpoint's keys."""
  keys = list(keys)
  patch = "embeddings.patch_embedding.weight"
  if BAGEL_PREFIX + patch in keys:
    return "bagel", BAGEL_PREFIX
  if HF_PREFIX + patch in keys:
    return "hf", HF_PREFIX
  if patch in keys:
    return "hf", ""
  raise kt.CheckpointError(
      f"no SigLIP tower found: expected {BAGEL_PREFIX + patch!r} (BAGEL), {HF_PREFIX + patch!r} "
      f"or {patch!r} (transformers); first keys: {sorted(keys)[:5]}")


def load_siglip(source: loader.Source, tower: SiglipVisionTower,
                connector: Connector | None = None, *, naming: str | None = None) -> str:
  """Loads a SigLIP tower (and BAGEL's connector, if given) in place; returns the naming used.

  `source`: a .safetensors path, a sharded index.json, opened TensorFiles or a {key: array} dict.
  Keys that belong to other parts of a full BAGEL or SigLIP checkpoint (LLM, VAE, text tower,
  pooling head) are skipped; a missing or misshapen tower tensor raises `CheckpointError`.
  """
  files = loader.open_tensors(source)
  found, prefix = detect_naming(files.keys())
  if naming is not None and naming != found:
    raise kt.CheckpointError(
        f"{files.files}: asked for the {naming!r} naming, but the keys are {found!r}")
  if connector is not None and found != "bagel":
    raise ValueError(f"{files.files}: the connector exists only in BAGEL checkpoints, "
                     f"not in the {found!r} naming")
  c = tower.config
  loader.load_into(
      tower, files, siglip_rules(found, c.patch_size, c.max_patches_per_side, hf_prefix=prefix),
      prefix=prefix, ignore=HF_IGNORE if found == "hf" else ())
  if connector is not None:
    loader.load_into(connector, files, connector_rules(), prefix=CONNECTOR_PREFIX)
  return found


def export_siglip(tower: SiglipVisionTower, connector: Connector | None = None, *,
                  naming: str = "bagel") -> dict[str, np.ndarray]:
  """{checkpoint key: numpy array} in the given naming (the HF export keeps the S x S table)."""
  c = tower.config
  out = loader.export_from(tower, siglip_rules(naming, c.patch_size, c.max_patches_per_side))
  if connector is not None:
    if naming != "bagel":
      raise ValueError("the connector exists only in the BAGEL naming")
    out.update(loader.export_from(connector, connector_rules()))
  return out
