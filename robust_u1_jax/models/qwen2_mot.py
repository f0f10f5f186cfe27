"""Qwen2 decoder with BAGEL's Mixture-of-Transformers (MoT) experts, packed attention, KV cache.

Every decoder layer holds an understanding expert (`und`: text and ViT tokens) and, when
`config.mot`, a generation expert (`gen`: VAE latent tokens) of identical shapes. Each token is
computed by its own expert only, with static shapes. A `route` is the string 'und' / 'gen' (all
tokens use one expert), a `Routing` (each expert's tokens gathered into a buffer of static
capacity, see `route_tokens`), or a (B, T) bool array, True for generation tokens (a `Routing` with
both capacities T: exact for any mask, but each expert's buffer is the whole row). Attention is
one joint self-attention over the whole packed row, with RoPE from explicit per-token positions
and an explicit (B, T, S) mask (see `attention_mask.packed_mask`).

Why capacities: a dense matmul needs its token count at trace time, so an expert's buffer must
hold the most tokens a row can give it; the sum of the two capacities is the work. A row's
generation tokens are its latent tokens, at most the row's latent slots (`SequenceInputs`
`latent_seq_index` width Nl, which the row builder enforces), and its understanding tokens are at
most `SequenceInputs.max_und` when the rows declare it (rows sized by a sample filling its canvas
hold at most T - Nl: then the two buffers together are one row, half today's both-experts work).
Padding tokens (attending nothing, attended by nothing, read by no loss) go to neither expert.

The decoder layers are one `layers.stack`: every layer parameter is stacked along a leading layer
axis (logical name `layers`, never sharded), and the forward and KV-cache paths run them as one
`lax.scan` (`layers.scan`) under the config's remat policy, so a 28-layer model compiles one layer
body. The KV cache is stacked the same way, (L, B, S, K, D), and is scanned alongside.

State paths: `embed_tokens.embedding`, `layers.{und,gen}.{input_norm, q_proj, k_proj, v_proj,
o_proj, q_norm, k_norm, post_norm, mlp.{gate,up,down}_proj}` (each of shape (L, ...)),
`final_norm.{und,gen}.scale`, `lm_head.kernel`. Checkpoint key tables address layer i as
`layers.{i}.<rest>` (`checkpoints/loader.py` stacks and unstacks). Everything of the generation
expert has `gen` in its path, so `nnx.PathContains('gen')` selects exactly the parameters stage I
trains.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from robust_u1_jax import files, sharding
from robust_u1_jax.models import attention, layers
from robust_u1_jax.models.kv_cache import KVCache

Array = jax.Array
Route = Any  # 'und' | 'gen' | None (= 'und') | Routing | (B, T) bool array
COMPONENT = "llm"
GEN_FILTER = nnx.PathContains("gen")


@dataclasses.dataclass(frozen=True)
class LLMConfig:
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float = 1e6
  rms_eps: float = 1e-6
  qk_norm: bool = True
  attention_bias: bool = True  # q/k/v projections; o_proj never has a bias
  tie_word_embeddings: bool = False
  mot: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  remat: str = "none"  # layers.REMAT_POLICIES: 'none' | 'full' | 'dots' | 'minimal'
  attention: str = "auto"  # attention.IMPLEMENTATIONS: 'auto' | 'xla' | 'splash' | 'cudnn'

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"LLMConfig: num_heads {self.num_heads} is not a multiple of "
                       f"num_kv_heads {self.num_kv_heads}")
    if self.head_dim % 2:
      raise ValueError(f"LLMConfig: head_dim must be even for RoPE, got {self.head_dim}")
    if self.tie_word_embeddings:
      raise ValueError("LLMConfig: tie_word_embeddings=True is not supported (BAGEL unties them)")
    layers.remat_policy(self.remat)  # validates the name
    attention.check_implementation(self.attention, "LLMConfig.attention")

  @classmethod
  def tiny(cls, **overrides) -> LLMConfig:
    kw = dict(vocab_size=2048, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
              num_kv_heads=2, head_dim=16, rope_theta=10000.0)
    return cls(**{**kw, **overrides})

  @classmethod
  def bagel_7b(cls, **overrides) -> LLMConfig:
    """Qwen2.5-7B shapes with QK-norm and the generation expert (BAGEL-7B-MoT)."""
    kw = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28,
              num_heads=28, num_kv_heads=4, head_dim=128, rope_theta=1e6, rms_eps=1e-6,
              qk_norm=True, attention_bias=True, mot=True)
    return cls(**{**kw, **overrides})

  @classmethod
  def bagel_1p5b(cls, **overrides) -> LLMConfig:
    """Qwen2.5-1.5B shapes with QK-norm and the generation expert, BAGEL's design at about 1.5B
    parameters per expert (no released checkpoint: trained from random weights, e.g. to measure
    one GPU). Qwen2.5-1.5B ties its embeddings; here they are untied, as in BAGEL."""
    kw = dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_layers=28,
              num_heads=12, num_kv_heads=2, head_dim=128, rope_theta=1e6, rms_eps=1e-6,
              qk_norm=True, attention_bias=True, mot=True)
    return cls(**{**kw, **overrides})

  @classmethod
  def from_hf_config(cls, hf: Mapping[str, Any], *, source: str = "config", **overrides
                     ) -> LLMConfig:
    """From a Qwen2/Qwen3 `config.json` or BAGEL `llm_config.json` dict.

    BAGEL's file is a Qwen2 config plus `qk_norm` and `layer_module` ("Qwen2MoTDecoderLayer" for
    the MoT model). Qwen3 configs imply QK-norm and read `attention_bias` (default False).
    """
    def field(key, kind, default=files.REQUIRED):
      return files.json_field(hf, key, source, kind, default)

    model_type = field("model_type", str, "qwen2")
    if model_type not in ("qwen2", "qwen3"):
      raise files.UnreadableFile(f"{source}: model_type {model_type!r} is not a Qwen2-family "
                                 "decoder; allowed: qwen2, qwen3")
    if field("hidden_act", str, "silu") != "silu":
      raise files.UnreadableFile(f"{source}: hidden_act {hf['hidden_act']!r} unsupported; only "
                                 "'silu'")
    rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    if not isinstance(rope, Mapping):
      raise files.UnreadableFile(f"{source}: field 'rope_scaling' = {rope!r}: not an object")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
      raise files.UnreadableFile(f"{source}: rope scaling {rope_type!r} unsupported; only "
                                 "'default'")
    if field("use_sliding_window", bool, False):
      raise files.UnreadableFile(f"{source}: use_sliding_window=true is unsupported")
    theta = field("rope_theta", float, files.json_field(rope, "rope_theta", source, float,
                                                         10000.0))
    hidden, heads = field("hidden_size", int), field("num_attention_heads", int)
    is_qwen3 = model_type == "qwen3"
    kw = dict(
        vocab_size=field("vocab_size", int), hidden_size=hidden,
        intermediate_size=field("intermediate_size", int),
        num_layers=field("num_hidden_layers", int), num_heads=heads,
        num_kv_heads=field("num_key_value_heads", int, heads),
        head_dim=field("head_dim", int, hidden // heads), rope_theta=theta,
        rms_eps=field("rms_norm_eps", float, 1e-6), qk_norm=field("qk_norm", bool, is_qwen3),
        attention_bias=field("attention_bias", bool, not is_qwen3),
        tie_word_embeddings=field("tie_word_embeddings", bool, False),
        mot="MoT" in field("layer_module", str, ""))
    # The config's own checks, in the file's field names (LLMConfig's are the model's).
    if heads % kw["num_kv_heads"]:
      raise files.UnreadableFile(f"{source}: num_attention_heads {heads} is not a multiple of "
                                 f"num_key_value_heads {kw['num_kv_heads']}")
    if kw["head_dim"] % 2:
      named = "head_dim" if "head_dim" in hf else "hidden_size / num_attention_heads"
      raise files.UnreadableFile(f"{source}: {named} = {kw['head_dim']}: RoPE needs it even")
    if kw["tie_word_embeddings"]:
      raise files.UnreadableFile(f"{source}: tie_word_embeddings = true is unsupported (BAGEL "
                                 "unties the embeddings)")
    with files.naming(source):  # the rest of the config's own checks
      return cls(**{**kw, **overrides})


class Expert(nnx.Module):
  """One expert's parameters in one decoder layer (norms, attention projections, MLP)."""

  def __init__(self, c: LLMConfig, *, rngs: nnx.Rngs):
    kw = dict(dtype=c.dtype, param_dtype=c.param_dtype, rngs=rngs)
    q_dim, kv_dim = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
    self.input_norm = layers.RMSNorm(c.hidden_size, c.rms_eps, **kw)
    self.q_proj = layers.dense(c.hidden_size, q_dim, ("embed", "q_heads"),
                               use_bias=c.attention_bias, **kw)
    self.k_proj = layers.dense(c.hidden_size, kv_dim, ("embed", "kv_heads"),
                               use_bias=c.attention_bias, **kw)
    self.v_proj = layers.dense(c.hidden_size, kv_dim, ("embed", "kv_heads"),
                               use_bias=c.attention_bias, **kw)
    self.o_proj = layers.dense(q_dim, c.hidden_size, ("q_heads", "embed"), use_bias=False, **kw)
    self.q_norm = layers.RMSNorm(c.head_dim, c.rms_eps, **kw) if c.qk_norm else None
    self.k_norm = layers.RMSNorm(c.head_dim, c.rms_eps, **kw) if c.qk_norm else None
    self.post_norm = layers.RMSNorm(c.hidden_size, c.rms_eps, **kw)
    self.mlp = layers.SwiGLU(c.hidden_size, c.intermediate_size, **kw)

  def qkv(self, x_btd: Array) -> tuple[Array, Array, Array]:
    """Input norm, projections and QK-norm (before RoPE, as in Qwen3/BAGEL)."""
    b, t, _ = x_btd.shape
    h = self.input_norm(x_btd)
    q = self.q_proj(h).reshape(b, t, self.num_heads, self.head_dim)
    k = self.k_proj(h).reshape(b, t, self.num_kv_heads, self.head_dim)
    v = self.v_proj(h).reshape(b, t, self.num_kv_heads, self.head_dim)
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    return q, k, v

  def out(self, attn_bthd: Array) -> Array:
    b, t = attn_bthd.shape[:2]
    return self.o_proj(attn_bthd.reshape(b, t, -1))

  def ffn(self, x_btd: Array) -> Array:
    return self.mlp(self.post_norm(x_btd))

  def out_ffn(self, x_btd: Array, attn_bthd: Array) -> Array:
    """The rest of the layer after attention, both residual branches (one gather per expert)."""
    x_btd = x_btd + self.out(attn_bthd)
    return x_btd + self.ffn(x_btd)


@flax.struct.dataclass
class Routing:
  """Where each expert's tokens sit in the row: (B, C) positions, C the expert's static capacity;
  unused slots hold T (out of the row: gathered clamped, dropped when scattered back)."""
  und_index: Array  # (B, Cu) int32
  gen_index: Array  # (B, Cg) int32


def route_tokens(is_gen_bt: Array, valid_bt: Array | None = None, *,
                 und_capacity: int | None = None, gen_capacity: int | None = None) -> Routing:
  """Routing of a (B, T) token-to-expert mask (True: generation expert) by one stable sort per
  row: understanding tokens first, then invalid ones (`valid_bt` False: padding, no expert), then
  generation tokens; the first `und_capacity` and the last `gen_capacity` sorted slots (default T
  each) are the experts' buffers. A capacity below an expert's token count of a row drops its
  extra tokens, so capacities must be bounds the rows guarantee (module docstring)."""
  b, t = is_gen_bt.shape
  cu = t if und_capacity is None else int(und_capacity)
  cg = t if gen_capacity is None else int(gen_capacity)
  if not (0 <= cu <= t and 0 <= cg <= t):
    raise ValueError(f"expert capacities ({cu}, {cg}) must lie in [0, T={t}]")
  valid = jnp.ones((b, t), bool) if valid_bt is None else valid_bt
  expert_bt = jnp.where(valid, jnp.where(is_gen_bt, 2, 0), 1)  # sort key: und, none, gen
  order_bt = jnp.argsort(expert_bt, axis=1, stable=True).astype(jnp.int32)

  def slots(order, expert):
    mine = jnp.take_along_axis(expert_bt, order, axis=1) == expert
    return jnp.where(mine, order, t)

  return Routing(slots(order_bt[:, :cu], 0), slots(order_bt[:, t - cg:], 2))


# Per row (vmapped: gathers and scatters with a batch dimension), so rows sharded over devices stay
# on theirs; an explicit row index makes XLA's partitioner all-gather the activations.
def _gather(x_btd: Array, index_bn: Array) -> Array:
  index_bn = jnp.minimum(index_bn, x_btd.shape[1] - 1)
  return jax.vmap(lambda x_td, index_n: x_td[index_n])(x_btd, index_bn)


def _scatter(base_btd: Array, index_bn: Array, values_bnd: Array) -> Array:
  return jax.vmap(lambda base_td, index_n, values_nd: base_td.at[index_n].set(
      values_nd.astype(base_td.dtype), mode="drop"))(base_btd, index_bn, values_bnd)


def _routed(fn, und: nnx.Module, gen: nnx.Module | None, route: Route, base, *args):
  """fn(expert, *args) with each token through its own expert only.

  `args` are (B, T, ...) arrays; `fn`'s outputs are (B, T, ...) like `base` (a pytree): with a
  `Routing`, each expert runs on its gathered tokens and its outputs are written over `base` at
  those tokens (tokens of neither expert keep `base`).
  """
  if gen is None or route is None or (isinstance(route, str) and route == "und"):
    return fn(und, *args)
  if isinstance(route, str):
    if route != "gen":
      raise ValueError(f"route must be 'und', 'gen', a Routing or a (B, T) bool array, got "
                       f"{route!r}")
    return fn(gen, *args)
  out = base
  for expert, index_bn in ((und, route.und_index), (gen, route.gen_index)):
    if index_bn.shape[1]:
      values = fn(expert, *(_gather(a, index_bn) for a in args))
      out = jax.tree.map(lambda o, v, i=index_bn: _scatter(o, i, v), out, values)
  return out


class FinalNorm(nnx.Module):
  """`norm` for understanding tokens, `norm_moe_gen` for generation tokens."""

  def __init__(self, c: LLMConfig, *, rngs: nnx.Rngs):
    kw = dict(dtype=c.dtype, param_dtype=c.param_dtype, rngs=rngs)
    self.und = layers.RMSNorm(c.hidden_size, c.rms_eps, **kw)
    self.gen = layers.RMSNorm(c.hidden_size, c.rms_eps, **kw) if c.mot else None

  def __call__(self, x_btd: Array, route: Route) -> Array:
    return _routed(lambda norm, x: norm(x), self.und, self.gen, route, x_btd, x_btd)


class DecoderLayer(nnx.Module):

  def __init__(self, c: LLMConfig, *, rngs: nnx.Rngs):
    self.rope_theta = c.rope_theta
    self.attention = c.attention
    self.und = Expert(c, rngs=rngs)
    self.gen = Expert(c, rngs=rngs) if c.mot else None

  def __call__(self, x_btd: Array, positions_bt: Array, mask_bts: Array, route: Route,
               past_kv: tuple[Array, Array] | None = None
               ) -> tuple[Array, tuple[Array, Array]]:
    """One layer; `past_kv` (B, S, K, D) cached keys/values come before this call's tokens.

    Returns the new hidden states and this call's keys (after RoPE) and values, for the cache.
    """
    heads = ("batch", "length", "act_heads", None)
    b, t, _ = x_btd.shape
    c = self.und
    base = tuple(jnp.zeros((b, t, n, c.head_dim), x_btd.dtype)
                 for n in (c.num_heads, c.num_kv_heads, c.num_kv_heads))
    q, k, v = _routed(lambda e, x: e.qkv(x), self.und, self.gen, route, base, x_btd)
    q = sharding.activation_constraint(layers.apply_rope(q, positions_bt, self.rope_theta),
                                       heads, COMPONENT)
    k = sharding.activation_constraint(layers.apply_rope(k, positions_bt, self.rope_theta),
                                       heads, COMPONENT)
    v = sharding.activation_constraint(v, heads, COMPONENT)
    k_all, v_all = k, v
    if past_kv is not None:
      k_all = jnp.concatenate([past_kv[0].astype(k.dtype), k], axis=1)
      v_all = jnp.concatenate([past_kv[1].astype(v.dtype), v], axis=1)
    attn = attention.attention(q, k_all, v_all, mask_bts, implementation=self.attention)
    x_btd = _routed(lambda e, x, a: e.out_ffn(x, a), self.und, self.gen, route, x_btd, x_btd,
                    attn)
    x_btd = sharding.activation_constraint(x_btd, ("batch", "length", "act_embed"), COMPONENT)
    return x_btd, (k, v)


class Qwen2MoT(nnx.Module):
  """The BAGEL language model. Inputs are embeddings so image tokens can be spliced in."""

  def __init__(self, config: LLMConfig, *, rngs: nnx.Rngs):
    c = self.config = config
    self.embed_tokens = nnx.Embed(
        c.vocab_size, c.hidden_size, dtype=c.dtype, param_dtype=c.param_dtype,
        embedding_init=nnx.with_partitioning(nnx.initializers.normal(0.02), ("vocab", "embed")),
        rngs=rngs)
    self.layers = layers.stack(lambda r: DecoderLayer(c, rngs=r), c.num_layers, rngs)
    self.final_norm = FinalNorm(c, rngs=rngs)
    self.lm_head = layers.dense(c.hidden_size, c.vocab_size, ("embed", "vocab"), use_bias=False,
                                dtype=c.dtype, param_dtype=c.param_dtype, rngs=rngs)

  def _route(self, route: Route) -> Route:
    if not self.config.mot:
      return "und"
    if isinstance(route, jax.Array | np.ndarray):  # a per-token mask: full capacities, exact
      return route_tokens(jnp.asarray(route, bool))
    return route

  def embed(self, tokens_bt: Array) -> Array:
    return self.embed_tokens(tokens_bt)

  def logits(self, hidden_btd: Array) -> Array:
    return self.lm_head(hidden_btd)

  def __call__(self, x_btd: Array, positions_bt: Array, mask_btt: Array,
               route: Route = None) -> Array:
    """Full forward over packed rows -> final hidden states (per-expert final norm).

    Args:
      x_btd: input embeddings (text from `embed`, image tokens from their towers).
      positions_bt: RoPE positions.
      mask_btt: bool attention mask, e.g. `attention_mask.packed_mask(layout)`, or an
        `attention.PackedMask` (the fused kernels take it without a (T, T) array).
      route: a `Routing`; a (B, T) bool mask, True for generation-expert tokens; or 'und' /
        'gen' for all tokens.
    """
    route = self._route(route)
    x_btd = sharding.activation_constraint(x_btd, ("batch", "length", "act_embed"), COMPONENT)

    def step(layer, x_btd, _):
      return layer(x_btd, positions_bt, mask_btt, route)[0], None

    x_btd, _ = layers.scan(self.layers, step, x_btd, remat=self.config.remat)
    return self.final_norm(x_btd, route)

  # KV-cache paths. One cache row holds one sample's context.

  def init_cache(self, batch: int, max_length: int, dtype=None) -> KVCache:
    c = self.config
    return KVCache.create(c.num_layers, batch, max_length, c.num_kv_heads, c.head_dim,
                          dtype or c.dtype)

  def extend(self, cache: KVCache, x_btd: Array, positions_bt: Array, mask_btt: Array | None,
             route: Route = None, valid_bt: Array | None = None, *, write: bool = True
             ) -> tuple[Array, KVCache]:
    """New tokens attend every valid cached slot and each other by `mask_btt` (None: valid
    tokens all of each other, `KVCache.attention_mask`).

    With `write`, their keys/values are appended (padding tokens, `valid_bt` False, are stored
    as invalid slots). Returns final hidden states (per-expert final norm) and the cache.
    """
    route = self._route(route)
    b, t, _ = x_btd.shape
    valid_bt = jnp.ones((b, t), bool) if valid_bt is None else valid_bt
    mask_bts = cache.attention_mask(mask_btt, valid_bt)

    def step(layer, x_btd, past_kv):
      x_btd, kv = layer(x_btd, positions_bt, mask_bts, route, past_kv)
      return x_btd, kv if write else None  # unwritten keys are not stacked

    # The cache's (L, B, S, K, D) keys and values are scanned with the layers; the new tokens'
    # keys and values come back stacked the same way, ready for `append`.
    x_btd, new_kv = layers.scan(self.layers, step, x_btd, (cache.k, cache.v),
                                remat=self.config.remat)
    if write:
      cache = cache.append(new_kv[0], new_kv[1], valid_bt, positions_bt)
    return self.final_norm(x_btd, route), cache

  def prefill(self, cache: KVCache, x_btd: Array, positions_bt: Array, mask_btt: Array,
              route: Route = None, valid_bt: Array | None = None) -> tuple[Array, KVCache]:
    """Writes a context (e.g. a prompt with its packed mask) into the cache."""
    return self.extend(cache, x_btd, positions_bt, mask_btt, route, valid_bt)

  def decode(self, cache: KVCache, x_btd: Array, route: Route = "und",
             positions_bt: Array | None = None) -> tuple[Array, KVCache]:
    """Appends T (usually 1) causal tokens after the cached context; positions continue."""
    b, t, _ = x_btd.shape
    if positions_bt is None:
      positions_bt = cache.next_position[:, None] + jnp.arange(t, dtype=jnp.int32)
    causal_tt = jnp.tril(jnp.ones((t, t), bool))
    return self.extend(cache, x_btd, positions_bt, jnp.broadcast_to(causal_tt, (b, t, t)), route)

  def denoise(self, cache: KVCache, x_btd: Array, positions_bt: Array,
              valid_bt: Array | None = None) -> Array:
    """Noisy latent tokens (generation expert) against the cached context; cache unchanged.

    The latent tokens attend the whole valid context of their row and each other
    (bidirectionally), exactly as a noisy block at the end of the packed sequence; padding
    tokens (`valid_bt` False) attend nothing.
    """
    hidden, _ = self.extend(cache, x_btd, positions_bt, None, "gen", valid_bt, write=False)
    return hidden

