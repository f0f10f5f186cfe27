"""Qwen2-MoT decoder: parity with transformers Qwen2/Qwen3 through the real loader, MoT routing,
BAGEL key table round trip, sharded forward, remat."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.torch import save_file
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM
from transformers.models.qwen2 import modeling_qwen2

from robust_u1_jax import sharding
from robust_u1_jax.checkpoints import key_table as kt
from robust_u1_jax.checkpoints import llm_keys
from robust_u1_jax.models import attention_mask as am
from robust_u1_jax.models import qwen2_mot

TINY = qwen2_mot.LLMConfig.tiny()
B, T = 2, 12


def _hf_kwargs(c):
  return dict(vocab_size=c.vocab_size, hidden_size=c.hidden_size,
              intermediate_size=c.intermediate_size, num_hidden_layers=c.num_layers,
              num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
              rms_norm_eps=c.rms_eps, rope_theta=c.rope_theta, tie_word_embeddings=False,
              attn_implementation="eager")


def hf_model(qk_norm: bool, seed: int):
  """Tiny transformers reference, every weight random (norms too). Qwen3 = Qwen2 + QK-norm; its
  o_proj bias (Qwen3 ties it to the q/k/v bias flag) is zeroed, as BAGEL's o_proj has none."""
  torch.manual_seed(seed)
  if qk_norm:
    model = Qwen3ForCausalLM(Qwen3Config(head_dim=TINY.head_dim, attention_bias=True,
                                         **_hf_kwargs(TINY)))
  else:
    model = Qwen2ForCausalLM(Qwen2Config(**_hf_kwargs(TINY)))
  model.eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("o_proj.bias"):
        p.zero_()
      elif "norm" in name or name.endswith("bias"):
        p.copy_(1.0 + 0.2 * torch.randn_like(p) if "norm" in name else 0.2 * torch.randn_like(p))
  return model


def torch_state(model) -> dict[str, torch.Tensor]:
  return {k: v.contiguous() for k, v in model.state_dict().items()
          if not k.endswith("o_proj.bias") and "rotary_emb" not in k}


def bagel_state(und, gen) -> dict[str, torch.Tensor]:
  """BAGEL's on-disk MoT naming: the generation expert's tensors get `_moe_gen` suffixes."""
  out = {"language_model." + k: v for k, v in torch_state(und).items()}
  for k, v in torch_state(gen).items():
    if k.startswith("model.layers."):
      k = (k.replace("self_attn.q_proj.", "self_attn.q_proj_moe_gen.")
           .replace("self_attn.k_proj.", "self_attn.k_proj_moe_gen.")
           .replace("self_attn.v_proj.", "self_attn.v_proj_moe_gen.")
           .replace("self_attn.o_proj.", "self_attn.o_proj_moe_gen.")
           .replace("self_attn.q_norm.", "self_attn.q_norm_moe_gen.")
           .replace("self_attn.k_norm.", "self_attn.k_norm_moe_gen.")
           .replace(".mlp.", ".mlp_moe_gen.")
           .replace("input_layernorm.", "input_layernorm_moe_gen.")
           .replace("post_attention_layernorm.", "post_attention_layernorm_moe_gen."))
      out["language_model." + k] = v.clone()  # safetensors refuses shared storage
    elif k == "model.norm.weight":
      out["language_model.model.norm_moe_gen.weight"] = v.clone()
  return out


def load(config, state, tmp_path, name="model.safetensors", prefix=""):
  path = str(tmp_path / name)
  save_file(state, path)
  model = qwen2_mot.Qwen2MoT(config, rngs=nnx.Rngs(123))
  llm_keys.load_llm(path, model, torch_prefix=prefix)
  return model


def inputs(seed=0):
  tokens = np.random.RandomState(seed).randint(0, TINY.vocab_size, (B, T))
  layout = am.stack_layouts([am.pack_samples([[("text", T)]], T)[0]] * B)
  mask = am.packed_mask(jax.tree.map(jnp.asarray, layout))
  positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  return tokens, positions, mask


@nnx.jit
def forward(model, tokens, positions, mask, route):
  return model.logits(model(model.embed(tokens), positions, mask, route))


def reference_logits(model, tokens):
  with torch.no_grad():
    return model(torch.from_numpy(tokens)).logits.numpy()


def assert_close(ours, ref, rel=1e-4):
  ours, ref = np.asarray(ours), np.asarray(ref)
  scale = max(1.0, float(np.abs(ref).max()))
  np.testing.assert_allclose(ours, ref, atol=rel * scale, rtol=0)


@pytest.mark.torch_ref
@pytest.mark.parametrize("qk_norm", [False, True], ids=["qwen2", "qwen3_qk_norm"])
def test_understanding_path_matches_transformers(tmp_path, qk_norm):
  ref = hf_model(qk_norm, seed=0)
  config = dataclasses.replace(TINY, qk_norm=qk_norm, mot=False)
  model = load(config, torch_state(ref), tmp_path)
  tokens, positions, mask = inputs()
  assert_close(forward(model, tokens, positions, mask, jnp.zeros((B, T), bool)),
               reference_logits(ref, tokens))


@pytest.mark.torch_ref
def test_mot_understanding_route_ignores_generation_weights(tmp_path):
  und, gen = hf_model(True, seed=0), hf_model(True, seed=1)
  model = load(TINY, bagel_state(und, gen), tmp_path, prefix="language_model.")
  tokens, positions, mask = inputs()
  assert_close(forward(model, tokens, positions, mask, jnp.zeros((B, T), bool)),
               reference_logits(und, tokens))


@pytest.mark.torch_ref
def test_mot_with_equal_experts_equals_plain_model(tmp_path):
  und = hf_model(True, seed=0)
  model = load(TINY, bagel_state(und, und), tmp_path, prefix="language_model.")
  tokens, positions, mask = inputs()
  route = jnp.asarray(np.random.RandomState(5).rand(B, T) > 0.5)
  assert_close(forward(model, tokens, positions, mask, route), reference_logits(und, tokens))


def brute_force_mot(und, gen, tokens, positions, mask, route):
  """Per-token expert choice with transformers' own submodules; joint attention over the row."""
  c = TINY
  group = c.num_heads // c.num_kv_heads
  with torch.no_grad():
    x = und.model.embed_tokens(torch.from_numpy(tokens))
    cos, sin = und.model.rotary_emb(x, torch.from_numpy(np.asarray(positions)).long())
    for li in range(c.num_layers):
      pick = lambda b, t: (gen if route[b, t] else und).model.layers[li]  # noqa: E731
      q = torch.zeros(B, c.num_heads, T, c.head_dim)
      k = torch.zeros(B, c.num_kv_heads, T, c.head_dim)
      v = torch.zeros(B, c.num_kv_heads, T, c.head_dim)
      for b in range(B):
        for t in range(T):
          layer = pick(b, t)
          h = layer.input_layernorm(x[b, t])
          attn = layer.self_attn
          q[b, :, t] = attn.q_norm(attn.q_proj(h).view(c.num_heads, c.head_dim))
          k[b, :, t] = attn.k_norm(attn.k_proj(h).view(c.num_kv_heads, c.head_dim))
          v[b, :, t] = attn.v_proj(h).view(c.num_kv_heads, c.head_dim)
      q, k = modeling_qwen2.apply_rotary_pos_emb(q, k, cos, sin)
      k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
      logits = q @ k.transpose(-1, -2) / c.head_dim ** 0.5
      logits = logits.masked_fill(~torch.from_numpy(np.asarray(mask))[:, None], -torch.inf)
      o = (logits.softmax(-1) @ v).transpose(1, 2).reshape(B, T, -1)
      new_x = torch.empty_like(x)
      for b in range(B):
        for t in range(T):
          layer = pick(b, t)
          y = x[b, t] + layer.self_attn.o_proj(o[b, t])
          new_x[b, t] = y + layer.mlp(layer.post_attention_layernorm(y))
      x = new_x
    out = torch.stack([torch.stack([(gen if route[b, t] else und).model.norm(x[b, t])
                                    for t in range(T)]) for b in range(B)])
    return und.lm_head(out).numpy()


@pytest.mark.torch_ref
def test_mot_routes_each_token_to_its_own_expert(tmp_path):
  und, gen = hf_model(True, seed=0), hf_model(True, seed=1)
  model = load(TINY, bagel_state(und, gen), tmp_path, prefix="language_model.")
  tokens, positions, _ = inputs()
  # A packed layout with image blocks, so routing meets a non-causal mask.
  layout = am.stack_layouts([am.pack_samples([[("text", 3), ("image", 5), ("text", 4)]], T)[0],
                             am.pack_samples([[("text", 2), ("noisy", 6)], [("text", 4)]], T)[0]])
  mask = am.packed_mask(jax.tree.map(jnp.asarray, layout))
  route = np.asarray(~layout.causal & (layout.sample_id >= 0))
  route[0, 0] = True  # a text token on the generation expert: routing is per token, not per kind
  ours = forward(model, tokens, positions, mask, jnp.asarray(route))
  ref = brute_force_mot(und, gen, tokens, positions, mask, route)
  assert_close(ours, ref)


def test_generation_mlp_change_only_moves_generation_tokens():
  model = qwen2_mot.Qwen2MoT(TINY, rngs=nnx.Rngs(0))
  tokens, positions, mask = inputs()
  route = jnp.asarray(np.random.RandomState(6).rand(B, T) > 0.5)
  before = forward(model, tokens, positions, mask, route)
  down = model.layers.gen.mlp.down_proj.kernel  # stacked (L, in, out): the last layer only
  down.set_value(down.get_value().at[-1].add(0.5))
  after = forward(model, tokens, positions, mask, route)
  changed = np.abs(np.asarray(after - before)).max(-1) > 1e-6
  np.testing.assert_array_equal(changed, np.asarray(route))


def test_generation_filter_selects_exactly_the_generation_expert():
  model = qwen2_mot.Qwen2MoT(TINY, rngs=nnx.Rngs(0))
  gen = kt.flat_paths(nnx.state(model, nnx.All(nnx.Param, qwen2_mot.GEN_FILTER)))
  every = kt.flat_paths(nnx.state(model, nnx.Param))
  table = kt.KeyTable(llm_keys.llm_rules(mot=True, qk_norm=True))
  # Exactly the tensors BAGEL names `_moe_gen` (layer 0 of a stacked parameter speaks for all).
  layer0 = lambda p: p.replace("layers.", "layers.0.")  # noqa: E731
  assert sorted(gen) == sorted(p for p in every if "moe_gen" in table.to_torch_key(layer0(p))[0])
  assert len(gen) == 14 + 1  # each stacked over the layers, and the final norm


def test_bagel_round_trip_is_exact(tmp_path):
  state = bagel_state(hf_model(True, 0), hf_model(True, 1))
  state["language_model.model.rotary_emb.inv_freq"] = torch.ones(8)  # ignored buffer
  model = load(TINY, state, tmp_path, prefix="language_model.")
  exported = llm_keys.export_llm(model, torch_prefix="language_model.")
  del state["language_model.model.rotary_emb.inv_freq"]
  assert sorted(exported) == sorted(state)
  for k, v in state.items():
    np.testing.assert_array_equal(exported[k], v.numpy(), err_msg=k)


def test_loader_errors_name_the_key(tmp_path):
  state = torch_state(hf_model(False, 0))
  config = dataclasses.replace(TINY, qk_norm=False, mot=False)
  missing = dict(state)
  del missing["model.layers.1.mlp.up_proj.weight"]
  with pytest.raises(kt.CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
    load(config, missing, tmp_path, "missing.safetensors")
  wrong = dict(state)
  wrong["model.norm.weight"] = torch.ones(7)
  with pytest.raises(kt.CheckpointError, match=r"'model\.norm\.weight' has shape \(7,\)"):
    load(config, wrong, tmp_path, "wrong.safetensors")
  with pytest.raises(kt.CheckpointError, match="unexpected.*q_norm"):
    load(config, torch_state(hf_model(True, 0)), tmp_path, "extra.safetensors")


def test_config_from_hf_dicts():
  hf = Qwen2Config(**{k: v for k, v in _hf_kwargs(TINY).items() if k != "attn_implementation"})
  config = qwen2_mot.LLMConfig.from_hf_config(hf.to_dict())
  assert config == dataclasses.replace(TINY, qk_norm=False, mot=False)
  # BAGEL's llm_config.json: a Qwen2 config plus qk_norm and the MoT layer module; no head_dim.
  bagel = dict(model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
               num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
               rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False, qk_norm=True,
               layer_module="Qwen2MoTDecoderLayer", hidden_act="silu")
  assert qwen2_mot.LLMConfig.from_hf_config(bagel) == qwen2_mot.LLMConfig.bagel_7b()
  qwen3 = Qwen3Config(head_dim=32, hidden_size=64, num_attention_heads=4,
                      num_key_value_heads=2).to_dict()
  c3 = qwen2_mot.LLMConfig.from_hf_config(qwen3)
  assert c3.qk_norm and not c3.attention_bias and c3.head_dim == 32 and not c3.mot
  with pytest.raises(ValueError, match="model_type 'llama'"):
    qwen2_mot.LLMConfig.from_hf_config({**bagel, "model_type": "llama"})
  with pytest.raises(ValueError, match="rope scaling 'yarn'"):
    qwen2_mot.LLMConfig.from_hf_config({**bagel, "rope_scaling": {"rope_type": "yarn"}})
  # The file's field names, not LLMConfig's (it read "LLMConfig: num_heads 3 is not a multiple
  # of num_kv_heads 2" about a file that has neither).
  for edit, words in (({"num_attention_heads": 30}, "llm_config.json: num_attention_heads 30 is "
                       "not a multiple of num_key_value_heads 4"),
                      ({"head_dim": 7}, "llm_config.json: head_dim = 7: RoPE needs it even"),
                      ({"tie_word_embeddings": True}, "llm_config.json: tie_word_embeddings = "
                       "true is unsupported")):
    with pytest.raises(ValueError, match=re.escape(words)):
      qwen2_mot.LLMConfig.from_hf_config({**bagel, **edit}, source="llm_config.json")
  with pytest.raises(ValueError, match="required field 'hidden_size' missing"):
    qwen2_mot.LLMConfig.from_hf_config({k: v for k, v in bagel.items() if k != "hidden_size"},
                                       source="llm_config.json")


def test_bagel_7b_shapes_and_parameter_count():
  # Two of the 28 layers keep the abstract build fast; every layer has the same shapes.
  config = qwen2_mot.LLMConfig.bagel_7b(num_layers=2)
  model = nnx.eval_shape(lambda: qwen2_mot.Qwen2MoT(config, rngs=nnx.Rngs(0)))
  flat = kt.flat_paths(nnx.state(model, nnx.Param))
  # Layer parameters are stacked along a leading layer axis.
  assert flat["layers.gen.k_proj.kernel"].shape == (2, 3584, 512)
  assert flat["layers.und.mlp.down_proj.kernel"].shape == (2, 18944, 3584)
  assert flat["layers.und.q_norm.scale"].shape == (2, 128)
  assert flat["lm_head.kernel"].shape == (3584, 152064)
  # Qwen2.5-7B has 7,615,616,512 parameters (28 layers, untied embeddings, final norm); MoT
  # duplicates each layer and the final norm, and QK-norm adds 2 x 128 per layer and expert.
  embeddings = 2 * 152064 * 3584
  per_layer = (7_615_616_512 - embeddings - 3584) // 28 + 2 * 128
  assert (7_615_616_512 - embeddings - 3584) % 28 == 0
  expected = embeddings + 2 * 3584 + 2 * 2 * per_layer  # 2 layers, 2 experts
  assert sum(int(np.prod(v.shape)) for v in flat.values()) == expected


def test_sharded_forward_matches_single_device():
  mesh = sharding.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
  config = dataclasses.replace(TINY, num_layers=1)
  create = lambda: qwen2_mot.Qwen2MoT(config, rngs=nnx.Rngs(0))  # noqa: E731
  sharded, single = sharding.create_sharded(create, "llm", mesh), create()
  spec = sharded.layers.gen.q_proj.kernel.get_value().sharding.spec
  assert tuple(spec) == (None, "fsdp", "tensor")  # the layer axis is never sharded
  tokens = np.random.RandomState(0).randint(0, TINY.vocab_size, (4, T))
  positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (4, T))
  mask = jnp.broadcast_to(jnp.tril(jnp.ones((T, T), bool)), (4, T, T))
  route = jnp.asarray(np.random.RandomState(1).rand(4, T) > 0.5)
  expected = forward(single, tokens, positions, mask, route)
  with jax.set_mesh(mesh):
    got = forward(sharded, tokens, positions, mask, route)
  assert_close(got, expected, rel=1e-5)


def test_remat_keeps_values_and_gradients():
  tokens, positions, mask = inputs()
  route = jnp.asarray(np.random.RandomState(2).rand(B, T) > 0.5)
  config = dataclasses.replace(TINY, num_layers=1)

  @nnx.jit
  def loss_and_grad(model):
    def loss(m):
      return jnp.mean(jnp.square(m(m.embed(tokens), positions, mask, route)))
    return nnx.value_and_grad(loss)(model)

  l0, g0 = loss_and_grad(qwen2_mot.Qwen2MoT(config, rngs=nnx.Rngs(0)))
  for policy in ("full", "dots", "minimal"):
    remat = qwen2_mot.Qwen2MoT(dataclasses.replace(config, remat=policy), rngs=nnx.Rngs(0))
    l1, g1 = loss_and_grad(remat)
    np.testing.assert_allclose(l0, l1, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), g0, g1)
    # The training steps' form: the model merged inside jax.value_and_grad from the trainable
    # state (traced there) and the frozen rest (traced one level up, by jit).
    graphdef, trainable, frozen = nnx.split(remat, lambda path, _: "mlp" in path, ...)

    @jax.jit
    def functional(trainable, frozen):
      def loss(t):
        m = nnx.merge(graphdef, t, frozen)
        return jnp.mean(jnp.square(m(m.embed(tokens), positions, mask, route)))
      return jax.value_and_grad(loss)(trainable)

    l2, g2 = functional(trainable, frozen)
    np.testing.assert_allclose(l0, l2, rtol=1e-6)
    g0_mlp = nnx.state(g0).filter(lambda path, _: "mlp" in path)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), g0_mlp, g2)
