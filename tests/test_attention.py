"""The attention kernels (models/attention.py): the splash kernel, run in Pallas interpret mode on
the CPU, against the XLA path on packed BAGEL rows, forward and gradient; which kernel runs for
which platform, mask and inputs; the cuDNN call's wrapping; the config field."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from robust_u1_jax import config_lib
from robust_u1_jax.data import sequence
from robust_u1_jax.models import attention as attn
from robust_u1_jax.models import attention_mask as am
from robust_u1_jax.models import bagel, kv_cache, layers, qwen2_mot, splash

T = 384  # three 128-token tiles of queries, six of keys (two copies)
SFT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                   "sft.py")


def _image(side, seed):
  return np.random.RandomState(seed).randint(0, 256, (side, side, 3)).astype(np.uint8)


def _packed_rows() -> am.Layout:
  """Two rows of the model's own layout (`data/sequence.build_rows`) with every block type:
  text, ViT, clean VAE, noisy VAE (also two noisy blocks followed by text in one sample), several
  samples per row, padding."""
  canvas = (64, 64)
  recovery = [sequence.Latent(64, 64, image=0, canvas=canvas), sequence.Vit(_image(64, 0)),
              sequence.Text(list(range(3, 15))),
              sequence.Latent(64, 64, noisy=True, image=1, canvas=canvas)]
  reasoning = [sequence.Latent(64, 64, image=0, canvas=canvas), sequence.Vit(_image(32, 1)),
               sequence.Text(list(range(3, 11))), sequence.Latent(64, 64, image=1, canvas=canvas),
               sequence.Vit(_image(32, 2)), sequence.Text(list(range(3, 9)))]
  interleaved = [sequence.Text(list(range(3, 23))),
                 sequence.Latent(64, 64, noisy=True, image=0, canvas=canvas),
                 sequence.Text(list(range(3, 8))),
                 sequence.Latent(48, 48, noisy=True, image=1, canvas=canvas),
                 sequence.Text(list(range(3, 10)))]
  rows = [[recovery, reasoning, interleaved], [interleaved, recovery]]
  inputs = sequence.build_rows(rows, bagel.BagelConfig.tiny(), sequence.Markers(1, 2),
                               seq_len=T, max_vit=128, max_latent=128)
  kinds = np.asarray(inputs.token_kind)
  assert (kinds == bagel.PAD).any(axis=1).all()  # both rows end in padding
  return jax.tree.map(jnp.asarray, inputs.layout)


def _qkv(b, t, heads, kv_heads, d=8, seed=0):
  keys = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(keys[0], (b, t, heads, d))
  k = jax.random.normal(keys[1], (b, t, kv_heads, d))
  v = jax.random.normal(keys[2], (b, t, kv_heads, d))
  return q, k, v, jax.random.normal(keys[3], (b, t, heads, d))


def _output_and_grads(fn, q, k, v, cotangent):
  @jax.jit
  def run(q, k, v):
    out, vjp = jax.vjp(fn, q, k, v)
    return out, vjp(cotangent)
  return run(q, k, v)


def _assert_close(a, b, atol=2e-5):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol,
                                                       rtol=0), a, b)


def _splash_against_xla(mask, q, k, v, cotangent, mesh_shape):
  """Output and gradients on splash (interpret mode), alone or under a mesh of `mesh_shape` on 4
  devices, checked equal to xla's on the dense mask; returns splash's."""
  xla = _output_and_grads(lambda q, k, v: layers.attention(q, k, v, mask.dense()), q, k, v,
                          cotangent)
  fused = lambda q, k, v: attn.attention(q, k, v, mask, platform="tpu", interpret=True)
  if mesh_shape is None:
    ours = _output_and_grads(fused, q, k, v, cotangent)
  else:
    mesh = jax.make_mesh(mesh_shape, ("data", "fsdp", "tensor"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 3,
                         devices=jax.devices()[:4])
    with jax.set_mesh(mesh):
      ours = _output_and_grads(fused, q, k, v, cotangent)
  _assert_close(ours, xla)
  assert float(jnp.abs(xla[1][1]).max()) > 0.1  # the gradients are not trivially zero
  return ours


@pytest.mark.parametrize("mesh_shape", [None, (1, 2, 2)])
def test_splash_equals_xla_on_packed_rows(mesh_shape):
  """Forward and gradients, grouped-query heads; also sharded (rows over fsdp, heads over
  tensor) under a mesh of 4 devices."""
  layout = _packed_rows()
  mask = attn.PackedMask(layout)
  q, k, v, cotangent = _qkv(2, T, heads=4, kv_heads=2)
  ours = _splash_against_xla(mask, q, k, v, cotangent, mesh_shape)
  valid = np.asarray(mask.valid())
  np.testing.assert_array_equal(np.asarray(ours[0])[~valid], 0)  # padding attends nothing


def _key_mask(b, t, s, seed=0):
  """Valid queries and keys at random, every row with some of each; the last rows' queries all
  valid (the no-padding case)."""
  rng = np.random.RandomState(seed)
  q_valid = rng.rand(b, t) < 0.8
  k_valid = rng.rand(b, s) < 0.6
  q_valid[-1] = True
  k_valid[:, 0] = q_valid[:, 0] = True
  return attn.KeyMask(jnp.asarray(q_valid), jnp.asarray(k_valid))


@pytest.mark.parametrize("mesh_shape", [None, (1, 2, 2)])
@pytest.mark.parametrize("t,s", [(100, 300), (128, 384), (6, 133)])
def test_splash_key_mask_equals_xla(mesh_shape, t, s):
  """The KV-cache mask (valid queries see valid keys) on splash at lengths that are and are not
  multiples of 128, forward and gradients, grouped-query heads, also sharded; invalid queries
  return zeros."""
  mask = _key_mask(4, t, s)
  q, _, _, cotangent = _qkv(4, t, heads=4, kv_heads=2)
  _, k, v, _ = _qkv(4, s, heads=4, kv_heads=2, seed=1)
  ours = _splash_against_xla(mask, q, k, v, cotangent, mesh_shape)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(ours))
  np.testing.assert_array_equal(np.asarray(ours[0])[~np.asarray(mask.q_valid)], 0)


def test_key_mask_tiles_skip_all_invalid_key_tiles():
  """A row whose valid keys sit in the first tile (the short no-image context padded to the
  longest) runs its valid query tiles against that tile only."""
  blocks = splash.SplashBlocks.for_lengths(256, 512)
  assert (blocks.block_q, blocks.block_kv) == (256, 512)
  blocks = splash.SplashBlocks(128, 128, 128)
  q_seg = jnp.asarray([1] * 128 + [2] * 128, jnp.int32)
  kv_seg = jnp.asarray([1] * 12 + [2] * 116 + [2] * 256 + [1] * 100 + [2] * 28, jnp.int32)
  tiles = np.asarray(splash.key_mask_tiles(q_seg, kv_seg, blocks))
  np.testing.assert_array_equal(tiles, [[True, False, False, True],
                                        [True, True, True, True]])


def _count_splash_calls(monkeypatch) -> dict[str, int]:
  """Counts the traces of splash's two kernels: the fallback to xla is silent, so a model that
  never reached splash would compare xla with xla."""
  calls = {"packed": 0, "key_mask": 0}
  for name in calls:
    kernel = getattr(splash, name)

    def counted(*args, _name=name, _kernel=kernel, **kwargs):
      calls[_name] += 1
      return _kernel(*args, **kwargs)
    monkeypatch.setattr(splash, name, counted)
  return calls


def test_denoise_on_splash_equals_xla(monkeypatch):
  """The noisy block against cached contexts of different lengths (the guidance branches
  concatenated, shorter ones padded with invalid slots), padding latents in one row: the
  language model's denoising hidden states on splash equal xla's."""
  calls = _count_splash_calls(monkeypatch)
  config = qwen2_mot.LLMConfig.tiny(num_layers=2)
  rng = np.random.RandomState(0)

  def hidden(implementation):
    model = qwen2_mot.Qwen2MoT(dataclasses.replace(config, attention=implementation),
                               rngs=nnx.Rngs(0))

    @nnx.jit
    def run(model):
      caches = []
      for length in (40, 7):
        cache = model.init_cache(2, length)
        tokens = jnp.asarray(rng.randint(0, config.vocab_size, (2, length)))
        positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (2, length))
        causal = jnp.broadcast_to(jnp.tril(jnp.ones((length, length), bool)), (2, length, length))
        caches.append(model.prefill(cache, model.embed(tokens), positions, causal)[1])
      cache = kv_cache.concatenate(caches)
      x = jax.random.normal(jax.random.key(1), (4, 20, config.hidden_size))
      positions = jnp.broadcast_to(40 + jnp.arange(20, dtype=jnp.int32), (4, 20))
      valid = jnp.ones((4, 20), bool).at[1, 15:].set(False)
      return model.denoise(cache, x, positions, valid) * valid[..., None]
    rng.seed(0)
    return run(model)

  xla = hidden("xla")
  assert calls == {"packed": 0, "key_mask": 0}
  with attn.emulate("tpu"):
    fused = hidden("splash")
  assert calls["key_mask"] > 0, calls  # the cached contexts' KeyMask
  _assert_close(fused, xla, atol=1e-5)


def test_splash_tiles_cover_every_visible_pair_and_skip_others():
  layout = _packed_rows()
  dense = np.asarray(am.packed_mask(layout))
  blocks = splash.SplashBlocks.for_length(T)
  assert (blocks.block_q, blocks.block_kv) == (128, 128)
  for r in range(2):
    row = jax.tree.map(lambda x: x[r], layout)
    tiles = np.asarray(splash.splash_tiles(splash.splash_row_inputs(row), T, blocks))
    noisy = np.asarray(row.noisy)
    pad = np.diag(np.asarray(row.sample_id) < 0)  # padding sees itself
    visible = np.concatenate([(dense[r] & ~noisy[None]) | pad, dense[r] & noisy[None]], axis=1)
    needed = visible.reshape(3, 128, 6, 128).any(axis=(1, 3))
    assert (tiles | ~needed).all(), (tiles, needed)
    assert tiles.sum() < tiles.size  # some tiles are skipped


def _random_layout(rng, length):
  samples, used = [], 0
  while True:
    blocks = [(str(rng.choice(am.BLOCK_KINDS)), int(rng.randint(1, 7)))
              for _ in range(rng.randint(1, 6))]
    n = sum(b[1] for b in blocks)
    if used + n > length:
      return am.pack_samples(samples, length)[0]
    samples.append(blocks)
    used += n


def test_segment_ids_and_mask_function_express_the_packed_mask():
  """The kernel's view (segment ids equal and the mask function of (X + 1, Y), over the two key
  copies) is exactly `attention_mask.packed_mask`, on random layouts; padding sees itself."""
  rng = np.random.RandomState(0)
  length = 48
  layouts = am.stack_layouts([_random_layout(rng, length) for _ in range(16)])
  dense = np.asarray(am.packed_mask(jax.tree.map(jnp.asarray, layouts)))
  function = splash.PackedMaskFunction(length)
  keys = jnp.arange(2 * length, dtype=jnp.int32)
  for r in range(16):
    row = jax.tree.map(lambda x: jnp.asarray(x[r]), layouts)
    inputs = splash.splash_row_inputs(row)
    seen = ((inputs["q_seg"][:, None] == inputs["kv_seg"][None, :])
            & function(inputs["packed"][:, None], keys[None, :]))
    seen = np.asarray(seen)
    head, tail = seen[:, :length], seen[:, length:]
    assert not (head & tail).any()
    valid = np.asarray(row.sample_id) >= 0
    np.testing.assert_array_equal((head | tail)[valid], dense[r][valid])
    np.testing.assert_array_equal((head | tail)[~valid], np.eye(length, dtype=bool)[~valid])


def test_kernel_choice_by_platform_mask_and_inputs():
  def choose(implementation="auto", platform="tpu", kind="packed", dtype=jnp.bfloat16, d=128,
             q_len=32768, kv_len=None):
    return attn.choose(implementation, platform=platform, kind=kind, dtype=dtype, head_dim=d,
                       q_len=q_len, kv_len=q_len if kv_len is None else kv_len)

  # auto: by platform
  assert choose() == "splash"
  assert choose(platform="gpu") == choose(platform="cuda") == "cudnn"
  assert choose(platform="cpu") == "xla"
  assert choose(platform="rocm") == "xla"
  # splash: packed self-attention over rows of a multiple of 128 tokens, up to 65,535
  assert choose(kind="dense") == choose(kind="none") == "xla"
  assert choose(q_len=32768 + 64) == "xla"
  assert choose(q_len=1, kv_len=512) == "xla"  # a KV cache's dense mask
  assert choose(kind="keys", q_len=1026, kv_len=3435) == "splash"  # a noisy block's, any length
  assert choose(q_len=65536) == "xla" and choose(q_len=65408) == "splash"
  assert choose(dtype=jnp.float32) == "splash"
  # cuDNN: half precision, head_dim a multiple of 8 up to 128, even lengths under a mask
  gpu = dict(platform="gpu")
  assert choose(kind="dense", q_len=6, kv_len=518, **gpu) == "cudnn"
  assert choose(kind="none", d=72, q_len=729, **gpu) == "cudnn"  # SigLIP-sized, unmasked
  assert choose(kind="dense", q_len=1, kv_len=512, **gpu) == "xla"  # odd length with a bias
  assert choose(dtype=jnp.float32, **gpu) == "xla"
  assert choose(dtype=jnp.float16, **gpu) == "cudnn"
  assert choose(d=256, **gpu) == choose(d=12, **gpu) == "xla"
  # an explicit kernel off its platform, or for inputs it cannot take, falls back to xla
  assert choose("splash", platform="gpu") == choose("cudnn", platform="tpu") == "xla"
  assert choose("splash", platform="cpu") == choose("cudnn", platform="cpu") == "xla"
  assert choose("xla") == choose("xla", platform="gpu") == "xla"
  assert choose("cudnn", kind="dense", q_len=1, **gpu) == "xla"
  with pytest.raises(ValueError, match="attention = 'flash' .* allowed: auto, xla, splash"):
    choose("flash")


def test_auto_follows_the_mesh_platform():
  assert attn.current_platform() == "cpu"
  mesh = jax.make_mesh((1, 1, 1), ("data", "fsdp", "tensor"), devices=jax.devices()[:1])
  with jax.set_mesh(mesh):
    assert jax.jit(lambda: jnp.asarray(attn.current_platform() == "cpu"))()
  with attn.emulate("tpu"):
    assert attn.current_platform() == "tpu"


def test_cudnn_call_is_wrapped_like_xla(monkeypatch):
  """The cuDNN path's own code (mask as (B, 1, T, S), rows with no visible key zeroed, dtype)
  with jax's XLA implementation of the same call in place of cuDNN."""
  calls = []
  original = jax.nn.dot_product_attention

  def fake(*args, implementation=None, **kw):
    calls.append((implementation, kw.get("mask") is not None and kw["mask"].shape))
    return original(*args, implementation="xla", **kw)

  monkeypatch.setattr(jax.nn, "dot_product_attention", fake)
  layout = _packed_rows()
  mask = attn.PackedMask(layout)
  q, k, v, _ = _qkv(2, T, heads=4, kv_heads=2)
  q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
  for m in (mask, mask.dense(), None):
    ours = attn.attention(q, k, v, m, platform="gpu")
    ref = layers.attention(q, k, v, None if m is None else mask.dense())
    assert ours.dtype == jnp.bfloat16
    _assert_close(ours.astype(jnp.float32), ref.astype(jnp.float32), atol=2e-2)
  assert calls == [("cudnn", (2, 1, T, T)), ("cudnn", (2, 1, T, T)), ("cudnn", False)]
  calls.clear()
  attn.attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), mask,
                 platform="gpu")
  assert not calls  # float32: xla


def test_decoder_on_splash_equals_xla_under_remat(monkeypatch):
  """The language model's own call sites (a PackedMask through the scanned, rematerialised
  layers): loss and gradients on splash (interpret mode, as on a TPU) equal xla's."""
  calls = _count_splash_calls(monkeypatch)
  t = 128
  layout = am.stack_layouts([am.pack_samples(
      [[("text", 9), ("image", 20), ("noisy", 30), ("text", 7)], [("text", 40)]], t)[0]])
  mask = attn.PackedMask(jax.tree.map(jnp.asarray, layout))
  config = qwen2_mot.LLMConfig.tiny(num_layers=1, remat="minimal")
  tokens = jnp.asarray(np.random.RandomState(1).randint(0, config.vocab_size, (1, t)))
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (1, t))
  route = jnp.asarray(layout.noisy)

  def loss_and_grads(implementation):
    model = qwen2_mot.Qwen2MoT(dataclasses.replace(config, attention=implementation),
                               rngs=nnx.Rngs(0))

    @nnx.jit
    def run(model):
      def loss(m):
        hidden = m(m.embed(tokens), positions, mask, route)
        return jnp.mean(jnp.square(hidden) * mask.valid()[..., None])
      return nnx.value_and_grad(loss)(model)
    return run(model)

  xla = loss_and_grads("xla")
  assert calls == {"packed": 0, "key_mask": 0}
  with attn.emulate("tpu"):
    fused = loss_and_grads("splash")
  assert calls["packed"] > 0, calls
  np.testing.assert_allclose(fused[0], xla[0], rtol=1e-5)
  _assert_close(nnx.state(fused[1]), nnx.state(xla[1]), atol=1e-5)


def test_attention_field_is_validated():
  with pytest.raises(ValueError, match="LLMConfig.attention = 'flash'"):
    qwen2_mot.LLMConfig.tiny(attention="flash")
  config = config_lib.load(f"{SFT}:tiny")
  assert config.attention == "auto"
  with pytest.raises(config_lib.ConfigError, match="config field attention = 'flash'"):
    config_lib.load(f"{SFT}:tiny", {"attention": "flash"})
  sft_7b = config_lib.load_file(f"{SFT}:bagel_7b")
  assert sft_7b.data.token_budget == 32_768
