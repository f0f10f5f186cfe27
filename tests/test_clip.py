"""CLIP towers: parity with open_clip (OpenAI naming) and transformers CLIPModel, preprocessing."""

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from PIL import Image
from safetensors.torch import save_file

from robust_u1_jax import sharding
from robust_u1_jax.checkpoints import clip_keys
from robust_u1_jax.checkpoints import key_table as kt
from robust_u1_jax.models import clip

CFG = clip.CLIPConfig.tiny()


def randomise(model: torch.nn.Module, seed: int) -> torch.nn.Module:
  torch.manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():  # LayerNorms start at 1/0 and logit_scale is fixed: perturb all.
      p.add_(0.1 * torch.randn_like(p))
  return model.eval()


def open_clip_model():
  import open_clip
  model = open_clip.model.CLIP(
      embed_dim=CFG.embed_dim,
      vision_cfg=dict(layers=CFG.vision_layers, width=CFG.vision_width,
                      head_width=CFG.vision_width // CFG.vision_heads, patch_size=CFG.patch_size,
                      image_size=CFG.image_size, mlp_ratio=CFG.vision_mlp_dim / CFG.vision_width),
      text_cfg=dict(context_length=CFG.context_length, vocab_size=CFG.vocab_size,
                    width=CFG.text_width, heads=CFG.text_heads, layers=CFG.text_layers,
                    mlp_ratio=CFG.text_mlp_dim / CFG.text_width),
      quick_gelu=True)
  return randomise(model, 0)


def hf_model(hidden_act: str, eos_token_id: int):
  from transformers import CLIPConfig as HFConfig, CLIPModel
  config = HFConfig(
      text_config=dict(vocab_size=CFG.vocab_size, hidden_size=CFG.text_width,
                       intermediate_size=CFG.text_mlp_dim, num_hidden_layers=CFG.text_layers,
                       num_attention_heads=CFG.text_heads,
                       max_position_embeddings=CFG.context_length, hidden_act=hidden_act,
                       eos_token_id=eos_token_id, bos_token_id=1, pad_token_id=0),
      vision_config=dict(hidden_size=CFG.vision_width, intermediate_size=CFG.vision_mlp_dim,
                         num_hidden_layers=CFG.vision_layers, num_attention_heads=CFG.vision_heads,
                         image_size=CFG.image_size, patch_size=CFG.patch_size,
                         hidden_act=hidden_act),
      projection_dim=CFG.embed_dim)
  return randomise(CLIPModel(config), 1), config


def inputs(seed=0, eot=None):
  rng = np.random.default_rng(seed)
  pixels = rng.normal(size=(3, CFG.image_size, CFG.image_size, 3)).astype(np.float32)
  eot = CFG.vocab_size - 1 if eot is None else eot
  tokens = np.zeros((3, CFG.context_length), np.int64)
  for i, n in enumerate((4, 7, CFG.context_length - 1)):  # EOT at different places
    tokens[i, 0] = 1
    tokens[i, 1:n] = rng.integers(3, CFG.vocab_size - 1, n - 1)
    tokens[i, n] = eot
  return pixels, tokens


def load(tensors, tmp_path, config=CFG):
  path = str(tmp_path / "clip.safetensors")
  save_file({k: v.detach().contiguous() for k, v in tensors.items()}, path)
  model = clip.CLIP(config, rngs=nnx.Rngs(0))
  return model, clip_keys.load_clip(path, model)


def close(got, want):
  want = np.asarray(want)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-4 * np.abs(want).max(), rtol=0)


@pytest.mark.torch_ref
def test_matches_open_clip(tmp_path):
  ref = open_clip_model()
  model, naming = load(ref.state_dict(), tmp_path)
  assert naming == "open_clip"
  pixels, tokens = inputs()
  with torch.no_grad():
    want_img = ref.encode_image(torch.from_numpy(pixels).permute(0, 3, 1, 2), normalize=True)
    want_txt = ref.encode_text(torch.from_numpy(tokens), normalize=True)
    want_logits = ref.logit_scale.exp() * want_img @ want_txt.T
  encode = nnx.jit(lambda m, p, t: (m.encode_image(p), m.encode_text(t), m(p, t)))
  img, txt, logits = encode(model, pixels, tokens)
  close(img, want_img)
  close(txt, want_txt)
  close(logits, want_logits)

  exported = clip_keys.export_clip(model, naming="open_clip")
  state = ref.state_dict()
  assert set(exported) == set(state)
  for k, v in exported.items():
    np.testing.assert_allclose(v, state[k].numpy(), atol=1e-7, err_msg=k)


@pytest.mark.torch_ref
@pytest.mark.parametrize("hidden_act,eos", [("gelu", CFG.vocab_size - 1), ("quick_gelu", 2)])
def test_matches_transformers(hidden_act, eos, tmp_path):
  ref, hf_config = hf_model(hidden_act, eos)
  config = clip.CLIPConfig.from_hf_config(hf_config.to_dict())
  assert config == clip.CLIPConfig(**{**vars(CFG), "activation": hidden_act,
                                     "eos_token_id": None if eos == 2 else eos})
  model, naming = load(ref.state_dict(), tmp_path, config)
  assert naming == "hf"
  # eos 2 is transformers' legacy marker for argmax pooling: the EOT is then the largest id.
  pixels, tokens = inputs(seed=1, eot=CFG.vocab_size - 1)
  with torch.no_grad():
    want_img = ref.get_image_features(pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2))
    want_txt = ref.get_text_features(input_ids=torch.from_numpy(tokens))
  want_img = getattr(want_img, "pooler_output", want_img)
  want_txt = getattr(want_txt, "pooler_output", want_txt)
  encode = nnx.jit(lambda m, p, t: (m.encode_image(p, normalize=False),
                                    m.encode_text(t, normalize=False)))
  img, txt = encode(model, pixels, tokens)
  close(img, want_img)
  close(txt, want_txt)

  exported = clip_keys.export_clip(model, naming="hf")
  state = {k: v for k, v in ref.state_dict().items() if not k.endswith("position_ids")}
  assert set(exported) == set(state)
  for k, v in exported.items():
    np.testing.assert_allclose(v, state[k].numpy(), atol=1e-7, err_msg=k)


def test_eos_pooling_takes_first_eos_not_argmax():
  """With an explicit eos_token_id, pooling takes its first occurrence, not the largest id."""
  model = clip.CLIP(clip.CLIPConfig(**{**vars(CFG), "eos_token_id": 5}), rngs=nnx.Rngs(0))
  tokens = np.array([[1, 50, 5, 90, 0, 0, 0, 0, 0, 0, 0, 0]])

  @nnx.jit
  def pooled_and_reference(text, tokens):
    hidden = text.ln_final(text.encoder(
        text.token_embedding[...][tokens] + text.pos_embedding[...],
        np.tril(np.ones((12, 12), bool))[None]))
    return text(tokens), hidden[:, 2] @ text.proj[...]

  got, want = pooled_and_reference(model.text, tokens)
  np.testing.assert_allclose(got, want, atol=1e-6)


@pytest.mark.torch_ref
def test_preprocess_matches_open_clip_transform():
  from open_clip.transform import image_transform
  rng = np.random.default_rng(0)
  for h, w in [(48, 64), (100, 70), (32, 32)]:
    small = rng.uniform(0, 255, (h // 4 + 1, w // 4 + 1, 3)).astype(np.uint8)
    img = np.asarray(Image.fromarray(small).resize((w, h), Image.BILINEAR))
    want = image_transform(32, is_train=False)(Image.fromarray(img)).permute(1, 2, 0).numpy()
    got = np.asarray(clip.preprocess(img, 32))
    diff = np.abs(got - want) * np.asarray(clip.STD)  # in [0, 1] pixel units
    # PIL rounds the resized image to uint8; we stay in float (see `preprocess`).
    assert diff.max() < 2 / 255 and diff.mean() < 0.5 / 255, (h, w, diff.max(), diff.mean())
  batch = np.stack([img, img[::-1]]).astype(np.float32) / 255
  np.testing.assert_allclose(clip.preprocess(batch, 32)[1], clip.preprocess(batch[1], 32),
                             atol=1e-6)


def test_loader_detects_and_reports(tmp_path):
  with pytest.raises(kt.CheckpointError, match="not a CLIP checkpoint"):
    load({"foo": torch.zeros(1)}, tmp_path)
  state = open_clip_model().state_dict()
  del state["visual.ln_post.bias"]
  with pytest.raises(kt.CheckpointError, match=r"missing.*visual\.ln_post\.bias"):
    load(state, tmp_path)


def test_sharded_image_tower_matches_single_device():
  """The reward path (image embeddings) under the 'clip' rules: fsdp 4 x tensor 2."""
  mesh = sharding.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
  create = lambda: clip.CLIP(CFG, rngs=nnx.Rngs(0))
  sharded = sharding.create_sharded(create, "clip", mesh)
  # (layers, embed, mlp): the stacked layer axis is never sharded.
  assert sharded.visual.encoder.layers.mlp.fc1.kernel[...].sharding.spec[:2] == (None, "fsdp")
  pixels = np.concatenate([inputs()[0]] * 3)[:8]
  forward = nnx.jit(lambda m, p: m.encode_image(p))
  want = forward(create(), pixels)
  with jax.set_mesh(mesh):
    got = forward(sharded, pixels)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
