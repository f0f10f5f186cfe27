"""FLUX autoencoder: parity with diffusers AutoencoderKL through the real ae.safetensors loader."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from flax import nnx
from safetensors.numpy import load_file
from safetensors.torch import save_file

from robust_u1_jax import sharding
from robust_u1_jax.checkpoints import key_table as kt
from robust_u1_jax.checkpoints import vae_keys
from robust_u1_jax.models import vae

CFG = vae.VAEConfig.tiny()
SIZES = ((32, 32), (40, 56))  # (H, W); the second is non-square.
B = 4  # divisible by the fsdp axis of the sharding test, which reuses the single-device compiles.

encoder_fn = jax.jit(lambda m, x: m.encoder(x))
decoder_fn = jax.jit(lambda m, z: m.decoder(z))
encode_fn = jax.jit(lambda m, x, key=None: m.encode(x, key))
decode_fn = jax.jit(lambda m, z: m.decode(z))


def torch_vae(seed: int = 0) -> AutoencoderKL:
  """diffusers AutoencoderKL in the FLUX layout at the tiny config, every tensor random."""
  torch.manual_seed(seed)
  n = len(CFG.ch_mult)
  model = AutoencoderKL(
      in_channels=CFG.in_channels, out_channels=CFG.out_ch,
      down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
      block_out_channels=CFG.block_channels, layers_per_block=CFG.num_res_blocks,
      latent_channels=CFG.z_channels, norm_num_groups=CFG.num_groups,
      scaling_factor=CFG.scale_factor, shift_factor=CFG.shift_factor,
      use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=True)
  with torch.no_grad():  # GroupNorm starts at (1, 0) and would hide a scale/bias mix-up.
    for name, p in model.named_parameters():
      if "norm" in name:
        p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn_like(p))
  return model.eval()


def images(b: int, h: int, w: int, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).uniform(-1, 1, (b, h, w, CFG.in_channels)).astype(np.float32)


def to_torch(x_bhwc: np.ndarray) -> torch.Tensor:
  return torch.from_numpy(np.ascontiguousarray(x_bhwc.transpose(0, 3, 1, 2)))


def to_nhwc(t: torch.Tensor) -> np.ndarray:
  return t.detach().numpy().transpose(0, 2, 3, 1)


def rngs() -> nnx.Rngs:
  # XLA:CPU compiles the default (threefry) generator very slowly: tens of seconds for a model's
  # worth of kernels. The VAE's weights come from checkpoints, so any generator will do.
  return nnx.Rngs(jax.random.key(0, impl="unsafe_rbg"))


_ABSTRACT = []


def abstract_model() -> vae.AutoEncoder:
  """A fresh shape-only model (traced once; each call returns an independent copy)."""
  if not _ABSTRACT:
    _ABSTRACT.append(nnx.eval_shape(lambda: vae.AutoEncoder(CFG, rngs=rngs())))
  return nnx.clone(_ABSTRACT[0])


def assert_close(got, want):
  want = np.asarray(want)
  scale = max(1.0, np.abs(want).max())
  np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-4 * scale)


@pytest.fixture(scope="module")
def reference():
  return torch_vae()


@pytest.fixture(scope="module")
def ae_file(reference, tmp_path_factory):
  path = str(tmp_path_factory.mktemp("vae") / "ae.safetensors")
  flux = vae_keys.diffusers_to_flux_keys(reference.state_dict())
  save_file({k: v.contiguous() for k, v in flux.items()}, path)
  return path


@pytest.fixture(scope="module")
def model(ae_file):
  m = abstract_model()
  assert vae_keys.load_vae(ae_file, m) == "flux"
  return m


@pytest.mark.torch_ref
@pytest.mark.parametrize("hw", SIZES)
def test_encoder_moments_match_diffusers(reference, model, hw):
  x = images(B, *hw, seed=hw[1])
  with torch.no_grad():
    dist = reference.encode(to_torch(x)).latent_dist
  moments = encoder_fn(model, x)
  assert moments.shape == (B, hw[0] // 8, hw[1] // 8, 2 * CFG.z_channels)
  mean, logvar = np.split(np.asarray(moments), 2, axis=-1)
  assert_close(mean, to_nhwc(dist.mean))
  assert_close(logvar, to_nhwc(dist.logvar))


@pytest.mark.torch_ref
@pytest.mark.parametrize("hw", SIZES)
def test_decoder_matches_diffusers(reference, model, hw):
  z = np.random.default_rng(1).normal(size=(B, hw[0] // 8, hw[1] // 8, CFG.z_channels))
  z = z.astype(np.float32)
  with torch.no_grad():
    want = to_nhwc(reference.decode(to_torch(z)).sample)
  got = decoder_fn(model, z)
  assert got.shape == (B, *hw, CFG.out_ch)
  assert_close(got, want)


@pytest.mark.torch_ref
def test_scale_and_shift_follow_the_flux_convention(reference, model):
  """encode = scale * (mean - shift); decode = decoder(z / scale + shift), as FLUX pipelines do."""
  x = images(B, *SIZES[1], seed=3)
  z = np.asarray(encode_fn(model, x))
  with torch.no_grad():
    mean = to_nhwc(reference.encode(to_torch(x)).latent_dist.mean)
    want_z = (mean - reference.config.shift_factor) * reference.config.scaling_factor
    want_x = to_nhwc(reference.decode(
        to_torch(z / reference.config.scaling_factor + reference.config.shift_factor)).sample)
  assert_close(z, want_z)
  assert_close(decode_fn(model, z), want_x)
  raw = np.random.default_rng(2).normal(size=(3, 4)).astype(np.float32)
  np.testing.assert_allclose(
      vae.denormalize_latent(vae.normalize_latent(raw, CFG), CFG), raw, rtol=1e-6, atol=1e-6)


def test_encode_with_key_samples_the_posterior(model):
  x = images(B, *SIZES[1], seed=4)
  mean, logvar = np.split(np.asarray(encoder_fn(model, x)), 2, axis=-1)
  a, b, c = (np.asarray(encode_fn(model, x, jax.random.key(k, impl="unsafe_rbg")))
             for k in (0, 0, 1))
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c) and not np.allclose(a, vae.normalize_latent(mean, CFG))
  # Standardised back to noise: zero mean, unit variance.
  eps = (vae.denormalize_latent(a, CFG) - mean) / np.exp(0.5 * logvar)
  assert abs(eps.mean()) < 0.3 and 0.7 < eps.std() < 1.3


def test_export_round_trips_the_file(ae_file, model):
  source = load_file(ae_file)
  exported = vae_keys.export_vae(model)
  assert set(exported) == set(source)
  for key, value in source.items():
    np.testing.assert_array_equal(exported[key], value, err_msg=key)


@pytest.mark.torch_ref
def test_diffusers_naming_loads_directly(reference, model, tmp_path):
  path = str(tmp_path / "diffusion_pytorch_model.safetensors")
  save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, path)
  m = abstract_model()
  assert vae_keys.load_vae(path, m) == "diffusers"
  want = kt.flat_paths(nnx.state(model, nnx.Param))
  for p, v in kt.flat_paths(nnx.state(m, nnx.Param)).items():
    np.testing.assert_array_equal(np.asarray(v.get_value()), np.asarray(want[p].get_value()), p)


def test_diffusers_up_blocks_are_reversed_and_attention_becomes_1x1():
  sd = torch_vae().state_dict()
  flux = vae_keys.diffusers_to_flux_keys(sd)
  # up_blocks.0 is the lowest resolution (upsamples), LDM's last level; full resolution has none.
  assert torch.equal(flux["decoder.up.3.upsample.conv.weight"],
                     sd["decoder.up_blocks.0.upsamplers.0.conv.weight"])
  assert torch.equal(flux["decoder.up.0.block.0.nin_shortcut.weight"],
                     sd["decoder.up_blocks.3.resnets.0.conv_shortcut.weight"])
  assert "decoder.up.0.upsample.conv.weight" not in flux
  assert flux["encoder.mid.attn_1.proj_out.weight"].shape == (16, 16, 1, 1)
  assert flux["decoder.norm_out.bias"] is sd["decoder.conv_norm_out.bias"]


def test_loader_errors_name_key_file_and_shape(ae_file, model, tmp_path):
  source = load_file(ae_file)
  bad = dict(source, **{"encoder.conv_in.weight": np.zeros((8, 3, 5, 5), np.float32),
                        "decoder.conv_in.bias": np.zeros(16, np.float32)})
  loaded = nnx.clone(model)
  with pytest.raises(kt.CheckpointError, match=r"encoder\.conv_in\.weight' has shape \(8, 3, 5, "
                     r"5\), but .* expects \(8, 3, 3, 3\) there \(\(3, 3, 3, 8\) in the model's"):
    vae_keys.load_vae(bad, loaded)
  # Nothing was assigned before the error.
  np.testing.assert_array_equal(loaded.decoder.conv_in.bias[...], source["decoder.conv_in.bias"])
  missing = {k: v for k, v in source.items() if k != "decoder.mid.attn_1.q.bias"}
  path = str(tmp_path / "short.safetensors")
  save_file({k: torch.from_numpy(v) for k, v in missing.items()}, path)
  with pytest.raises(kt.CheckpointError,
                     match=r"short\.safetensors.*decoder\.mid\.attn_1\.q\.bias"):
    vae_keys.load_vae(path, abstract_model())
  with pytest.raises(kt.CheckpointError, match="quant_conv"):
    vae_keys.diffusers_to_flux_keys({"quant_conv.weight": np.zeros((8, 8, 1, 1))})
  with pytest.raises(kt.CheckpointError, match="no autoencoder"):
    vae_keys.load_vae({"foo.weight": np.zeros(2)}, abstract_model())


def test_config_contract():
  flux = vae.VAEConfig.flux()
  assert flux.downsample == 8 and CFG.downsample == 8 and flux.z_channels == 16
  assert flux.block_channels == (128, 256, 512, 512)
  with pytest.raises(ValueError, match="num_groups 32 does not divide"):
    vae.VAEConfig(ch=8)
  with pytest.raises(ValueError, match="multiples of 8"):
    abstract_model().latent_dist(jnp.zeros((1, 30, 32, 3)))


def test_sharded_encode_decode_match_single_device(ae_file, model):
  mesh = sharding.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
  sharded = sharding.create_sharded(lambda: vae.AutoEncoder(CFG, rngs=rngs()), "vae", mesh)
  vae_keys.load_vae(ae_file, sharded)  # keeps the placement create_sharded chose
  direct = abstract_model()
  vae_keys.load_vae(ae_file, direct, mesh=mesh)  # placed while loading, no random init
  spec = jax.sharding.PartitionSpec(None, None, None, "fsdp")
  for m in (sharded, direct):
    assert m.encoder.down[1].block[0].conv1.kernel[...].sharding.spec == spec
    # 3 output channels do not split 4 ways: replicated.
    assert not any(m.decoder.conv_out.kernel[...].sharding.spec)
  x = images(B, *SIZES[1], seed=3)
  z = np.random.default_rng(8).normal(size=(B, 5, 7, CFG.z_channels)).astype(np.float32)
  want_z, want_x = encode_fn(model, x), decode_fn(model, z)
  for m in (sharded, direct):
    with jax.set_mesh(mesh):
      got_z, got_x = encode_fn(m, x), decode_fn(m, z)
    np.testing.assert_allclose(np.asarray(got_z), np.asarray(want_z), atol=1e-5)
    np.testing.assert_allclose(np.asarray(got_x), np.asarray(want_x), atol=1e-5)


def test_chunked_attention_matches_full(monkeypatch):
  q, k, v = np.random.default_rng(9).normal(size=(3, 2, 32, 8)).astype(np.float32)
  # Fresh lambdas: a jit of the function itself would reuse the unchunked trace.
  full = jax.jit(lambda *a: vae.spatial_attention(*a))(q, k, v)
  monkeypatch.setattr(vae, "ATTENTION_CHUNK", 8)  # read at trace time: 4 chunks of 8 queries
  assert "scan" in str(jax.make_jaxpr(vae.spatial_attention)(q, k, v))
  chunked = jax.jit(lambda *a: vae.spatial_attention(*a))(q, k, v)
  np.testing.assert_allclose(np.asarray(chunked), np.asarray(full), rtol=1e-5, atol=1e-6)
