"""The demo's quick variant end to end, as the README runs it (its own process, one device):
every part trains from the previous part's output, the evaluation writes its report with every
claim measured, and a re-run has nothing left to do."""

import json
import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from robust_u1_jax import config_lib
from robust_u1_jax.training import demo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train(workdir: str) -> str:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  # One CPU device, as on a user's laptop (the test session fakes 8).
  env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                              if "force_host_platform_device_count" not in f)
  out = subprocess.run(
      [sys.executable, "-m", "robust_u1_jax.train", "--config",
       os.path.join(ROOT, "configs", "demo.py") + ":quick", "--workdir", workdir],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=2400)
  assert out.returncode == 0, out.stderr[-3000:]
  return out.stdout


@pytest.mark.slow
def test_quick_demo_runs_every_part_and_resumes(tmp_path):
  workdir = str(tmp_path / "demo")
  first = _train(workdir)
  for part in demo.PARTS[:-1]:
    assert os.path.isdir(os.path.join(workdir, part, "model")), part
    assert f"] {part} (" in first, part
  assert os.path.isfile(os.path.join(workdir, "clip", demo.CLIP_FILE))
  with open(os.path.join(workdir, "eval", "report.json")) as f:
    data = json.load(f)
  claims = " ".join(c["claim"] for c in data["claims"])
  for claim in ("recovery beats the corrupted image at 100%", "corrupted + recovered answers",
                "RL's mean SSIM above SFT's", "RL's mean CLIP above SFT's",
                "clean accuracy within 2 points"):
    assert claim in claims, claim
  assert all(isinstance(c["holds"], bool) and c["measured"] for c in data["claims"])
  # The RL stage used the bootstrapped CLIP for its semantic reward.
  rl_rows = [json.loads(line) for line in open(os.path.join(workdir, "rl", "metrics.jsonl"))]
  assert all(0.0 < row["reward_clip_mean"] <= 1.0 for row in rl_rows if "reward_clip_mean" in row)
  assert any("reward_clip_mean" in row for row in rl_rows)
  for name in ("accuracy_vs_intensity.png", "ssim_sft_vs_rl.png", "rl_rewards.png"):
    assert os.path.getsize(os.path.join(workdir, "eval", name)) > 1000, name
  # Each part's header estimates the minutes to go.
  assert first.count(" to go) -> ") == len(demo.PARTS)
  # A re-run finds every part finished and the report of these models and settings.
  again = _train(workdir)
  assert again.count("nothing to train") == len(demo.PARTS) - 1 and "nothing to evaluate" in again
  assert again.count("about 0.0 to go") == len(demo.PARTS)


@pytest.mark.parametrize("variant", ["default", "quick"])
def test_every_part_has_reference_minutes(variant):
  minutes = config_lib.load_file(os.path.join(ROOT, "configs", f"demo.py:{variant}")).minutes
  assert set(minutes) == set(demo.PARTS)
  assert all(m > 0 for m in minutes.values())


def test_a_negative_reference_minute_is_refused():
  with pytest.raises(config_lib.ConfigError, match="minutes.vae = -1.0 is invalid"):
    config_lib.load(os.path.join(ROOT, "configs", "demo.py:quick"), {"minutes.vae": -1.0})
  with pytest.raises(config_lib.ConfigError, match="minutes_work.eval = 0.0 is invalid"):
    config_lib.load(os.path.join(ROOT, "configs", "demo.py:quick"), {"minutes_work.eval": 0.0})


def _scaled(overrides):
  config = config_lib.load(os.path.join(ROOT, "configs", "demo.py"), overrides)
  configs = {part: demo.part_config(config, part, "/runs/demo") for part in demo.PARTS}
  return config.minutes, demo.scaled_minutes(config, configs)


def test_the_estimate_follows_the_work_a_run_asks_of_a_part():
  minutes, scaled = _scaled({})
  assert scaled == pytest.approx(dict(minutes))  # measured at the config's own settings
  _, longer = _scaled({"vae.total_steps": 3000, "base.total_steps": 600})
  assert longer["vae"] == pytest.approx(3 * minutes.vae)
  assert longer["base"] == pytest.approx(minutes.base / 2)
  assert longer["eval"] == pytest.approx(minutes.eval)
  # Twice the images in every condition: twice the evaluation.
  _, twice = _scaled({"eval.claim_samples": 512, "eval.num_samples": 128})
  assert twice["eval"] == pytest.approx(2 * minutes.eval)
  assert twice["reason"] == pytest.approx(minutes.reason)
  # The claims' questions alone: more, but less than in proportion (the other conditions and the
  # compared models' recoveries stay at num_samples).
  _, claims = _scaled({"eval.claim_samples": 1000})
  assert minutes.eval * 1.5 < claims["eval"] < minutes.eval * 1000 / 256


def test_minutes_to_go_scales_the_reference_by_the_pace_so_far():
  reference = {"a": 1.0, "b": 2.0, "c": 3.0}
  # Nothing timed yet: the reference minutes themselves.
  assert demo.minutes_to_go(reference, {}, ["a", "b", "c"]) == pytest.approx(6.0)
  # Part a took twice its reference: the rest at the same pace.
  assert demo.minutes_to_go(reference, {"a": 2.0}, ["b", "c"]) == pytest.approx(10.0)
  assert demo.minutes_to_go(reference, {"a": 2.0, "b": 1.0}, ["c"]) == pytest.approx(3.0)
  # A part skipped (finished before) or resumed is not timed and, once done, not to run.
  assert demo.minutes_to_go(reference, {}, []) == 0.0


def _stopped_train(ran: list):
  """A trainer stopped by Ctrl-C at its first step, as `trainer.train` ends then."""
  from robust_u1_jax.training import checkpoint

  def train(c, workdir, build, **kwargs):
    ran.append(workdir)
    raise checkpoint.Stopped(1, signal.SIGINT, [])

  return train


def test_a_stopped_part_stops_the_demo(tmp_path, monkeypatch, capsys):
  from robust_u1_jax.training import checkpoint, trainer

  ran = []
  monkeypatch.setattr(trainer, "train", _stopped_train(ran))
  config = config_lib.load_file(os.path.join(ROOT, "configs", "demo.py:quick"))
  with pytest.raises(checkpoint.Stopped) as e:
    demo.run(config, str(tmp_path))
  assert e.value.exit_status == 130
  assert ran == [str(tmp_path / "vae")]
  steps = demo.part_config(config, "vae", str(tmp_path)).total_steps
  assert (f"the demo stopped in its vae part at step 1 of {steps}, its checkpoint "
          f"in {tmp_path / 'vae' / 'checkpoints'}; run the same command to resume"
          in capsys.readouterr().out)


class _Position:
  """The data iterator a checkpoint saves beside the state."""

  def get_state(self):
    return {"position": 0}

  def set_state(self, state):
    pass


def _checkpoint_part(workdir: str, part: str, config) -> None:
  """One checkpoint in `workdir`/`part` saved with the trainer's metadata for `config`."""
  from robust_u1_jax.training import checkpoint

  c = demo.part_config(config, part, workdir)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, part), every=1, keep=1)
  ckpt.save(1, {"w": jnp.zeros(2)}, _Position(),
            {"stage": c.stage, "config": c.to_json_best_effort(), "step": 1})
  ckpt.close()


def test_a_workdir_of_another_variant_is_refused_before_anything_runs(tmp_path, monkeypatch):
  from robust_u1_jax.training import checkpoint, trainer

  ran = []
  monkeypatch.setattr(trainer, "train", _stopped_train(ran))
  quick = config_lib.load_file(os.path.join(ROOT, "configs", "demo.py:quick"))
  default = config_lib.load_file(os.path.join(ROOT, "configs", "demo.py"))
  workdir = str(tmp_path / "demo")
  for part in ("vae", "vit"):  # the vit part's init_from names the vae part's workdir
    _checkpoint_part(workdir, part, quick)
  with pytest.raises(config_lib.ConfigError) as e:
    demo.run(default, workdir)
  message = str(e.value)
  assert message.startswith(f"{os.path.join(workdir, 'vae')} was trained with other settings")
  assert "variant 'quick', now 'default'" in message and "another --workdir" in message
  assert ran == []
  # With its own config, the workdir moved elsewhere (its chained paths differ) goes on.
  moved = str(tmp_path / "moved")
  os.rename(workdir, moved)
  with pytest.raises(checkpoint.Stopped):
    demo.run(quick, moved)
  assert ran == [os.path.join(moved, "vae")]


def test_a_part_draws_with_its_own_seed_or_the_demo_s(tmp_path, monkeypatch):
  # `--config.sft.seed=3` was overwritten by the demo's seed: a finished workdir answered
  # "nothing to train" and the run trained nothing with it.
  from robust_u1_jax.training import trainer

  spec = os.path.join(ROOT, "configs", "demo.py:quick")
  seeds = lambda config: {p: demo.part_config(config, p, "/runs/demo").seed for p in demo.PARTS}
  assert set(seeds(config_lib.load(spec, {"seed": 2})).values()) == {2, 0}  # eval keeps its own
  own = seeds(config_lib.load(spec, {"seed": 2, "sft.seed": 3}))
  assert own["sft"] == 3 and own["rl"] == own["vae"] == 2 and own["eval"] == 0
  workdir = str(tmp_path / "demo")
  for part in ("vae", "sft"):
    _checkpoint_part(workdir, part, config_lib.load(spec))
  monkeypatch.setattr(trainer, "train", _stopped_train([]))
  with pytest.raises(config_lib.ConfigError, match="sft was trained with other settings than "
                                                   "this config's: seed 0, now 3"):
    demo.run(config_lib.load(spec, {"sft.seed": 3}), workdir)


def test_several_processes_are_refused_before_anything_runs(tmp_path, monkeypatch):
  # As under launch/local.sh --processes 2: the bootstrap parts write their models from one host.
  from robust_u1_jax.training import trainer

  ran = []
  monkeypatch.setattr(trainer, "train", lambda c, workdir, build, **kwargs: ran.append(workdir))
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  quick = config_lib.load_file(os.path.join(ROOT, "configs", "demo.py:quick"))
  with pytest.raises(config_lib.ConfigError, match="runs in one process, here 2"):
    demo.run(quick, str(tmp_path / "demo"))
  assert ran == [] and not os.path.exists(tmp_path / "demo")


def test_the_evaluation_runs_again_for_other_settings_or_models(tmp_path, monkeypatch, capsys):
  from robust_u1_jax.eval import partial
  from robust_u1_jax.eval import run as eval_run
  from robust_u1_jax.training import checkpoint

  monkeypatch.setattr(checkpoint, "finished", lambda workdir, total_steps: True)
  evaluated = []

  def evaluate(c):
    evaluated.append(c.num_samples)
    return os.path.join(c.out, "report.md")

  monkeypatch.setattr(eval_run, "run", evaluate)
  config = config_lib.load_file(os.path.join(ROOT, "configs", "demo.py:quick"))
  workdir = str(tmp_path)
  for part in ("reason", "sft", "rl"):  # the evaluated and compared models' folders
    os.makedirs(os.path.join(workdir, part, "model", "params"))  # as Orbax model checkpoints
    open(os.path.join(workdir, part, "model", "bagel_config.json"), "w").close()
  weights = os.path.join(workdir, "reason", "model", "weights")
  with open(weights, "w") as f:
    f.write("trained")
  c = demo.part_config(config, "eval", workdir)
  os.makedirs(c.out)
  # The report of this very evaluation, as `eval_run.run` stamps it.
  with open(os.path.join(c.out, "report.json"), "w") as f:
    json.dump({"settings": {"stamp": partial.stamp(eval_run.fingerprint(c))}}, f)
  open(os.path.join(c.out, "report.md"), "w").close()
  demo.run(config, workdir)
  assert evaluated == [] and "nothing to evaluate" in capsys.readouterr().out
  # Other settings: evaluated again.
  more = config_lib.load_file(os.path.join(ROOT, "configs", "demo.py:quick"))
  with more.unlocked():
    more.eval.num_samples = 32
  demo.run(more, workdir)
  assert evaluated == [32]
  assert "written for other models, settings or code: evaluating again" in capsys.readouterr().out
  # A model retrained (its file rewritten): evaluated again.
  with open(weights, "w") as f:
    f.write("trained again")
  demo.run(config, workdir)
  assert evaluated == [32, 16]
  # The stamp of this evaluation, but its report.md gone (deleted, or a write that never ended):
  # evaluated again.
  with open(os.path.join(c.out, "report.json"), "w") as f:
    json.dump({"settings": {"stamp": partial.stamp(eval_run.fingerprint(c))}}, f)
  demo.run(config, workdir)
  assert evaluated == [32, 16]
  os.remove(os.path.join(c.out, "report.md"))
  demo.run(config, workdir)
  assert evaluated == [32, 16, 16]


def test_the_quick_variant_compiles_at_level_0_before_the_backend_starts(tmp_path):
  quick = config_lib.load_file(os.path.join(ROOT, "configs", "demo.py:quick"))
  assert quick.xla_flags == "--xla_backend_optimization_level=0"
  assert config_lib.load_file(os.path.join(ROOT, "configs", "demo.py")).xla_flags == ""
  # train.main applies them before anything starts the backend (XLA reads its flags then), ahead
  # of the user's own, which win. In a process of its own: importing train defines its required
  # --config on absl's global flags, which other tests parse.
  probe = """
import os, sys
from jax._src import xla_bridge
from robust_u1_jax import cli, train

use = train.use_xla_flags

def applied(flags):
  use(flags)
  print(xla_bridge.backends_are_initialized(), os.environ["XLA_FLAGS"])
  raise SystemExit(0)

train.use_xla_flags = applied
sys.argv = ["train", "--config", sys.argv[1], "--workdir", sys.argv[2]]
cli.run(train.main)
"""
  env = {**os.environ, "XLA_FLAGS": "--xla_backend_optimization_level=2"}
  out = subprocess.run([sys.executable, "-c", probe, os.path.join(ROOT, "configs", "demo.py:quick"),
                        str(tmp_path / "demo")], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env=env)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip() == ("False --xla_backend_optimization_level=0 "
                                "--xla_backend_optimization_level=2")
