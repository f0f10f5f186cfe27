"""Evaluation of a trained model (`python -m robust_u1_jax.evaluate`), docs/design.md#corruptions.

Variants: `configs/eval.py:tiny` (the built-in world's held-out test split, a few minutes on a CPU)
and `configs/eval.py:bagel_7b` (the paper's settings; benchmark files from local paths).
"""

import ml_collections
from ml_collections import config_dict


def get_config(variant: str = "tiny") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.stage = "eval"
  c.variant = variant
  c.model = ""  # required: a model directory, Orbax checkpoint or stage workdir (--model)
  c.out = ""  # report directory (default: <model's parent>/eval)
  c.dtype = "float32"
  c.seed = 0
  c.split = "test"  # the built-in world's held-out split: never trained or tuned on
  c.num_samples = 64  # 0: no image of the built-in world, the benchmark tables alone
  # Samples of the figures the claims read (the Robust-R1 pipeline's conditions and the clean
  # images, with recovery off and on); the other conditions take the first num_samples of them.
  # At most num_samples: every figure on num_samples. Both at most the split's records (the
  # built-in world's held-out splits hold 1,000).
  c.claim_samples = 0
  c.intensities = ("25%", "50%", "100%")  # Robust-R1 pipeline at I = 0.23 / 0.45 / 0.9
  c.imagenet_c_types = ("all",)  # ImageNet-C corruptions (short or qualified names), or all
  c.severities = (3, 5)
  c.robust_r1_types = ()  # Robust-R1 degradations one by one (recovery quality), or all
  c.recovery_on_clean = True  # also answer clean images with recovery on (the "does no harm" row)
  c.recovery_steps = 50
  # Guidance scales of every recovery (`recover`'s --cfg_text / --cfg_img); unset: each model's
  # own (guidance.json beside it, written by training), else BAGEL's 4 / 2; 1: unguided.
  c.cfg_text = config_dict.placeholder(float)
  c.cfg_img = config_dict.placeholder(float)
  c.batch_size = 32
  # The world's longest answers in the Robust-R1 format (every combination of the pipeline's four
  # degradations in TYPE and INFLUENCE) take 167 tokens; a cut answer loses its ANSWER field.
  c.max_new_tokens = 176
  # The semantic similarity of recoveries: a CLIP checkpoint (open_clip or transformers naming).
  c.clip_checkpoint = ""
  c.clip_model = "vit_b32"  # vit_b32 | tiny
  # Recovery quality of other models on the same conditions (e.g. the SFT and RL stages' models),
  # for the "RL above SFT" comparison; empty entries are skipped.
  c.compare = ml_collections.ConfigDict({"sft": "", "rl": ""})
  c.rl_workdir = ""  # an RL stage's workdir: its metrics.jsonl gives the reward curves
  # Benchmark tables (VLMEvalKit TSV or Hugging Face parquet) read from local paths, each
  # evaluated on clean images and at the pipeline's three intensities, the paper's (whatever
  # `intensities` says); empty entries are skipped. Another table: add its name here
  # (`--config.benchmarks.<name>=` sets only the names a config has).
  c.benchmarks = ml_collections.ConfigDict(
      {"rbench": "", "mmstar": "", "realworldqa": "", "mmmb": ""})
  c.benchmark_samples = 0  # rows per benchmark (0: all), bad rows included
  # 'whole': each image at its size by the model's resize rule, as `answer` takes it (each size
  # compiles its own programs); 'square': its centred square (one size, one compile; what the crop
  # cuts off is not seen, so scores are not comparable with published ones).
  c.benchmark_images = "whole"
  # Bad rows (unreadable images, malformed rows) are left out, logged and listed in the report;
  # past this fraction of a table's rows the evaluation stops instead.
  c.max_skip_ratio = 0.01
  if variant == "tiny":
    c.clip_model = "tiny"
    c.recovery_steps = 20
    # On 64 questions the "within 2 points" claim is 1.3 answers, and one model's accuracy moved
    # by 14 points between two sets of 64 (the +10 claim's corrupted + recovered figure, test
    # and validation split); 256 cost about 40 s more.
    c.claim_samples = 256
    c.imagenet_c_types = ("gaussian_noise", "defocus_blur", "fog", "contrast", "pixelate",
                          "jpeg_compression")
  elif variant == "bagel_7b":
    c.dtype = "bfloat16"
    c.batch_size = 8
    c.max_new_tokens = 1024
    c.num_samples = 500
  else:
    raise ValueError(f"configs/eval.py: unknown variant {variant!r}; choose one of: tiny, "
                     "bagel_7b")
  return c
