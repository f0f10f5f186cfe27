"""Model FLOPs of a step: the useful work, counted from the model's shapes (not the compiler's).

Model-FLOPs utilisation (MFU) = `step_flops(...)['total']` / (step time x peak FLOP/s of the
devices). What is counted, per step (2 FLOPs per multiply-add; norms, RoPE, softmax, activations,
biases and the optimizer left out, a few percent):

  LLM     per token the matmul parameters of the one expert it uses: text and ViT tokens the
          understanding expert, VAE latent tokens (clean conditioning latents and noisy targets
          alike: `Bagel.__call__` routes `token_kind == LATENT`) the generation expert; 2 FLOPs
          per parameter forward.
  attention  4 x heads x head_dim FLOPs per layer per (query, key) pair the BAGEL mask allows,
          forward (QK^T and PV): the mask's actual attended pairs of the rows (`Work`), never the
          padded T x T the XLA path computes.
  ViT     each image's real patches through SigLIP (its attention within the image), plus the
          connector; VAE encoder / decoder convolutions at each image's real size.
  heads   `lm_head` on the tokens whose logits a loss reads (`Work.logit_tokens`), the velocity
          head, `vae2llm` and the timestep embedder on latent tokens.
  backward  through frozen weights only the activation gradient (1x the forward), and only where
          a trainable parameter lies below (the LLM whenever anything of it, or of what feeds it,
          trains; never into the frozen ViT or VAE); trainable weights add their weight gradient
          (1x). Rematerialised forwards are not counted (that is hardware-FLOPs utilisation).

The work of a step is a list of `Work` items: a kind of LLM call (a packed training row, a
context prefill, a denoising step against a cached context) with its token counts and attended
pairs, times how often the step makes it. `sample_work` builds one from a sample's blocks,
`rows_work` from host-side packed rows (`SequenceInputs` of numpy arrays), `denoise_work` for a
cached denoising call.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

# Block kinds of a sample (`sample_work`): the expert each uses and how the BAGEL mask treats it.
BLOCK_KINDS = ("text", "vit", "latent", "noisy")
_GEN_KINDS = ("latent", "noisy")
# One parameter path per part, matched against a stage's trainable regexes (StageSpec.trainable).
PART_PATHS = {
    "und": "language_model.layers.und.mlp.up_proj.kernel",
    "gen": "language_model.layers.gen.mlp.up_proj.kernel",
    "embed": "language_model.embed_tokens.embedding",
    "lm_head": "language_model.lm_head.kernel",
    "vit": "vit_model.encoder.blocks.mlp.fc1.kernel",
    "connector": "connector.fc1.kernel",
    "latent_in": "vae2llm.kernel",
    "time": "time_embedder.fc1.kernel",
    "velocity_head": "llm2vae.kernel",
}


@dataclasses.dataclass(frozen=True)
class Work:
  """One kind of LLM call of a step, made `count` times (fractions allowed: an average row).

  und_tokens / gen_tokens: tokens through each expert; pairs: attended (query, key) pairs;
  vit_images: real patches of each image the ViT encodes; encode_images / decode_images: pixels
  of each image the VAE encodes / decodes; logit_tokens: tokens whose text logits a loss reads;
  velocity_tokens: latent tokens the velocity head reads. `backward`: the call's output reaches
  the loss (its gradient is taken); False for rollouts and frozen recoveries.
  """
  und_tokens: float
  gen_tokens: float
  pairs: float
  count: float = 1.0
  backward: bool = True
  vit_images: tuple[int, ...] = ()
  encode_images: tuple[int, ...] = ()
  decode_images: tuple[int, ...] = ()
  logit_tokens: float = 0.0
  velocity_tokens: float = 0.0

  def times(self, count: float, backward: bool | None = None) -> Work:
    return dataclasses.replace(self, count=self.count * count,
                               backward=self.backward if backward is None else backward)


def block_pairs(blocks: Sequence[tuple[str, int]]) -> int:
  """(query, key) pairs one sample's blocks attend under the BAGEL mask (attention_mask.py):
  text causal within its block, images and noisy blocks full within theirs, every block sees the
  earlier blocks of its sample except noisy ones."""
  pairs, visible = 0, 0
  for kind, n in blocks:
    if kind not in BLOCK_KINDS:
      raise ValueError(f"block kind {kind!r}: use one of {BLOCK_KINDS}")
    pairs += n * visible + (n * (n + 1) // 2 if kind == "text" else n * n)
    if kind != "noisy":
      visible += n
  return pairs


def sample_work(blocks: Sequence[tuple[str, int]], pixels_per_token: int, *, count: float = 1.0,
                backward: bool = True, logit_tokens: float = 0.0,
                encode: bool = True) -> Work:
  """A packed sample of `blocks` [(kind, tokens)], kind in BLOCK_KINDS; each 'vit' block is one
  image's patches, each 'latent' / 'noisy' block one VAE image (encoded when `encode`) of
  tokens x pixels_per_token pixels (image-block markers are text blocks of their own, or
  left out). The velocity head reads the noisy tokens."""
  und = sum(n for kind, n in blocks if kind not in _GEN_KINDS)
  gen = sum(n for kind, n in blocks if kind in _GEN_KINDS)
  noisy = sum(n for kind, n in blocks if kind == "noisy")
  return Work(und, gen, block_pairs(blocks), count, backward,
              vit_images=tuple(n for kind, n in blocks if kind == "vit"),
              encode_images=tuple(n * pixels_per_token for kind, n in blocks
                                  if kind in _GEN_KINDS and encode),
              logit_tokens=logit_tokens, velocity_tokens=noisy)


def denoise_work(context_keys: float, block_tokens: int, *, count: float = 1.0,
                 backward: bool = False) -> Work:
  """One noisy block of `block_tokens` latent tokens against a cached context of `context_keys`
  valid keys (`Bagel.denoise_velocity`): the block attends the context and itself in full."""
  return Work(0, block_tokens, block_tokens * (context_keys + block_tokens), count, backward,
              velocity_tokens=block_tokens)


def rows_work(inputs: Any, pixels_per_token: int, *, backward: bool = True,
              logit_tokens: float = 0.0) -> Work:
  """The work of host-side packed rows (a `bagel.SequenceInputs` of numpy arrays, as a stage's
  `host_inputs` builds them): tokens by expert, the mask's exact attended pairs (from the layout's
  blocks), the real ViT images (segments) and VAE images (latent blocks)."""
  from robust_u1_jax.models import bagel as bagel_lib  # the token kinds; keeps this module light

  kind = np.asarray(inputs.token_kind)
  layout = inputs.layout
  sample, block = np.asarray(layout.sample_id), np.asarray(layout.block_id)
  causal, noisy = np.asarray(layout.causal), np.asarray(layout.noisy)
  pairs = 0
  for r in range(kind.shape[0]):
    for s in np.unique(sample[r][sample[r] >= 0]):
      where = np.flatnonzero(sample[r] == s)
      _, starts, sizes = np.unique(block[r, where], return_index=True, return_counts=True)
      first = where[starts]
      blocks = [("text" if causal[r, i] else "noisy" if noisy[r, i] else "vit", int(n))
                for i, n in zip(first, sizes)]
      pairs += block_pairs(blocks)
  latent = kind == bagel_lib.LATENT
  images = [n * pixels_per_token for r in range(kind.shape[0])
            for n in np.bincount(np.unique(block[r][latent[r]], return_inverse=True)[1])]
  segments = np.asarray(inputs.vit_segment_ids)
  vit_images = tuple(int(n) for r in range(segments.shape[0])
                     for n in np.bincount(segments[r])[1:] if n)
  gen = int(latent.sum())
  return Work(int((kind >= 0).sum()) - gen, gen, pairs, 1.0, backward, vit_images=vit_images,
              encode_images=tuple(int(n) for n in images), logit_tokens=logit_tokens,
              velocity_tokens=int((latent & noisy).sum()))


def trainable_parts(trainable: Iterable[str]) -> frozenset[str]:
  """The parts of PART_PATHS a stage's trainable regexes select."""
  patterns = [re.compile(p) for p in trainable]
  return frozenset(part for part, path in PART_PATHS.items()
                   if any(p.search(path) for p in patterns))


def expert_flops_per_token(llm) -> float:
  """Forward FLOPs of one token through one expert of every decoder layer (its matmuls)."""
  q, kv = llm.num_heads * llm.head_dim, llm.num_kv_heads * llm.head_dim
  params = llm.hidden_size * (2 * q + 2 * kv) + 3 * llm.hidden_size * llm.intermediate_size
  return 2.0 * params * llm.num_layers


def vit_flops(vit, llm_hidden: int, patches: int) -> tuple[float, float]:
  """(ViT encoder, connector) forward FLOPs of one image of `patches` patches."""
  w = vit.hidden_size
  per_layer = 2 * patches * (4 * w * w + 2 * w * vit.mlp_dim) + 4 * patches * patches * w
  encoder = 2 * patches * vit.patch_dim * w + vit.num_layers * per_layer
  connector = 2 * patches * (w * llm_hidden + llm_hidden * llm_hidden)
  return float(encoder), float(connector)


def vae_flops_per_pixel(vae) -> tuple[float, float]:
  """(encoder, decoder) forward FLOPs per image pixel, convolutions only (the mid block's
  attention, quadratic in the latent positions, is added by `vae_flops`)."""
  widths = vae.block_channels

  def conv(cin, cout, k, scale):  # per input-image pixel at a resolution 1 / scale per side
    return 2.0 * k * k * cin * cout / (scale * scale)

  def resnet(cin, cout, scale):
    return conv(cin, cout, 3, scale) + conv(cout, cout, 3, scale) + (
        conv(cin, cout, 1, scale) if cin != cout else 0.0)

  def mid(c, scale):
    return 2 * resnet(c, c, scale) + 4 * conv(c, c, 1, scale)

  enc, cin, scale = conv(vae.in_channels, vae.ch, 3, 1), vae.ch, 1
  for i, cout in enumerate(widths):
    for _ in range(vae.num_res_blocks):
      enc += resnet(cin, cout, scale)
      cin = cout
    if i < len(widths) - 1:
      scale *= 2
      enc += conv(cout, cout, 3, scale)  # stride 2: output resolution
  enc += mid(cin, scale) + conv(cin, 2 * vae.z_channels, 3, scale)
  dec, cin = conv(vae.z_channels, widths[-1], 3, scale) + mid(widths[-1], scale), widths[-1]
  for i in reversed(range(len(widths))):
    for _ in range(vae.num_res_blocks + 1):
      dec += resnet(cin, widths[i], scale)
      cin = widths[i]
    if i:
      scale //= 2
      dec += conv(cin, cin, 3, scale)  # after nearest upsampling: the finer resolution
  dec += conv(cin, vae.out_ch, 3, 1)
  return enc, dec


def vae_flops(vae, pixels: float, encode: bool) -> float:
  """Encoder or decoder forward FLOPs of one image of `pixels` pixels: convolutions and the mid
  block's attention over all latent positions."""
  enc, dec = vae_flops_per_pixel(vae)
  positions = pixels / vae.downsample ** 2
  return pixels * (enc if encode else dec) + 4.0 * positions * positions * vae.block_channels[-1]


def step_flops(model_config, work: Sequence[Work], trainable: Sequence[str]) -> dict[str, Any]:
  """Model FLOPs of one step: {'total', 'forward', 'backward', 'llm', 'attention', 'vit', 'vae',
  'heads', 'tokens', 'pairs', 'trainable_parts'}, over all devices.

  `model_config`: a `bagel.BagelConfig`; `work`: the step's LLM calls (`Work`, e.g. from
  `sample_work`, `rows_work`, `denoise_work`); `trainable`: the stage's trainable-parameter
  regexes (`StageSpec.trainable`). See the module docstring for what is counted.
  """
  llm, parts = model_config.llm, trainable_parts(trainable)
  h = llm.hidden_size
  expert = expert_flops_per_token(llm)
  per_pair = 4.0 * llm.num_heads * llm.head_dim * llm.num_layers
  # Activation gradients run through the LLM when anything in it, or feeding it, trains.
  llm_grad = bool(parts & {"und", "gen", "embed", "connector", "vit", "latent_in", "time"})
  out = dict(llm=0.0, attention=0.0, vit=0.0, vae=0.0, heads=0.0, forward=0.0, backward=0.0)

  def add(key, forward, backward):
    out[key] += forward + backward
    out["forward"] += forward
    out["backward"] += backward

  for w in work:
    n = w.count
    bwd = w.backward and llm_grad
    for tokens, name in ((w.und_tokens, "und"), (w.gen_tokens, "gen")):
      f = n * tokens * expert
      add("llm", f, f * (bwd + (w.backward and name in parts)))
    f = n * w.pairs * per_pair
    add("attention", f, 2 * f * bwd)
    for patches in w.vit_images:
      encoder, connector = vit_flops(model_config.vit, h, patches)
      vit_grad = w.backward and "vit" in parts
      add("vit", n * encoder, n * encoder * 2 * vit_grad)
      add("vit", n * connector,
          n * connector * (vit_grad + (w.backward and "connector" in parts)))
    vae = model_config.vae
    add("vae", n * (sum(vae_flops(vae, p, True) for p in w.encode_images)
                    + sum(vae_flops(vae, p, False) for p in w.decode_images)), 0.0)
    latents = w.gen_tokens
    c = model_config.latent_channels
    heads = ((2.0 * w.logit_tokens * h * llm.vocab_size, w.backward and llm_grad,
              "lm_head"),
             (2.0 * w.velocity_tokens * h * c, w.backward and llm_grad, "velocity_head"),
             (2.0 * latents * c * h, False, "latent_in"),
             (2.0 * latents * (256 * h + h * h), False, "time"))
    for forward, input_grad, name in heads:
      add("heads", n * forward, n * forward * (input_grad + (w.backward and name in parts)))
  out["total"] = out["forward"] + out["backward"]
  out["tokens"] = sum(w.count * (w.und_tokens + w.gen_tokens) for w in work)
  out["pairs"] = sum(w.count * w.pairs for w in work)
  out["trainable_parts"] = tuple(sorted(parts))
  return out


def mfu(model_flops: float, seconds: float, peak_flops: float) -> float:
  """Model-FLOPs utilisation: useful FLOPs / (step time x the devices' peak FLOP/s)."""
  return model_flops / (seconds * peak_flops)


def describe(counts: Mapping[str, Any]) -> str:
  """One line: total and its parts."""
  p = lambda key: f"{counts[key]:.3g}"
  return (f"{p('total')} FLOP (forward {p('forward')}, backward {p('backward')}; LLM matmuls "
          f"{p('llm')}, attention {p('attention')} over {counts['pairs']:.3g} attended pairs, "
          f"ViT {p('vit')}, VAE {p('vae')}, heads {p('heads')})")
