"""The FLUX autoencoder (BAGEL's generation VAE) in Flax NNX, channels-last.

Architecture of the LDM/FLUX `AutoEncoder`: the encoder maps an image in [-1, 1] to the moments
(mean, log-variance) of a diagonal Gaussian over `z_channels` latent channels at 1/8 resolution for
ch_mult (1, 2, 4, 4); the decoder maps latents back. Resolution changes between levels: the encoder
pads (0, 1, 0, 1) and applies a stride-2 3x3 conv, the decoder repeats pixels x2 then convolves. The
mid block (resnet, single-head spatial self-attention, resnet) runs at the lowest resolution.

The model-facing latent is normalised: `encode` returns `scale * (mean - shift)` and `decode`
inverts it before the decoder, as FLUX does. `Encoder` and `Decoder` are the raw networks.

State paths mirror FLUX's `ae.safetensors` keys (`encoder.down.{i}.block.{j}.conv1.kernel`,
`decoder.up.{i}.upsample.conv.kernel`, `encoder.mid.attn_1.proj_out.kernel`, ...), with `up.{i}`
indexed by resolution level like LDM (the decoder runs them from the last level to the first).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from robust_u1_jax import sharding

Array = jax.Array
COMPONENT = "vae"
# Query rows per attention chunk: bounds the score matrix at large images (a 1024 px image has
# 16384 latent positions at the mid block, whose full score matrix would be 1 GiB in fp32).
ATTENTION_CHUNK = 4096


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """Shapes of the autoencoder; `flux()` is `ae.safetensors` of FLUX.1 (and BAGEL)."""
  resolution: int = 256
  in_channels: int = 3
  ch: int = 128
  out_ch: int = 3
  ch_mult: tuple[int, ...] = (1, 2, 4, 4)
  num_res_blocks: int = 2
  z_channels: int = 16
  scale_factor: float = 0.3611
  shift_factor: float = 0.1159
  num_groups: int = 32
  norm_eps: float = 1e-6

  def __post_init__(self):
    for c in self.block_channels:
      if c % self.num_groups:
        raise ValueError(f"VAEConfig: num_groups {self.num_groups} does not divide the block width "
                         f"{c} (ch {self.ch} x ch_mult {self.ch_mult})")
    if not self.ch_mult or self.num_res_blocks < 1:
      raise ValueError(f"VAEConfig: need a non-empty ch_mult and num_res_blocks >= 1, got "
                       f"ch_mult={self.ch_mult}, num_res_blocks={self.num_res_blocks}")

  @property
  def block_channels(self) -> tuple[int, ...]:
    return tuple(self.ch * m for m in self.ch_mult)

  @property
  def downsample(self) -> int:
    """Pixels per latent position along each side."""
    return 2 ** (len(self.ch_mult) - 1)

  @classmethod
  def flux(cls) -> VAEConfig:
    return cls()

  @classmethod
  def tiny(cls) -> VAEConfig:
    """Same contract as FLUX (downsample 8, 2x2-patchifiable latents) at a few kFLOPs per pixel."""
    return cls(resolution=64, ch=8, ch_mult=(1, 2, 2, 2), num_res_blocks=1, z_channels=4,
               num_groups=4)


# PyTorch's default conv init scale, drawn uniformly: the weights always come from a checkpoint, and
# a truncated normal costs seconds of XLA compile per kernel shape on CPU.
_KERNEL_INIT = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def conv(in_ch: int, out_ch: int, kernel: int, *, stride: int = 1, padding="SAME",
         dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs) -> nnx.Conv:
  """NHWC conv with an HWIO kernel named (None, None, conv_in, conv_out)."""
  return nnx.Conv(
      in_ch, out_ch, (kernel, kernel), strides=stride, padding=padding, dtype=dtype,
      param_dtype=param_dtype,
      kernel_init=nnx.with_partitioning(_KERNEL_INIT, (None, None, "conv_in", "conv_out")),
      bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("conv_out",)),
      rngs=rngs)


def group_norm(channels: int, config: VAEConfig, *, dtype, param_dtype,
               rngs: nnx.Rngs) -> nnx.GroupNorm:
  # Two-pass variance: the E[x^2] - E[x]^2 form loses precision against PyTorch's GroupNorm.
  return nnx.GroupNorm(
      channels, num_groups=config.num_groups, epsilon=config.norm_eps, use_fast_variance=False,
      dtype=dtype, param_dtype=param_dtype,
      scale_init=nnx.with_partitioning(nnx.initializers.ones_init(), ("norm",)),
      bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("norm",)),
      rngs=rngs)


def _constrain(x_bhwc: Array) -> Array:
  return sharding.activation_constraint(x_bhwc, ("batch", None, None, None), COMPONENT)


class ResnetBlock(nnx.Module):
  """`skip(x) + conv2(silu(norm2(conv1(silu(norm1(x))))))`; skip is a 1x1 `nin_shortcut` when
  the widths differ, else the identity."""

  def __init__(self, in_ch: int, out_ch: int, config: VAEConfig, *, dtype, param_dtype,
               rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.norm1 = group_norm(in_ch, config, **kw)
    self.conv1 = conv(in_ch, out_ch, 3, **kw)
    self.norm2 = group_norm(out_ch, config, **kw)
    self.conv2 = conv(out_ch, out_ch, 3, **kw)
    self.nin_shortcut = conv(in_ch, out_ch, 1, **kw) if in_ch != out_ch else None

  def __call__(self, x_bhwc: Array) -> Array:
    h = self.conv1(jax.nn.silu(self.norm1(x_bhwc)))
    h = self.conv2(jax.nn.silu(self.norm2(h)))
    skip = self.nin_shortcut(x_bhwc) if self.nin_shortcut is not None else x_bhwc
    return skip + h


def spatial_attention(q_btc: Array, k_btc: Array, v_btc: Array) -> Array:
  """Single-head softmax attention over all positions; scores and softmax in float32."""
  scale = q_btc.shape[-1] ** -0.5
  t = q_btc.shape[1]

  def rows(q):
    s = jnp.einsum("bqc,bkc->bqk", q, k_btc, preferred_element_type=jnp.float32) * scale
    p = jax.nn.softmax(s, axis=-1).astype(v_btc.dtype)
    return jnp.einsum("bqk,bkc->bqc", p, v_btc)

  if t <= ATTENTION_CHUNK or t % ATTENTION_CHUNK:
    return rows(q_btc)
  b, _, c = q_btc.shape
  q_nbqc = q_btc.reshape(b, t // ATTENTION_CHUNK, ATTENTION_CHUNK, c).transpose(1, 0, 2, 3)
  out_nbqc = jax.lax.map(rows, q_nbqc)
  return out_nbqc.transpose(1, 0, 2, 3).reshape(b, t, c)


class AttnBlock(nnx.Module):
  """`x + proj_out(attention(q, k, v))` over the H*W positions; q/k/v/proj_out are 1x1 convs."""

  def __init__(self, channels: int, config: VAEConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.norm = group_norm(channels, config, **kw)
    self.q = conv(channels, channels, 1, **kw)
    self.k = conv(channels, channels, 1, **kw)
    self.v = conv(channels, channels, 1, **kw)
    self.proj_out = conv(channels, channels, 1, **kw)

  def __call__(self, x_bhwc: Array) -> Array:
    b, h, w, c = x_bhwc.shape
    y = self.norm(x_bhwc)
    q, k, v = (proj(y).reshape(b, h * w, c) for proj in (self.q, self.k, self.v))
    out = spatial_attention(q, k, v).reshape(b, h, w, c)
    return x_bhwc + self.proj_out(out)


class MidBlock(nnx.Module):
  def __init__(self, channels: int, config: VAEConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.block_1 = ResnetBlock(channels, channels, config, **kw)
    self.attn_1 = AttnBlock(channels, config, **kw)
    self.block_2 = ResnetBlock(channels, channels, config, **kw)

  def __call__(self, x_bhwc: Array) -> Array:
    return self.block_2(self.attn_1(self.block_1(x_bhwc)))


class Downsample(nnx.Module):
  """Halves H and W: pad one row/column at the bottom/right, then a stride-2 3x3 conv."""

  def __init__(self, channels: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.conv = conv(channels, channels, 3, stride=2, padding="VALID", dtype=dtype,
                     param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x_bhwc: Array) -> Array:
    return self.conv(jnp.pad(x_bhwc, ((0, 0), (0, 1), (0, 1), (0, 0))))


class Upsample(nnx.Module):
  """Doubles H and W by nearest-neighbour repetition, then a 3x3 conv."""

  def __init__(self, channels: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.conv = conv(channels, channels, 3, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x_bhwc: Array) -> Array:
    return self.conv(jnp.repeat(jnp.repeat(x_bhwc, 2, axis=1), 2, axis=2))


class Level(nnx.Module):
  """One resolution level: resnet blocks, then an optional resampler (`downsample`/`upsample`)."""

  def __init__(self, blocks: list[ResnetBlock], *, downsample: Downsample | None = None,
               upsample: Upsample | None = None):
    self.block = nnx.List(blocks)
    self.downsample = downsample
    self.upsample = upsample

  def __call__(self, x_bhwc: Array) -> Array:
    for block in self.block:
      x_bhwc = block(x_bhwc)
    if self.downsample is not None:
      x_bhwc = self.downsample(x_bhwc)
    if self.upsample is not None:
      x_bhwc = self.upsample(x_bhwc)
    return _constrain(x_bhwc)


class Encoder(nnx.Module):
  """Image (B, H, W, in_channels) -> moments (B, H/8, W/8, 2 * z_channels): [mean, logvar]."""

  def __init__(self, config: VAEConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    widths = config.block_channels
    self.conv_in = conv(config.in_channels, config.ch, 3, **kw)
    levels, in_ch = [], config.ch
    for i, out_ch in enumerate(widths):
      blocks = []
      for _ in range(config.num_res_blocks):
        blocks.append(ResnetBlock(in_ch, out_ch, config, **kw))
        in_ch = out_ch
      last = i == len(widths) - 1
      levels.append(Level(blocks, downsample=None if last else Downsample(out_ch, **kw)))
    self.down = nnx.List(levels)
    self.mid = MidBlock(in_ch, config, **kw)
    self.norm_out = group_norm(in_ch, config, **kw)
    self.conv_out = conv(in_ch, 2 * config.z_channels, 3, **kw)

  def __call__(self, x_bhwc: Array) -> Array:
    h = self.conv_in(_constrain(x_bhwc))
    for level in self.down:
      h = level(h)
    h = self.mid(h)
    return self.conv_out(jax.nn.silu(self.norm_out(h)))


class Decoder(nnx.Module):
  """Raw latents (B, h, w, z_channels) -> image (B, 8h, 8w, out_ch)."""

  def __init__(self, config: VAEConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    widths = config.block_channels
    in_ch = widths[-1]
    self.conv_in = conv(config.z_channels, in_ch, 3, **kw)
    self.mid = MidBlock(in_ch, config, **kw)
    # Built from the lowest resolution up, stored by level index (`up.0` is full resolution).
    levels = [None] * len(widths)
    for i in reversed(range(len(widths))):
      blocks = []
      for _ in range(config.num_res_blocks + 1):
        blocks.append(ResnetBlock(in_ch, widths[i], config, **kw))
        in_ch = widths[i]
      levels[i] = Level(blocks, upsample=Upsample(in_ch, **kw) if i else None)
    self.up = nnx.List(levels)
    self.norm_out = group_norm(in_ch, config, **kw)
    self.conv_out = conv(in_ch, config.out_ch, 3, **kw)

  def __call__(self, z_bhwc: Array) -> Array:
    h = self.mid(self.conv_in(_constrain(z_bhwc)))
    for level in reversed(self.up):
      h = level(h)
    return self.conv_out(jax.nn.silu(self.norm_out(h)))


class AutoEncoder(nnx.Module):
  """FLUX autoencoder: normalised latents in, images in [-1, 1] (NHWC) out, and back."""

  def __init__(self, config: VAEConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.config = config
    self.encoder = Encoder(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.decoder = Decoder(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def latent_dist(self, x_bhwc: Array) -> tuple[Array, Array]:
    """(mean, logvar) of the raw (unnormalised) latent, each (B, H/8, W/8, z_channels)."""
    d = self.config.downsample
    if x_bhwc.ndim != 4 or x_bhwc.shape[1] % d or x_bhwc.shape[2] % d:
      raise ValueError(f"VAE encode expects images (B, H, W, C) with H and W multiples of {d}, "
                       f"got shape {x_bhwc.shape}")
    moments = self.encoder(x_bhwc)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, logvar

  def encode(self, x_bhwc: Array, key: Array | None = None) -> Array:
    """Normalised latent `scale * (z - shift)`; z is the mean, or a posterior sample given a key."""
    mean, logvar = self.latent_dist(x_bhwc)
    z = mean
    if key is not None:
      # Clamped as in LDM/diffusers so a saturated logvar cannot overflow exp().
      std = jnp.exp(0.5 * jnp.clip(logvar.astype(jnp.float32), -30.0, 20.0))
      z = mean + (std * jax.random.normal(key, mean.shape, jnp.float32)).astype(mean.dtype)
    return normalize_latent(z, self.config)

  def decode(self, z_bhwc: Array) -> Array:
    """Image in (about) [-1, 1] from a normalised latent."""
    return self.decoder(denormalize_latent(z_bhwc, self.config))

  def __call__(self, x_bhwc: Array, key: Array | None = None) -> Array:
    return self.decode(self.encode(x_bhwc, key))


def normalize_latent(z: Array, config: VAEConfig) -> Array:
  """Raw latent -> the model-facing latent: `scale * (z - shift)`."""
  return config.scale_factor * (z - config.shift_factor)


def denormalize_latent(z: Array, config: VAEConfig) -> Array:
  """Model-facing latent -> raw latent: `z / scale + shift`."""
  return z / config.scale_factor + config.shift_factor
