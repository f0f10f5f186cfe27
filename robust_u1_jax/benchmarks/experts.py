"""`python -m robust_u1_jax.bench experts`: each token through its own expert vs both experts.

Forward + backward of a small Mixture-of-Transformers language model over packed rows of
SFT-shaped samples (a clean VAE block, a ViT block, an instruction, a noisy VAE target: 59 % of
the real tokens on the generation expert, as a 7B SFT sample at 512 px), two rows of 896 tokens
with a little padding. The routed side gathers each expert's tokens into buffers of capacity
(T - Nl, Nl) (`bagel.bound_experts`); the other is the rule routing replaced, both experts on
every token and a per-token select (`both_experts`). The sides alternate call by call
(`benchmarks.alternate`); the ratio printed is the median of the per-round ratios with its
quartiles. The ideal ratio is below 2: attention, norms and RoPE are the same work on both sides.
"""

from __future__ import annotations

import contextlib
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from robust_u1_jax.benchmarks import alternate
from robust_u1_jax.data import sequence
from robust_u1_jax.models import attention_mask, bagel, qwen2_mot

SAMPLES_PER_ROW, ROWS, ROW_TOKENS = 4, 2, 896


def both_experts(routed):
  """A drop-in for `qwen2_mot._routed` with the rule before routing: both experts on every token
  (padding included, on the understanding expert), each token's output from its own expert."""

  def select(fn, und, gen, route, base, *args):
    if not isinstance(route, qwen2_mot.Routing):
      return routed(fn, und, gen, route, base, *args)
    b, t = args[0].shape[:2]
    rows = jnp.arange(b)[:, None]
    is_gen = jnp.zeros((b, t), bool).at[rows, route.gen_index].set(True, mode="drop")
    pick = lambda u, g: jnp.where(is_gen.reshape((b, t) + (1,) * (u.ndim - 2)), g, u)  # noqa: E731
    return jax.tree.map(pick, fn(und, *args), fn(gen, *args))

  return select


@contextlib.contextmanager
def both_experts_rule():
  """Within: `qwen2_mot` layers trace with `both_experts` (trace, or compile, inside)."""
  routed = qwen2_mot._routed
  qwen2_mot._routed = both_experts(routed)
  try:
    yield
  finally:
    qwen2_mot._routed = routed


def mixed_rows(config: bagel.BagelConfig) -> bagel.SequenceInputs:
  """ROWS packed rows of SAMPLES_PER_ROW SFT-shaped samples each (numpy), `max_und` declared."""
  rng = np.random.default_rng(0)
  sample = [sequence.Latent(128, 128), sequence.Vit(rng.integers(0, 255, (64, 64, 3), np.uint8)),
            sequence.Text(list(range(5, 24))), sequence.Latent(128, 128, noisy=True)]
  _, vit, latent = sequence.lengths(sample, *sequence.strides(config))
  n = SAMPLES_PER_ROW
  inputs = sequence.build_rows([[sample] * n] * ROWS, config, sequence.Markers(3, 4),
                               seq_len=ROW_TOKENS, max_vit=n * vit, max_latent=n * latent)
  return bagel.bound_experts(inputs)


def forward_backward(llm_config: qwen2_mot.LLMConfig, seconds: float, *,
                     min_reps: int = 5) -> dict:
  config = dataclasses.replace(bagel.BagelConfig.tiny(), llm=llm_config)
  inputs = jax.tree.map(jnp.asarray, mixed_rows(config))
  graphdef, params = nnx.split(qwen2_mot.Qwen2MoT(config.llm, rngs=nnx.Rngs(0)))
  b, t = inputs.token_kind.shape
  key_x, key_w = jax.random.split(jax.random.key(0))
  x = jax.random.normal(key_x, (b, t, config.llm.hidden_size))
  weights = jax.random.normal(key_w, x.shape)
  valid = (inputs.token_kind != bagel.PAD)[..., None]

  def compiled_step():
    """The jitted step, traced now: a fresh function each time, as jit reuses the trace of a
    function object it has seen (which would hide the rule in force)."""
    def step(params, x, inputs):  # the rows are arguments: constants would be folded
      def loss(params):
        mask = attention_mask.packed_mask(inputs.layout)
        hidden = nnx.merge(graphdef, params)(x, inputs.positions, mask, inputs.routing())
        return jnp.sum(jnp.where(valid, hidden * weights, 0.0))
      return jax.grad(loss)(params)
    return jax.jit(step).lower(params, x, inputs).compile()

  routed = compiled_step()
  with both_experts_rule():
    both = compiled_step()
  timed = alternate({"routed": lambda: jax.block_until_ready(routed(params, x, inputs)),
                     "both": lambda: jax.block_until_ready(both(params, x, inputs))}, seconds,
                    min_reps=min_reps)
  kind = np.asarray(inputs.token_kind)
  return {"rows": b, "tokens": t, "gen_tokens": int((kind == bagel.LATENT).sum()),
          "und_tokens": int(((kind == bagel.TEXT) | (kind == bagel.VIT)).sum()),
          "capacities": (inputs.max_und, inputs.latent_seq_index.shape[1]),
          "routed_s": timed.median("routed"), "both_s": timed.median("both"),
          "both_over_routed": timed.ratio("both", "routed")}


def run(*, seconds: float = 3.0) -> dict:
  """Prints the measurement; `seconds` is the wall time of the alternated measurement."""
  llm = qwen2_mot.LLMConfig.tiny(hidden_size=512, intermediate_size=2048, num_heads=8,
                                 num_kv_heads=2, head_dim=64)
  print(f"expert routing benchmark on {jax.devices()[0].device_kind}; {seconds:g} s alternated; "
        f"LLM {llm.num_layers} layers, hidden {llm.hidden_size}, MLP {llm.intermediate_size}",
        flush=True)
  print("compiling both programs (most of the wait), then timing ...", flush=True)
  r = forward_backward(llm, seconds)
  print(f"forward+backward, {r['rows']} packed rows x {r['tokens']} tokens "
        f"({r['und_tokens']} understanding, {r['gen_tokens']} generation tokens; routed "
        f"capacities {r['capacities']}): routed {r['routed_s'] * 1e3:.1f} ms, both experts "
        f"{r['both_s'] * 1e3:.1f} ms (medians); both/routed = {r['both_over_routed']}",
        flush=True)
  return r
