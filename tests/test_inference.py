"""The inference package against its own references: cached decoding equals an uncached forward,
a batch equals its samples one by one, guidance with scales of 1 equals no guidance, the batched
guidance branches equal separate calls, and one ViT resize for every path."""

import dataclasses
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from robust_u1_jax import sampling
from robust_u1_jax.data import answer_format, sequence
from robust_u1_jax.data import shapes
from robust_u1_jax.data import tokenizer as tokenizer_lib
from robust_u1_jax.inference import context, engine, images, reasoner, recovery
from robust_u1_jax.inference import text
from robust_u1_jax.models import bagel

RULES = images.ImageRules(64, 32, 16, 64, 32, 8)  # the tiny world's resize rules
FEW_STEPS = recovery.Sampler(num_steps=4)


@pytest.fixture(scope="module")
def tiny(random_bagel):
  tok = tokenizer_lib.load_tokenizer()
  model = random_bagel(bagel.BagelConfig.tiny(vocab_size=len(tok)))
  return engine.Engine.from_model(model, tok, RULES), model


@pytest.fixture(scope="module")
def world_images():
  world = shapes.ShapesWorld("validation")
  return [world[i]["image"] for i in range(3)]


def test_cached_greedy_decode_equals_uncached_argmax(tiny, world_images):
  eng, model = tiny
  image = world_images[0]
  conv = eng.conversation(seed=0, posterior="mean")
  vae_image = conv.add_image(image)
  prompt = "What colour is the largest shape?"
  conv.add_text(prompt)
  # A stop token the random model never reaches: all 12 tokens are decoded.
  ids, stop = conv.generate_text(max_new_tokens=12, stop_ids=(len(eng.tokenizer) + 7,))
  assert stop == -1 and len(ids) == 12

  # One uncached forward over [image][prompt][<|im_start|> + the generated tokens].
  vit_image = np.asarray(images.vit_resize(vae_image, RULES.vit_size(*vae_image.shape[:2])))
  fed = [eng.special["im_start"]] + ids[:-1]
  blocks = context.image_blocks(vae_image, vit_image) + [
      sequence.Text(eng.encode_block(prompt)), sequence.Text(fed)]
  rows = context.rows([blocks], model.config, eng.markers)
  latents = context.gather_latents(
      context.encode_images(model, jnp.asarray(vae_image)[None, None]), rows)
  hidden = model(jax.tree.map(jnp.asarray, rows), latents, jnp.zeros(latents.shape[:2]))
  logits = model.text_logits(hidden)[0, -len(fed):]
  np.testing.assert_array_equal(np.argmax(np.asarray(logits), -1), ids)


def test_batched_answers_equal_uncached_argmax_of_each_row(random_bagel, world_images):
  """`Engine.generate_batch`, every evaluation answer: greedy by default, each row's
  `Latent(image=k)` reading image k of its stack (rows of the corrupted + recovered layout, two
  images in other orders), equal to one uncached forward's argmax per row."""
  tok = tokenizer_lib.load_tokenizer()
  model = random_bagel(bagel.BagelConfig.tiny(vocab_size=len(tok)), seed=1)
  # The random model's text barely depends on its VAE tokens (its greedy answer was the same
  # whatever the second image); scaled up, they steer it, so a row reading the wrong image of its
  # stack answers otherwise.
  model.vae2llm.kernel.set_value(model.vae2llm.kernel.get_value() * 30)
  eng = engine.Engine.from_model(model, tok, RULES)
  question = eng.encode_block("What colour is the largest shape?")
  vit = lambda im: np.asarray(images.vit_resize(im, RULES.vit_size(*im.shape[:2])))

  def blocks(first, second):
    return [sequence.Latent(64, 64, image=0), sequence.Vit(sequence.vit_input(vit(first))),
            sequence.Text(question), sequence.Latent(64, 64, image=1),
            sequence.Vit(sequence.vit_input(vit(second)))]

  # Images far apart (one the other's negative), so reading the wrong one changes the answer.
  pairs = [(world_images[0], 255 - world_images[0]), (255 - world_images[1], world_images[1])]
  rows = [blocks(a, b) for a, b in pairs]
  stacks = np.stack([np.stack(pair) for pair in pairs])
  outs = eng.generate_batch(rows, stacks, max_new_tokens=10)  # no temperature: the default's
  assert [len(ids) for ids in outs] == [10, 10]  # the random model never writes <|im_end|>

  for row, stack, ids in zip(rows, stacks, outs):
    fed = [eng.special["im_start"]] + ids[:-1]
    inputs = context.rows([row + [sequence.Text(fed)]], model.config, eng.markers)
    latents = context.gather_latents(context.encode_images(model, jnp.asarray(stack)[None]),
                                     inputs)
    hidden = model(jax.tree.map(jnp.asarray, inputs), latents, jnp.zeros(latents.shape[:2]))
    logits = model.text_logits(hidden)[0, -len(fed):]
    np.testing.assert_array_equal(np.argmax(np.asarray(logits), -1), ids)


def test_text_generation_stops_at_a_stop_token(tiny, world_images):
  eng, _ = tiny
  conv = eng.conversation(seed=0, posterior="mean")
  conv.add_image(world_images[0])
  conv.add_text("Describe the image.")
  ids, _ = conv.generate_text(max_new_tokens=6, stop_ids=(len(eng.tokenizer) + 7,))
  short, stop = conv.generate_text(max_new_tokens=6, stop_ids=(ids[2],))
  first = ids.index(ids[2])
  assert stop == ids[2] and short == ids[:first]


def test_generate_rows_stop_independently(tiny):
  _, model = tiny
  cache = model.init_cache(2, 64)
  start = jnp.asarray([5, 9], jnp.int32)
  free = text.generate(model, cache, start, jax.random.PRNGKey(0), max_new_tokens=5,
                       temperature=0.0, stop_ids=(10**6,))
  stop_token = int(free.tokens[0, 1])
  out = text.generate(model, cache, start, jax.random.PRNGKey(0), max_new_tokens=5,
                      temperature=0.0, stop_ids=(stop_token,))
  first_hit = int(np.argmax(np.asarray(free.tokens[0]) == stop_token))
  assert int(out.length[0]) == first_hit + 1 and int(out.stop[0]) == stop_token
  assert np.all(np.asarray(out.tokens[0, first_hit + 1:]) == -1)
  # The other row goes on as if alone (unless it meets the stop token itself).
  row1 = np.asarray(free.tokens[1])
  n1 = int(np.argmax(row1 == stop_token)) + 1 if stop_token in row1 else 5
  np.testing.assert_array_equal(np.asarray(out.tokens[1, :n1]), row1[:n1])


def test_contexts_follow_bagel_bookkeeping(tiny, world_images):
  eng, _ = tiny
  conv = eng.conversation(seed=0, posterior="mean")
  conv.add_text("First a caption.")  # text before the image stays in no_text, as in BAGEL
  n_text = int(conv.contexts.full.valid.sum())
  conv.add_image(world_images[1])
  n_image = int(conv.contexts.full.valid.sum()) - n_text
  conv.add_text("Then a question.")
  n_second = int(conv.contexts.full.valid.sum()) - n_text - n_image
  c = conv.contexts
  assert int(c.no_text.valid.sum()) == n_text + n_image
  assert int(c.no_image.valid.sum()) == n_text + n_second
  # The VAE and ViT blocks of the image take one RoPE position each.
  assert int(c.full.next_position[0]) == n_text + 2 + n_second
  # A generated image joins the full and no_text contexts.
  conv.add_image(world_images[2], generated=True)
  assert int(conv.contexts.no_text.valid.sum()) == n_text + 2 * n_image
  assert int(conv.contexts.no_image.valid.sum()) == n_text + n_second


def test_recovery_batch_equals_one_by_one(tiny, world_images):
  eng, _ = tiny
  keys = jnp.stack([jax.random.fold_in(jax.random.PRNGKey(3), i) for i in range(3)])
  together, latents = eng.recover(world_images, sampler=FEW_STEPS, keys=keys)
  assert together.shape == (3, 64, 64, 3) and together.dtype == np.uint8
  for i, image in enumerate(world_images):
    alone, alone_latents = eng.recover([image], sampler=FEW_STEPS, keys=keys[i:i + 1])
    np.testing.assert_allclose(alone_latents[0], latents[i], rtol=1e-4, atol=1e-4)
    assert np.abs(alone[0].astype(int) - together[i].astype(int)).max() <= 1
  # The posterior sample moves the recovery; the mean is deterministic.
  mean, _ = eng.recover(world_images[:1], sampler=FEW_STEPS, keys=keys[:1], posterior="mean")
  assert not np.array_equal(mean[0], together[0])


def test_a_recovery_s_steps_show_as_a_bar_and_change_nothing(tiny, world_images, monkeypatch,
                                                             tmp_path):
  # With a bar the sampler's moves run one program call each, so the host sees each step; the
  # result is the one program's, and every program is one JAX's persistent cache keeps (a host
  # callback in the sampler's scan made the recovery a program compiled again on every run).
  eng, _ = tiny
  shown = []

  class Bar:  # what the bar is asked to show
    def __init__(self, *, total, initial, desc, **unused):
      shown.append(("open", desc, initial, total))

    def update(self, n):
      shown.append(n)

    def close(self):
      shown.append("close")
  monkeypatch.setattr(engine, "progress_lib", types.SimpleNamespace(bar=Bar))
  keys = engine.image_keys(0, [0])
  plain, plain_latents = eng.recover(world_images[:1], sampler=FEW_STEPS, keys=keys)
  assert not shown
  barred, barred_latents = eng.recover(world_images[:1], sampler=FEW_STEPS, keys=keys,
                                       progress="recovering")
  # Opened once the first move is done (its compile behind it), one update per move, closed.
  assert shown == [("open", "recovering", 1, 4), 1, 1, 1, "close"]
  np.testing.assert_array_equal(barred, plain)
  np.testing.assert_array_equal(barred_latents, plain_latents)
  # The stochastic step too: its key is the one the scan gives that move.
  sde = dataclasses.replace(FEW_STEPS, sde_step=1)
  np.testing.assert_array_equal(
      eng.recover(world_images[:1], sampler=sde, keys=keys, progress="recovering")[0],
      eng.recover(world_images[:1], sampler=sde, keys=keys)[0])
  # The reasoner's drawn image the same way.
  shown.clear()
  drawn = []
  for progress in (None, "image"):
    conv = eng.conversation(seed=0, posterior="mean")
    conv.add_image(world_images[0])
    conv.add_text(recovery.INSTRUCTION)
    drawn.append(conv.generate_image(sampler=FEW_STEPS, progress=progress))
  assert shown == [("open", "image", 1, 4), 1, 1, 1, "close"]
  np.testing.assert_array_equal(drawn[0][0], drawn[1][0])
  np.testing.assert_array_equal(drawn[0][1], drawn[1][1])


def test_a_barred_recovery_compiles_programs_the_persistent_cache_keeps(tiny, world_images,
                                                                       caplog):
  # JAX writes no persistent cache entry for a program with a host callback: a bar fed from
  # inside the sampler's scan made `recover` compile the whole recovery again on every run.
  eng, _ = tiny

  def refused() -> list[str]:
    return [r.getMessage() for r in caplog.records if "host callbacks" in r.getMessage()]

  with jax.explain_cache_misses(True), caplog.at_level("WARNING", logger="jax._src.compiler"):
    jax.jit(lambda x: jax.debug.callback(lambda v: None, x) or x + 1)(np.float32(1))
    assert refused()  # what the check sees: a program with a callback, refused
    caplog.clear()
    # A sampler and an image size of this test's own: each program compiles here (not from this
    # process's memory; jax.clear_caches would make every later test in the worker compile again),
    # so each reaches the persistent cache's writer.
    eng.recover([world_images[0][:48]], sampler=recovery.Sampler(num_steps=3),
                keys=engine.image_keys(0, [0]), progress="recovering")
    assert not refused()


def _inputs(eng, model, image):
  vit = np.asarray(images.vit_resize(image, RULES.vit_size(64, 64)))
  rows = recovery.recovery_inputs([{"corrupted": image, "corrupted_vit": vit}], model.config,
                                  eng.markers, eng.encode_block(recovery.INSTRUCTION))
  return jax.tree.map(jnp.asarray, rows)


def test_guidance_off_equals_no_guidance_and_branches_batch(tiny, world_images):
  eng, model = tiny
  inputs = _inputs(eng, model, world_images[0])
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 16, model.config.latent_channels))
  t = jnp.full((1,), 0.7)
  plain = recovery.velocity_fn(model, inputs, recovery.NO_GUIDANCE)(x, t)
  # Three branches in one call, but the interval switches guidance off: the full branch alone.
  never = recovery.Guidance(interval=(1.0, 1.0))
  np.testing.assert_allclose(recovery.velocity_fn(model, inputs, never)(x, t), plain,
                             rtol=1e-5, atol=1e-6)
  # One batched call equals three separate calls combined, for each renorm type.
  for renorm in sampling.RENORM_TYPES:
    g = recovery.Guidance(renorm_type=renorm, renorm_min=0.2)
    batched = recovery.velocity_fn(model, inputs, g)(x, t)
    single = lambda rows: recovery.velocity_fn(
        model, dataclasses.replace(inputs, full=rows), recovery.NO_GUIDANCE)(x, t)
    expected = sampling.cfg_velocity(single(inputs.full), single(inputs.no_text),
                                      single(inputs.no_image), 4.0, 2.0, 0.2, renorm)
    np.testing.assert_allclose(batched, expected, rtol=1e-4, atol=1e-5)
    assert not np.allclose(batched, plain, atol=1e-3)


def test_each_expert_runs_on_its_own_tokens_only(tiny, world_images):
  """The rows bound each expert's buffer: the noisy block's understanding expert runs on its two
  markers, not on its every latent token (which doubled a denoising step's matmuls), and the
  velocity is the unbounded rows' (to float rounding: the buffers' shapes differ)."""
  eng, model = tiny
  inputs = _inputs(eng, model, world_images[0])
  for rows in (inputs.full, inputs.no_text, inputs.noisy):
    assert rows.max_und == rows.token_kind.shape[1] - rows.latent_seq_index.shape[1]
  assert inputs.noisy.max_und == 2
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 16, model.config.latent_channels))
  t = jnp.full((1,), 0.7)
  bounded = recovery.velocity_fn(model, inputs, recovery.Guidance())(x, t)
  unbounded = dataclasses.replace(inputs, **{
      name: getattr(inputs, name).replace(max_und=None)
      for name in ("full", "no_text", "no_image", "noisy")})
  np.testing.assert_allclose(
      bounded, recovery.velocity_fn(model, unbounded, recovery.Guidance())(x, t),
      rtol=1e-5, atol=1e-5)


def test_conversation_image_equals_recovery_of_the_same_context(tiny, world_images):
  """[image][instruction] in a conversation generates what `recover` does from the same noise."""
  eng, model = tiny
  image = world_images[1]
  conv = eng.conversation(seed=0, posterior="mean")
  conv.add_image(image)
  conv.add_text(recovery.INSTRUCTION)
  x0 = jax.random.normal(jax.random.PRNGKey(5), (1, 16, model.config.latent_channels))
  generated, latents = conv.generate_image(sampler=FEW_STEPS, x_init=x0)
  ref_latents, ref_images = recovery.recover(model, _inputs(eng, model, image), FEW_STEPS,
                                             jax.random.PRNGKey(0), x_init=x0)
  np.testing.assert_allclose(latents, ref_latents, rtol=1e-4, atol=1e-4)
  reference = np.asarray(images.quantize(ref_images))[0]
  assert np.abs(generated.astype(int) - reference.astype(int)).max() <= 1


def test_released_stochastic_step_changes_only_with_its_key(tiny, world_images):
  eng, _ = tiny
  sde = dataclasses.replace(FEW_STEPS, sde_step=1)
  key = jax.random.PRNGKey(1)[None]
  a, _ = eng.recover(world_images[:1], sampler=sde, keys=key, posterior="mean")
  b, _ = eng.recover(world_images[:1], sampler=sde, keys=key, posterior="mean")
  ode, _ = eng.recover(world_images[:1], sampler=FEW_STEPS, keys=key, posterior="mean")
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, ode)
  # With one key per image, the stochastic step's noise does not depend on the batch either.
  keys = jnp.stack([jax.random.fold_in(key[0], i) for i in range(2)])
  pair, _ = eng.recover(world_images[:2], sampler=sde, keys=keys, posterior="mean")
  alone, _ = eng.recover(world_images[1:2], sampler=sde, keys=keys[1:], posterior="mean")
  assert np.abs(pair[1].astype(int) - alone[0].astype(int)).max() <= 1
  with pytest.raises(ValueError, match="sde_step"):
    recovery.Sampler(num_steps=4, sde_step=3)
  for shift in (0.0, -1.0, float("nan")):  # times of NaN or below 0 otherwise
    with pytest.raises(ValueError, match="timestep shift must be > 0"):
      recovery.Sampler(num_steps=4, shift=shift)


def test_the_stochastic_steps_draw_noise_of_their_own(tiny, world_images, monkeypatch):
  """The steps' keys are not split from the key that drew the initial noise (fold_in(key, i) is
  split(key, n)[i]): a stochastic step at index 0 drew x_init's noise again, at index 1 the
  VAE posterior's."""
  eng, model = tiny
  seen = {}
  sample_latents = recovery.sample_latents

  def spy(velocity, x_init, sampler, key, **options):
    seen.update(x_init=x_init, key=key)
    return sample_latents(velocity, x_init, sampler, key, **options)

  monkeypatch.setattr(recovery, "sample_latents", spy)
  keys = jax.random.PRNGKey(3)[None]  # one key per image, as `Engine.recover` passes them
  recovery.recover(model, _inputs(eng, model, world_images[0]),
                   dataclasses.replace(FEW_STEPS, sde_step=0), keys)
  x_init = np.asarray(seen["x_init"])[0]
  step_keys = jax.random.split(seen["key"][0], FEW_STEPS.num_steps - 1)  # as `sampling.sample`
  posterior = np.asarray(recovery.stream_key(keys, recovery.POSTERIOR_STREAM)[0])
  for k, step_key in enumerate(step_keys):
    drawn = np.asarray(jax.random.normal(step_key, x_init.shape, x_init.dtype))
    assert not np.allclose(drawn, x_init), k
    assert not np.array_equal(np.asarray(step_key), posterior), k


def test_posterior_sample_and_mean(tiny, world_images):
  _, model = tiny
  batch = jnp.asarray(np.stack(world_images[:2]))[:, None]
  mean = context.encode_images(model, batch)
  np.testing.assert_allclose(mean, bagel.patchify_latents(
      model.vae.encode(images.to_model_range(batch[:, 0])), 2).reshape(mean.shape), atol=1e-6)
  keys = jax.random.split(jax.random.PRNGKey(0), 2)
  drawn = context.encode_images(model, batch, keys)
  noise = np.abs(np.asarray(drawn) - np.asarray(mean)).max()
  assert noise > 1e-3
  # Per-row keys: a row's draw does not depend on the rest of the batch. Equal up to the float
  # rounding of a batch of 1 against 2 (3.6e-7 on an AVX2 CPU, bitwise on others): far below the
  # posterior noise another key would draw.
  np.testing.assert_allclose(context.encode_images(model, batch[1:], keys[1:])[0], drawn[1],
                             rtol=0, atol=1e-5)
  with pytest.raises(ValueError, match="vae_posterior"):
    context.posterior_key("median", keys[0])


def test_vit_resize_is_pil_bicubic_and_one_function_in_and_out_of_jit():
  rng = np.random.default_rng(0)
  image = (rng.uniform(size=(64, 48, 3)) * 255).astype(np.uint8)
  for size in ((32, 24), (40, 32), (96, 72)):
    ours = np.asarray(images.vit_resize(image, size)).astype(int)
    pil = np.asarray(Image.fromarray(image).resize(size[::-1], Image.Resampling.BICUBIC)).astype(
        int)
    assert np.abs(ours - pil).mean() < 1.5, size
    jitted = jax.jit(images.vit_resize, static_argnums=1)(image, size)
    np.testing.assert_array_equal(np.asarray(jitted), ours)


def test_reasoning_paths_feed_the_vit_the_same_recovered_pixels():
  from robust_u1_jax.models import vit as vit_lib
  from robust_u1_jax.training import reasoning

  rng = np.random.default_rng(1)
  recovered = (rng.uniform(size=(2, 64, 64, 3)) * 255).astype(np.uint8)
  vit_hw, patch = RULES.vit_size(64, 64), 8
  cached = [np.asarray(images.vit_resize(r, vit_hw)) for r in recovered]
  placeholder = jnp.zeros((2, 2 * (vit_hw[0] // patch) * (vit_hw[1] // patch), 3 * patch ** 2))
  segments = jnp.repeat(jnp.asarray([1, 2]), placeholder.shape[1] // 2)[None].repeat(2, 0)
  inputs = bagel.SequenceInputs(*[None] * 5, placeholder, None, segments, *[None] * 3)
  on_the_fly = reasoning.with_recovered_patches(inputs, jnp.asarray(recovered), vit_hw, patch)
  for i in range(2):
    expected = vit_lib.images_to_patches(images.to_model_range(jnp.asarray(cached[i])[None]),
                                         patch)[0]
    np.testing.assert_array_equal(on_the_fly.vit_patches[i, placeholder.shape[1] // 2:], expected)
  # Rows as the data path builds them carry uint8 patches: the recovered ones stay uint8 too.
  as_uint8 = reasoning.with_recovered_patches(
      inputs.replace(vit_patches=placeholder.astype(jnp.uint8)), jnp.asarray(recovered), vit_hw,
      patch)
  assert as_uint8.vit_patches.dtype == jnp.uint8
  for i in range(2):
    np.testing.assert_array_equal(as_uint8.vit_patches[i, placeholder.shape[1] // 2:],
                                  vit_lib.images_to_patches(cached[i][None], patch)[0])


def test_reasoner_loop_follows_the_stop_tokens(tiny, world_images, monkeypatch):
  """A scripted model: text ending at <|vision_start|>, then an answer repeated past the cut."""
  eng, _ = tiny
  sp = eng.special
  script = [(eng.tokenizer.encode("<TYPE>noise", add_special_tokens=False), sp["vision_start"]),
            (eng.tokenizer.encode("<ANSWER>B<ANSWER_END> <ANSWER>B<ANSWER_END> <ANSWER>C",
                                  add_special_tokens=False), sp["im_start"]),
            ([], sp["endoftext"])]
  calls = []

  def scripted(self, **kw):
    calls.append(kw)
    return script[len(calls) - 1]

  added = []
  real_add = engine.Conversation.add_image

  def add_image(self, image, *, generated=False):
    added.append(generated)
    return real_add(self, image, generated=generated)

  monkeypatch.setattr(engine.Conversation, "generate_text", scripted)
  monkeypatch.setattr(engine.Conversation, "add_image", add_image)
  settings = reasoner.Settings(max_iterations=5, sampler=FEW_STEPS)
  ex = reasoner.answer(eng, world_images[0], "Which shape?", ["circle", "square", "star"],
                       settings)
  assert [s.kind for s in ex.steps] == ["text", "image", "text"]
  assert added == [False, True] and ex.steps[1].image.shape == (64, 64, 3)
  assert ex.stopped_by == "end_of_text" and len(calls) == 3
  assert ex.answer_text.count("<ANSWER>") == 2 and ex.answer == "B"
  record = ex.record(["step_02.png"])
  assert record["steps"][1] == {"type": "image", "image": "step_02.png",
                                "seconds": round(ex.steps[1].seconds, 3)}
  assert "Please restore this corrupted image" in record["prompt"]
  assert "B. square" in record["prompt"]


def test_reasoner_without_recovery_draws_no_image(tiny, world_images, monkeypatch):
  """`answer --no_recover`: a <|vision_start|> the model writes is passed over, not answered
  with a recovery; the loop goes on to the answer."""
  eng, _ = tiny
  sp = eng.special
  script = [(eng.tokenizer.encode("<TYPE>noise", add_special_tokens=False), sp["vision_start"]),
            (eng.tokenizer.encode("<ANSWER>B<ANSWER_END>", add_special_tokens=False),
             sp["endoftext"])]
  calls, drawn = [], []

  def scripted(self, **kw):
    calls.append(kw)
    return script[len(calls) - 1]

  def draw(self, **kw):
    drawn.append(kw)
    raise AssertionError("an image was drawn without recovery")

  monkeypatch.setattr(engine.Conversation, "generate_text", scripted)
  monkeypatch.setattr(engine.Conversation, "generate_image", draw)
  settings = reasoner.Settings(max_iterations=5, sampler=FEW_STEPS, recover=False)
  ex = reasoner.answer(eng, world_images[0], "Which shape?", ["circle", "square", "star"],
                       settings)
  assert [s.kind for s in ex.steps] == ["text", "text"] and not drawn
  assert ex.stopped_by == "end_of_text" and len(calls) == 2 and ex.answer == "B"


def test_reasoner_runs_on_the_random_model(tiny, world_images):
  eng, _ = tiny
  ex = reasoner.answer(eng, world_images[0], "Which colour?", ["red", "blue"],
                       reasoner.Settings(max_iterations=2, max_new_tokens=6, temperature=0.3,
                                         sampler=FEW_STEPS))
  assert ex.steps and set(ex.seconds) >= {"context", "text"}


def test_prompt_and_answer_extraction():
  p = reasoner.prompt("How many?", ["one", "B. two"])
  assert p.splitlines() == ["Question: How many?", "Options:", "A. one", "B. two",
                            answer_format.RESTORE, answer_format.ANSWER_FROM_RESTORED]
  assert reasoner.prompt("How many?", ["one"], recover=False).splitlines()[-1] == (
      answer_format.SELECT)
  assert reasoner.extract_answer("<REASONING>x<ANSWER>(B) two<ANSWER_END>", ["a", "b"]) == "B"
  assert reasoner.extract_answer("it is two", ["one", "two"]) == "B"
  # The article "A" is no option letter; a letter alone or closed by '.', ')' or ':' is.
  assert reasoner.extract_answer("A square.", ["circle", "square"]) == "B"
  assert reasoner.extract_answer("A red circle, so the answer is B.", ["x", "y", "z"]) == "B"
  # Inside the reply only one closed letter names an option: two name none (VLMEvalKit's rule).
  assert reasoner.extract_answer("It is not A. The answer is B.", ["x", "y", "z"]) == ""
  assert reasoner.extract_answer("option C) z is unlikely, B) y it is", ["x", "y", "z"]) == ""
  assert reasoner.extract_answer("so B. Yes, B.", ["x", "y", "z"]) == "B"
  # A letter in passing, before the last four words, names none (VLMEvalKit's rule): a model's
  # noise named "B" in 3,551 characters.
  assert reasoner.extract_answer("stolock B warpedffiti and so on for many more words",
                                 ["x", "y"]) == ""
  assert reasoner.extract_answer("the answer is (C) as shown", ["x", "y", "z"]) == "C"
  assert reasoner.extract_answer("<ANSWER>A<ANSWER_END>", ["x", "y"]) == "A"
  # In the answer field a lowercase letter is the option, as the training targets' parser reads
  # it (it named none); in free text 'a' stays an article.
  for reply in ("<ANSWER>b<ANSWER_END>", "<ANSWER> b\n<ANSWER_END>"):
    assert reasoner.extract_answer(reply, ["x", "y"]) == "B"
  assert answer_format.parse_answer("<ANSWER>b<ANSWER_END>") == "B"
  assert reasoner.extract_answer("<ANSWER>c<ANSWER_END>", ["x", "y"]) == ""
  assert reasoner.extract_answer("a", ["x", "y"]) == "A"  # a reply of one letter names it
  assert reasoner.extract_answer("C: green", ["x", "y", "z"]) == "C"
  # VLMEvalKit's rule: the one letter standing as a word, punctuation aside; 'A' and 'I' before a
  # lowercase word are words.
  for reply in ("answer: B", "The answer is (B), the square", "I think B", "B because it is"):
    assert reasoner.extract_answer(reply, ["x", "y", "z"]) == "B", reply
  assert reasoner.extract_answer("A triangle, B or C", ["x", "y", "z"]) == ""
  # ... unless the word after it is a verb or offers another option: then it is the letter, and a
  # reply that offers two options names none.
  for reply in ("Option A is correct.", "A is correct", "I think A is right.", "A seems best"):
    assert reasoner.extract_answer(reply, ["x", "y", "z"]) == "A", reply
  for reply in ("A or B", "Either A or C", "A and B are both wrong, C", "A nor B"):
    assert reasoner.extract_answer(reply, ["x", "y", "z"]) == "", reply
  assert reasoner.extract_answer("<ANSWER>blue<ANSWER_END>") == "blue"
  # An answer field left open ends at the next field's tag, not at the end of the text.
  assert reasoner.extract_answer("<ANSWER>E<ANSWER>D<TYPE>none<TYPE_END>") == "D"
  assert reasoner.extract_answer("<ANSWER>blue\n<REASONING>it is<REASONING_END>") == "blue"
  assert reasoner.extract_answer("<ANSWER>B<CONCLUSION>so A", ["x", "y"]) == "B"
  # VLMEvalKit's text rule: exactly one option's text, in an answer at most twice as long as the
  # options' texts; else no option ('', scored wrong).
  assert reasoner.extract_answer("red or blue", ["red", "blue", "green"]) == ""
  assert reasoner.extract_answer("x" * 40 + " cyan", ["red", "cyan"]) == ""
  assert reasoner.extract_answer("surely cyan", ["red", "cyan"]) == "B"
  assert reasoner.extract_answer("no idea", ["red", "cyan"]) == ""
  assert reasoner.cut_answers("a<ANSWER>1<ANSWER>2<ANSWER>3") == "a<ANSWER>1<ANSWER>2"


def test_options_that_carry_their_own_letters():
  """The letters a user gave are the ones the model is shown and the answer is read against."""
  lines = lambda options: reasoner.prompt("Which?", options).splitlines()[2:2 + len(options)]
  assert lines(["B. cat", "C. dog"]) == ["B. cat", "C. dog"]
  assert lines(["(a) cat", "b) dog"]) == ["A. cat", "B. dog"]
  # Not every option lettered, or a letter twice: letters in order, a stray one kept as text.
  assert lines(["B. cat", "dog"]) == ["A. B. cat", "B. dog"]
  assert lines(["A. Lincoln", "Washington"]) == ["A. Lincoln", "B. Washington"]
  assert lines(["A. x", "A. y"]) == ["A. x", "B. A. y"]
  assert lines(["A.red", "blue"]) == ["A. A.red", "B. blue"]  # no space: part of the text
  for reply, letter in (("<ANSWER>C<ANSWER_END>", "C"), ("<ANSWER>c<ANSWER_END>", "C"),
                        ("<ANSWER>A<ANSWER_END>", ""), ("<ANSWER>a dog<ANSWER_END>", "C"),
                        ("<ANSWER>(B) cat<ANSWER_END>", "B")):
    assert reasoner.extract_answer(reply, ["B. cat", "C. dog"]) == letter, reply


def test_cache_grows_without_changing_results(tiny):
  _, model = tiny
  cache = model.init_cache(1, 8)
  grown = cache.grow(20)
  assert grown.max_length == 256 and cache.grow(4) is cache
  start = jnp.asarray([5], jnp.int32)
  a = text.generate(model, grown, start, jax.random.PRNGKey(0), max_new_tokens=6,
                    temperature=0.0, stop_ids=(10**6,))
  b = text.generate(model, model.init_cache(1, 6), start, jax.random.PRNGKey(0),
                    max_new_tokens=6, temperature=0.0, stop_ids=(10**6,))
  np.testing.assert_array_equal(a.tokens, b.tokens)


def test_engine_loads_a_released_directory(tiny, world_images, tmp_path):
  """A BAGEL-format directory whose weights are Robust-U1's `model_bf16.safetensors`."""
  import os

  from robust_u1_jax.checkpoints import bagel_export

  eng, model = tiny
  path = str(tmp_path / "release")
  bagel_export.save_model_dir(model, path, tokenizer_dir=tokenizer_lib.default_tokenizer_dir(),
                           save_dtype="bfloat16")
  os.rename(os.path.join(path, "ema.safetensors"), os.path.join(path, "model_bf16.safetensors"))
  RULES.save(path)
  loaded = engine.Engine.load(path)
  assert loaded.rules == RULES
  keys = jax.random.PRNGKey(0)[None]
  ours, _ = loaded.recover(world_images[:1], sampler=FEW_STEPS, keys=keys, posterior="mean")
  # The same model rounded to bfloat16 recovers nearly the same image.
  ref, _ = eng.recover(world_images[:1], sampler=FEW_STEPS, keys=keys, posterior="mean")
  assert np.abs(ours.astype(float) - ref.astype(float)).mean() < 8.0
  os.remove(os.path.join(path, "ae.safetensors"))
  with pytest.raises(FileNotFoundError, match="ae.safetensors"):
    engine.Engine.load(path)
  os.remove(os.path.join(path, "tokenizer.json"))
  with pytest.raises(engine.ModelError, match="tokenizer.json"):
    engine.Engine.load(path)
