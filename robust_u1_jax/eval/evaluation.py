"""Evaluation of a Robust-U1 model: recovery quality and answer accuracy under corruption.

For every corruption condition (the Robust-R1 pipeline at the paper's 25 / 50 / 100 % intensities,
each ImageNet-C corruption at chosen severities, each Robust-R1 degradation at those intensities),
the same held-out images are corrupted deterministically (key from (seed, record index)), then:

  recovery quality  PSNR, SSIM and CLIP similarity to the clean image of the recovery, next to the
                    same figures for the corrupted image itself (a recovery must beat doing
                    nothing) and for the corrupted image through the VAE alone (what a recovery
                    that copies its input gives back: the VAE smooths noise away by itself);
  answer accuracy   in four modes: the clean image; the corrupted image only; corrupted plus the
                    model's own recovery (Robust-U1, the reasoning stage's input format); the
                    recovery only. Answers are generated greedily and reduced to an option letter
                    (`inference.reasoner.extract_answer`), scored by letter match; questions
                    without options by normalised exact match.
  bounds            what the model could reach with a perfect recovery, for the report to say
                    why a claim fails: the VAE's round trip of the clean image (the nearest a
                    decoded recovery gets), and the pipeline conditions' answers with the clean
                    image in the recovery's place (ORACLE).

Every batch is one jitted call (recoveries: `Engine.recover`; answers: `Engine.generate_batch`).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from robust_u1_jax import config_lib, pixels
from robust_u1_jax.data import answer_format, corruptions
from robust_u1_jax.data import sequence
from robust_u1_jax.eval import partial
from robust_u1_jax.inference import engine as engine_lib
from robust_u1_jax.inference import images as images_lib
from robust_u1_jax.inference import reasoner
from robust_u1_jax.inference import recovery as recovery_lib

MODES = ("clean", "corrupted", "corrupted+recovered", "recovered")
PIPELINE = corruptions.PIPELINE  # the family of the claims' conditions
# The Robust-U1 layout with a perfect recovery: the clean image where the model's recovery goes.
ORACLE = "corrupted+clean"
INTENSITIES = config_lib.EVAL_INTENSITIES
# The columns of the report's image grids, left to right.
GRID_COLUMNS = ("corrupted", "through the VAE alone", "recovered", "clean")  # the grids' titles
GRID_ROWS = 3  # images a condition's grid shows


@dataclasses.dataclass(frozen=True)
class Condition:
  family: str  # 'robust_r1_pipeline' | 'imagenet_c' | 'robust_r1'
  name: str  # what `corruptions.corrupt` takes
  level: str  # '25%' | '50%' | '100%' | 's3' | 's5'
  severity: int | None = None
  intensity: float | None = None

  @property
  def label(self) -> str:
    return f"{self.name.split('/')[-1]} {self.level}"


def conditions(intensities: Sequence[str], imagenet_c_types: Sequence[str],
               severities: Sequence[int], robust_r1_types: Sequence[str] = ()
               ) -> list[Condition]:
  """The pipeline at each intensity, each ImageNet-C type at each severity, each Robust-R1
  degradation at each intensity. Types may be 'all'."""
  out = [Condition(corruptions.PIPELINE, corruptions.PIPELINE, level,
                   intensity=INTENSITIES[level]) for level in intensities]
  out += [Condition("imagenet_c", n, f"s{s}", severity=s)
          for n in corruptions.expand_types(imagenet_c_types, "imagenet_c") for s in severities]
  out += [Condition("robust_r1", n, level, intensity=INTENSITIES[level])
          for n in corruptions.expand_types(robust_r1_types, "robust_r1")
          for level in intensities]
  return out


def corrupt(images: Sequence[np.ndarray], indices: Sequence[int], condition: Condition,
            seed: int) -> list[np.ndarray]:
  """Each image corrupted with a key from (seed, its record index): the same for every model."""
  base = jax.random.PRNGKey(seed)
  return [np.asarray(corruptions.corrupt(image, condition.name, jax.random.fold_in(base, int(i)),
                                         severity=condition.severity,
                                         intensity=condition.intensity))
          for image, i in zip(images, indices)]


# -- quality --------------------------------------------------------------------------------------


def psnr(images: np.ndarray, clean: np.ndarray) -> np.ndarray:
  """Per image of B x H x W x 3 batches of one shape, uint8 or float in [0, 1] (as `ssim`
  takes them), in dB over the full range (255 for uint8, 1 for floats)."""
  images, clean = np.asarray(images), np.asarray(clean)
  if images.shape != clean.shape or images.ndim != 4:
    raise ValueError(f"psnr: two B x H x W x 3 batches of one shape, got {images.shape} and "
                     f"{clean.shape}")
  # On the uint8 scale: a float image in [0, 1] read as 0..1 of 255 would score 48 dB too high.
  scaled = [x.astype(np.float64) * (1.0 if x.dtype == np.uint8 else 255.0) for x in (images, clean)]
  mse = ((scaled[0] - scaled[1]) ** 2).mean(axis=(1, 2, 3))
  return 10.0 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-10))


def ssim(images: np.ndarray, clean: np.ndarray) -> np.ndarray:
  """The RL reward's SSIM (Gaussian window 11, sigma 1.5), per image."""
  from robust_u1_jax.training import rewards

  return np.asarray(rewards.ssim(pixels.to_float(jnp.asarray(images)),
                                 pixels.to_float(jnp.asarray(clean))))


def clip_similarity_fn(clip_model) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
  """Cosine of CLIP image embeddings, per image pair (the semantic reward's similarity)."""
  from robust_u1_jax.models import clip as clip_lib

  @jax.jit
  def similarity(a, b):
    embed = lambda x: clip_lib.l2_normalize(clip_model.encode_image(
        clip_lib.preprocess(pixels.to_float(x), clip_model.config.image_size)))
    return jnp.sum(embed(a) * embed(b), axis=-1)

  return lambda a, b: np.asarray(similarity(jnp.asarray(a), jnp.asarray(b)))


# -- answers --------------------------------------------------------------------------------------


def mode_blocks(mode: str, question_ids: list[int], instructed_ids: list[int], vae: dict,
                vit: dict) -> list[sequence.Block]:
  """A row's context in `mode`; images: {'clean'|'corrupted'|'recovered': uint8}. The image
  stack of the row is `image_stack`'s."""
  def image(kind, slot):
    return [sequence.Latent(*vae[kind].shape[:2], image=slot),
            sequence.Vit(sequence.vit_input(vit[kind]))]

  if mode == "clean":
    return image("clean", 0) + [sequence.Text(question_ids)]
  if mode == "corrupted":
    return image("corrupted", 0) + [sequence.Text(question_ids)]
  if mode == "recovered":
    return image("recovered", 1) + [sequence.Text(question_ids)]
  if mode in ("corrupted+recovered", ORACLE):  # the reasoning stage's layout
    second = "clean" if mode == ORACLE else "recovered"
    return (image("corrupted", 0) + [sequence.Text(instructed_ids),
                                     sequence.Open(instructed_ids[:1])] + image(second, 1))
  raise ValueError(f"evaluation mode {mode!r} is unknown; allowed: "
                   f"{', '.join(MODES + (ORACLE,))}")


def image_stack(mode: str, vae: Mapping[str, np.ndarray]) -> list[np.ndarray]:
  """The row's two image slots in `mode`, as `mode_blocks` reads them: (the clean image in mode
  'clean', else the corrupted one, else the clean one; the image in slot 1: the clean one in
  ORACLE, else the recovery, else the first again)."""
  first = vae["corrupted"] if "corrupted" in vae and mode != "clean" else vae["clean"]
  return [first, vae["clean"] if mode == ORACLE else vae.get("recovered", first)]


def normalise(text: str) -> str:
  return re.sub(r"\s+", " ", re.sub(r"[^\w\s]", " ", text.lower())).strip()


# An option written into a question's text, as MMStar's ("Options: A: 3, B: 4") and RealWorldQA's
# ("A. Yes\nB. No") parquet tables write them: its letter, after a space, a comma, a colon or at
# the start, closed by '.', ')' or ':'; its text runs to the next option or the line's end. The
# letters must run A, B, C, ... for a text to count as listing options.
_WRITTEN_OPTION = re.compile(r"(?:^|(?<=[\s,:]))\(?([A-Z])[.):][ \t]")


def written_options(question: str) -> list[str]:
  """The options a question's text lists, as 'X. text', when it lists at least two with distinct
  letters in order from A; else []."""
  marks = list(_WRITTEN_OPTION.finditer(question))
  letters = "".join(m.group(1) for m in marks)
  if len(marks) < 2 or letters != answer_format.LETTERS[:len(marks)]:
    return []
  ends = [m.start() for m in marks[1:]] + [len(question)]
  texts = (question[m.end():end].partition("\n")[0].strip().rstrip(",").strip()
           for m, end in zip(marks, ends))
  return [f"{m.group(1)}. {text}" for m, text in zip(marks, texts)]


def benchmark_question(question: Mapping[str, Any]) -> dict[str, Any]:
  """A benchmark row's question as it is asked and scored: with its own options; else, when its
  answer is a letter, with the options its text lists (`written_options`: MMStar's and
  RealWorldQA's parquet tables), so that it is asked as multiple choice, as the same table's
  VLMEvalKit TSV asks it (whose questions list the options too)."""
  question = dict(question)
  truth = str(question["answer"]).strip()
  if question.get("options") or not (len(truth) == 1 and truth.isalpha()):
    return question
  written = written_options(str(question.get("question", "")))
  if truth.upper() in answer_format.LETTERS[:len(written)]:
    question["options"] = written
  return question


def score(answer_text: str, question: Mapping[str, Any]) -> tuple[str, bool]:
  """(the extracted answer, whether it is right): option letter match for multiple choice
  (`reasoner.extract_answer`), normalised exact match otherwise. A letter answer to a question
  without options is scored on the letter of A to D (or to the answer's letter) that the reply
  names (`reasoner.named_letter`)."""
  options = question.get("options") or ()
  truth = str(question["answer"]).strip()
  if options:
    extracted = reasoner.extract_answer(answer_text, options)
    return extracted, extracted == truth.upper()
  answer = reasoner.answer_field(answer_text)
  if len(truth) == 1 and truth.isalpha():
    truth = truth.upper()
    letters = answer_format.LETTERS[:max(4, answer_format.LETTERS.index(truth) + 1)]
    letter = reasoner.named_letter(answer, letters)
    return letter, letter == truth
  return answer, normalise(answer) == normalise(truth)


@dataclasses.dataclass
class Sample:
  index: int  # record index: the corruption key
  image: np.ndarray  # clean, uint8 at the model's VAE size
  question: dict  # {'question', 'options', 'answer'}
  kind: str = ""


class Evaluator:
  """Recovers and answers held-out samples under corruption conditions with one model."""

  def __init__(self, engine: engine_lib.Engine, *, recovery_steps: int, batch_size: int,
               max_new_tokens: int, seed: int = 0,
               guidance: recovery_lib.Guidance = recovery_lib.Guidance(),
               clip_similarity: Callable | None = None):
    self.engine, self.batch_size, self.seed = engine, batch_size, seed
    self.max_new_tokens = max_new_tokens
    self.sampler = recovery_lib.Sampler(num_steps=recovery_steps, guidance=guidance)
    self.instruction = engine.instruction  # the model's own (its instruction.json)
    self.clip_similarity = clip_similarity

  def _batches(self, images: Sequence[np.ndarray]) -> list[list[int]]:
    """Indices of `images` in batches of at most `batch_size` images of one size, in order: the
    built-in world's images, all of one size, in consecutive runs. A size's last batch, short of
    its full ones, repeats its last index to their length: each size compiles one set of programs
    (minutes each for a 7B model), not a second for its remainder. The repeat's results are its
    original's, written to the same place."""
    by_size: dict[tuple[int, ...], list[int]] = {}
    for i, image in enumerate(images):
      by_size.setdefault(np.shape(image), []).append(i)
    batches = []
    for same in by_size.values():
      for start in range(0, len(same), self.batch_size):
        batch = same[start:start + self.batch_size]
        if start:  # a remainder after full batches
          batch = batch + batch[-1:] * (self.batch_size - len(batch))
        batches.append(batch)
    return batches

  def _per_image(self, fn: Callable[..., Sequence[Any]], *images: Sequence[np.ndarray]) -> list:
    """`fn(batch, *stacked)` on each batch of `images[0]`'s sizes (`_batches`: `batch` its
    indices, `stacked` that batch of each of `images`); what it returns per image, in order."""
    out = [None] * len(images[0])
    for batch in self._batches(images[0]):
      results = fn(batch, *(np.stack([each[i] for i in batch]) for each in images))
      for i, result in zip(batch, results):
        out[i] = result
    return out

  def recover(self, corrupted: Sequence[np.ndarray], indices: Sequence[int]):
    """Deterministic recoveries (posterior mean, noise from (seed, index)), as `stacked`."""
    base = jax.random.PRNGKey(self.seed + 1)

    def recover(batch, images):
      keys = jnp.stack([jax.random.fold_in(base, int(indices[i])) for i in batch])
      return self.engine.recover(images, sampler=self.sampler, keys=keys,
                                 instruction=self.instruction, posterior="mean")[0]

    return stacked(self._per_image(recover, corrupted))

  def through_vae(self, images: Sequence[np.ndarray]):
    """The VAE's own reconstructions of `images` (posterior mean): what a recovery decodes to
    when it copies its input's latents and restores nothing. As `stacked`."""
    return stacked(self._per_image(lambda _, batch: self.engine.round_trip(batch), images))

  def round_trip(self, clean: Sequence[np.ndarray]) -> dict[str, float]:
    """Quality of the VAE's own reconstruction of the clean images: a recovery's ceiling."""
    return _means(self.quality(self.through_vae(clean), clean))

  def quality(self, images: Sequence[np.ndarray], clean: Sequence[np.ndarray]
              ) -> dict[str, np.ndarray]:
    """PSNR, SSIM (and CLIP similarity) of each image to its clean one, `batch_size` images of one
    size at a time: a condition of 500 large images at once would not fit a device."""
    def measure(_, batch, clean_batch):
      out = {"psnr": psnr(batch, clean_batch), "ssim": ssim(batch, clean_batch)}
      if self.clip_similarity is not None:
        out["clip"] = self.clip_similarity(batch, clean_batch)
      return [{k: v[j] for k, v in out.items()} for j in range(len(batch))]

    rows = self._per_image(measure, images, clean)
    return {k: np.array([row[k] for row in rows]) for k in rows[0]}

  def answers(self, mode: str, samples: Sequence[Sample], corrupted=None, recovered=None
              ) -> list[dict[str, Any]]:
    """Greedy answers of every sample in `mode`, scored."""
    eng = self.engine
    rules = eng.rules
    results = [None] * len(samples)
    for batch in self._batches([s.image for s in samples]):
      rows, stacks = [], []
      for j in batch:
        sample = samples[j]
        vae = {"clean": sample.image}
        if corrupted is not None:
          vae["corrupted"] = corrupted[j]
        if recovered is not None:
          vae["recovered"] = recovered[j]
        vit = {k: np.asarray(images_lib.vit_resize(v, rules.vit_size(*v.shape[:2])))
               for k, v in vae.items()}
        rows.append(mode_blocks(
            mode, eng.encode_block(answer_format.format_question(sample.question)),
            eng.encode_block(answer_format.format_question(sample.question, self.instruction)),
            vae, vit))
        stacks.append(image_stack(mode, vae))
      ids = eng.generate_batch(rows, np.asarray(stacks), max_new_tokens=self.max_new_tokens)
      for j, row_ids in zip(batch, ids):
        sample, text = samples[j], eng.decode(row_ids)
        extracted, right = score(text, sample.question)
        results[j] = {"index": sample.index, "kind": sample.kind, "answer": extracted,
                      "truth": sample.question["answer"], "correct": bool(right),
                      "options": len(sample.question.get("options") or ()), "text": text}
    return results

  def clean(self, samples: Sequence[Sample], *, recovery: bool = False) -> dict[str, Any]:
    """Accuracy on clean images (`recovery`: with recovery always on, the clean image in the
    corrupted image's place and its recovery beside it), by kind, and the answers."""
    if recovery:
      clean = stacked([s.image for s in samples])
      answers = self.answers("corrupted+recovered", samples, clean,
                             self.recover(clean, [s.index for s in samples]))
    else:
      answers = self.answers("clean", samples)
    return {"accuracy": accuracy(answers), "by_kind": accuracy_by_kind(answers),
            "answers": answers}

  def evaluate(self, samples: Sequence[Sample], conds: Sequence[Condition], *,
               modes: Sequence[str] = MODES[1:], progress: Callable[[str], None] = lambda _: None,
               per_sample: bool = False, vae_baseline: bool = True,
               store: partial.PartialResults | None = None, unit_prefix: str = ""
               ) -> dict[str, Any]:
    """{'num_samples', 'conditions': [per condition: quality of the corrupted image, of the
    corrupted image through the VAE alone ('through_vae': doing nothing in the recovery's own
    output space) and of the recovery, accuracy per mode, 'gain_se' (the standard errors of
    recovered - corrupted quality and of corrupted+recovered - corrupted accuracy),
    'beyond_vae_se' (of recovered - through_vae quality); the pipeline's: ORACLE's accuracy too;
    `per_sample`: each sample's recovered quality, 'recovered_per_sample', and each mode's
    answers, 'answers'], 'examples': a few
    (condition, [GRID_COLUMNS' images]) for grids}. `modes`: the answer modes scored under each
    condition (of MODES[1:]; none for recoveries alone; clean images: `clean`). Without
    `vae_baseline` (a model scored only for its recoveries beside another's, which has them: the
    VAE is frozen) neither 'through_vae' nor 'examples'. Each condition is a unit, `unit_prefix`
    + its label, as `progress` is told; with a `store`, read from it when an earlier run finished
    it, written to it when this one does."""
    clean = stacked([s.image for s in samples])
    indices = [s.index for s in samples]
    out: dict[str, Any] = {"num_samples": len(samples), "conditions": [], "examples": []}
    for cond in conds:
      compute = lambda: self._condition(cond, samples, clean, indices, modes=modes,
                                        per_sample=per_sample, vae_baseline=vae_baseline)
      if store is None:
        progress(unit_prefix + cond.label)
        unit = compute()
      else:
        unit = store.get_or_compute(unit_prefix + cond.label, compute, progress)
      out["conditions"].append(unit["row"])
      if "example" in unit:
        out["examples"].append((cond.label, unit["example"]))
    return out

  def _condition(self, cond: Condition, samples: Sequence[Sample], clean: np.ndarray,
                 indices: Sequence[int], *, modes: Sequence[str], per_sample: bool,
                 vae_baseline: bool) -> dict[str, Any]:
    """One condition of `evaluate`: {'row': its row, 'example': its grid's columns}."""
    corrupted = stacked(corrupt(clean, indices, cond, self.seed))
    recovered = self.recover(corrupted, indices)
    quality = {"corrupted": self.quality(corrupted, clean),
               "recovered": self.quality(recovered, clean)}
    row = {"family": cond.family, "name": cond.name, "level": cond.level, "label": cond.label,
           "num_samples": len(samples), "corrupted": _means(quality["corrupted"]),
           "recovered": _means(quality["recovered"]), "accuracy": {}, "by_kind": {},
           "gain_se": {m: paired_se(v, quality["corrupted"][m])
                       for m, v in quality["recovered"].items()}}
    unit = {"row": row}
    if vae_baseline:
      through_vae = self.through_vae(corrupted)
      baseline = self.quality(through_vae, clean)
      row["through_vae"] = _means(baseline)
      row["beyond_vae_se"] = {m: paired_se(v, baseline[m])
                              for m, v in quality["recovered"].items()}
      unit["example"] = [x[:GRID_ROWS] for x in (corrupted, through_vae, recovered, clean)]
    if per_sample:
      row["recovered_per_sample"] = quality["recovered"]
    correct = {}
    for mode in modes:
      if mode != "clean":
        answers = self.answers(mode, samples, corrupted, recovered)
        row["accuracy"][mode] = accuracy(answers)
        row["by_kind"][mode] = accuracy_by_kind(answers)
        correct[mode] = [a["correct"] for a in answers]
        # What reads 0 % apart from wrong answers: replies that name no option at all.
        row.setdefault("no_option", {})[mode] = [sum(not a["answer"] for a in answers),
                                                 len(answers)]
        if per_sample:
          row.setdefault("answers", {})[mode] = answers
    if {"corrupted", "corrupted+recovered"} <= set(correct):
      row["gain_se"]["accuracy"] = paired_se(correct["corrupted+recovered"],
                                             correct["corrupted"])
    if "corrupted+recovered" in modes and cond.family == PIPELINE:
      row["oracle_accuracy"] = accuracy(self.answers(ORACLE, samples, corrupted, recovered))
    return unit


def stacked(images: Sequence[np.ndarray]):
  """Images of one size as one B x H x W x 3 array; of several sizes (a benchmark's, kept whole),
  the list."""
  return np.stack(images) if len({np.shape(x) for x in images}) == 1 else list(images)


def paired_se(a: Sequence[float], b: Sequence[float]) -> float:
  """The standard error of mean(a) - mean(b) when a[i] and b[i] come from the same sample i: how
  far that difference would move on another draw of as many samples (nan below two)."""
  d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
  return float(d.std(ddof=1) / np.sqrt(d.size)) if d.size > 1 else float("nan")


def rl_minus_sft(rl_rows: Sequence[Mapping[str, Any]], sft_rows: Sequence[Mapping[str, Any]]
                 ) -> dict[str, dict[str, float]]:
  """Per metric, {'sft', 'rl': mean recovered quality, 'se': the paired standard error of RL -
  SFT} over conditions (rows of `evaluate(..., per_sample=True)` for the same samples). Each
  sample is averaged over the rows first: the samples, not their corruptions, are the
  independent draws a standard error counts."""
  rl, sft = sample_means(rl_rows), sample_means(sft_rows)
  return {m: {"sft": float(sft[m].mean()), "rl": float(v.mean()), "se": paired_se(v, sft[m])}
          for m, v in rl.items()}


def sample_means(rows: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
  """Per metric, each sample's recovered quality averaged over `rows` (conditions)."""
  return {m: np.mean([r["recovered_per_sample"][m] for r in rows], axis=0)
          for m in rows[0]["recovered"]}


def _means(metrics: Mapping[str, np.ndarray]) -> dict[str, float]:
  return {k: float(np.mean(v)) for k, v in metrics.items()}


def accuracy(answers: Sequence[Mapping[str, Any]]) -> float:
  return float(np.mean([a["correct"] for a in answers])) if answers else float("nan")


def accuracy_by_kind(answers: Sequence[Mapping[str, Any]]) -> dict[str, float]:
  """Accuracy per question kind (the world's colour, shape, ...; a benchmark's category)."""
  kinds = sorted({a["kind"] for a in answers})
  return {k: accuracy([a for a in answers if a["kind"] == k]) for k in kinds}


def shapes_samples(split: str, count: int, rules: images_lib.ImageRules, seed: int = 0
                   ) -> list[Sample]:
  """`count` held-out records of the built-in world, one question each (drawn by index)."""
  from robust_u1_jax.data import shapes

  world = shapes.ShapesWorld(split, seed=seed)
  out = []
  for i in range(count):
    record = world[i]
    q = record["questions"][int(np.random.default_rng([seed, i]).integers(
        len(record["questions"])))]
    out.append(Sample(i, rules.at_vae_size(record["image"]), dict(q), q.get("kind", "")))
  return out
