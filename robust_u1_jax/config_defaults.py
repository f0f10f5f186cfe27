"""The fields every stage config starts from: data, mesh, optimizer, LoRA, guidance, checkpointing,
logging.

Stage configs (`configs/sft.py`, `rl.py`, `reason.py`, `demo.py`) start from `get_base_config()`
and state only what differs. Every field has a typed default so `--config.x=y` overrides are
type-checked and unknown names are refused by the locked ConfigDict; `config_lib` checks the
values and loads config files.
"""

import ml_collections

# The text fields of the stages' batches (data/pipeline.py: TEXT_FIELDS), as data.text_widths names
# them.
TEXT_FIELDS = ("instruction", "question", "answer", "caption", "recovery_question")


def get_data_config() -> ml_collections.ConfigDict:
  d = ml_collections.ConfigDict()
  # shapes | folder | tfds | jsonl | vqa_tsv | vqa_parquet
  d.source = "shapes"
  d.path = ""  # folder, .jsonl, .tsv or .parquet path; TFDS dataset name for source=tfds
  d.tfds_data_dir = ""  # empty: $TFDS_DATA_DIR
  d.split = "train"
  d.image_size = 64  # side of the built-in shapes world's images
  d.shapes_size = 100_000  # records per shapes-world split (train; val and test are smaller)
  # BAGEL resize rules (docs/design.md#model-bagel-7b-mot); the tiny configs scale them down.
  d.vae_max_side = 1024
  d.vae_min_side = 512
  d.vae_stride = 16
  d.vit_max_side = 980
  d.vit_min_side = 224
  d.vit_patch = 14
  # Center-crop every image to a square before resizing; with vae_min_side = vae_max_side all
  # images get one size (the RL stage's rollouts batch images of one size).
  d.crop_square = False
  # Corruption applied on the fly: robust_r1_pipeline | imagenet_c | a single corruption's name |
  # none.
  d.corruption = "robust_r1_pipeline"
  d.severity = 3  # ImageNet-C severity 1..5 (0: draw uniformly per record)
  d.intensity = -1.0  # Robust-R1 intensity in [0, 1] (negative: draw uniformly per record)
  # How the pipeline draws a negative intensity: 'stage' (one per stage, as the release's
  # generator) or 'record' (one for all four stages, as the 25 / 50 / 100 % evaluation levels
  # apply it: mild and heavy records equally often).
  d.intensity_draw = "stage"
  # Of the records, drawn per record, those left uncorrupted: their 'corrupted' image is the clean
  # one and a reasoning answer says so (TYPE none), which a model that should tell clean images
  # from corrupted ones needs to see.
  d.clean_fraction = 0.0
  # SFT and RL: of the records with questions (the built-in world's, a VQA table's), drawn per
  # record, those whose recovery instruction is the release's whole prompt for one of them (the
  # question, its options, the restore and answer requests), the context in which `answer`'s loop
  # generates its recovery. 0: the instruction alone, as the paper's stage I trains.
  d.question_prompt_fraction = 0.0
  d.tokenizer_dir = ""  # empty: the built-in world's tokenizer
  d.batch_size = 8  # global batch: samples, or packed rows when token_budget > 0
  d.token_budget = 0  # packing budget in tokens per row (0: no packing)
  # Of token_budget, the slots of the generation expert's (VAE latent) tokens; the rest hold the
  # understanding expert's (text, ViT): rows are filled within both, so each expert computes
  # only its share of a row (bagel.bound_experts). 0: no split, each expert gets the whole row.
  d.latent_budget = 0
  # Width texts are padded to in unpacked batches (0: a power-of-two bucket per batch). Multi-host
  # unpacked runs need it: every host must build rows of one length.
  d.text_pad_to = 0
  # One text field's width in unpacked batches, in place of text_pad_to's rule (0: that rule): a
  # field whose longest text is known pads to it, not to the next power of two, and every batch
  # has one shape (one compile).
  d.text_widths = ml_collections.ConfigDict({field: 0 for field in TEXT_FIELDS})
  d.shuffle = True
  d.num_epochs = 0  # 0: repeat forever
  d.worker_count = 0  # Grain worker processes (0: in the main process)
  d.max_skip_ratio = 0.01  # stop when more than this fraction of records is unreadable
  # Images with a side below this many pixels are bad records (counted, replaced): the resize rule
  # would invent nearly every pixel the model sees. 0: transforms.default_min_side, one VAE stride
  # or one ViT patch, whichever is larger.
  d.min_image_side = 0
  return d


def get_mesh_config() -> ml_collections.ConfigDict:
  m = ml_collections.ConfigDict()
  # Axis sizes; -1 takes all remaining devices.
  m.data = 1
  m.fsdp = -1
  m.tensor = 1
  return m


def get_optimizer_config() -> ml_collections.ConfigDict:
  o = ml_collections.ConfigDict()
  o.learning_rate = 2e-5
  o.end_learning_rate = 1e-7
  o.warmup_steps = 2000  # trainer steps, like total_steps (state.learning_rate_schedule)
  o.b1 = 0.9
  o.b2 = 0.95
  o.eps = 1e-15
  o.weight_decay = 0.0
  o.grad_clip = 1.0
  o.ema_decay = 0.999  # per optimizer update
  # k > 1: a trainer step (one batch of data.batch_size) makes a gradient step (RL: several) and
  # the optimizer updates on the mean of every k of them, as one k-fold batch would; the
  # learning-rate schedule and the EMA follow the updates. total_steps, warmup_steps and the
  # *_every fields still count trainer steps.
  o.grad_accum_steps = 1
  return o


# The generation expert's attention and MLP kernels (stage I/II LoRA targets).
LORA_TARGETS = (r"^language_model\.layers\.gen\."
                r"(q_proj|k_proj|v_proj|o_proj|mlp\.(gate_proj|up_proj|down_proj))\.kernel$")


def get_lora_config() -> ml_collections.ConfigDict:
  """LoRA on the stage's trainable kernels (training/lora.py); rank 0 trains them fully."""
  lo = ml_collections.ConfigDict()
  lo.rank = 0  # 0: no LoRA
  lo.alpha = 16.0  # the update is (alpha / rank) * A @ B
  # Regex on dotted parameter paths; kernels among the stage's trainable parameters only.
  lo.targets = LORA_TARGETS
  return lo


def get_guidance_config() -> ml_collections.ConfigDict:
  """BAGEL's classifier-free guidance (inference/recovery.py Guidance): the release's values."""
  g = ml_collections.ConfigDict()
  g.text_scale = 4.0  # cfg_text_scale
  g.image_scale = 2.0  # cfg_img_scale (acts only with text_scale > 1, as in BAGEL)
  g.renorm_min = 0.0
  g.renorm_type = "text_channel"  # global | channel | text_channel
  return g


def get_base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.stage = ""
  c.seed = 0
  c.model = "tiny"  # preset name in robust_u1_jax.models.bagel.PRESETS (init_from='random')
  c.init_from = "random"  # random | a BAGEL/Robust-U1 model directory | an Orbax checkpoint dir
  c.param_dtype = "float32"
  c.compute_dtype = "float32"
  c.remat = "none"  # none | full | dots | minimal (layers.remat_policy)
  # The attention kernel (models/attention.py): auto (by platform: TPU splash, GPU cuDNN, else
  # XLA) | xla | splash | cudnn; a kernel that cannot take a mask or shape falls back to xla.
  c.attention = "auto"
  # How an image's VAE latent enters the model: a posterior sample (BAGEL, in training and
  # inference) or the posterior mean. Drawn from the step's key, like every random draw.
  c.vae_posterior = "sample"
  # The guidance of every recovery a stage draws: RL's rollouts, the reasoning stage's recoveries
  # (on the fly or cached) and the recoveries of the evaluation during training.
  c.guidance = get_guidance_config()
  c.total_steps = 1000
  c.data = get_data_config()
  c.eval_data = get_data_config()
  c.eval_data.split = "validation"
  c.eval_data.shuffle = False
  c.mesh = get_mesh_config()
  c.optimizer = get_optimizer_config()
  c.lora = get_lora_config()
  c.checkpoint_every = 500
  c.keep_checkpoints = 3
  c.log_every = 10
  c.eval_every = 500  # and at the last step; 0: never
  c.tensorboard = True
  return c
