"""The convert CLI and Orbax model checkpoints: hf -> orbax -> hf is lossless, Orbax restores onto
a mesh, `load_pretrained` takes either kind of directory, and bad paths fail with clear errors."""

import json
import os
import re
import shutil
import subprocess
import sys

import jax
import ml_dtypes
import numpy as np
import safetensors.numpy
import pytest
from absl import flags

from robust_u1_jax import cli, convert, sharding
from robust_u1_jax.checkpoints import bagel_export, loader, orbax_io
from robust_u1_jax.inference import images, recovery
from robust_u1_jax.models import bagel

CFG = bagel.BagelConfig.tiny()


@pytest.fixture(scope="module")
def source(random_bagel):
  return random_bagel(CFG, seed=5)


@pytest.fixture(scope="module")
def model_dir(source, tmp_path_factory):
  tok = tmp_path_factory.mktemp("tok")
  (tok / "tokenizer.json").write_text('{"model": "tiny"}\n')
  (tok / "merges.txt").write_text("#version: 0.2\n")
  path = str(tmp_path_factory.mktemp("hf") / "model")

  def side_files(folder):  # as a model trained here and converted to a BAGEL directory has
    images.ImageRules(64, 32, 16, 64, 32, 8).save(folder)
    recovery.Guidance(text_scale=1.5, image_scale=1.5).save(folder)
    recovery.save_instruction(folder, "Make this picture clean again.")

  return bagel_export.save_model_dir(source, path, tokenizer_dir=str(tok), write_beside=side_files)


def run_cli(*args):
  return subprocess.run([sys.executable, "-m", "robust_u1_jax.convert", "--noprogress", *args],
                        capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def orbax_dir(model_dir, tmp_path_factory):
  dst = str(tmp_path_factory.mktemp("orbax") / "ckpt")
  result = run_cli("--from", "hf", "--src", model_dir, "--dst", dst)
  assert result.returncode == 0, result.stderr[-3000:]
  return dst


def test_cli_hf_orbax_hf_is_lossless(model_dir, orbax_dir, tmp_path, read_tensors):
  # The trained model's image rules, guidance and instruction travel with it both ways.
  assert sorted(os.listdir(orbax_dir)) == ["bagel_config.json", "guidance.json",
                                          "image_rules.json", "instruction.json", "merges.txt",
                                          "params", "tokenizer.json"]
  back = str(tmp_path / "back")
  result = run_cli("--to", "hf", "--src", orbax_dir, "--dst", back)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"wrote {back}" in result.stdout
  for name in ("ema.safetensors", "ae.safetensors"):
    a, b = read_tensors(os.path.join(model_dir, name)), read_tensors(os.path.join(back, name))
    assert a.keys() == b.keys()
    for k in a:
      assert a[k].dtype == b[k].dtype, k
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  for name in ("llm_config.json", "vit_config.json", "robust_u1_config.json", "tokenizer.json",
               "merges.txt", "image_rules.json", "guidance.json", "instruction.json"):
    with open(os.path.join(model_dir, name)) as f1, open(os.path.join(back, name)) as f2:
      assert f1.read() == f2.read(), name


def test_orbax_restores_onto_a_mesh(source, orbax_dir, assert_same_params):
  mesh = sharding.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
  model = orbax_io.load_orbax(orbax_dir, mesh=mesh)
  assert model.config == CFG
  kernel = model.language_model.layers.gen.mlp.down_proj.kernel.get_value()
  assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "tensor", "fsdp")
  assert_same_params(source, model)
  bf16 = orbax_io.load_orbax(orbax_dir, param_dtype="bfloat16")  # cast while reading
  assert all(v.get_value().dtype == np.dtype("bfloat16")
             for v in loader.param_variables(bf16).values())


def test_load_pretrained_takes_either_directory(source, model_dir, orbax_dir, tmp_path,
                                                  assert_same_params):
  assert_same_params(source, orbax_io.load_pretrained(orbax_dir))
  assert_same_params(source, orbax_io.load_pretrained(model_dir))
  with pytest.raises(FileNotFoundError, match="neither a BAGEL model directory"):
    orbax_io.load_pretrained(str(tmp_path))
  # Hugging Face's cache: the model two folders down. The message names it.
  hub = tmp_path / "hub" / "models--ByteDance-Seed--BAGEL-7B-MoT"
  snapshot = hub / "snapshots" / "0123abc"
  shutil.copytree(model_dir, snapshot)
  with pytest.raises(FileNotFoundError, match=r"neither a BAGEL model directory .*; a model is "
                     rf"below it: {re.escape(str(snapshot))}$"):
    orbax_io.load_pretrained(str(tmp_path / "hub"))


def test_save_orbax_in_process_round_trip(source, tmp_path, assert_same_params):
  path = orbax_io.save_orbax(source, str(tmp_path / "ckpt"))
  assert_same_params(source, orbax_io.load_orbax(path))
  with pytest.raises(FileExistsError, match="overwrite"):
    orbax_io.save_orbax(source, path)


@pytest.fixture
def main_with_flags():
  """Runs convert.main in-process with the given flags, restoring the flag state afterwards."""
  def run(*args):
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["convert", "--noprogress", *args])
    return cli.call(convert.main, ["convert"])  # as the program: a bad input is exit status 2

  yield run
  flags.FLAGS.unparse_flags()


def test_cli_errors(model_dir, orbax_dir, tmp_path, main_with_flags, capsys):
  assert main_with_flags("--from", "hf", "--src", model_dir, "--dst", orbax_dir) == 2
  assert "already exists" in capsys.readouterr().err and os.path.isdir(orbax_dir)
  missing = str(tmp_path / "nowhere")
  assert main_with_flags("--to", "hf", "--src", missing, "--dst", str(tmp_path / "x")) == 2
  assert f"error: --src {missing}: no such folder" in capsys.readouterr().err
  # An Orbax checkpoint is not a model directory: the error says what was expected.
  assert main_with_flags("--from", "hf", "--src", orbax_dir, "--dst", str(tmp_path / "y")) == 2
  assert "convert it with --to hf" in capsys.readouterr().err
  # A model directory without its LLM config: the loader names the file.
  partial = tmp_path / "partial"
  partial.mkdir()
  assert main_with_flags("--from", "hf", "--src", str(partial), "--dst", str(tmp_path / "z")) == 2
  assert "llm_config.json" in capsys.readouterr().err
  assert main_with_flags("--from", "hf", "--to", "hf", "--src", model_dir, "--dst", missing) == 2
  assert "exactly one of" in capsys.readouterr().err
  assert main_with_flags("--from", "hf", "--src", model_dir) == 2
  assert "error: missing --dst" in capsys.readouterr().err
  assert not os.path.exists(str(tmp_path / "y")) and not os.path.exists(missing)


def _truncate(path, keep=100):
  with open(path, "r+b") as f:
    f.truncate(keep)


def _copy(tree, tmp_path, name, change):
  copy = tmp_path / name
  shutil.copytree(tree, copy)
  change(copy)
  return str(copy)


def test_a_broken_source_is_one_line_naming_what_is_broken(model_dir, orbax_dir, tmp_path,
                                                          main_with_flags, capsys):
  def bump_layers(folder):
    config = json.loads((folder / orbax_io.CONFIG).read_text())
    config["llm"]["num_layers"] += 1
    (folder / orbax_io.CONFIG).write_text(json.dumps(config))

  def cut_largest_array_file(folder):
    files = [p for p in (folder / "params").rglob("*") if p.is_file()]
    _truncate(max(files, key=lambda p: p.stat().st_size if "METADATA" not in p.name else 0))

  def nan_in(name, dtype):
    def change(folder):
      tensors = safetensors.numpy.load_file(str(folder / name))
      key = sorted(tensors)[0]
      tensors[key] = tensors[key].astype(dtype)
      tensors[key].reshape(-1)[[0, -1]] = [np.nan, np.inf]
      safetensors.numpy.save_file(tensors, str(folder / name))
      return key
    return change

  nan_key = sorted(safetensors.numpy.load_file(os.path.join(model_dir, "ema.safetensors")))[0]
  vae_key = sorted(safetensors.numpy.load_file(os.path.join(model_dir, "ae.safetensors")))[0]
  def diverged(folder):  # an Orbax model whose one weight a diverged run left infinite
    model = orbax_io.load_orbax(orbax_dir)
    kernel = model.llm2vae.kernel
    kernel.set_value(kernel.get_value().at[0, 0].set(np.inf))
    shutil.rmtree(folder)
    orbax_io.save_orbax(model, str(folder), tokenizer_dir=orbax_dir)

  def edit(name, **fields):
    def change(folder):
      config = json.loads((folder / name).read_text())
      for key, value in fields.items():
        section, _, key = key.rpartition("__")
        (config[section] if section else config)[key] = value
      (folder / name).write_text(json.dumps(config))
    return change

  hf, to_hf = ["--from", "hf"], ["--to", "hf"]
  cases = [
      # A hand-edited config: a traceback from int(), or from JAX at a negative layer count.
      (hf, _copy(model_dir, tmp_path, "abc", edit("vit_config.json", hidden_size="abc")),
       "vit_config.json: field 'hidden_size' = \"abc\": not a whole number >= 1"),
      (hf, _copy(model_dir, tmp_path, "neg", edit("llm_config.json", num_hidden_layers=-1)),
       "llm_config.json: field 'num_hidden_layers' = -1: not a whole number >= 1"),
      (hf, _copy(model_dir, tmp_path, "null", edit("llm_config.json", num_attention_heads=None)),
       "llm_config.json: required field 'num_attention_heads' = null: not a whole number >= 1"),
      (hf, _copy(model_dir, tmp_path, "eps", edit("llm_config.json", rms_norm_eps="1e-6x")),
       "llm_config.json: field 'rms_norm_eps' = \"1e-6x\": not a finite number"),
      (hf, _copy(model_dir, tmp_path, "act", edit("vit_config.json", hidden_act="relu6")),
       "vit_config.json: hidden_act 'relu6' is not supported"),
      (hf, _copy(model_dir, tmp_path, "heads", edit("vit_config.json", num_attention_heads=5)),
       # Its field names, not SiglipConfig's ("SiglipConfig: ... num_heads 5").
       "vit_config.json: hidden_size 32 is not a multiple of num_attention_heads 5"),
      (to_hf, _copy(orbax_dir, tmp_path, "typo", edit(orbax_io.CONFIG, latent_patch_sise=2)),
       "bagel_config.json: unknown field(s) ['latent_patch_sise'] in 'top level'"),
      (to_hf, _copy(orbax_dir, tmp_path, "mult", edit(orbax_io.CONFIG, vae__ch_mult=[1, "2"])),
       "bagel_config.json (vae): field 'ch_mult' = \"2\": not a whole number >= 1"),
      (to_hf, _copy(orbax_dir, tmp_path, "dtype", edit(orbax_io.CONFIG, llm__dtype="float33")),
       "bagel_config.json: dtype 'float33' is not a dtype's name"),
      # Exported silently before: the BAGEL directory's every output was NaN.
      (to_hf, _copy(orbax_dir, tmp_path, "inf", diverged),
       "/inf: model parameter 'llm2vae.kernel' (tensor 'llm2vae.weight') holds 1 NaN or "
       "infinite value(s) of "),
      # A damaged weight is named with its file, whatever its dtype; it used to convert silently.
      (hf, _copy(model_dir, tmp_path, "nan", nan_in("ema.safetensors", np.float32)),
       f"ema.safetensors: tensor '{nan_key}' holds 2 NaN or infinite value(s)"),
      (hf, _copy(model_dir, tmp_path, "nan16", nan_in("ae.safetensors", ml_dtypes.bfloat16)),
       f"ae.safetensors: tensor '{vae_key}' holds 2 NaN or infinite value(s)"),
      (hf, _copy(model_dir, tmp_path, "ema", lambda d: _truncate(d / "ema.safetensors")),
       "ema.safetensors: not a readable safetensors file"),
      (hf, _copy(model_dir, tmp_path, "llm", lambda d: _truncate(d / "llm_config.json", 40)),
       "llm_config.json: not valid JSON"),
      (hf, _copy(model_dir, tmp_path, "guide", lambda d: _truncate(d / "guidance.json", 10)),
       "guidance.json: not valid JSON"),
      (to_hf, _copy(orbax_dir, tmp_path, "config", lambda d: _truncate(d / orbax_io.CONFIG, 40)),
       "bagel_config.json: not valid JSON"),
      (to_hf, _copy(orbax_dir, tmp_path, "meta", lambda d: (d / "params" / "_METADATA").unlink()),
       "params: not a whole Orbax checkpoint (no _METADATA; a copy cut short?)"),
      # Its array files gone, its _METADATA there: it said "no readable _METADATA".
      (to_hf, _copy(orbax_dir, tmp_path, "data", lambda d: shutil.rmtree(d / "params" / "d")),
       "params: not a whole Orbax checkpoint (its _METADATA is there, its array files are not "
       "readable; a copy cut short?)"),
      # Orbax's own error named the shapes, not the array.
      (to_hf, _copy(orbax_dir, tmp_path, "layers", bump_layers),
       "params: array 'language_model.layers.gen.input_norm.scale' has shape (2, 64), but the "
       "model of bagel_config.json expects (3, 64) (and 27 more arrays): the checkpoint and its "
       "bagel_config.json do not match"),
      (to_hf, _copy(orbax_dir, tmp_path, "arrays", cut_largest_array_file),
       "params: its arrays cannot be read (a file cut short, or other shapes than "
       "bagel_config.json describes): "),
  ]
  for direction, src, message in cases:
    assert main_with_flags(*direction, "--src", src, "--dst", str(tmp_path / "out")) == 2, src
    err = capsys.readouterr().err
    assert err.count("error: ") == 1 and message in err and "Traceback" not in err, err
    assert "strict=False" not in err and err.count(os.path.basename(src) + "/") <= 2, err
    assert not os.path.exists(tmp_path / "out")


def test_a_damaged_checkpoint_is_the_command_s_only_line(orbax_dir, tmp_path):
  # In its own process, as a user runs it: Orbax warned in a line of its own above the error.
  src = _copy(orbax_dir, tmp_path, "meta", lambda d: (d / "params" / "_METADATA").unlink())
  out = run_cli("--to", "hf", "--src", src, "--dst", str(tmp_path / "out"))
  assert out.returncode == 2 and out.stderr.splitlines() == [
      f"error: {src}/params: not a whole Orbax checkpoint (no _METADATA; a copy cut short?): "
      "write or copy it again"], out.stderr


def test_flags_of_the_other_direction_and_a_bad_fsdp_are_refused(model_dir, orbax_dir, tmp_path,
                                                                 main_with_flags, capsys,
                                                                 monkeypatch):
  dst = str(tmp_path / "out")
  for args, message in [
      (["--to", "hf", "--src", orbax_dir, "--param_dtype", "bfloat16"],
       "--param_dtype: only used with --from hf"),
      (["--from", "hf", "--src", model_dir, "--save_dtype", "bfloat16"],
       "--save_dtype: only used with --to hf"),
      (["--from", "hf", "--src", model_dir, "--fsdp", "0"], "--fsdp 0: give 1 to"),
      (["--to", "hf", "--src", model_dir], "a BAGEL model directory (it has llm_config.json); "
       "import it with --from hf"),
  ]:
    assert main_with_flags(*args, "--dst", dst) == 2, args
    assert message in capsys.readouterr().err
    assert not os.path.exists(dst)
  monkeypatch.setattr(jax, "device_count", lambda: 1)
  assert main_with_flags("--from", "hf", "--src", model_dir, "--fsdp", "4", "--dst", dst) == 2
  assert "--fsdp 4: give 1 (the one device here), or -1 for all" in capsys.readouterr().err


def test_a_source_without_a_tokenizer_converts_with_a_note(model_dir, tmp_path, main_with_flags,
                                                           capsys):
  def drop_tokenizer(folder):
    for name in ("tokenizer.json", "merges.txt"):
      (folder / name).unlink()

  src = _copy(model_dir, tmp_path, "no_tokenizer", drop_tokenizer)
  assert main_with_flags("--from", "hf", "--src", src, "--dst", str(tmp_path / "out")) == 0
  assert f"note: {src} has no tokenizer files" in capsys.readouterr().err
  assert orbax_io.is_orbax_model(str(tmp_path / "out"))


def test_bfloat16_weights_widened_to_float32_are_noted(model_dir, tmp_path):
  """A BAGEL release (bfloat16) came back from --from hf and --to hf twice its size, unsaid."""
  def declare_bfloat16(folder):
    config = json.loads((folder / "llm_config.json").read_text())
    (folder / "llm_config.json").write_text(json.dumps({**config, "torch_dtype": "bfloat16"}))

  def store(dtype):
    def change(folder):
      path = str(folder / "ema.safetensors")
      tensors = safetensors.numpy.load_file(path)
      safetensors.numpy.save_file({k: v.astype(dtype) for k, v in tensors.items()}, path)
    return change

  # The weights' headers say it, whatever the config says (a float16 shard went unnoted).
  for name, dtype in (("bfloat16", ml_dtypes.bfloat16), ("float16", np.float16)):
    src = _copy(model_dir, tmp_path, name, store(dtype))
    assert convert.upcast_note(src, "float32") == (
        f"note: {src}: its weights are stored as {name}; the checkpoint stores them as float32 "
        "(--param_dtype), twice their size: --param_dtype bfloat16 keeps them as they are, "
        f"--to hf --save_dtype {name} writes them back as {name}")
    assert convert.upcast_note(src, "bfloat16") is None
  assert convert.upcast_note(model_dir, "float32") is None  # float32 weights
  # A config that declares bfloat16 over float32 weights widens nothing.
  said = _copy(model_dir, tmp_path, "said", declare_bfloat16)
  assert convert.upcast_note(said, "float32") is None


def test_overwrite_replaces_only_a_model(model_dir, orbax_dir, tmp_path, main_with_flags,
                                         capsys):
  dst = tmp_path / "ckpt"
  shutil.copytree(orbax_dir, dst)
  (dst / "stale.txt").write_text("old")
  assert main_with_flags("--from", "hf", "--src", model_dir, "--dst", str(dst),
                         "--overwrite") == 0
  assert "stale.txt" not in os.listdir(dst) and orbax_io.is_orbax_model(str(dst))
  # --overwrite deletes the destination whole: what is no model is refused before any load.
  parent = tmp_path / "parent"
  src = parent / "model"
  shutil.copytree(model_dir, src)
  (parent / "notes.txt").write_text("keep")
  other = tmp_path / "other"
  other.mkdir()
  (other / "a.txt").write_text("keep")
  for target, message in [(parent, "holds the source"), (src, "the source folder itself"),
                          (src / "out", "inside the source"),
                          (parent / "notes.txt", "a file, not a model folder"),
                          (other, "not a model folder (no llm_config.json or bagel_config.json")]:
    for overwrite in (["--overwrite"], []):  # without it, no advice to add it
      assert main_with_flags("--from", "hf", "--src", str(src), "--dst", str(target),
                             *overwrite) == 2, target
      err = capsys.readouterr().err
      assert f"error: --dst {target}: {message}" in err and "Traceback" not in err, err
  assert sorted(os.listdir(parent)) == ["model", "notes.txt"]
  assert (parent / "notes.txt").read_text() == "keep" and os.listdir(other) == ["a.txt"]
  assert sorted(os.listdir(src)) == sorted(os.listdir(model_dir))




def test_an_interrupted_write_leaves_no_partial_folder_though_its_writers_go_on(tmp_path):
  # Ctrl-C during `convert` left <dst>.partial/params.orbax-checkpoint-tmp/: TensorStore's writes,
  # in their own threads, created it again after the folder was removed.
  import threading
  import time

  dst = tmp_path / "model"
  writer = []
  with pytest.raises(KeyboardInterrupt):
    with bagel_export.atomic_directory(str(dst)) as tmp:
      def late_write():  # a write still in flight when the interrupt reaches the block
        time.sleep(0.3)
        os.makedirs(os.path.join(tmp, "params.orbax-checkpoint-tmp"), exist_ok=True)
      writer.append(threading.Thread(target=late_write))
      writer[0].start()
      raise KeyboardInterrupt
  writer[0].join()
  assert os.listdir(tmp_path) == []
