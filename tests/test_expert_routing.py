"""Each token through its own expert only (static-capacity buffers, `qwen2_mot.Routing`) equals
the rule it replaces, both experts on every token and a per-token select, on packed rows of every
block type: hidden states and parameter gradients."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from robust_u1_jax.benchmarks import experts
from robust_u1_jax.data import sequence as seq
from robust_u1_jax.models import attention_mask, bagel, qwen2_mot

CFG = bagel.BagelConfig.tiny()
MK = seq.Markers(3, 4)
_rng = np.random.default_rng(0)
# Every block kind: clean latents, ViT, text, a noisy target, text after it; padding ends rows.
SAMPLE_A = [seq.Latent(32, 48), seq.Vit(_rng.uniform(-1, 1, (16, 24, 3)).astype(np.float32)),
            seq.Text([5, 6, 7, 8]), seq.Latent(32, 48, noisy=True), seq.Text([9, 10, 11])]
SAMPLE_B = [seq.Text([12, 13]), seq.Vit(_rng.uniform(-1, 1, (24, 16, 3)).astype(np.float32)),
            seq.Latent(48, 32, noisy=True)]
PAD = 5


@pytest.fixture(scope="module")
def rows():
  lengths = [seq.lengths(s, *seq.strides(CFG)) for s in (SAMPLE_A, SAMPLE_B)]
  t, nv, nl = (sum(x) for x in zip(*lengths))
  inputs = seq.build_rows([[SAMPLE_A, SAMPLE_B], [SAMPLE_B]], CFG, MK, seq_len=t + PAD,
                          max_vit=nv, max_latent=nl)
  latents = np.random.default_rng(1).standard_normal((2, nl, CFG.latent_channels))
  timesteps = np.random.default_rng(2).uniform(0, 1, (2, nl))
  return inputs, jnp.asarray(latents, jnp.float32), jnp.asarray(timesteps, jnp.float32)


@pytest.fixture(scope="module")
def model(random_bagel):
  return random_bagel(CFG, seed=4)


def _loss_and_grads(llm, x, inputs):
  """Hidden states at the rows' tokens and the gradients of a loss on them (parameters and
  inputs), jitted afresh so each routing rule is traced."""
  valid = (inputs.token_kind != bagel.PAD)[..., None]
  weights = jax.random.normal(jax.random.key(0), x.shape)
  mask = attention_mask.packed_mask(inputs.layout)
  graphdef, params = nnx.split(llm)

  def loss_fn(params, x):
    hidden = nnx.merge(graphdef, params)(x, inputs.positions, mask, inputs.routing())
    return jnp.sum(jnp.where(valid, hidden * weights, 0.0)), jnp.where(valid, hidden, 0.0)

  (_, hidden), grads = jax.jit(jax.value_and_grad(loss_fn, (0, 1), has_aux=True))(params, x)
  return hidden, nnx.to_pure_dict(grads[0]), grads[1]


def test_routed_experts_equal_both_experts_with_select(model, rows):
  numpy_inputs, latents, timesteps = rows
  bounded = bagel.bound_experts(numpy_inputs)
  t, nl = numpy_inputs.token_kind.shape[1], numpy_inputs.latent_seq_index.shape[1]
  assert bounded.max_und == t - nl  # the two buffers together hold exactly one row
  assert bagel.bound_experts(numpy_inputs.replace(max_und=None)).max_und == t - nl
  x = model.embed_sequence(jax.tree.map(jnp.asarray, numpy_inputs), latents, timesteps)
  with experts.both_experts_rule():
    expected = _loss_and_grads(model.language_model, x, jax.tree.map(jnp.asarray, bounded))
  for inputs in (numpy_inputs, bounded):  # capacities (T, Nl) and (T - Nl, Nl)
    got = _loss_and_grads(model.language_model, x, jax.tree.map(jnp.asarray, inputs))
    chex.assert_trees_all_close(got, expected, rtol=1e-5, atol=1e-5)
  gen_grad = expected[1]["layers"]["gen"]["mlp"]["up_proj"]["kernel"]
  assert float(jnp.abs(gen_grad).max()) > 0  # latent tokens reach the generation expert


def test_route_tokens_buffers_hold_each_experts_tokens_in_order():
  is_gen = jnp.asarray([[0, 1, 0, 0, 1, 0], [1, 1, 0, 0, 0, 0]], bool)
  valid = jnp.asarray([[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0]], bool)
  r = qwen2_mot.route_tokens(is_gen, valid, und_capacity=3, gen_capacity=2)
  np.testing.assert_array_equal(r.und_index, [[0, 2, 3], [2, 6, 6]])  # 6 = T: an empty slot
  np.testing.assert_array_equal(r.gen_index, [[1, 4], [0, 1]])
  with pytest.raises(ValueError, match="capacities"):
    qwen2_mot.route_tokens(is_gen, und_capacity=7)


def test_rows_whose_understanding_tokens_exceed_t_minus_nl_keep_full_capacity(rows):
  inputs = rows[0]
  t = inputs.token_kind.shape[1]
  # The same rows with latent slots for the whole row (as packed rows have): no bound to declare.
  wide = inputs.replace(latent_seq_index=np.zeros((2, t), np.int32))
  assert bagel.bound_experts(wide).max_und is None
