"""A whole BAGEL / Robust-U1 model directory: its files, its config and its import.

A model directory (the format of BAGEL-7B-MoT and of the Robust-U1 SFT / RL / final releases):
  ema.safetensors   every non-VAE tensor in BAGEL naming (or model.safetensors, a sharded
                    `*.safetensors.index.json`, Robust-U1's model_bf16.safetensors;
                    pytorch_model.bin only with allow_pickle)
  ae.safetensors    the FLUX autoencoder (FLUX / LDM naming)
  llm_config.json   a Qwen2 config plus `qk_norm` and `layer_module`
  vit_config.json   a SigLIP vision config stating one more layer than the checkpoint holds
  tokenizer files   tokenizer.json, tokenizer_config.json, vocab.json, merges.txt, ...
  robust_u1_config.json  (ours, optional) what the BAGEL files cannot state: the VAE shapes, the
                    latent patch / grid sizes and the ViT position grid. BAGEL ignores it; a
                    directory without it gets BAGEL-7B's values (FLUX VAE, 2, 64, 70).

Import builds the model abstractly (no parameter is ever initialised), gives every parameter its
mesh sharding, and streams the tensors through ONE key table (`model_rules`) straight onto their
shards, one parameter at a time (the layers of a stacked parameter are stacked on the host first,
`loader.load_into`). Export (`bagel_export.py`) streams the other way through the same table, so
neither direction holds a second copy of the model.

The fixed sin-cos tables `latent_pos_embed.pos_embed` and `vit_pos_embed.pos_embed` are accepted
but not required on import (the model rebuilds them; a table's value at grid cell (h, w) does not
depend on the grid size, so a file made for another `max_latent_size` fits too). They ARE written
on export: BAGEL's trainer saves them (they are `nn.Parameter`s with requires_grad False), its
resume path `pop`s them without a default (train/fsdp_utils.py), and its inference path builds
the model on the meta device and fills it from the file, so a directory without them would break
both.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from absl import logging
from flax import nnx

from robust_u1_jax import files, sharding
from robust_u1_jax.checkpoints import key_table as kt
from robust_u1_jax.checkpoints import llm_keys, loader, tensor_files, vae_keys, vit_keys
from robust_u1_jax.models.bagel import COMPONENTS, Bagel, BagelConfig
from robust_u1_jax.models.qwen2_mot import LLMConfig
from robust_u1_jax.models.siglip import SiglipConfig
from robust_u1_jax.models.vae import VAEConfig

LLM_CONFIG = "llm_config.json"
ORBAX_CONFIG = "bagel_config.json"  # of an Orbax model checkpoint (orbax_io.CONFIG)
VIT_CONFIG = "vit_config.json"
EXTRA_CONFIG = "robust_u1_config.json"
VAE_FILE = "ae.safetensors"
# Preference order: BAGEL releases the EMA weights; its trainer also writes the raw ones.
# Robust-U1's demo also reads `model_bf16.safetensors`, a bfloat16 copy of the final weights.
WEIGHT_FILES = ("ema.safetensors", "ema.safetensors.index.json", "model.safetensors",
                "model.safetensors.index.json", "model_bf16.safetensors", "pytorch_model.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja",
                   "chat_template.json", "generation_config.json")
# What a model trained by this project keeps beside its weights (written by the trainer, read by
# inference/images.py and inference/recovery.py): its image resize rules, its recoveries'
# guidance and the instruction it recovers by. Conversions carry them along (`copy_side_files`).
RULES_FILE = "image_rules.json"
GUIDANCE_FILE = "guidance.json"
INSTRUCTION_FILE = "instruction.json"
# Written by a stage that trains no recovery (the demo's vae and vit parts): its language model is
# untrained, so `recover` and `answer` say so.
NO_RECOVERY_FILE = "no_recovery.json"
SIDE_FILES = (RULES_FILE, GUIDANCE_FILE, INSTRUCTION_FILE, NO_RECOVERY_FILE)


class SideFileError(ValueError):
  """A model's side file (SIDE_FILES) that cannot be read: the message names the file."""

  @classmethod
  def of(cls, file: str, error: Exception) -> SideFileError:
    """`error` of reading `file`, the file named once."""
    message = str(error)
    return cls(message if message.startswith(file) else f"{file}: {message}")


LATENT_POS_KEY = "latent_pos_embed.pos_embed"
VIT_POS_KEY = "vit_pos_embed.pos_embed"
# Keys a checkpoint may carry that the model rebuilds itself.
IGNORE = tuple(llm_keys.IGNORE) + (r"latent_pos_embed\.pos_embed", r"vit_pos_embed\.pos_embed")
LLM_PREFIX = "language_model."
VAE_PREFIX = "vae."
_HF_ACTIVATIONS = {"gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu", "quick_gelu": "quick_gelu"}


# -- key table -------------------------------------------------------------------------------------


def model_rules(config: BagelConfig) -> list[kt.Rule]:
  """The one table of a model directory: checkpoint keys (ema + ae) <-> `Bagel` state paths."""
  v = config.vit
  rules = kt.prefixed(llm_keys.llm_rules(config.llm.mot, config.llm.qk_norm), LLM_PREFIX,
                      LLM_PREFIX)
  rules += kt.prefixed(vit_keys.siglip_rules("bagel", v.patch_size, v.max_patches_per_side),
                       "", "vit_model.")
  rules += kt.prefixed(vit_keys.connector_rules(), "", "connector.")
  rules += vit_keys.linear_rules("time_embedder.mlp.0", "time_embedder.fc1")
  rules += vit_keys.linear_rules("time_embedder.mlp.2", "time_embedder.fc2")
  rules += vit_keys.linear_rules("vae2llm", "vae2llm") + vit_keys.linear_rules("llm2vae", "llm2vae")
  rules += kt.prefixed(vae_keys.flux_rules(), "", VAE_PREFIX)
  return rules


# -- configs ---------------------------------------------------------------------------------------


def _dtype_name(dtype) -> str:
  return jnp.dtype(dtype).name


def config_to_dict(config: BagelConfig) -> dict[str, Any]:
  """JSON-ready dict of a BagelConfig (dtypes by name), inverse of `config_from_dict`."""
  llm = dataclasses.asdict(config.llm)
  llm["dtype"], llm["param_dtype"] = _dtype_name(llm["dtype"]), _dtype_name(llm["param_dtype"])
  # The attention kernel is the platform's business, not the model's: a model saved on a TPU run
  # loads as 'auto' (its run's `attention` field, when given, overrides it).
  llm.pop("attention", None)
  vae = dataclasses.asdict(config.vae)
  vae["ch_mult"] = list(vae["ch_mult"])
  return {"llm": llm, "vit": dataclasses.asdict(config.vit), "vae": vae,
          "latent_patch_size": config.latent_patch_size,
          "max_latent_size": config.max_latent_size}


# What a model config's fields hold, by their annotation (the dataclasses' `from __future__
# import annotations` keeps them as text): each read with `files.json_field`.
_FIELD_KINDS = {"int": int, "float": float, "bool": bool, "str": str}


def _fields(cls, values: Mapping[str, Any], source: str, section: str) -> dict[str, Any]:
  """`values` of the dataclass `cls`, each of its field's kind; UnreadableFile naming `source`
  and the field for an unknown field or a value of another kind."""
  if not isinstance(values, Mapping):
    raise files.UnreadableFile(f"{source}: section {section!r} = {values!r}: not an object")
  kinds = {f.name: f.type for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - set(kinds))
  if unknown:
    raise files.UnreadableFile(f"{source}: unknown field(s) {unknown} in {section!r}; allowed: "
                               f"{sorted(kinds)}")
  out = dict(values)
  for key in values:
    kind = _FIELD_KINDS.get(str(kinds[key]))
    if kind is not None:
      out[key] = files.json_field(values, key, f"{source} ({section})", kind)
    elif str(kinds[key]).startswith("tuple[int"):
      if not isinstance(values[key], list) or not values[key]:
        raise files.UnreadableFile(f"{source} ({section}): field {key!r} = {values[key]!r}: "
                                   "not a list of whole numbers >= 1")
      out[key] = tuple(files.json_field({key: v}, key, f"{source} ({section})", int)
                       for v in values[key])
  return out


def config_from_dict(d: Mapping[str, Any], *, source: str = "config", **llm_overrides
                     ) -> BagelConfig:
  """BagelConfig from `config_to_dict`'s output; `llm_overrides` (dtype, remat, ...) win."""
  missing = [k for k in ("llm", "vit", "vae") if k not in d]
  if missing:
    raise files.UnreadableFile(f"{source}: missing section(s) {missing}")
  llm = _fields(LLMConfig, d["llm"], source, "llm")
  with files.naming(source):  # an unknown dtype; the configs' own checks
    for key in ("dtype", "param_dtype"):
      if key in llm:
        llm[key] = _dtype(llm[key])
    top = _fields(BagelConfig, {k: v for k, v in d.items() if k not in ("llm", "vit", "vae")},
                  source, "top level")
    return BagelConfig(llm=LLMConfig(**{**llm, **_llm_overrides(llm_overrides)}),
                       vit=SiglipConfig(**_fields(SiglipConfig, d["vit"], source, "vit")),
                       vae=VAEConfig(**_fields(VAEConfig, d["vae"], source, "vae")), **top)


def _dtype(name: Any):
  try:
    return jnp.dtype(name)
  except TypeError:
    raise ValueError(f"dtype {name!r} is not a dtype's name (float32, bfloat16, ...)") from None


def _llm_overrides(overrides: Mapping[str, Any]) -> dict[str, Any]:
  out = {k: v for k, v in overrides.items() if v is not None}
  for key in ("dtype", "param_dtype"):
    if key in out:
      out[key] = jnp.dtype(out[key])
  return out


def llm_flags_from_keys(llm_json: Mapping[str, Any], keys) -> dict[str, bool]:
  """`mot` / `qk_norm` from the checkpoint's keys where `llm_config.json` does not state them.

  BAGEL-7B-MoT's llm_config.json is the plain Qwen2.5 config: its code sets `qk_norm` and
  `layer_module` programmatically (app.py, the training flags), so the file alone would describe
  a model without the generation expert and QK-norm.
  """
  keys = list(keys)
  flags = {}
  if "layer_module" not in llm_json:
    flags["mot"] = any("_moe_gen." in k for k in keys)
  if "qk_norm" not in llm_json:
    flags["qk_norm"] = any(".self_attn.q_norm" in k for k in keys)
  return flags


def read_config(path: str, *, keys=None, **llm_overrides) -> BagelConfig:
  """The BagelConfig of a model directory (llm/vit configs, plus our extra file if present).

  `keys`: the checkpoint's tensor names, to settle what a plain Qwen2 llm_config.json leaves out
  (see `llm_flags_from_keys`).
  """
  overrides = _llm_overrides(llm_overrides)
  llm_path = os.path.join(path, LLM_CONFIG)
  if keys is not None and os.path.exists(llm_path):
    overrides = {**llm_flags_from_keys(files.read_json_object(llm_path), keys), **overrides}
  config = BagelConfig.from_model_dir(path, **overrides)
  extra_path = os.path.join(path, EXTRA_CONFIG)
  if not os.path.exists(extra_path):
    return config
  extra = files.read_json_object(extra_path)
  allowed = ("vae", "latent_patch_size", "max_latent_size", "vit_max_patches_per_side")
  unknown = sorted(set(extra) - set(allowed))
  if unknown:
    raise files.UnreadableFile(f"{extra_path}: unknown field(s) {unknown}; allowed: "
                               f"{list(allowed)}")
  changes = {k: files.json_field(extra, k, extra_path, int)
             for k in ("latent_patch_size", "max_latent_size") if k in extra}
  with files.naming(extra_path):  # the configs' own checks
    if "vae" in extra:
      changes["vae"] = VAEConfig(**_fields(VAEConfig, extra["vae"], extra_path, "vae"))
    if "vit_max_patches_per_side" in extra:
      changes["vit"] = dataclasses.replace(config.vit, max_patches_per_side=files.json_field(
          extra, "vit_max_patches_per_side", extra_path, int))
    return dataclasses.replace(config, **changes)


def llm_config_json(c: LLMConfig, torch_dtype: str) -> dict[str, Any]:
  """BAGEL's `llm_config.json`: a transformers Qwen2Config plus `qk_norm` and `layer_module`."""
  return {
      "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
      "vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
      "intermediate_size": c.intermediate_size, "num_hidden_layers": c.num_layers,
      "num_attention_heads": c.num_heads, "num_key_value_heads": c.num_kv_heads,
      "head_dim": c.head_dim, "hidden_act": "silu", "rms_norm_eps": c.rms_eps,
      "rope_theta": c.rope_theta, "rope_scaling": None, "max_position_embeddings": 32768,
      "attention_bias": c.attention_bias, "attention_dropout": 0.0,
      "tie_word_embeddings": c.tie_word_embeddings, "use_sliding_window": False,
      "sliding_window": None, "use_cache": True, "torch_dtype": torch_dtype,
      "qk_norm": c.qk_norm,
      "layer_module": "Qwen2MoTDecoderLayer" if c.mot else "Qwen2DecoderLayer",
  }


def vit_config_json(c: SiglipConfig) -> dict[str, Any]:
  """BAGEL's `vit_config.json`: a SigLIP vision config with one layer more than the model uses
  (BAGEL drops the last one before loading) and image_size = S * patch (980 = 70 x 14)."""
  return {
      "model_type": "siglip_vision_model", "hidden_size": c.hidden_size,
      "intermediate_size": c.mlp_dim, "num_attention_heads": c.num_heads,
      "num_hidden_layers": c.num_layers + 1, "patch_size": c.patch_size,
      "image_size": c.max_patches_per_side * c.patch_size, "num_channels": 3,
      "layer_norm_eps": c.layer_norm_eps, "hidden_act": _HF_ACTIVATIONS[c.activation],
  }


def extra_config_json(config: BagelConfig) -> dict[str, Any]:
  vae = dataclasses.asdict(config.vae)
  vae["ch_mult"] = list(vae["ch_mult"])
  return {"vae": vae, "latent_patch_size": config.latent_patch_size,
          "max_latent_size": config.max_latent_size,
          "vit_max_patches_per_side": config.vit.max_patches_per_side}


# -- abstract, sharded model -----------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _abstract_split(config: BagelConfig) -> tuple[nnx.GraphDef, nnx.State]:
  # Tracing the initialisers costs seconds (each RNG draw is staged), so it is done once per config.
  return nnx.split(nnx.eval_shape(lambda: Bagel(config, rngs=nnx.Rngs(0))))


def abstract_bagel(config: BagelConfig, mesh: jax.sharding.Mesh | None = None) -> Bagel:
  """A shape-only Bagel whose parameters are ShapeDtypeStructs carrying their target sharding
  (the mesh sharding from the logical axis names, or device 0 without a mesh)."""
  graphdef, state = _abstract_split(config)
  model = nnx.merge(graphdef, jax.tree.map(lambda x: x, state))  # fresh Variables per call
  everything = kt.flat_paths(nnx.state(model))
  params = loader.param_variables(model)
  others = sorted(set(everything) - set(params))
  if others:
    # Only parameters come from a checkpoint; anything else would stay abstract.
    raise TypeError(f"Bagel state {others[:5]} is not an nnx.Param; model import cannot fill it")
  if mesh is not None:
    shardings = kt.flat_paths(sharding.state_shardings(nnx.state(model, nnx.Param), COMPONENTS,
                                                       mesh))
  for path, variable in params.items():
    target = (shardings[path] if mesh is not None
              else jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    variable.set_value(jax.ShapeDtypeStruct(variable.shape, variable.dtype, sharding=target))
  return model


# -- import ----------------------------------------------------------------------------------------


def find_weight_file(path: str) -> str:
  """The non-VAE weight file of a model directory, in `WEIGHT_FILES` order."""
  if not os.path.isdir(path):
    raise FileNotFoundError(f"model directory not found: {path}")
  present = [name for name in WEIGHT_FILES if os.path.exists(os.path.join(path, name))]
  if not present:
    raise FileNotFoundError(f"{path}: no weight file; expected one of {list(WEIGHT_FILES)}")
  if len(present) > 1:
    _note_unread_weights(os.path.abspath(path), tuple(present))
  return os.path.join(path, present[0])


@functools.cache  # once per folder: a command finds the file more than once
def _note_unread_weights(path: str, present: tuple[str, ...]) -> None:
  # Robust-U1's model_bf16.safetensors copied into a BAGEL folder would otherwise load as BAGEL.
  logging.warning("%s holds %d weight files: reading %s, not %s (this order: %s); move the one "
                  "you mean into a folder of its own if it is another", path, len(present),
                  present[0], ", ".join(present[1:]), ", ".join(WEIGHT_FILES))


def open_model_files(path: str, *, allow_pickle: bool = False) -> tensor_files.TensorFiles:
  """The weight file and ae.safetensors of a directory as one lazy key -> tensor view."""
  weights = tensor_files.open_tensor_files(find_weight_file(path), allow_pickle=allow_pickle)
  vae_path = os.path.join(path, VAE_FILE)
  if not os.path.exists(vae_path):
    raise FileNotFoundError(f"{path}: missing {VAE_FILE} (the FLUX autoencoder)")
  ae = tensor_files.open_tensor_files(vae_path)
  both = sorted(set(weights.keys()) & set(ae.keys()))
  if both:
    raise kt.CheckpointError(f"{path}: tensor(s) {both[:5]} appear in both {weights.files} and "
                             f"{VAE_FILE}")
  return tensor_files.TensorFiles({**weights.loaders, **ae.loaders},
                                  {**weights.file_of, **ae.file_of})


def progress_bar(total: int, desc: str, enabled: bool):
  """A tqdm bar over tensors, shown on process 0 when `enabled`."""
  from robust_u1_jax import progress  # deferred: only conversions show progress

  return progress.bar(total=total, desc=desc, unit="tensor",
                      disable=not enabled or jax.process_index() != 0)


def _counted(files: tensor_files.TensorFiles, bar) -> tensor_files.TensorFiles:
  def wrap(load):
    def counted():
      value = load()
      bar.update(1)
      return value
    return counted

  return tensor_files.TensorFiles({k: wrap(v) for k, v in files.loaders.items()}, files.file_of)


def load_model_dir(path: str, *, mesh: jax.sharding.Mesh | None = None, dtype=None,
                   param_dtype=None, remat: str | None = None, attention: str | None = None,
                   allow_pickle: bool = False, progress: bool = False) -> Bagel:
  """Builds `Bagel` from a BAGEL / Robust-U1 model directory, sharded onto `mesh`.

  Args:
    path: the directory (see the module docstring).
    mesh: parameters are placed by the logical rules of `bagel.COMPONENTS`; None: device 0.
    dtype, param_dtype, remat, attention: overrides of the LLM config (compute dtype, parameter
      dtype, rematerialisation, attention kernel); checkpoint tensors are cast to the parameter
      dtype.
    allow_pickle: accept `pytorch_model.bin` (loaded with torch.load(weights_only=True)).
    progress: show a tqdm bar over tensors.
  Raises:
    FileNotFoundError for a missing directory or file; CheckpointError naming key, file and
    shapes for a missing, unexpected or misshapen tensor.
  """
  if not os.path.isdir(path):
    raise FileNotFoundError(f"model directory not found: {path}")
  for name in (LLM_CONFIG, VIT_CONFIG):  # named before the weights are opened
    if not os.path.exists(os.path.join(path, name)):
      raise FileNotFoundError(f"{path}: missing {name} (a BAGEL model directory holds "
                              f"{LLM_CONFIG}, {VIT_CONFIG}, ema.safetensors, {VAE_FILE})")
  weights = open_model_files(path, allow_pickle=allow_pickle)
  config = read_config(path, keys=weights.keys(), dtype=dtype, param_dtype=param_dtype,
                       remat=remat, attention=attention)
  model = abstract_bagel(config, mesh)
  ignored = kt.matches_any(IGNORE)  # never loaded: not counted in the bar's total
  loaded = sum(not ignored(k) for k in weights.loaders)
  with progress_bar(loaded, f"loading {os.path.basename(path.rstrip('/'))}", progress) as bar:
    try:
      loader.load_into(model, _counted(weights, bar), model_rules(config), ignore=IGNORE)
    except kt.CheckpointError as e:
      if "expects" not in str(e):
        raise
      # The shapes come from the configs beside the weights, which a misfit may be the fault of.
      # Without ours, a small model (exported here, its robust_u1_config.json left behind) reads
      # as BAGEL-7B's image side, so its first image tensor misfits: say what was assumed.
      image_side = (f"and {EXTRA_CONFIG}" if os.path.exists(os.path.join(path, EXTRA_CONFIG)) else
                    f"and, as {path} has no {EXTRA_CONFIG}, BAGEL-7B's image shapes were "
                    f"assumed: the FLUX VAE, latent patch {config.latent_patch_size}, "
                    f"{config.max_latent_size} latent and {config.vit.max_patches_per_side} ViT "
                    "patches a side (a model this project exported has that file beside its "
                    "weights)")
      raise kt.CheckpointError(
          f"{str(e).rstrip('.')} (the model's shapes are read from {path}'s {LLM_CONFIG}, "
          f"{VIT_CONFIG} {image_side}: the weights or one of them is not this model's)") from None
  return model
