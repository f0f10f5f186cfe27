"""The built-in world's demo, `python -m robust_u1_jax.train --config configs/demo.py --workdir
runs/demo`: `get_config` (at the end) lists every part, run in order by training/demo.py.

Bootstrap of the built-in world's demo: the stand-in for the pretrained BAGEL that Robust-U1
starts from, made with the same model code in four stages (training/bootstrap_vae.py,
bootstrap_clip.py, bootstrap_vit.py, pretrain.py), each run by `trainer.train`:

  vae_config    stage 'bootstrap_vae': the tiny Bagel's VAE as an autoencoder of world images;
                everything later keeps it frozen
  clip_config   stage 'bootstrap_clip': a tiny CLIP on images and captions, written to
                `<workdir>/model/clip.safetensors` for the RL stage's semantic reward
                (rl.clip_checkpoint, rl.clip_model='tiny')
  vit_config    stage 'bootstrap_vit': the Bagel's own ViT trained contrastively on the same
                captions (the stand-in for SigLIP's pretraining), written into vae_config's model
  base_config   stage 'pretrain': the whole Bagel but the VAE and ViT on clean images: answering and
                captioning, drawing from captions, reconstructing; init_from is vit_config's workdir

Variants: 'default' (the demo; its parts' minutes in `get_config`) and 'quick' (for CI: all
eight parts, a few steps each, in 3.4 minutes into an empty compile cache on a 2-core AMD EPYC
Zen 4 and 1.8 with it filled, 2026-12-05). VAEConfig.tiny (ch 8, z 4)
reaches about 25 dB PSNR on 64 px world images within the default budget: wider VAEs (ch 16,
z 8 or 16) measured no better per CPU second, so there is no demo preset.
"""

import importlib.util
import os

import ml_collections

from robust_u1_jax import config_defaults, config_lib
from robust_u1_jax.training import demo as demo_lib

VARIANTS = ("default", "quick")


def _check_variant(variant: str, name: str) -> None:
  if variant not in VARIANTS:
    raise ValueError(f"configs/demo.py:{name}: unknown variant {variant!r}; choose one of: "
                     f"{', '.join(VARIANTS)}")


def _world(c: ml_collections.ConfigDict, *, batch_size: int, eval_batch_size: int) -> None:
  """The built-in world at 64 px, clean, in the tiny model's resize rules (as configs/sft.py)."""
  c.model = "tiny"
  c.data.source = "shapes"
  c.data.image_size = 64
  c.data.vae_max_side, c.data.vae_min_side, c.data.vae_stride = 64, 32, 16
  c.data.vit_max_side, c.data.vit_min_side, c.data.vit_patch = 64, 32, 8
  c.data.corruption = "none"
  c.data.batch_size = batch_size
  c.eval_data.update({k: v for k, v in c.data.items() if k not in ("split", "shuffle")})
  c.eval_data.batch_size = eval_batch_size  # the validation images every evaluation scores
  c.optimizer.eps = 1e-8
  c.tensorboard = False


def _schedule(c: ml_collections.ConfigDict, steps: int, *, checkpoints: int = 2) -> None:
  """`steps` updates, a checkpoint every steps / checkpoints, one evaluation at the end."""
  c.total_steps = steps
  c.checkpoint_every = max(steps // checkpoints, 1)
  c.eval_every = steps
  c.log_every = max(min(steps // 10, 25), 1)


def vae_config(variant: str = "default") -> ml_collections.ConfigDict:
  _check_variant(variant, "vae_config")
  c = config_defaults.get_base_config()
  c.stage = "bootstrap_vae"
  c.variant = variant
  a = c.autoencoder = ml_collections.ConfigDict()
  # Mostly L2 (what PSNR scores), some L1 for edges: measured sharper outlines at equal PSNR.
  a.l1_weight = 0.2
  a.l2_weight = 1.0
  # Objects over background (bootstrap_vae.py): the right hues in the same CPU time.
  a.contrast_weight = 16.0
  # Per latent element against per-pixel errors: enough to keep a Gaussian posterior (whose
  # samples the decoder learns to take), little enough to leave reconstruction first.
  a.kl_weight = 1e-4
  quick = variant == "quick"
  # Small batches: more updates per CPU second is what this small network needs.
  _world(c, batch_size=8, eval_batch_size=32 if quick else 64)
  # 1,000 steps: 25.2 dB PSNR (25.8 after 1,200, whose 0.7 min the demo's 15 minutes needed).
  # 3,000 steps reach 28.7 dB (27.7 with seed 1), 3 more minutes on the AMD machine, and the
  # 25 % recovery claim held with seed 0 (+0.69 ± 0.33 dB) but not with seed 1 (-1.47 ± 0.36):
  # not the only limit (docs/DEMO.md, 'Four draws'). Learning rate 6e-3: 24.3 dB after 1,000.
  _schedule(c, 40 if quick else 1000)
  c.optimizer.learning_rate = 3e-3
  c.optimizer.end_learning_rate = 1e-4
  c.optimizer.warmup_steps = 10 if quick else 30
  c.optimizer.b2 = 0.99
  c.optimizer.ema_decay = 0.9 if quick else 0.99
  return c


def clip_config(variant: str = "default") -> ml_collections.ConfigDict:
  _check_variant(variant, "clip_config")
  c = config_defaults.get_base_config()
  c.stage = "bootstrap_clip"
  c.variant = variant
  c.clip = ml_collections.ConfigDict()
  c.clip.model = "tiny"  # the shapes rl.clip_model='tiny' reads
  c.clip.max_logit_scale = 100.0
  quick = variant == "quick"
  _world(c, batch_size=64, eval_batch_size=64)
  _schedule(c, 40 if quick else 800)
  c.optimizer.learning_rate = 2e-3
  c.optimizer.end_learning_rate = 1e-5
  c.optimizer.warmup_steps = 30
  c.optimizer.b2 = 0.98
  c.optimizer.ema_decay = 0.0
  return c


def vit_config(variant: str = "default", init_from: str = "random"
               ) -> ml_collections.ConfigDict:
  """The Bagel's ViT against a text tower of clip.model's shapes, as clip_config trains its CLIP;
  `init_from`: the workdir of vae_config's run, whose model the trained ViT is written into."""
  _check_variant(variant, "vit_config")
  c = clip_config(variant)
  c.stage = "bootstrap_vit"
  c.init_from = init_from
  # Measured (batch 64, 2026-12-02): caption retrieval among 64 validation images 31 % after 200
  # steps, 55 % after 600 and after 1,200 (the CLIP part: 50 % after 800); 600 take 1.0 min.
  _schedule(c, 40 if variant == "quick" else 600)
  return c


def base_config(variant: str = "default", init_from: str = "random") -> ml_collections.ConfigDict:
  """`init_from`: the workdir of vit_config's run (its model: the trained VAE and ViT)."""
  _check_variant(variant, "base_config")
  c = config_defaults.get_base_config()
  c.stage = "pretrain"
  c.variant = variant
  c.init_from = init_from
  p = c.pretrain = ml_collections.ConfigDict()
  p.caption_prompt = "Describe the image."
  # Not the recovery instruction: the base model learns to copy an image, not to restore one.
  p.reconstruction_instruction = "Draw this image again."
  # Understanding rows that caption (the rest answer a question). Captions are what teaches the
  # base to look at the image: teacher-forced NLL of the answers' image-dependent tokens with the
  # true image against another sample's (1,200 steps, 128 held-out questions) is 0.83 vs 0.96 at
  # 0.5, 0.88 vs 0.89 at 0 (answers from the text prior alone). More captions do not help the
  # answers (0.8: greedy accuracy 34 %, chance 37 %), nor does weighting the answer loss 3x
  # (accuracy 37 %; the copy is delayed: reconstruction 17.5 dB). Nor does a larger LLM or ViT
  # (96 held-out questions, chance 36 %: 28 % as is, 41 % at 4 layers of width 128, 25 % with a
  # ViT of 4 layers of width 64 too; 31 % without the generation loss). What failed was the
  # option letter, an in-context lookup while the world shuffled its options (its conclusions
  # named the right colour for 59 % of colour questions, its letters matched them for 37 %);
  # with fixed options (data/shapes.py) the same 1,200 steps answer 36 to 44 % (chance 25 %).
  p.caption_fraction = 0.5
  # Question rows in the reasoning stage's two-image layout, the clean image in both places (the
  # stand-in for BAGEL's interleaved multi-image pretraining). Without them the base had never
  # answered after a second image, and after the reasoning stage's 300 steps the corrupted +
  # recovered mode still wrote broken answers (14 % at 100 % intensity, against 36 % from the
  # corrupted image alone; with them 25 % against 30 %; 2026-12-02, 64 held-out samples). (That
  # stage's first answer loss, 7.3 nats either way, is its TYPE field's corruption names, which
  # the base never writes.) Their text is the reasoning stage's: the release's prompt with the
  # recovery instruction (answer_format.prompt). With the question alone there, the instruction
  # the evaluation puts after it cut that layout's accuracy over the 15 test conditions to 26.1 %
  # (46.4 % from the corrupted image alone), and with recovery always on clean accuracy from
  # 50.0 % to 23.4 %; with it (and RL's 120 steps), 42.0 % against 44.4 %, and 42.2 % both ways
  # (2026-12-02, 64 samples a condition).
  p.two_image_fraction = 0.5
  # Three in four one-image answer rows without the VAE tokens (pretrain.py), so the base reads
  # through the ViT the vit part pretrained. Its VAE tokens pass through the generation expert,
  # which SFT trains alone: a base that reads through them loses its answers there (256
  # validation questions, 2026-12-02: without this and the vit part, base 47.7 % (colour 74 %,
  # count 42 %) -> after SFT 36.3 % (52 %, 16 %); with both, 43.4 % -> 42.6 % (66 %, 40 %);
  # with this alone the base reads poorly, 33.2 %, its ViT trained only here).
  p.answer_vae_dropout = 0.75
  # The ViT stays as the vit part trained it: at this part's learning rate it forgets what it
  # learnt there (256 clean validation questions, 2026-12-03: base 40.2 %, colour 56 %; frozen
  # 45.7 %, colour 76 %, no slower; a ViT first taught shapes, 71 % by a linear probe, keeps 71 %
  # frozen and 36 % trained here).
  p.freeze_vit = True
  # Generation rows drawn from captions (the rest reconstruct: there the model learns to copy an
  # image from its context, the skill every recovery builds on). None in the demo: rows without
  # an image to copy delay the copy past the budget (measured, 800 steps, answer rows included:
  # velocity error 1.05 with a quarter of the rows from captions, 0.67 and falling without).
  p.text_to_image_fraction = 0.0
  p.understanding_weight = 1.0
  p.generation_weight = 1.0
  # Copying is learnt at high noise, where x_t no longer shows the image: shift 3 samples there
  # more often. Measured (reconstruction rows only, 1,000 steps): the x0 error at t = 1 fell to
  # 0.02 of the latents' variance at shift 3 (learning rate 5e-3), 0.13 at shift 1 (even at 1e-2).
  p.timestep_shift = 3.0
  # No image dropout here: rows without the VAE tokens teach the ViT-only route, and the precise
  # copy through the VAE tokens then emerges several times later (measured: x0 error at t = 0.5
  # 0.14 against 0.006 after 800 steps). SFT's dropout teaches guidance's image-free contexts.
  p.text_dropout, p.vit_dropout, p.vae_dropout = 0.1, 0.0, 0.0
  p.eval_num_steps = 20
  quick = variant == "quick"
  # Samples per CPU second do not depend on the batch here (measured 8 and 32): small batches
  # give more updates. 8 splits over the tests' 8 fake devices.
  _world(c, batch_size=8, eval_batch_size=32)
  # One row shape for every batch (one compile): the world's longest text is a 77-token answer.
  c.data.text_pad_to = c.eval_data.text_pad_to = 80
  _schedule(c, 10 if quick else 1200)
  if quick:
    c.eval_every = 0  # its sampler and decoder compiles would outlast the training
  # Copying an image from the context appears suddenly, after 300 to 600 steps of batch 8 at 5e-3
  # on reconstruction rows alone (at 2e-3 it had not appeared after 600), later beside the answer
  # rows: after 800 steps the x0 error at t = 0.5 was 0.12 of the latents' variance with the
  # image in context, 0.53 without; hence 1,200. Unclipped: the answer loss's gradient would
  # dominate a clipped global norm.
  c.optimizer.learning_rate = 5e-3
  c.optimizer.b2 = 0.99
  c.optimizer.grad_clip = 0.0
  c.optimizer.warmup_steps = 2 if quick else 20
  c.optimizer.ema_decay = 0.0 if quick else 0.99
  return c


# -- the whole demo --------------------------------------------------------------------------------


def _stage(name: str, variant: str) -> ml_collections.ConfigDict:
  """configs/<name>.py:<variant> (configs is not a package: loaded from this file's folder)."""
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"_demo_{name}_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


def get_config(variant: str = "default") -> ml_collections.ConfigDict:
  """Every part of `python -m robust_u1_jax.train --config configs/demo.py`, in order:
  vae, clip, vit, base (bootstrap), sft, rl, reason, eval (training/demo.py chains their
  workdirs).

  'default' is sized for about 15 minutes on an idle 2-core CPU, 'quick' for under 4 (its test
  runs it twice); docs/DEMO.md, "Time", has every run measured, part by part."""
  _check_variant(variant, "get_config")
  quick = variant == "quick"
  c = ml_collections.ConfigDict()
  c.stage = "demo"
  c.variant = variant
  c.seed = 0
  # Each part's minutes in one run, from which training/demo.py estimates the minutes to go (at
  # the pace of the parts this run has timed): the default's 13.5-minute run on a 2-core AMD EPYC
  # Zen 4 with its compile cache filled (2026-12-04), the quick variant's 1.8 minutes there
  # (2026-12-05).
  minutes = (dict(vae=0.3, clip=0.1, vit=0.1, base=0.2, sft=0.2, rl=0.2, reason=0.2, eval=0.5)
             if quick else
             dict(vae=1.6, clip=0.7, vit=0.7, base=4.3, sft=0.5, rl=0.5, reason=2.6, eval=2.6))
  c.minutes = ml_collections.ConfigDict(minutes)
  # Each part starts from the previous part's output; training/demo.py fills in the paths.
  c.vae, c.clip = vae_config(variant), clip_config(variant)
  c.vit = vit_config(variant, init_from="<the vae part's workdir>")
  c.base = base_config(variant, init_from="<the vit part's workdir>")

  c.sft = _stage("sft", "tiny")
  c.sft.init_from = "<the base part's workdir>"
  _schedule(c.sft, 30 if quick else 400)
  # The base's copy is learnt at shift 3, where the sampler spends its steps, and is lost at
  # stage I's shift 1 and condition dropout 0.3 (configs/sft.py). Measured on 64 validation
  # images, recovered SSIM / PSNR (dB) of clean, 25 % and 100 % inputs (2026-12-02): base, no SFT
  # 0.692/24.77, 0.639/23.55, 0.358/15.76; shift 1, dropout 0.3: 0.633/22.41, 0.592/21.77,
  # 0.369/16.66; shift 3: 0.655/23.32, 0.615/22.55, 0.386/16.97; with dropout 0.1 too:
  # 0.664/23.62, 0.631/22.79, 0.387/17.03. Learning rates 3e-4 and 2e-3 were no better; 1,600
  # steps lost 3.5 dB on every input (0.643/20.13 on clean).
  c.sft.timestep_shift = 3.0
  c.sft.vit_dropout = c.sft.vae_dropout = 0.1
  # Recovery after the instruction alone, as the paper's stage I, so `answer`'s loop, which draws
  # its image after the question, draws a poorer one than `recover` (SSIM 0.28 against 0.62 under
  # noise, severity 3). Half the records after a question prompt (data.question_prompt_fraction
  # 0.5) draw it at 0.57, but lose 0.7 dB at 100 % in `recover` and RL's SSIM claim (2026-12-06,
  # docs/DEMO.md, "The image `answer` draws").
  c.sft.eval_num_steps = 10
  c.sft.tensorboard = False

  c.rl = _stage("rl", "tiny")
  c.rl.init_from = "<the sft part's workdir>"
  # Chosen on validation (64 samples x the 15 conditions, mean over recoveries, 2026-12-02): SFT
  # SSIM 0.5286 / CLIP 0.4967; 60 RL steps 0.5298 / 0.5015; 120 steps 0.5330 / 0.5073 (1.3 min).
  _schedule(c.rl, 6 if quick else 120)
  # The released weights of the two rewards, the semantic one from the bootstrapped CLIP (the
  # demo runner points rl.clip_checkpoint at it).
  c.rl.rl.reward_weights = ml_collections.ConfigDict({"ssim": 1.0, "clip": 0.2})
  c.rl.rl.clip_model = "tiny"
  c.rl.rl.clip_checkpoint = "<the clip part's model/clip.safetensors>"
  c.rl.rl.eval_num_steps = 10
  c.rl.tensorboard = False

  c.reason = _stage("reason", "tiny")
  c.reason.init_from = "<the rl part's workdir>"
  _schedule(c.reason, 10 if quick else 300)
  c.reason.reason.recovery_steps = 10
  # The world's longest reasoning-stage texts (every combination of the pipeline's four
  # degradations, every kind of question): question 70 tokens, answer 167. As power-of-two buckets
  # they padded to 128 and 256, the rows were 553 tokens long instead of 417, and a batch whose
  # questions fitted 64 compiled the step again. Fixed: 2.6 to 3.1 steps a second against 1.8 to
  # 2.2 (100 steps each in fresh processes, alternated twice; Zen 4, 2026-12-04), and the same
  # answers to the last question (docs/DEMO.md, "What changed", item 10).
  c.reason.data.text_widths.question = 72
  c.reason.data.text_widths.answer = 176
  c.reason.tensorboard = False
  # The model a run writes is its EMA, which starts at the RL model: at 0.999 over 300 steps it
  # holds 0.999^300 = 74 % of it, a weight interpolation between the RL model and the trained one.
  # Kept, as chosen on validation (the 2026-12-06 run's RL model, 128 questions at 100 %
  # intensity; accuracy % clean / corrupted / corrupted + recovered / corrupted + clean): 0.999
  # 47.7 / 29.7 / 34.4 / 48.4; 0.99 (the trained weights) 20.3 / 17.2 / 23.4 / 25.0, its
  # answers naming a corruption for clean images too and 8 % missing their answer field; 0.99 at
  # learning rate 1e-4 45.3 / 34.4 / 29.7 / 35.9. The stage's 300 steps learn the answers' form
  # (0.88 token accuracy) and lose the reading: the interpolation keeps the RL model's reading,
  # and its <TYPE> field stays the RL model's 'none' (docs/DEMO.md, "The reasoning stage").
  # A quarter of the records clean (data.clean_fraction) keeps the trained weights' reading
  # (50.0 / 41.4 / 34.4 / 43.8) but teaches no naming and moves no claim (docs/DEMO.md, "Clean
  # rows keep the reading"), so the stage trains on corrupted records only.
  c.reason.optimizer.ema_decay = 0.999

  c.eval = _stage("eval", "tiny")
  c.eval.num_samples = 16 if quick else 64
  # Five sampler steps, where the tiny model's recoveries are best. Measured on validation (the
  # reasoning model of the 2026-12-04 run, 15 conditions x 64 images, guidance 1.5 / 1.5): mean
  # SSIM / CLIP / PSNR 0.5721 / 0.6110 / 21.04 dB at 20 steps; 10: +0.0021, +0.0032, +0.06;
  # 5: +0.0057 ± 0.0006, +0.0085 ± 0.0034, +0.16 ± 0.03; 3: +0.0032, +0.0045, +0.13. RL against
  # SFT the same at 5 steps as at 20 (SSIM +0.0007 ± 0.0010, +0.0008 ± 0.0010). The eval part
  # took 146 s instead of 179 (Zen 4): its answers, not its recoveries, are most of it.
  c.eval.recovery_steps = 5
  # Room for the world's longest answer (167 tokens; the reasoning stage's text_widths.answer):
  # the README run's answers (TYPE none, 70 to 73 tokens) are the same at 128, a model that names
  # the pipeline's degradations writes up to 167, and a cut answer loses its ANSWER field.
  c.eval.max_new_tokens = 176
  # Guidance 1.5 / 1.5 for every recovery of the demo's model (RL's rollouts, the reasoning
  # stage's recoveries, the evaluations; written beside each model for `recover`, `answer` and
  # `evaluate`),
  # not the release's 4 / 2: the tiny model's image-free branches are barely trained, and
  # extrapolating towards them costs precision. Measured on validation (64 images, recovered PSNR
  # dB / SSIM at 25 % and 100 % intensity and of clean inputs, 2026-12-04): the base copying at
  # 4 / 2 24.18 / 0.681 on clean images, unguided 25.22 / 0.704 (its VAE's round trip: 25.23);
  # the SFT model at 4 / 2 22.07 / 0.626, 15.98 / 0.385, 22.87 / 0.656; at 1.5 / 1.5 22.65 /
  # 0.639, 16.79 / 0.394, 23.44 / 0.665; unguided 22.24 / 0.608, 17.31 / 0.387 (2 / 2 and
  # 2 / 1.5 between; docs/DEMO.md, "Guidance").
  # The evaluation recovers with each model's own (configs/eval.py cfg_text / cfg_img).
  for part in ("base", "sft", "rl", "reason"):
    c[part].guidance.text_scale = c[part].guidance.image_scale = 1.5
  # One intensity for all four pipeline stages, drawn per record (data.intensity_draw), as the
  # evaluation's 25 / 50 / 100 % levels apply it: drawn per stage, a record with all four mild
  # came once in 120. SFT on validation at 1.5 / 1.5: 22.89 / 0.644 at 25 % (22.65 / 0.639 per
  # stage), 16.72 / 0.393 at 100 % (16.79 / 0.394), 23.66 / 0.670 on clean images (23.44 / 0.665).
  for part in ("sft", "rl", "reason"):
    c[part].data.intensity_draw = "record"
  if quick:
    c.eval.claim_samples = 0  # the conditions' 16
    c.eval.imagenet_c_types = ("fog", "pixelate")
    c.eval.severities = (5,)
    c.reason.optimizer.warmup_steps = 2
  # Every training part draws with the demo's seed (--config.seed) unless given its own
  # (--config.sft.seed=3); the evaluation keeps its own (eval.seed), so draws of the recipe are
  # scored on the same corrupted images.
  for part in demo_lib.PARTS[:-1]:
    c[part].seed = config_lib.DEMO_SEED
  # XLA flags for the demo's process, placed before the user's own XLA_FLAGS (which win). The
  # quick variant runs each program a few times, so it compiles at LLVM's level 0, as the tests
  # do: into an empty compile cache it took 232 s against 272 s at XLA's default level, 89 s of
  # compiles against 165 (Zen 4, back to back, 2026-12-05), and 204 s with the present steps (40
  # for vae, clip and vit, 30 for sft, 10 for reason; 80, 120, 120, 60 and 30 before), 110 s with
  # the compile cache filled. The default's steps run about half as fast at level 0 (docs/DEMO.md,
  # "Time"), so it keeps XLA's default.
  c.xla_flags = "--xla_backend_optimization_level=0" if quick else ""
  # The work the parts' minutes were measured at (training/demo.py part_work: steps, or the
  # images the evaluation reads), so that a run asking more of a part (--config.vae.total_steps=
  # 3000, --config.eval.claim_samples=1000) is estimated at its own.
  c.minutes_work = ml_collections.ConfigDict(
      {part: demo_lib.part_work(demo_lib.part_config(c, part, "runs/demo"))
       for part in demo_lib.PARTS})
  return c
