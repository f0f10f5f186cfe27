"""Key table of the FLUX autoencoder (`ae.safetensors`), import/export, and diffusers import.

Two on-disk namings:
  "flux":      the FLUX / BAGEL `ae.safetensors` (LDM naming): `encoder.down.{i}.block.{j}.conv1`,
               `encoder.mid.attn_1.{norm,q,k,v,proj_out}` (1x1 Conv2d weights, (C, C, 1, 1)),
               `decoder.up.{i}.upsample.conv`, `{encoder,decoder}.{conv_in,norm_out,conv_out}`.
               `up.{i}` is indexed by resolution level (`up.0` is full resolution).
  "diffusers": `AutoencoderKL` without quant convs (the FLUX.1 `vae/` folder):
               `encoder.down_blocks.{i}.resnets.{j}`, `mid_block.attentions.0.to_q` (Linear,
               (C, C)), `conv_norm_out`, and `decoder.up_blocks.{k}`, where k counts from the lowest
               resolution, i.e. `up_blocks.{k}` is LDM's `up.{n - 1 - k}`. It is mapped onto the
               FLUX naming by `diffusers_to_flux_keys` (lazily, one tensor at a time, on import).

Flax paths of `models.vae.AutoEncoder` mirror the FLUX keys: `weight` -> `kernel` (convs, HWIO) or
`scale` (GroupNorm).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from robust_u1_jax import sharding
from robust_u1_jax.checkpoints import key_table as kt
from robust_u1_jax.checkpoints import loader
from robust_u1_jax.checkpoints.tensor_files import TensorFiles
from robust_u1_jax.models.vae import COMPONENT, AutoEncoder

NAMINGS = ("flux", "diffusers")


def conv_rules(name: str) -> list[kt.Rule]:
  return [kt.Rule(f"{name}.weight", f"{name}.kernel", kt.CONV2D),
          kt.Rule(f"{name}.bias", f"{name}.bias")]


def norm_rules(name: str) -> list[kt.Rule]:
  return [kt.Rule(f"{name}.weight", f"{name}.scale"), kt.Rule(f"{name}.bias", f"{name}.bias")]


def resnet_rules(name: str) -> list[kt.Rule]:
  rules = norm_rules(f"{name}.norm1") + norm_rules(f"{name}.norm2")
  for c in ("conv1", "conv2", "nin_shortcut"):
    rules += conv_rules(f"{name}.{c}")
  return rules


def mid_rules(name: str) -> list[kt.Rule]:
  rules = resnet_rules(f"{name}.block_1") + resnet_rules(f"{name}.block_2")
  rules += norm_rules(f"{name}.attn_1.norm")
  for c in ("q", "k", "v", "proj_out"):
    rules += conv_rules(f"{name}.attn_1.{c}")
  return rules


def flux_rules() -> list[kt.Rule]:
  """FLUX `ae.safetensors` keys <-> `AutoEncoder` state paths (the same names, Flax leaf names)."""
  rules = []
  for part in ("encoder", "decoder"):
    rules += conv_rules(f"{part}.conv_in") + mid_rules(f"{part}.mid")
    rules += norm_rules(f"{part}.norm_out") + conv_rules(f"{part}.conv_out")
  rules += resnet_rules("encoder.down.{i}.block.{j}")
  rules += conv_rules("encoder.down.{i}.downsample.conv")
  rules += resnet_rules("decoder.up.{i}.block.{j}") + conv_rules("decoder.up.{i}.upsample.conv")
  return rules


# diffusers sub-module names -> FLUX names; {i}/{j} are integers (applied after the up-block flip).
_DIFFUSERS_PATTERNS: tuple[tuple[str, str], ...] = (
    (r"(encoder|decoder)\.conv_norm_out\.(\w+)", r"\1.norm_out.\2"),
    (r"(encoder|decoder)\.(conv_in|conv_out)\.(\w+)", r"\1.\2.\3"),
    (r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", r"encoder.down.\1.block.\2.\3"),
    (r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(\w+)",
     r"encoder.down.\1.downsample.conv.\2"),
    (r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", r"decoder.up.\1.block.\2.\3"),
    (r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(\w+)", r"decoder.up.\1.upsample.conv.\2"),
    (r"(encoder|decoder)\.mid_block\.resnets\.0\.(.+)", r"\1.mid.block_1.\2"),
    (r"(encoder|decoder)\.mid_block\.resnets\.1\.(.+)", r"\1.mid.block_2.\2"),
    (r"(encoder|decoder)\.mid_block\.attentions\.0\.group_norm\.(\w+)",
     r"\1.mid.attn_1.norm.\2"),
    # Current (to_*) and pre-0.14 (query/key/value/proj_attn) diffusers attention names.
    (r"(encoder|decoder)\.mid_block\.attentions\.0\.(?:to_q|query)\.(\w+)", r"\1.mid.attn_1.q.\2"),
    (r"(encoder|decoder)\.mid_block\.attentions\.0\.(?:to_k|key)\.(\w+)", r"\1.mid.attn_1.k.\2"),
    (r"(encoder|decoder)\.mid_block\.attentions\.0\.(?:to_v|value)\.(\w+)", r"\1.mid.attn_1.v.\2"),
    (r"(encoder|decoder)\.mid_block\.attentions\.0\.(?:to_out\.0|proj_attn)\.(\w+)",
     r"\1.mid.attn_1.proj_out.\2"),
)
_DIFFUSERS_RE = tuple((re.compile(p), r) for p, r in _DIFFUSERS_PATTERNS)
_ATTN_LINEAR = re.compile(r".*\.mid\.attn_1\.(q|k|v|proj_out)\.weight")
_UP_BLOCK = re.compile(r"decoder\.up_blocks\.(\d+)\.")


def _diffusers_key(key: str, num_levels: int) -> tuple[str, bool]:
  """FLUX key for one diffusers key, and whether its Linear weight becomes a 1x1 conv."""
  if key.startswith(("quant_conv.", "post_quant_conv.")):
    raise kt.CheckpointError(
        f"diffusers key {key!r}: the FLUX autoencoder has no quant convs; only AutoencoderKL "
        "checkpoints with use_quant_conv=False and use_post_quant_conv=False can be imported")
  m = _UP_BLOCK.match(key)
  if m:  # diffusers counts decoder blocks from the lowest resolution, LDM by level.
    key = f"decoder.up_blocks.{num_levels - 1 - int(m.group(1))}." + key[m.end():]
  for regex, repl in _DIFFUSERS_RE:
    if regex.fullmatch(key):
      out = regex.sub(repl, key).replace(".conv_shortcut.", ".nin_shortcut.")
      return out, bool(_ATTN_LINEAR.fullmatch(out))
  raise kt.CheckpointError(f"diffusers key {key!r} has no counterpart in the FLUX autoencoder")


def _num_up_levels(keys) -> int:
  levels = [int(m.group(1)) for k in keys if (m := _UP_BLOCK.match(k))]
  return max(levels) + 1 if levels else 0


def _as_conv1x1(x):
  return x.reshape(*x.shape, 1, 1) if x.ndim == 2 else x


def diffusers_to_flux_keys(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """diffusers `AutoencoderKL` state dict -> the same tensors under FLUX `ae.safetensors` keys.

  Values keep their type (torch or numpy); attention Linear weights (C, C) become (C, C, 1, 1).
  """
  n = _num_up_levels(state_dict)
  out = {}
  for key, value in state_dict.items():
    flux_key, linear = _diffusers_key(key, n)
    out[flux_key] = _as_conv1x1(value) if linear else value
  return out


def detect_naming(keys) -> str:
  keys = list(keys)
  if any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.", "encoder.mid_block."))
         for k in keys):
    return "diffusers"
  if any(k.startswith(("encoder.", "decoder.")) for k in keys):
    return "flux"
  raise kt.CheckpointError(
      f"no autoencoder found: expected keys under 'encoder.' and 'decoder.' (FLUX ae.safetensors "
      f"or diffusers AutoencoderKL); first keys: {keys[:5]}")


def load_vae(path_or_tensors: str | TensorFiles | Mapping[str, Any], model: AutoEncoder, *,
             naming: str | None = None, mesh: Mesh | None = None) -> str:
  """Loads FLUX or diffusers autoencoder weights into `model` in place; returns the naming used.

  `model` may be abstract (`sharding.abstract_model` / `nnx.eval_shape`: no random init is ever
  run) or already placed, in which case every parameter keeps its sharding. With `mesh`, parameters
  are placed by the "vae" sharding rules instead. Missing, unexpected or misshapen tensors raise
  `CheckpointError` naming key and file, before any parameter is changed.
  """
  files = loader.open_tensors(path_or_tensors)
  loaders, source, source_of = dict(files.loaders), files.files, files.file_of
  naming = naming or detect_naming(loaders)
  if naming not in NAMINGS:
    raise ValueError(f"unknown VAE naming {naming!r}; allowed: {NAMINGS}")
  if naming == "diffusers":
    n = _num_up_levels(loaders)
    converted, converted_of = {}, {}
    for key, load in loaders.items():
      flux_key, linear = _diffusers_key(key, n)
      converted[flux_key] = (lambda load=load: _as_conv1x1(load())) if linear else load
      if source_of is not None:
        converted_of[flux_key] = f"{source_of[key]}, diffusers key {key}"
    loaders, source_of = converted, converted_of or None
  state = nnx.state(model, nnx.Param)
  variables = kt.flat_paths(state)
  expected = {p: (tuple(v.shape), v.dtype) for p, v in variables.items()}
  # Converted in full before any assignment, so a bad file leaves the model untouched (the VAE is
  # small: about 330 MB in fp32).
  arrays = dict(kt.convert_to_flax(loaders, kt.KeyTable(flux_rules()), expected,
                                   source=source, source_of=source_of))
  targets = kt.flat_paths(sharding.state_shardings(state, COMPONENT, mesh)) if mesh else {}
  for path, array in arrays.items():
    old = variables[path].get_value()
    if path in targets:
      value = jax.device_put(array, targets[path])
    elif isinstance(old, jax.Array):
      value = jax.device_put(array, old.sharding)
    else:
      value = jnp.asarray(array)
    variables[path].set_value(value)
  return naming


def export_vae(model: AutoEncoder) -> dict[str, np.ndarray]:
  """{FLUX `ae.safetensors` key: numpy array in PyTorch layout}, in the parameters' dtype."""
  return kt.convert_to_torch(kt.flat_paths(nnx.state(model, nnx.Param)), kt.KeyTable(flux_rules()))
