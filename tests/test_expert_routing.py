"""Each token through its own expert only (static-capacity buffers, `qwen2_mot.Routing`) equals
the rule it replaces, both experts on every token and a per-token select, on packed rows of every
block type: hidden states and parameter gradients."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from robust_u1_jax import sharding
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


def test_batch_sharded_rows_are_routed_on_their_devices():
  """The gathers and scatters run per row: on a batch-sharded mesh the routed step all-gathers no
  more than the both-experts rule, whose collectives are the FSDP weight gathers."""
  mesh = sharding.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
  config = dataclasses.replace(qwen2_mot.LLMConfig.tiny(), num_layers=1)
  llm = sharding.create_sharded(lambda: qwen2_mot.Qwen2MoT(config, rngs=nnx.Rngs(0)), "llm", mesh)
  graphdef, params = nnx.split(llm)
  b, t = 8, 32
  rows = NamedSharding(mesh, P(("data", "fsdp")))
  x = jax.device_put(jnp.ones((b, t, config.hidden_size)), rows)
  positions = jax.device_put(jnp.broadcast_to(jnp.arange(t), (b, t)), rows)
  mask = jax.device_put(jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, t, t)), rows)
  is_gen = jax.device_put(jnp.asarray(np.random.default_rng(0).random((b, t)) > 0.5), rows)

  def all_gathers():
    def grads(params, x, positions, mask, is_gen):
      route = qwen2_mot.route_tokens(is_gen, und_capacity=24, gen_capacity=24)
      loss = lambda p: jnp.sum(nnx.merge(graphdef, p)(x, positions, mask, route) ** 2)  # noqa: E731
      return jax.grad(loss)(params)
    hlo = jax.jit(grads).lower(params, x, positions, mask, is_gen).compile().as_text()
    return hlo.count("all-gather(") + hlo.count("all-gather-start(")

  with jax.set_mesh(mesh):
    routed = all_gathers()
    with experts.both_experts_rule():
      both = all_gathers()
  assert 0 < routed <= both, (routed, both)


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
