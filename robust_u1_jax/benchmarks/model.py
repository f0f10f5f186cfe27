"""`python -m robust_u1_jax.bench model`: model speed, as ratios measured in one run.

1. Forward + backward of the tiny language model (the bulk of the tiny config's FLOPs) against
   transformers' PyTorch Qwen2 of the same shapes on the same CPU threads (goal: ours not slower).
2. One cached denoising step (the noisy latent block against a KV-cached context) with a context
   of L and 2L tokens (goal: at most 1.3x when L doubles: the step's cost is the latent block's,
   and the context only adds attention keys).

Both sides of each ratio take turns call by call (`benchmarks.alternate`), and the ratio printed
is the median of the per-round ratios with its quartiles: timing JAX and then PyTorch once each
swung from 2.0 to 19.7 between two runs on a loaded machine.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from robust_u1_jax.benchmarks import alternate, goal, usable_cpus
from robust_u1_jax.data import sequence
from robust_u1_jax.models import bagel as bagel_lib
from robust_u1_jax.models.qwen2_mot import LLMConfig, Qwen2MoT

# Each measurement lasts at least this long: the steps here take a millisecond or two, and one
# call's ratio to another's ranged from 0.02 to 5.5 (2L/L, one core of a 2-core Xeon).
MIN_MEASUREMENT_S = 0.02


def llm_forward_backward(batch: int, length: int, seconds: float, *,
                         min_reps: int = 5) -> dict:
  import torch
  import transformers

  c = LLMConfig.tiny(mot=False, qk_norm=False)
  model = Qwen2MoT(c, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  tokens = jax.random.randint(jax.random.PRNGKey(0), (batch, length), 0, c.vocab_size)
  positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
  causal = jnp.broadcast_to(jnp.tril(jnp.ones((length, length), bool)), (batch, length, length))

  @jax.jit
  def jax_step(params):
    def loss(p):
      m = nnx.merge(graphdef, p)
      logits = m.logits(m(m.embed(tokens), positions, causal, "und"))
      return jnp.mean(jax.nn.logsumexp(logits, -1))
    return jax.grad(loss)(params)

  hf = transformers.Qwen2Config(
      vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
      num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
      num_key_value_heads=c.num_kv_heads, rope_theta=c.rope_theta, attn_implementation="sdpa")
  torch_model = transformers.Qwen2ForCausalLM(hf)
  torch_tokens = torch.from_numpy(np.array(tokens)).long()
  # PyTorch's own default counts physical cores and XLA:CPU's the CPUs this process may use: both
  # get the latter, so the ratio compares code, not thread pools.
  threads = usable_cpus()
  torch.set_num_threads(threads)

  def torch_step():
    torch_model.zero_grad(set_to_none=True)
    logits = torch_model(torch_tokens).logits
    torch.logsumexp(logits, -1).mean().backward()

  timed = alternate({"jax": lambda: jax.block_until_ready(jax_step(params)),
                     "torch": torch_step}, seconds, min_reps=min_reps,
                    min_measurement_s=MIN_MEASUREMENT_S)
  return {"jax_s": timed.median("jax"), "torch_s": timed.median("torch"),
          "torch_over_jax": timed.ratio("torch", "jax"), "threads": threads}


def denoise_step_scaling(context: int, seconds: float, *, min_reps: int = 5) -> dict:
  config = bagel_lib.BagelConfig.tiny()
  model = bagel_lib.Bagel(config, rngs=nnx.Rngs(0))
  markers = sequence.Markers(1, 2)
  noisy = jax.tree.map(jnp.asarray, sequence.build_rows(
      [[[sequence.Latent(64, 64, noisy=True)]]], config, markers, seq_len=18, max_vit=0,
      max_latent=16))
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 16, config.latent_channels))
  graphdef, state = nnx.split(model)

  def step_fn(length: int):
    ids = list(np.arange(length) % 50 + 3)
    rows = jax.tree.map(jnp.asarray, sequence.build_rows(
        [[[sequence.Text(ids)]]], config, markers, seq_len=length, max_vit=0, max_latent=0))
    cache = model.prefill(model.init_cache(1, length), rows)

    @jax.jit
    def step(state, cache, x):
      return nnx.merge(graphdef, state).denoise_velocity(cache, noisy, x, jnp.array([0.5]))

    return lambda: jax.block_until_ready(step(state, cache, x))

  timed = alternate({"L": step_fn(context), "2L": step_fn(2 * context)}, seconds,
                    min_reps=min_reps, min_measurement_s=MIN_MEASUREMENT_S)
  return {"L": context, "step_s_L": timed.median("L"), "step_s_2L": timed.median("2L"),
          "ratio_2L_over_L": timed.ratio("2L", "L")}


def run(*, seconds: float = 3.0, batch: int = 4, length: int = 128, context: int = 512) -> dict:
  """Prints both measurements; `seconds` is the wall time of each alternated measurement."""
  print(f"model benchmark on {jax.devices()[0].device_kind} ({jax.device_count()} device(s)); "
        f"{seconds:g} s per alternated measurement", flush=True)
  r = llm_forward_backward(batch, length, seconds)
  print(f"tiny LLM forward+backward, batch {batch} x {length} tokens, float32, "
        f"{r['threads']} CPU thread(s) each: "
        f"jax {r['jax_s'] * 1e3:.2f} ms, torch {r['torch_s'] * 1e3:.2f} ms (medians); "
        f"torch/jax = {r['torch_over_jax']} "
        f"{goal(r['torch_over_jax'].median, 1, at_most=False)}", flush=True)
  d = denoise_step_scaling(context, seconds)
  print(f"cached denoising step: context {d['L']} -> {d['step_s_L'] * 1e3:.2f} ms, "
        f"{2 * d['L']} -> {d['step_s_2L'] * 1e3:.2f} ms (medians); 2L/L = "
        f"{d['ratio_2L_over_L']} {goal(d['ratio_2L_over_L'].median, 1.3, at_most=True)}",
        flush=True)
  return {"llm": r, "denoise": d}
