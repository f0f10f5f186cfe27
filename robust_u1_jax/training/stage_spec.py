"""The stage contract: what a stage builder receives (`RunContext`) and returns (`StageSpec`).

A stage (sft.py, rl.py, reasoning.py, the bootstrap stages) is a function
`build(ctx: RunContext) -> StageSpec`; `trainer.train` runs it, `benchmarks/aot.py` compiles its
step for a TPU slice, and `training/run_setup.py` builds the context both of them pass. This
module holds the two types only, so a stage depends on the contract and never on the trainer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
from flax import nnx

if TYPE_CHECKING:
  import jax
  import ml_collections

  from robust_u1_jax.models import bagel as bagel_lib
  from robust_u1_jax.data import sequence


@dataclasses.dataclass
class StageSpec:
  """What a stage contributes to the shared training loop; everything else is the trainer's."""
  trainable: tuple[str, ...]  # regexes on dotted parameter paths (state.trainable_filter)
  # (pipeline batch, numpy Generator for this step) -> device-input pytree of numpy arrays; host
  # side and deterministic in (seed, step), so a resumed run sees the same inputs. The trainer
  # runs it as the pipeline's last map (data/pipeline.py `format_rows`), in a Grain thread beside
  # the training thread: it builds rows from `data/sequence.py` block lists and nothing else.
  host_inputs: Callable[[dict, np.random.Generator], Any]
  # (graphdef, optimizer) -> step(state, inputs) -> (state, metrics), jitted by the trainer. The
  # step builds its model with `state.merge_model(graphdef, params, frozen)`: with LoRA on,
  # graphdef is a lora.LoraGraphDef and params the LoRA factors (training/lora.py). It applies
  # gradients with `state.apply_gradients`, which owns gradient accumulation and the EMA.
  make_step: Callable[[nnx.GraphDef, Any], Callable]
  samples_per_step: int
  aux: dict[str, Any] = dataclasses.field(default_factory=dict)
  reference: bool = False  # keep a frozen copy of the initial trainable params in aux
  # (graphdef, state) -> ({column title: images} for a grid, scalar metrics); run every
  # eval_every steps and at the last (trainer.evaluates_at).
  evaluate: Callable | None = None
  # A model of the stage's own, trained instead of the Bagel (built on the run's mesh).
  model: nnx.Module | None = None
  # (workdir, graphdef, state, config) -> None: writes the final model; default
  # `trainer.save_model`.
  save: Callable | None = None
  # The pipeline stage (data/pipeline.py STAGES) the batches come from; default config.stage.
  data_stage: str | None = None
  # (one step's host inputs) -> that step's work as `flops.Work` items, for the model FLOPs and
  # MFU the trainer logs (`flops.step_flops` with `trainable`); None: not counted.
  work: Callable[[Any], list] | None = None


class RunContext:
  """What a stage builder may use: the run's config, mesh, tokenizer, image markers and model.

  Built by `run_setup.make_context`. `model_config` is known without building anything; `model`
  is built on first use (from a function given in its place), so a stage that trains a model of
  its own never pays for building the Bagel.
  """

  def __init__(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
               model: bagel_lib.Bagel | Callable[[], bagel_lib.Bagel], tokenizer: Any,
               markers: sequence.Markers, model_config: bagel_lib.BagelConfig | None = None):
    self.config, self.mesh, self.tokenizer, self.markers = config, mesh, tokenizer, markers
    self._model = model
    self._model_config = model_config

  @property
  def model(self) -> bagel_lib.Bagel:
    if not isinstance(self._model, nnx.Module):
      self._model = self._model()
    return self._model

  @property
  def model_config(self) -> bagel_lib.BagelConfig:
    return self._model_config if self._model_config is not None else self.model.config
