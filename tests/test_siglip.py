"""SigLIP NaViT tower + BAGEL connector: transformers parity, BAGEL import, packing, sharding."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.torch import save_file
from transformers import SiglipVisionConfig, SiglipVisionModel

from robust_u1_jax import sharding
from robust_u1_jax.checkpoints import key_table as kt
from robust_u1_jax.checkpoints import vit_keys
from robust_u1_jax.models import siglip

CFG = siglip.SiglipConfig.tiny()
P, S = CFG.patch_size, CFG.max_patches_per_side
LLM_HIDDEN = 48


def hf_model(grid: int, seed: int = 0) -> SiglipVisionModel:
  """transformers SigLIP whose position table covers grid x grid patches, all weights random."""
  torch.manual_seed(seed)
  config = SiglipVisionConfig(
      hidden_size=CFG.hidden_size, intermediate_size=CFG.mlp_dim, num_hidden_layers=CFG.num_layers,
      num_attention_heads=CFG.num_heads, patch_size=P, image_size=grid * P,
      hidden_act="gelu_pytorch_tanh", layer_norm_eps=CFG.layer_norm_eps, vision_use_head=False)
  model = SiglipVisionModel(config).eval()
  with torch.no_grad():
    for p in model.parameters():  # LayerNorms start at 1/0: randomise them too.
      p.add_(0.1 * torch.randn_like(p))
  return model


def hf_state(model, prefix: str = "vision_model.") -> dict[str, torch.Tensor]:
  """Hub layout (`vision_model.` prefix) by default; transformers 5 saves SiglipVisionModel bare."""
  return {prefix + k: v.contiguous() for k, v in model.state_dict().items()}


def bagel_state(model, connector: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
  """The same weights as BAGEL saves them: Linear patch embedding (BAGEL's conversion), prefixes."""
  out = {}
  for k, v in hf_state(model).items():
    if k.endswith("embeddings.patch_embedding.weight"):
      v = v.permute(0, 2, 3, 1).reshape(v.shape[0], -1).contiguous()  # convert_conv2d_to_linear
    out["vit_model." + k] = v
  out.update({"connector." + k: v for k, v in connector.items()})
  return out


def mae_sincos_2d(embed_dim: int, grid_size: int) -> np.ndarray:
  """BAGEL's `get_2d_sincos_pos_embed` (the MAE recipe), the reference for `vit_pos_embed`."""
  def one_d(dim, pos):
    omega = np.arange(dim // 2, dtype=np.float32) / (dim / 2.0)
    omega = 1.0 / 10000 ** omega
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)
  grid = np.stack(np.meshgrid(np.arange(grid_size, dtype=np.float32),
                              np.arange(grid_size, dtype=np.float32)), axis=0)
  return np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)


def new_tower():
  return siglip.SiglipVisionTower(CFG, rngs=nnx.Rngs(0))


def load(tensors, tmp_path, name, connector=None):
  path = str(tmp_path / name)
  save_file(tensors, path)
  tower = new_tower()
  naming = vit_keys.load_siglip(path, tower, connector)
  return tower, naming


LENGTH = 32  # every test packs to this length, so one compiled forward serves them all
FORWARD = jax.jit(lambda m, *a: m(*a))


def pack_row(images, length: int = LENGTH) -> dict[str, np.ndarray]:
  """Packs several (H, W, 3) images into one NaViT row, as the model's row builder lays them out:
  `patches` (L, 3 p p), `position_ids` (L,), `segment_ids` (L,) with image k (from 1) marked k and
  padding 0, and `num_patches` (K,)."""
  parts = [siglip.patchify(np.asarray(im, np.float32), P, S) for im in images]
  counts = np.array([len(p) for p, _ in parts], np.int32)
  assert counts.sum() <= length
  patches = np.zeros((length, 3 * P * P), np.float32)
  position_ids = np.zeros((length,), np.int32)
  segment_ids = np.zeros((length,), np.int32)
  start = 0
  for k, (p, pos) in enumerate(parts):
    patches[start:start + len(p)] = p
    position_ids[start:start + len(p)] = pos
    segment_ids[start:start + len(p)] = k + 1
    start += len(p)
  return dict(patches=patches, position_ids=position_ids, segment_ids=segment_ids,
              num_patches=counts)


def run_tower(tower, images):
  """Packs images into one padded row; returns the valid rows of the output and the batch."""
  batch = pack_row(images)
  out = FORWARD(tower, *(batch[k][None] for k in ("patches", "position_ids", "segment_ids")))
  return np.asarray(out[0])[:int(batch["num_patches"].sum())], batch


def image(h, w, seed):
  return np.random.default_rng(seed).uniform(-1, 1, (h * P, w * P, 3)).astype(np.float32)


@pytest.mark.torch_ref
@pytest.mark.parametrize("grid", [2, 3, 5])
def test_matches_transformers_square_images(grid, tmp_path):
  model = hf_model(grid)
  # transformers 5 saves a SiglipVisionModel without the `vision_model.` prefix: accept both.
  prefix = "" if grid == 3 else "vision_model."
  tower, naming = load(hf_state(model, prefix), tmp_path, "siglip.safetensors")
  assert naming == "hf"
  x = image(grid, grid, seed=grid)
  with torch.no_grad():
    want = model(pixel_values=torch.from_numpy(x).permute(2, 0, 1)[None]).last_hidden_state[0]
  got, _ = run_tower(tower, [x])
  scale = float(want.abs().max())
  np.testing.assert_allclose(got, want.numpy(), atol=1e-4 * scale, rtol=0)


@pytest.mark.torch_ref
def test_navit_rectangular_image_uses_grid_positions(tmp_path):
  """A 2 x 5-patch image reads position rows h*S + w of the S x S table (torch reference)."""
  model = hf_model(S)  # table of S*S rows: identical to ours
  tower, _ = load(hf_state(model), tmp_path, "siglip.safetensors")
  h, w = 2, 5
  x = image(h, w, seed=7)
  vm = model
  with torch.no_grad():
    emb = vm.embeddings.patch_embedding(torch.from_numpy(x).permute(2, 0, 1)[None])
    emb = emb.flatten(2).transpose(1, 2)
    pos = torch.tensor([i * S + j for i in range(h) for j in range(w)])
    emb = emb + vm.embeddings.position_embedding(pos)[None]
    want = vm.post_layernorm(vm.encoder(inputs_embeds=emb).last_hidden_state)[0]
  got, _ = run_tower(tower, [x])
  np.testing.assert_allclose(got, want.numpy(), atol=1e-4 * float(want.abs().max()), rtol=0)


@pytest.mark.torch_ref
def test_bagel_naming_matches_conv_naming_and_connector_matches_reference(tmp_path):
  model = hf_model(S)
  torch.manual_seed(1)
  fc1, fc2 = torch.nn.Linear(CFG.hidden_size, LLM_HIDDEN), torch.nn.Linear(LLM_HIDDEN, LLM_HIDDEN)
  connector_sd = {"fc1.weight": fc1.weight, "fc1.bias": fc1.bias, "fc2.weight": fc2.weight,
                  "fc2.bias": fc2.bias}
  connector_sd = {k: v.detach().contiguous() for k, v in connector_sd.items()}
  tensors = bagel_state(model, connector_sd)
  # BAGEL drops the fixed table on save; a checkpoint that still has it must load too.
  tensors["vit_pos_embed.pos_embed"] = torch.from_numpy(mae_sincos_2d(LLM_HIDDEN, S))
  connector = siglip.Connector(CFG.hidden_size, LLM_HIDDEN, S, rngs=nnx.Rngs(1))
  bagel_tower, naming = load(tensors, tmp_path, "ema.safetensors", connector)
  assert naming == "bagel"
  hf_tower, _ = load(hf_state(model), tmp_path, "siglip.safetensors")

  images = [image(3, 4, seed=1), image(2, 2, seed=2)]
  got, batch = run_tower(bagel_tower, images)
  want, _ = run_tower(hf_tower, images)
  np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max(), rtol=0)

  position_ids = batch["position_ids"][:len(got)]
  out = np.asarray(connector(jnp.asarray(got[None]), jnp.asarray(position_ids[None]))[0])
  with torch.no_grad():
    h = fc2(torch.nn.functional.gelu(fc1(torch.from_numpy(got)), approximate="tanh")).numpy()
  ref = h + mae_sincos_2d(LLM_HIDDEN, S)[position_ids]
  np.testing.assert_allclose(out, ref, atol=1e-4 * np.abs(ref).max(), rtol=0)

  exported = vit_keys.export_siglip(bagel_tower, connector, naming="bagel")
  assert set(exported) == set(tensors) - {"vit_pos_embed.pos_embed"}
  for k, v in exported.items():
    np.testing.assert_allclose(v, tensors[k].numpy(), atol=1e-7, err_msg=k)


def test_packed_images_match_each_image_alone(tmp_path):
  tower, _ = load(hf_state(hf_model(S)), tmp_path, "siglip.safetensors")
  a, b = image(2, 3, seed=3), image(3, 1, seed=4)
  batch = pack_row([a, b])
  np.testing.assert_array_equal(batch["num_patches"], [6, 3])
  np.testing.assert_array_equal(batch["segment_ids"], [1] * 6 + [2] * 3 + [0] * (LENGTH - 9))
  np.testing.assert_array_equal(batch["position_ids"][6:9], [0, S, 2 * S])
  packed = np.asarray(FORWARD(tower, *(batch[k][None]
                                       for k in ("patches", "position_ids", "segment_ids")))[0])
  alone_a, _ = run_tower(tower, [a])
  alone_b, _ = run_tower(tower, [b])
  np.testing.assert_allclose(packed[:6], alone_a, atol=1e-5)
  np.testing.assert_allclose(packed[6:9], alone_b, atol=1e-5)
  np.testing.assert_array_equal(packed[9:], 0)


def test_patchify_order_is_row_column_channel():
  x = np.arange(2 * P * 3 * P * 3, dtype=np.float32).reshape(2 * P, 3 * P, 3)
  patches, pos = siglip.patchify(x, P, S)
  assert patches.shape == (6, 3 * P * P)
  np.testing.assert_array_equal(pos, [0, 1, 2, S, S + 1, S + 2])
  # Patch (1, 2), pixel (row 3, col 5), channel 1.
  np.testing.assert_array_equal(patches[5].reshape(P, P, 3)[3, 5, 1], x[P + 3, 2 * P + 5, 1])
  with pytest.raises(ValueError, match="multiple of the patch size"):
    siglip.patchify(x[:-1], P, S)
  with pytest.raises(ValueError, match="at most 8 per side"):
    siglip.patchify(np.zeros((9 * P, P, 3), np.float32), P, S)


def test_from_hf_config_drops_bagel_last_layer(tmp_path):
  path = tmp_path / "vit_config.json"
  path.write_text(json.dumps(dict(
      hidden_size=1152, intermediate_size=4304, num_attention_heads=16, num_hidden_layers=27,
      patch_size=14, image_size=980, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)))
  assert siglip.SiglipConfig.from_hf_config(str(path), drop_last_layer=True) == \
      siglip.SiglipConfig.so400m()
  assert siglip.SiglipConfig.from_hf_config(str(path), drop_last_layer=False).num_layers == 27
  with pytest.raises(ValueError, match="hidden_act"):
    siglip.SiglipConfig.from_hf_config(dict(json.loads(path.read_text()), hidden_act="swish"),
                                       drop_last_layer=True)


def test_loader_errors_name_key_and_file(tmp_path):
  tensors = hf_state(hf_model(S))
  tensors["vision_model.encoder.layers.0.mlp.fc1.weight"] = torch.zeros(3, 3)
  with pytest.raises(kt.CheckpointError, match=r"bad\.safetensors.*layers\.0\.mlp\.fc1\.weight"):
    load(tensors, tmp_path, "bad.safetensors")
  with pytest.raises(kt.CheckpointError, match="no SigLIP tower"):
    load({"foo.weight": torch.zeros(2)}, tmp_path, "other.safetensors")


def test_sharded_forward_matches_single_device():
  mesh = sharding.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
  sharded = sharding.create_sharded(new_tower, "vit", mesh)
  fc1 = sharded.encoder.layers.mlp.fc1.kernel[...]  # (layers, embed, mlp)
  assert fc1.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
  rows = [pack_row([image(3, 2, seed=5 + i), image(2, 2, seed=6 + i)]) for i in range(4)]
  args = [np.stack([r[k] for r in rows]) for k in ("patches", "position_ids", "segment_ids")]
  want = FORWARD(new_tower(), *args)
  with jax.set_mesh(mesh):
    got = FORWARD(sharded, *args)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
