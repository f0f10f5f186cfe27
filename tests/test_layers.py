"""Shared layers against their PyTorch references (transformers Qwen2, diffusers, brute force),
each jitted and eager."""

import contextlib
import io

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.models import embeddings as diffusers_embeddings
from flax import nnx
from jax.ad_checkpoint import checkpoint_name, print_saved_residuals
from transformers import Qwen2Config
from transformers.models.qwen2 import modeling_qwen2

from robust_u1_jax.models import layers


def _np(t: torch.Tensor) -> np.ndarray:
  return t.detach().numpy()


@pytest.mark.torch_ref
class Qwen2ReferenceTest(chex.TestCase):
  """RMSNorm, RoPE and the SwiGLU MLP against transformers' Qwen2, jitted and eager."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_rmsnorm_matches_qwen2(self):
    x = np.random.RandomState(0).randn(2, 5, 16).astype(np.float32) * 3
    ref = modeling_qwen2.Qwen2RMSNorm(16, eps=1e-6)
    with torch.no_grad():
      ref.weight.copy_(torch.randn(16))
    norm = layers.RMSNorm(16, 1e-6)
    norm.scale.set_value(jnp.asarray(_np(ref.weight)))
    out = self.variant(lambda x: norm(x))(jnp.asarray(x))
    chex.assert_shape(out, x.shape)
    chex.assert_trees_all_close(out, _np(ref(torch.from_numpy(x))), atol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  def test_rope_matches_qwen2_with_explicit_positions(self):
    config = Qwen2Config(hidden_size=64, num_attention_heads=4, rope_theta=1e4)
    rotary = modeling_qwen2.Qwen2RotaryEmbedding(config)
    # Non-monotone positions: packed samples restart, image blocks repeat a position.
    positions = np.array([[0, 1, 2, 3, 3, 3, 4, 0, 1, 1]], np.int64)
    rng = np.random.RandomState(1)
    q = rng.randn(1, 10, 4, 16).astype(np.float32)
    k = rng.randn(1, 10, 2, 16).astype(np.float32)
    cos, sin = rotary(torch.from_numpy(q), torch.from_numpy(positions))
    # transformers works on (B, H, T, D).
    q_ref, k_ref = modeling_qwen2.apply_rotary_pos_emb(
        torch.from_numpy(q).transpose(1, 2), torch.from_numpy(k).transpose(1, 2), cos, sin)
    rope = self.variant(lambda x, pos: layers.apply_rope(x, pos, 1e4))
    pos = jnp.asarray(positions, jnp.int32)
    chex.assert_trees_all_close(rope(jnp.asarray(q), pos), _np(q_ref.transpose(1, 2)), atol=1e-5)
    chex.assert_trees_all_close(rope(jnp.asarray(k), pos), _np(k_ref.transpose(1, 2)), atol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  def test_swiglu_matches_qwen2_mlp(self):
    config = Qwen2Config(hidden_size=16, intermediate_size=24)
    ref = modeling_qwen2.Qwen2MLP(config)
    mlp = layers.SwiGLU(16, 24, rngs=nnx.Rngs(0))
    for name in ("gate_proj", "up_proj", "down_proj"):
      getattr(mlp, name).kernel.set_value(jnp.asarray(_np(getattr(ref, name).weight).T))
    x = np.random.RandomState(3).randn(2, 3, 16).astype(np.float32)
    chex.assert_trees_all_close(self.variant(lambda x: mlp(x))(jnp.asarray(x)),
                                _np(ref(torch.from_numpy(x))), atol=1e-5)


def _attention_reference(q, k, v, mask):
  """Loop over heads with explicit K/V head repetition, masked softmax in float64."""
  b, t, h, d = q.shape
  group = h // k.shape[2]
  out = np.zeros((b, t, h, d))
  for bi in range(b):
    for hi in range(h):
      logits = q[bi, :, hi].astype(np.float64) @ k[bi, :, hi // group].T / np.sqrt(d)
      for ti in range(t):
        allowed = mask[bi, ti]
        if not allowed.any():
          continue
        w = np.exp(logits[ti][allowed] - logits[ti][allowed].max())
        out[bi, ti, hi] = (w / w.sum()) @ v[bi, allowed, hi // group]
  return out


class AttentionTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_attention_gqa_masked_and_empty_rows(self):
    rng = np.random.RandomState(2)
    q = rng.randn(2, 6, 4, 8).astype(np.float32)
    k = rng.randn(2, 9, 2, 8).astype(np.float32)
    v = rng.randn(2, 9, 2, 8).astype(np.float32)
    mask = rng.rand(2, 6, 9) > 0.4
    mask[1, 3] = False  # a padding query: must give zeros, not NaN
    attention = self.variant(layers.attention)
    out = attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(mask))
    chex.assert_shape(out, q.shape)
    chex.assert_tree_all_finite(out)
    chex.assert_trees_all_close(out, _attention_reference(q, k, v, mask), atol=1e-5)
    chex.assert_trees_all_equal(out[1, 3], jnp.zeros((4, 8)))
    unmasked = self.variant(lambda q, k, v: layers.attention(q, k, v, None))(
        jnp.asarray(q), jnp.asarray(k), jnp.asarray(v))
    chex.assert_trees_all_close(unmasked,
                                _attention_reference(q, k, v, np.ones((2, 6, 9), bool)),
                                atol=1e-5)

  def test_attention_rejects_bad_head_counts(self):
    with self.assertRaisesRegex(ValueError, "not a multiple"):
      layers.attention(jnp.zeros((1, 2, 3, 4)), jnp.zeros((1, 2, 2, 4)), jnp.zeros((1, 2, 2, 4)))


@pytest.mark.torch_ref
@pytest.mark.parametrize("dim,grid", [(32, 5), (64, 8)])
def test_sincos_2d_matches_diffusers(dim, grid):
  ref = diffusers_embeddings.get_2d_sincos_pos_embed(dim, grid, base_size=grid)
  table = layers.sincos_2d_table(dim, grid)
  chex.assert_shape(table, (grid * grid, dim))
  chex.assert_trees_all_close(table, _np(ref), atol=1e-5)
  # Row h*grid + w; first half encodes the column.
  chex.assert_trees_all_equal(table[2 * grid + 3, : dim // 2], table[3, : dim // 2])


@pytest.mark.torch_ref
class TimestepEmbedderTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_timestep_embedder_matches_dit_reference(self):
    t = np.array([0.0, 0.25, 0.5, 1.0], np.float32)
    ref_freq = diffusers_embeddings.get_timestep_embedding(
        torch.from_numpy(t), 256, flip_sin_to_cos=True, downscale_freq_shift=0)
    sinusoid = self.variant(layers.timestep_sinusoid)(jnp.asarray(t))
    chex.assert_shape(sinusoid, (4, 256))
    chex.assert_trees_all_close(sinusoid, _np(ref_freq), atol=1e-6)
    torch.manual_seed(0)
    ref_mlp = torch.nn.Sequential(torch.nn.Linear(256, 32), torch.nn.SiLU(),
                                  torch.nn.Linear(32, 32))
    emb = layers.TimestepEmbedder(32, rngs=nnx.Rngs(0))
    for ours, theirs in ((emb.fc1, ref_mlp[0]), (emb.fc2, ref_mlp[2])):
      ours.kernel.set_value(jnp.asarray(_np(theirs.weight).T))
      ours.bias.set_value(jnp.asarray(_np(theirs.bias)))
    chex.assert_trees_all_close(self.variant(lambda t: emb(t))(jnp.asarray(t)),
                                _np(ref_mlp(ref_freq)), atol=1e-5)


def test_dense_and_norm_carry_logical_names():
  d = layers.dense(4, 6, ("embed", "mlp"), rngs=nnx.Rngs(0))
  assert d.kernel.get_metadata()["out_sharding"] == ("embed", "mlp")
  assert d.bias.get_metadata()["out_sharding"] == ("mlp",)
  assert layers.RMSNorm(4).scale.get_metadata()["out_sharding"] == ("norm",)


def _saved_residuals(policy) -> list[str]:
  """What `jax.checkpoint(f, policy=policy)` keeps for the backward pass, besides the inputs,
  for an `f` with one plain matmul, one batched einsum, elementwise work, the four names
  'minimal' saves and one name it does not. Distinct shapes tell the residuals apart."""
  def f(w, x, y):
    plain = x @ w  # (3, 6): a weight matmul, no batch dimension
    batched = jnp.einsum("bij,bjk->bik", y, y)  # (2, 5, 5): like the attention's einsums
    named = [checkpoint_name(jnp.sin(plain) * i, n) for i, n in enumerate(layers.MINIMAL_SAVED)]
    other = checkpoint_name(jnp.cos(plain), "mlp_hidden")
    return jnp.sum(jnp.sin(batched)) + sum(jnp.sum(jnp.sin(a) * jnp.sin(other)) for a in named)

  args = jnp.ones((4, 6)), jnp.ones((3, 4)), jnp.ones((2, 5, 5))
  out = io.StringIO()
  with contextlib.redirect_stdout(out):  # the public API prints "f32[3,6] <where from>" lines
    print_saved_residuals(jax.checkpoint(f, policy=policy), *args)
  return [line for line in out.getvalue().splitlines() if "from the argument" not in line]


def test_remat_policy_names():
  assert layers.remat_policy("none") is None
  assert layers.remat_policy("full") is jax.checkpoint_policies.nothing_saveable
  assert layers.remat_policy("dots") is jax.checkpoint_policies.dots_with_no_batch_dims_saveable
  with pytest.raises(ValueError, match="'none', 'full', 'dots', 'minimal'"):
    layers.remat_policy("sometimes")
  # 'minimal' is built per call by save_only_these_names (no module-level policy to compare by
  # identity), so it is checked by what it saves; the others too, which also pins the behaviour
  # the docstring promises ('dots' keeps plain matmuls, not the attention's batched einsums).
  assert _saved_residuals(layers.remat_policy("full")) == []
  dots = _saved_residuals(layers.remat_policy("dots"))
  assert len(dots) == 1 and dots[0].startswith("f32[3,6] output of dot_general"), dots
  minimal = _saved_residuals(layers.remat_policy("minimal"))
  assert sorted(line.split("'")[1] for line in minimal) == sorted(layers.MINIMAL_SAVED), minimal
  assert all(line.startswith("f32[3,6] named ") for line in minimal), minimal


def test_stack_and_scan_match_a_loop_over_layers():
  """`stack` draws each layer on its own (as separate layers would be), puts the layer axis in
  front of the logical names, and `scan` runs the layers in order, under every remat policy."""
  stacked = layers.stack(lambda r: layers.SwiGLU(4, 8, rngs=r), 3, nnx.Rngs(0))
  kernel = stacked.up_proj.kernel
  assert kernel.shape == (3, 4, 8)
  assert kernel.get_metadata()["out_sharding"] == (layers.LAYER_AXIS, "embed", "mlp")
  assert not np.array_equal(kernel[0], kernel[1])
  x = jax.random.normal(jax.random.key(0), (2, 5, 4))

  def loop(x):
    for i in range(3):
      w = {n: getattr(stacked, n).kernel[i] for n in ("gate_proj", "up_proj", "down_proj")}
      x = x + (jax.nn.silu(x @ w["gate_proj"]) * (x @ w["up_proj"])) @ w["down_proj"]
    return x

  def step(layer, x, scale):
    return x + layer(x), scale * jnp.sum(x)

  want = loop(x)
  for remat in layers.REMAT_POLICIES:
    got, ys = layers.scan(stacked, step, x, jnp.arange(3.0), remat=remat)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert ys.shape == (3,) and ys[0] == 0
    run = lambda x: layers.scan(stacked, step, x, jnp.arange(3.0), remat=remat)[0]  # noqa: E731
    grad = jax.grad(lambda x: jnp.sum(run(x) ** 2))(x)
    np.testing.assert_allclose(grad, jax.grad(lambda x: jnp.sum(loop(x) ** 2))(x), rtol=1e-4,
                               atol=1e-5)
