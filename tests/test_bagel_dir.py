"""BAGEL model directory import/export: round trips, BAGEL file layout, errors naming key and file,
alternative weight files (model.safetensors, sharded index, opt-in pickle), sharded import."""

import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from robust_u1_jax import sharding
from robust_u1_jax.checkpoints import bagel_dir, bagel_export, llm_keys, loader, tensor_files
from robust_u1_jax.checkpoints import key_table as kt
from robust_u1_jax.checkpoints.key_table import CheckpointError
from robust_u1_jax.data import sequence as seq
from robust_u1_jax.models import bagel, layers, qwen2_mot

CFG = bagel.BagelConfig.tiny()


@pytest.fixture(scope="module")
def source(random_bagel):
  return random_bagel(CFG, seed=0)


@pytest.fixture(scope="module")
def exported(source, tmp_path_factory):
  tok = tmp_path_factory.mktemp("tok")
  (tok / "tokenizer.json").write_text('{"model": "tiny"}\n')
  (tok / "tokenizer_config.json").write_text('{"tokenizer_class": "Qwen2Tokenizer"}\n')
  path = str(tmp_path_factory.mktemp("export") / "model")
  bagel_export.save_model_dir(source, path, tokenizer_dir=str(tok))
  return path


@pytest.fixture(scope="module")
def loaded(exported):
  return bagel_dir.load_model_dir(exported)


@pytest.fixture
def variant(exported, tmp_path, read_tensors):
  """variant(edit_ema=None, edit_ae=None): a copy of the exported directory under tmp_path, its
  tensor files edited in place by the given functions of {key: array}."""
  def make(edit_ema=None, edit_ae=None):
    out = str(tmp_path / "variant")
    shutil.copytree(exported, out)
    for name, edit in (("ema.safetensors", edit_ema), ("ae.safetensors", edit_ae)):
      if edit is not None:
        tensors = read_tensors(os.path.join(out, name))
        edit(tensors)
        tensor_files.save_safetensors(tensors, os.path.join(out, name))
    return out

  return make


# -- round trips -----------------------------------------------------------------------------------


def _rows():
  img = np.random.default_rng(1).uniform(-1, 1, (16, 24, 3)).astype(np.float32)
  blocks = [seq.Latent(32, 32), seq.Vit(img), seq.Text([5, 6, 7]), seq.Latent(32, 32, noisy=True)]
  t, nv, nl = seq.lengths(blocks, *seq.strides(CFG))
  inputs = seq.build_rows([[blocks]], CFG, seq.Markers(3, 4), seq_len=t, max_vit=nv,
                          max_latent=nl)
  return jax.tree.map(jnp.asarray, inputs), nl


@nnx.jit
def _forward(model, inputs, latents, timesteps):
  hidden = model(inputs, latents, timesteps)
  return model.velocity(hidden, inputs.latent_seq_index), model.text_logits(hidden)


def test_export_import_gives_the_same_model(source, loaded, assert_same_params):
  assert loaded.config == CFG
  assert_same_params(source, loaded)
  inputs, nl = _rows()
  latents = jax.random.normal(jax.random.key(0), (1, nl, CFG.latent_channels))
  t = jnp.full((1, nl), 0.5)
  v_src, logits_src = _forward(source, inputs, latents, t)
  v_new, logits_new = _forward(loaded, inputs, latents, t)
  assert float(jnp.abs(v_src).max()) > 1e-3  # llm2vae is not zero: the check means something
  np.testing.assert_array_equal(np.asarray(v_src), np.asarray(v_new))
  np.testing.assert_array_equal(np.asarray(logits_src), np.asarray(logits_new))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_import_export_is_bit_identical(source, exported, tmp_path, dtype, read_tensors):
  src = exported
  if dtype == "bfloat16":  # BAGEL releases bfloat16 files: read and written without a detour
    src = bagel_export.save_model_dir(source, str(tmp_path / "bf16"), save_dtype="bfloat16")
  model = bagel_dir.load_model_dir(src, param_dtype=dtype)
  again = bagel_export.save_model_dir(model, str(tmp_path / "again"))
  for name in ("ema.safetensors", "ae.safetensors"):
    a, b = read_tensors(os.path.join(src, name)), read_tensors(os.path.join(again, name))
    assert a.keys() == b.keys(), name
    for k in a:
      assert a[k].dtype == b[k].dtype == np.dtype(jnp.dtype(dtype)), (name, k)
      np.testing.assert_array_equal(a[k].view(np.uint8), b[k].view(np.uint8), err_msg=k)
  for name in ("llm_config.json", "vit_config.json", "robust_u1_config.json"):
    with open(os.path.join(src, name)) as f1, open(os.path.join(again, name)) as f2:
      assert json.load(f1) == json.load(f2), name


@pytest.mark.torch_ref
def test_files_follow_bagel_layout(source, exported, bagel_params):
  import torch
  from safetensors.torch import load_file  # BAGEL's own reader validates our streamed files
  from transformers import Qwen2Config, SiglipVisionConfig

  assert sorted(os.listdir(exported)) == sorted(
      ["ema.safetensors", "ae.safetensors", "llm_config.json", "vit_config.json",
       "robust_u1_config.json", "tokenizer.json", "tokenizer_config.json"])
  ema = load_file(os.path.join(exported, "ema.safetensors"))
  ae = load_file(os.path.join(exported, "ae.safetensors"))
  c, v = CFG.llm, CFG.vit
  expected_shapes = {
      "language_model.model.embed_tokens.weight": (c.vocab_size, c.hidden_size),
      "language_model.lm_head.weight": (c.vocab_size, c.hidden_size),
      "language_model.model.norm_moe_gen.weight": (c.hidden_size,),
      "language_model.model.layers.1.self_attn.q_proj_moe_gen.weight":
          (c.num_heads * c.head_dim, c.hidden_size),
      "language_model.model.layers.0.self_attn.k_norm.weight": (c.head_dim,),
      "language_model.model.layers.0.mlp_moe_gen.down_proj.weight":
          (c.hidden_size, c.intermediate_size),
      "vit_model.vision_model.embeddings.patch_embedding.weight": (v.hidden_size, v.patch_dim),
      "vit_model.vision_model.embeddings.position_embedding.weight":
          (v.max_patches_per_side ** 2, v.hidden_size),
      f"vit_model.vision_model.encoder.layers.{v.num_layers - 1}.mlp.fc1.weight":
          (v.mlp_dim, v.hidden_size),
      "vit_model.vision_model.post_layernorm.bias": (v.hidden_size,),
      "connector.fc1.weight": (c.hidden_size, v.hidden_size),
      "time_embedder.mlp.0.weight": (c.hidden_size, 256),
      "time_embedder.mlp.2.bias": (c.hidden_size,),
      "vae2llm.weight": (c.hidden_size, CFG.latent_channels),
      "llm2vae.weight": (CFG.latent_channels, c.hidden_size),
      "latent_pos_embed.pos_embed": (CFG.max_latent_size ** 2, c.hidden_size),
      "vit_pos_embed.pos_embed": (v.max_patches_per_side ** 2, c.hidden_size),
  }
  for key, shape in expected_shapes.items():
    assert tuple(ema[key].shape) == shape, key
  assert not any(k.startswith(("encoder.", "decoder.")) for k in ema)
  assert all(k.startswith(("encoder.", "decoder.")) for k in ae)
  assert tuple(ae["encoder.conv_in.weight"].shape) == (CFG.vae.ch, 3, 3, 3)
  # PyTorch layout: Linear weights are (out, in).
  np.testing.assert_array_equal(ema["llm2vae.weight"].numpy(),
                                bagel_params(source)["llm2vae.kernel"].T)
  np.testing.assert_array_equal(
      ema["latent_pos_embed.pos_embed"].numpy(),
      layers.sincos_2d_table(c.hidden_size, CFG.max_latent_size))
  assert ema["vit_pos_embed.pos_embed"].dtype == torch.float32

  llm = Qwen2Config.from_json_file(os.path.join(exported, "llm_config.json"))
  assert (llm.hidden_size, llm.num_hidden_layers, llm.num_key_value_heads) == (
      c.hidden_size, c.num_layers, c.num_kv_heads)
  assert llm.qk_norm is True and llm.layer_module == "Qwen2MoTDecoderLayer"
  vit = SiglipVisionConfig.from_json_file(os.path.join(exported, "vit_config.json"))
  assert vit.num_hidden_layers == v.num_layers + 1  # BAGEL drops the last layer on load
  assert vit.image_size == v.max_patches_per_side * v.patch_size
  assert vit.hidden_act == "gelu_pytorch_tanh"


def test_llm_subtree_equals_direct_qwen2_load(exported, loaded, bagel_params):
  qwen = nnx.eval_shape(lambda: qwen2_mot.Qwen2MoT(CFG.llm, rngs=nnx.Rngs(0)))
  llm_keys.load_llm(os.path.join(exported, "ema.safetensors"), qwen,
                    torch_prefix="language_model.")
  direct = bagel_params(qwen)
  sub = {p[len("language_model."):]: a for p, a in bagel_params(loaded).items()
         if p.startswith("language_model.")}
  assert direct.keys() == sub.keys()
  for k in direct:
    np.testing.assert_array_equal(direct[k], sub[k], err_msg=k)


def test_sharded_import_places_each_parameter(source, exported, assert_same_params):
  mesh = sharding.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
  model = bagel_dir.load_model_dir(exported, mesh=mesh)
  expected = sharding.state_shardings(nnx.state(model, nnx.Param), bagel.COMPONENTS, mesh)
  flat_expected = kt.flat_paths(expected)
  variables = loader.param_variables(model)
  sharded = 0
  for path, variable in variables.items():
    value = variable.get_value()
    assert value.sharding.is_equivalent_to(flat_expected[path], value.ndim), path
    sharded += not value.sharding.is_fully_replicated
  assert sharded > len(variables) // 3  # the LLM's matrices really are split
  kernel = variables["language_model.layers.und.mlp.up_proj.kernel"].get_value()
  assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
  assert_same_params(source, model)


def test_stacked_layers_are_addressed_per_layer(source):
  """Key tables see layer i of a stacked parameter at its per-layer path."""
  slots = loader.layer_slots(loader.param_variables(source))
  last = CFG.llm.num_layers - 1
  assert slots[f"language_model.layers.{last}.gen.mlp.up_proj.kernel"] == loader.Slot(
      "language_model.layers.gen.mlp.up_proj.kernel", last)
  assert slots["vit_model.encoder.layers.1.attn.q.kernel"] == loader.Slot(
      "vit_model.encoder.layers.attn.q.kernel", 1)
  assert slots["language_model.lm_head.kernel"] == loader.Slot("language_model.lm_head.kernel")
  assert "language_model.layers.gen.mlp.up_proj.kernel" not in slots


def test_export_from_a_mesh_is_bit_identical(source, exported, tmp_path, read_tensors):
  """Each layer of a sharded stacked parameter is cut out on the devices and gathered alone."""
  mesh = sharding.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
  model = bagel_dir.load_model_dir(exported, mesh=mesh)
  back = bagel_export.save_model_dir(model, str(tmp_path / "back"))
  for name in ("ema.safetensors", "ae.safetensors"):
    a, b = read_tensors(os.path.join(exported, name)), read_tensors(os.path.join(back, name))
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_orbax_checkpoint_of_unstacked_layers_restores(source, tmp_path, assert_same_params):
  """An Orbax model checkpoint written before the layers were stacked (one array per layer)
  restores into the stacked model, with and without a mesh."""
  import orbax.checkpoint as ocp

  from robust_u1_jax.checkpoints import orbax_io

  stacked = orbax_io.save_orbax(source, str(tmp_path / "stacked"))
  variables = loader.param_variables(source)
  per_layer = {}
  for p, s in loader.layer_slots(variables).items():
    value = np.asarray(variables[s.path].get_value())
    per_layer[p] = value if s.layer is None else value[s.layer]
  legacy = tmp_path / "legacy"
  shutil.copytree(stacked, legacy)
  shutil.rmtree(legacy / orbax_io.PARAMS)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(str(legacy / orbax_io.PARAMS), orbax_io._nested(per_layer))
    checkpointer.wait_until_finished()
  assert_same_params(source, orbax_io.load_orbax(str(legacy)))
  mesh = sharding.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
  restored = orbax_io.load_orbax(str(legacy), mesh=mesh)
  kernel = restored.language_model.layers.und.mlp.up_proj.kernel.get_value()
  assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
  assert_same_params(source, restored)


# -- alternative weight files ----------------------------------------------------------------------


def test_model_safetensors_and_sharded_index_load(source, tmp_path, variant, read_tensors,
                                                  assert_same_params):
  raw = variant()
  os.rename(os.path.join(raw, "ema.safetensors"), os.path.join(raw, "model.safetensors"))
  assert_same_params(source, bagel_dir.load_model_dir(raw))

  index_dir = str(tmp_path / "index")
  shutil.copytree(raw, index_dir)
  tensors = read_tensors(os.path.join(index_dir, "model.safetensors"))
  os.remove(os.path.join(index_dir, "model.safetensors"))
  keys = sorted(tensors)
  weight_map = {}
  for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:])):
    name = f"model-{i + 1:05d}-of-00002.safetensors"
    tensor_files.save_safetensors({k: tensors[k] for k in part}, os.path.join(index_dir, name))
    weight_map.update({k: name for k in part})
  index = os.path.join(index_dir, "model.safetensors.index.json")
  with open(index, "w") as f:
    json.dump({"metadata": {}, "weight_map": weight_map}, f)
  assert_same_params(source, bagel_dir.load_model_dir(index_dir))
  # A shard's tensor is named with the shard's path; a shard missing, with the index naming it.
  second = os.path.join(index_dir, "model-00002-of-00002.safetensors")
  part = read_tensors(second)
  tensor_files.save_safetensors({k: v.astype(np.int32) for k, v in part.items()}, second)
  with pytest.raises(CheckpointError, match=rf"^{re.escape(second)}: tensor '.*' holds int32"):
    bagel_dir.load_model_dir(index_dir)
  os.remove(second)
  with pytest.raises(FileNotFoundError, match=rf"not found: {re.escape(second)}, a shard that "
                     rf"{re.escape(index)} lists"):
    bagel_dir.load_model_dir(index_dir)


def test_a_folder_of_two_weight_files_says_which_it_reads(variant, caplog):
  # Robust-U1's model_bf16.safetensors copied beside BAGEL's ema.safetensors loaded BAGEL, and
  # nothing said so.
  both = variant()
  shutil.copy(os.path.join(both, "ema.safetensors"), os.path.join(both, "model_bf16.safetensors"))
  for _ in range(2):
    assert bagel_dir.find_weight_file(both) == os.path.join(both, "ema.safetensors")
  notes = [r.getMessage() for r in caplog.records if "weight files" in r.getMessage()]
  assert notes == [f"{os.path.abspath(both)} holds 2 weight files: reading ema.safetensors, not "
                   f"model_bf16.safetensors (this order: {', '.join(bagel_dir.WEIGHT_FILES)}); "
                   "move the one you mean into a folder of its own if it is another"]


def test_sincos_tables_are_optional(source, variant, assert_same_params):
  def drop(t):
    del t["latent_pos_embed.pos_embed"], t["vit_pos_embed.pos_embed"]

  assert_same_params(source, bagel_dir.load_model_dir(variant(drop)))


def test_plain_qwen2_llm_config_takes_mot_and_qk_norm_from_the_keys(source, variant,
                                                                    assert_same_params):
  # BAGEL-7B-MoT ships Qwen2.5's config unchanged; its code sets qk_norm and layer_module.
  out = variant()
  file = os.path.join(out, "llm_config.json")
  with open(file) as f:
    llm = json.load(f)
  del llm["qk_norm"], llm["layer_module"]
  with open(file, "w") as f:
    json.dump(llm, f)
  model = bagel_dir.load_model_dir(out)
  assert model.config.llm.mot and model.config.llm.qk_norm
  assert_same_params(source, model)


def test_pickle_needs_opt_in(source, variant, read_tensors, assert_same_params):
  import torch

  out = variant()
  tensors = read_tensors(os.path.join(out, "ema.safetensors"))
  os.remove(os.path.join(out, "ema.safetensors"))
  torch.save({k: torch.from_numpy(v) for k, v in tensors.items()},
             os.path.join(out, "pytorch_model.bin"))
  with pytest.raises(ValueError, match="pytorch_model.bin.*allow_pickle"):
    bagel_dir.load_model_dir(out)
  assert_same_params(source, bagel_dir.load_model_dir(out, allow_pickle=True))


# -- errors ----------------------------------------------------------------------------------------

_KEY = "language_model.model.layers.1.mlp_moe_gen.up_proj.weight"


def _missing(t):
  del t[_KEY]


def _unexpected(t):
  t["language_model.model.layers.7.mlp.up_proj.weight"] = np.zeros((4, 4), np.float32)


def _misshapen(t):
  t[_KEY] = t[_KEY][:, :-1].copy()


def _integers(t):
  t[_KEY] = t[_KEY].astype(np.int32)


@pytest.mark.parametrize("edit, key, words", [
    (_missing, _KEY, "missing"),
    (_unexpected, "language_model.model.layers.7.mlp.up_proj.weight", "unexpected"),
    (_misshapen, _KEY, "shape"),
    (_integers, _KEY, "holds int32 values, but the model's"),  # converted without a word
])
def test_bad_ema_tensor_names_key_and_file(edit, key, words, variant):
  with pytest.raises(CheckpointError) as e:
    bagel_dir.load_model_dir(variant(edit_ema=edit))
  message = str(e.value)
  assert key in message and "ema.safetensors" in message and words in message
  assert "more layers than the weights hold" not in message  # a key of a layer it holds


def test_bad_vae_tensor_names_key_and_file(variant):
  def edit(t):
    t["decoder.conv_out.weight"] = t["decoder.conv_out.weight"][:, :-1].copy()

  with pytest.raises(CheckpointError, match=r"ae\.safetensors.*decoder\.conv_out\.weight.*shape"):
    bagel_dir.load_model_dir(variant(edit_ae=edit))


def test_a_misfit_names_the_shape_in_the_file_and_the_configs_it_was_read_against(variant):
  # up_proj is (intermediate, hidden) in the file and transposed for the model: the message
  # compares shapes as the file stores them, which a user can look up, the model's layout after.
  stored = wanted = None

  def edit(t):
    nonlocal stored, wanted
    wanted = t[_KEY].shape
    t[_KEY] = t[_KEY][:, :-1].copy()
    stored = t[_KEY].shape

  misshapen = variant(edit_ema=edit)
  with pytest.raises(CheckpointError) as e:
    bagel_dir.load_model_dir(misshapen)
  message = str(e.value)
  assert (f"has shape {tuple(stored)}, but the model's 'language_model.layers.1.gen.mlp.up_proj."
          f"kernel' expects {tuple(wanted)} there ({tuple(wanted[::-1])} in the model's "
          "layout)") in message
  assert "read from" in message and "llm_config.json, vit_config.json and " in message
  # A config that does not describe the weights: the same line names the configs.
  shutil.rmtree(misshapen)
  out = variant()
  with open(os.path.join(out, "llm_config.json")) as f:
    llm = json.load(f)
  llm["intermediate_size"] += 8
  with open(os.path.join(out, "llm_config.json"), "w") as f:
    json.dump(llm, f)
  with pytest.raises(CheckpointError, match=r"expects .* \(the model's shapes are read from .*"
                     r"llm_config.json"):
    bagel_dir.load_model_dir(out)


def test_a_config_of_more_layers_than_the_weights_says_so(variant):
  """It listed the extra layer's every tensor (2,438 characters for one layer) and no cause."""
  out = variant()
  with open(os.path.join(out, "llm_config.json")) as f:
    llm = json.load(f)
  last = llm["num_hidden_layers"]
  llm["num_hidden_layers"] += 1
  with open(os.path.join(out, "llm_config.json"), "w") as f:
    json.dump(llm, f)
  with pytest.raises(CheckpointError, match=rf"tensor\(s\) missing from the checkpoint, all of "
                     rf"layer {last}, past its last \(the model's config describes more layers "
                     r"than the weights hold\): language_model\.model\.layers\.") as e:
    bagel_dir.load_model_dir(out)
  assert len(str(e.value)) < 1500


def test_a_small_model_without_its_extra_config_says_what_was_assumed(variant):
  # Without robust_u1_config.json the tiny model reads as BAGEL-7B's image side (the FLUX VAE).
  out = variant()
  os.remove(os.path.join(out, bagel_dir.EXTRA_CONFIG))
  with pytest.raises(CheckpointError, match=r"shape.* \(the model's shapes are read from .*"
                     r"llm_config.json, vit_config.json and, as .* has no robust_u1_config.json, "
                     r"BAGEL-7B's image shapes were assumed: the FLUX VAE, latent patch 2"):
    bagel_dir.load_model_dir(out)


@pytest.mark.parametrize("name", ["ae.safetensors", "llm_config.json", "ema.safetensors"])
def test_missing_file_is_named(name, variant):
  out = variant()
  os.remove(os.path.join(out, name))
  with pytest.raises(FileNotFoundError, match=name.split(".")[0]):
    bagel_dir.load_model_dir(out)


def test_save_refuses_existing_and_leaves_nothing_on_failure(source, exported, tmp_path, variant):
  with pytest.raises(FileExistsError, match="overwrite"):
    bagel_export.save_model_dir(source, exported)
  target = tmp_path / "fails"
  with pytest.raises(FileNotFoundError, match="tokenizer"):
    bagel_export.save_model_dir(source, str(target), tokenizer_dir=str(tmp_path / "nowhere"))
  assert os.listdir(tmp_path) == []  # neither the target nor a temp directory is left behind
  copy = variant()
  bagel_export.save_model_dir(source, copy, overwrite=True)
  assert "tokenizer.json" not in os.listdir(copy)  # replaced as a whole, not merged
  assert sorted(os.listdir(tmp_path)) == ["variant"]


def test_config_dict_round_trip():
  config = bagel.BagelConfig.tiny(dtype=jnp.bfloat16, remat="dots")
  back = bagel_dir.config_from_dict(json.loads(json.dumps(bagel_dir.config_to_dict(config))))
  assert back == config
  with pytest.raises(ValueError, match="hidden_sise"):
    d = bagel_dir.config_to_dict(config)
    d["llm"]["hidden_sise"] = 3
    bagel_dir.config_from_dict(d, source="x.json")


@pytest.mark.torch_ref
def test_save_safetensors_streams_any_tensor(tmp_path):
  """The one safetensors writer: a dict or (name, array) pairs, lazy tensors fetched and cast on
  write, 0-d and Fortran-ordered arrays, bfloat16; what torch's reader gets back is the same."""
  import ml_dtypes
  from safetensors.torch import load_file

  path = str(tmp_path / "t.safetensors")
  fetched = []
  lazy = tensor_files.LazyTensor((2, 2), np.dtype(ml_dtypes.bfloat16),
                                 lambda: fetched.append(1) or np.full((2, 2), 1.5, np.float32))
  tensors = [("scalar", np.array(2.5, np.float32)), ("lazy", lazy),
             ("fortran", np.asfortranarray(np.arange(6, dtype=np.int64).reshape(2, 3)))]
  tensor_files.save_safetensors(tensors, path)
  assert fetched == [1]
  back = load_file(path)
  assert tuple(back["scalar"].shape) == () and float(back["scalar"]) == 2.5
  assert str(back["lazy"].dtype) == "torch.bfloat16" and back["lazy"].float().eq(1.5).all()
  np.testing.assert_array_equal(back["fortran"].numpy(), np.arange(6).reshape(2, 3))
  tensor_files.save_safetensors({"x": np.zeros(3, np.float16)}, path)  # a dict; replaces the file
  assert list(load_file(path)) == ["x"]
  bad = tensor_files.LazyTensor((2,), np.dtype(np.float32), lambda: np.zeros(3))
  with pytest.raises(CheckpointError, match="'bad' has shape"):
    tensor_files.save_safetensors([("bad", bad)], path)
  assert sorted(os.listdir(tmp_path)) == ["t.safetensors"]  # no temp file left behind
  with pytest.raises(ValueError, match="dtype object"):
    tensor_files.save_safetensors({"o": np.array([None])}, path)


def test_a_conv_weight_of_another_rank_names_its_key_and_shape(variant):
  # The conv's layout change (a transpose of four axes) met a 2-D tensor first: a traceback
  # ending "axes don't match array", or that line alone from `recover`.
  def edit(t):
    t["decoder.conv_out.weight"] = t["decoder.conv_out.weight"][:, :, 0, 0].copy()

  with pytest.raises(CheckpointError, match=r"ae\.safetensors: tensor 'decoder\.conv_out\.weight' "
                     r"has shape \(\d+, \d+\), but the model's .* expects \(\d+, \d+, 3, 3\)"):
    bagel_dir.load_model_dir(variant(edit_ae=edit))


def test_a_renamed_key_is_named_both_as_unexpected_and_as_missing(variant):
  # Only the unexpected half was named: the key the model looked for was left to guess.
  renamed = _KEY.replace("up_proj", "up_projj")

  def edit(t):
    t[renamed] = t.pop(_KEY)

  with pytest.raises(CheckpointError) as e:
    bagel_dir.load_model_dir(variant(edit_ema=edit))
  message = str(e.value)
  assert f"1 unexpected tensor(s) that the model has no place for: {renamed} (in " in message
  assert f"; and 1 tensor(s) missing from the checkpoint: {_KEY} (model path " in message


def test_weights_of_more_layers_than_the_config_says_so(variant):
  # The reverse of the test above this one's neighbour: it listed the layer's every tensor.
  out = variant()
  with open(os.path.join(out, "llm_config.json")) as f:
    llm = json.load(f)
  llm["num_hidden_layers"] -= 1
  with open(os.path.join(out, "llm_config.json"), "w") as f:
    json.dump(llm, f)
  with pytest.raises(CheckpointError, match=rf"unexpected tensor\(s\) that the model has no place "
                     rf"for, all of layer {llm['num_hidden_layers']}, past the model's last \(the "
                     r"weights hold more layers than the model's config describes\): "):
    bagel_dir.load_model_dir(out)


@pytest.mark.parametrize("name, text, words", [
    # Valid JSON of another kind met `.get` deep in the config's reading: a traceback.
    ("llm_config.json", "[1, 2]", "a JSON list, not an object of fields"),
    ("vit_config.json", "[1, 2]", "a JSON list, not an object of fields"),
    (bagel_dir.EXTRA_CONFIG, "[1, 2]", "a JSON list, not an object of fields"),
    ("image_rules.json", '{"vae_max_side": "x"}',
     "field 'vae_max_side' = \"x\": not a whole number >= 1"),  # int()'s own words, no field
])
def test_a_config_file_of_another_kind_is_named(variant, name, text, words):
  out = variant()
  with open(os.path.join(out, name), "w") as f:
    f.write(text)
  from robust_u1_jax.inference import images

  # The image rules are read by the engine, not by the weights' loader.
  read = images.ImageRules.for_model_dir if name == "image_rules.json" else bagel_dir.load_model_dir
  with pytest.raises(ValueError, match=re.escape(f"{os.path.join(out, name)}: {words}")):
    read(out)


@pytest.mark.parametrize("index", [{"metadata": {}}, {"weight_map": []},
                                   {"weight_map": {"a": 3}}])
def test_an_index_without_its_weight_map_is_named(tmp_path, index):
  # It was a KeyError's traceback: 'weight_map'.
  path = tmp_path / "model.safetensors.index.json"
  path.write_text(json.dumps(index))
  with pytest.raises(ValueError, match=re.escape(f"{path}: ")) as e:
    tensor_files.open_tensor_files(str(path))
  assert "weight_map" in str(e.value)
