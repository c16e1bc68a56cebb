"""Configs are data: loading without JAX, one loader, typed overrides, objective options, one-line errors,
and every config check before any data is read."""

import json
import os
import pathlib
import re
import subprocess
import sys

import jax
import ml_collections
import pytest

from exlm_jax import config_lib, objectives
from exlm_jax.data import vocab
from exlm_jax.objectives import base
from exlm_jax.train import loop

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG_FILES = sorted((REPO / "configs").glob("*.py"))
BLOCKED = ("jax", "jaxlib", "flax", "optax", "orbax", "tensorflow", "tensorflow_datasets", "grain")
# Raises on any import of the heavy libraries, so a config (or sweep.py) that reaches them fails loudly.
BLOCKER = f"""
import sys
class _Block:
  def find_spec(self, name, path=None, target=None):
    if name.partition(".")[0] in {BLOCKED!r}:
      raise ImportError("blocked import of " + name)
sys.meta_path.insert(0, _Block())
"""


def documented_specs(path: pathlib.Path) -> tuple[set, set]:
  """({arg}, {sweep_arg}) of the commands quoted in a config's docstring (None = the default)."""
  lines = path.read_text().split('"""')[1].splitlines()
  name = re.escape(path.name)
  args = {None} | {m.group(1) for line in lines for m in re.finditer(rf"configs/{name}:(\S+)", line)}
  sweeps = {None} | {m.group(1) for line in lines if re.search(rf"configs/{name}", line)
                     for m in re.finditer(r"--sweep_arg (\S+)", line)}
  return args, sweeps


def _run_python(code: str, *args, cwd=REPO):
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
  return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, env=env, capture_output=True, text=True,
                        timeout=120)


def test_every_config_loads_without_jax_or_other_exlm_modules():
  cases = {str(path): [sorted(s, key=str) for s in documented_specs(path)] for path in CONFIG_FILES}
  code = BLOCKER + f"""
import json
from exlm_jax import config_lib
loaded = []
for path, (args, sweeps) in {cases!r}.items():
  for arg in args:
    config = config_lib.load(path + (":" + arg if arg else ""))
    loaded.append([path, arg, sorted(config.keys())])
  module = config_lib.load_module(path)
  for arg in sweeps if hasattr(module, "get_sweep") else ():
    assert module.get_sweep(arg), (path, arg)
    loaded.append([path, "sweep " + str(arg), []])
print(json.dumps({{"loaded": loaded, "modules": sorted(m for m in sys.modules if m.startswith("exlm_jax"))}}))
"""
  result = _run_python(code)
  assert result.returncode == 0, result.stderr[-3000:]
  out = json.loads(result.stdout)
  assert out["modules"] == ["exlm_jax", "exlm_jax.config_lib"]
  assert {path for path, _, _ in out["loaded"]} == {str(p) for p in CONFIG_FILES}
  assert len(out["loaded"]) >= 2 * len(CONFIG_FILES)  # documented arguments beyond the defaults
  for path, arg, keys in out["loaded"]:
    if not arg or not arg.startswith("sweep"):
      assert "objective" in keys or "finetune" in keys, (path, arg)


def test_config_lib_imports_nothing_heavy():
  text = (REPO / "exlm_jax" / "config_lib.py").read_text()
  imported = re.findall(r"^(?:from|import) (\S+)", text, re.M)
  assert not [m for m in imported if m.partition(".")[0] in BLOCKED + ("exlm_jax",)], imported


def test_sweep_dry_run_stays_jax_free(tmp_path):
  code = BLOCKER + """
import runpy
sys.argv = ["launch/sweep.py", *sys.argv[1:]]
try:
  runpy.run_path("launch/sweep.py", run_name="__main__")
except SystemExit as e:
  assert e.code == 0, e.code
assert not [m for m in sys.modules if m.partition(".")[0] in ("jax", "flax")]
"""
  result = _run_python(code, "--config", "configs/exlm_smiles_small.py:size=tiny", "--sweep_arg", "sweep=ablations",
                       "--workdir", str(tmp_path / "s"), "--dry_run")
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.splitlines()
  assert len(lines) == 4 and lines[1].endswith("--config.exlm.transitions=ctc")  # an option the config does not write
  assert not (tmp_path / "s").exists()


# ----------------------------------------------------------------------------------------------
# One loader
# ----------------------------------------------------------------------------------------------


def test_load_by_path_relative_to_cwd_then_repo(tmp_path, monkeypatch):
  (tmp_path / "configs").mkdir()
  (tmp_path / "configs" / "quickstart.py").write_text(
      "from exlm_jax import config_lib\n\n"
      "def get_config(arg=None):\n  return config_lib.parse_arg(arg, here=True, steps=1)\n")
  monkeypatch.chdir(tmp_path)
  assert config_lib.load("configs/quickstart.py:steps=5").to_dict() == {"here": True, "steps": 5}  # cwd first
  repo = config_lib.load(str(REPO / "configs" / "quickstart.py") + ":objective=mlm,steps=7")
  assert (repo.objective, repo.total_steps) == ("mlm", 7)
  assert config_lib.load("configs/mlm_smiles_small.py:size=tiny").batch_size == 8  # not in cwd: the repo's
  with pytest.raises(FileNotFoundError, match=r"config file 'configs/nope\.py' not found") as err:
    config_lib.load("configs/nope.py:size=tiny")
  assert "\n" not in str(err.value)
  with pytest.raises(FileNotFoundError, match="nope.py"):
    config_lib.load_module("nope.py", relative_to=REPO / "configs" / "quickstart.py")
  (tmp_path / "bad.py").write_text("def get_config(arg=None):\n  return {'a': 1}\n")
  with pytest.raises(ValueError, match="not a ConfigDict"):
    config_lib.load("bad.py")


def test_derived_configs_equal_their_base_with_the_argument():
  pairs = [("finetune_bbbp.py:quick", "finetune_moleculenet.py:task=bbbp,quick"),
           ("finetune_sst2.py", "finetune_glue.py:task=sst2")]
  for derived, original in pairs:
    assert config_lib.load(f"configs/{derived}").to_dict() == config_lib.load(f"configs/{original}").to_dict()
  large = config_lib.load("configs/maelm_large.py")
  assert (large.model.num_layers, large.model.d_model, large.model.remat, large.seq_len) == (24, 1024, "dots", 512)


def test_finetune_task_names_match_the_registries():
  from exlm_jax.finetune.metrics import GLUE_TASKS  # pylint: disable=g-import-not-at-top
  from exlm_jax.finetune.tasks import MOLECULENET  # pylint: disable=g-import-not-at-top
  from exlm_jax.finetune.squad.reader import VERSIONS  # pylint: disable=g-import-not-at-top
  assert config_lib.GLUE_TASKS == tuple(GLUE_TASKS) and config_lib.MOLECULENET_TASKS == tuple(MOLECULENET)
  assert sorted(config_lib.SQUAD_VERSIONS.values()) == sorted(VERSIONS)  # one task per SQuAD version


def test_repeated_mlm_config_mask_prob_matches_the_pilot_maths():
  from exlm_jax.analysis import repeated_mlm as pilot  # pylint: disable=g-import-not-at-top
  module = config_lib.load_module("configs/repeated_mlm_smiles_small.py")
  for ratio in (0.15, 0.3):
    for k in (1, 2, 3, 4):
      config = module.get_config(f"k={k},fixed=corrupted,ratio={ratio}")
      assert config.mask_prob == pilot.solve_p(ratio, k) and config.repeated_mlm.num_copies == k
      assert module.get_config(f"k={k},fixed=unreal,ratio={ratio}").mask_prob == ratio
    for arm in ("corrupted", "unreal"):
      grid = pilot.pk_grid(ks=(1, 2, 4), **{arm: ratio})
      assert module.get_sweep(f"sweep={arm},ratio={ratio}") == [
          {"mask_prob": point.p, "repeated_mlm.num_copies": point.k} for point in grid]
  for bad in ("fixed=both", "ratio=1.5", "k=0"):
    with pytest.raises(ValueError):
      module.get_config(bad)


# ----------------------------------------------------------------------------------------------
# Overrides and objective options
# ----------------------------------------------------------------------------------------------


def test_override_types_values_like_their_field():
  config = config_lib.pretrain_config("mlm", "tiny")
  config.finetune_like = config_lib.finetune_config()
  for key, text, expected in [
      ("total_steps", "30", 30), ("learning_rate", "1e-3", 1e-3), ("learning_rate", "2", 2.0),
      ("async_checkpointing", "false", False), ("async_checkpointing", "1", True), ("data.column", "0", "0"),
      ("model.positions", "absolute+relbias", "absolute+relbias"), ("finetune_like.seeds", "(0,)", (0,)),
      ("finetune_like.seeds", "3,4", (3, 4)), ("finetune_like.seeds", "5", (5,)),
      ("logical_axis_rules", "(('embed', 'fsdp'),)", (("embed", "fsdp"),)),
      ("data.packing", "true", True), ("data.max_examples_per_block", "6", 6),
      ("data.text_units", "documents", "documents"),
  ]:
    config_lib.override(config, key, text)
    node = config
    for part in key.split("."):
      node = node[part]
    assert node == expected and type(node) is type(expected), (key, text, node)


@pytest.mark.parametrize("key,text,message", [
    ("totl_steps", "30", "config has no key 'totl_steps'; did you mean 'total_steps'?"),
    ("foo", "1", "config has no key 'foo'; known: adam_b1, "),
    ("model.dmodel", "3", "config.model has no key 'dmodel'; did you mean 'd_model'?"),
    ("model.d_model.x", "3", "config.model.d_model is a value, not a section"),
    ("model", "3", "is a section, not a value"),
    ("total_steps", "1e3", "must be an integer"),
    ("learning_rate", "fast", "must be a number"),
    ("async_checkpointing", "maybe", "must be true or false"),
])
def test_override_errors_are_one_line_with_the_closest_key(key, text, message):
  with pytest.raises(ValueError) as err:
    config_lib.override(config_lib.pretrain_config("mlm"), key, text)
  assert message in str(err.value) and "\n" not in str(err.value)
  assert str(err.value).startswith(f"--config.{key}")


def test_objective_options_merge_defaults_and_reject_unknown_keys():
  for name in objectives.names():
    module = getattr(objectives, name)
    config = config_lib.pretrain_config(name, "tiny")
    assert name not in config  # configs write only what they change
    assert module.options(config).to_dict() == module.DEFAULTS
    assert objectives.get(name).options(config).to_dict() == module.DEFAULTS
    key, value = next(iter(module.DEFAULTS.items()))
    changed = type(value)(not value) if isinstance(value, bool) else value + 1 if isinstance(value, int) else value
    config[name] = ml_collections.ConfigDict({key: changed})
    merged = objectives.with_defaults(config)
    assert merged[name].to_dict() == {**module.DEFAULTS, key: changed} and config[name].to_dict() == {key: changed}
    config[name][key + "s"] = changed
    with pytest.raises(ValueError, match=rf"unknown config.{name} keys \['{key}s'\]; did you mean '{key}'\?"):
      module.options(config)
  config = config_lib.pretrain_config("exlm", "tiny")
  config.exlm = ml_collections.ConfigDict(dict(num_copies="four"))
  with pytest.raises(ValueError, match="config.exlm: Could not override field 'num_copies'"):
    objectives.exlm.options(config)


# ----------------------------------------------------------------------------------------------
# Validation before any data work
# ----------------------------------------------------------------------------------------------


def _config(objective="mlm", **fields):
  config = config_lib.pretrain_config(objective, "tiny", **{"seq_len": 16, "batch_size": 8, **fields})
  if objective == "maelm":
    config.model.update(pre_ln=False, positions="absolute+relbias", embed_layernorm=True, max_positions=64)
  return config


@pytest.mark.parametrize("fields,message", [
    ({"batch_size": 0}, "batch_size=0 must be positive"),
    ({"keep_checkpoints": 0}, "keep_checkpoints=0 must be >= 1 (use a large number to keep all)"),
    ({"learning_rate": -1.0}, "learning_rate=-1.0 must be positive"),
    ({"learning_rate": 0.0}, "learning_rate=0.0 must be positive"),
    ({"seq_len": 100_000}, "seq_len=100000 exceeds model.max_positions=2048 (positions='rope2d')"),
    ({"seq_len": 1}, "use >= 3"),
    ({"seq_len": 2}, "use >= 3"),
    ({"eval_every": 0}, "eval_every=0 must be positive"),
    ({"profile_start_step": 2, "profile_num_steps": 0}, "profile_num_steps=0 must be positive"),
])
def test_each_bad_value_is_one_line(fields, message):
  config = _config(**fields)
  with pytest.raises(ValueError) as err:
    loop.validate_config(config, num_devices=8)
  assert message in str(err.value) and "\n" not in str(err.value)


def test_learned_position_tables_bound_seq_len_and_rope2d_has_its_own_bound():
  assert config_lib.pretrain_config("mlm").model.max_positions == 2048
  assert config_lib.model_config("small", positions="absolute+relbias").max_positions == 512
  config = _config("maelm", seq_len=65)
  with pytest.raises(ValueError, match="seq_len=65 exceeds model.max_positions=64 .positions='absolute.relbias'."):
    loop.validate_config(config, num_devices=8)
  config = _config(seq_len=4096)
  config.model.max_positions = 4096
  loop.validate_config(config, num_devices=8)


@pytest.mark.parametrize("objective", ["mlm", "maelm", "exlm", "repeated_mlm"])
def test_the_minimum_block_is_valid_for_every_objective(objective):
  """seq_len = vocab.MIN_BLOCK_LEN passes every check and the objective's model traces on `<s> x </s>`."""
  config = _config(objective, seq_len=vocab.MIN_BLOCK_LEN)
  loop.validate_config(config, num_devices=8)  # vocabulary not known yet: every other check runs
  config = loop.with_vocab_size(config, 40)
  loop.validate_vocabulary(config)
  objective_ = objectives.get(objective)
  tokens = base.dummy_tokens(8, vocab.MIN_BLOCK_LEN)
  key = jax.random.key(0)
  params = jax.eval_shape(lambda k: base.init_params(objective_, config, k), key)
  loss_sum, (weight, _) = jax.eval_shape(lambda p, k: base.apply_loss(objective_, config, p, tokens, k, True),
                                         params, key)
  assert loss_sum.shape == weight.shape == ()
  with pytest.raises(ValueError, match="use >= 3"):
    loop.validate_config(_config(objective, seq_len=vocab.MIN_BLOCK_LEN - 1), num_devices=8)


def test_packing_is_refused_up_front_for_an_objective_without_packed_batches():
  """Objectives flagged `packed_batches` pass validation packed; any other is refused in one line."""
  packs = {name for name in objectives.names() if objectives.get(name).packed_batches}
  assert {"mlm", "maelm", "exlm"} <= packs
  for name in objectives.names():
    config = _config(name)
    config.data.packing = True
    if name in packs:
      loop.validate_config(config, num_devices=8)
      continue
    with pytest.raises(ValueError) as err:
      loop.validate_config(config, num_devices=8)
    assert "--config.data.packing=false" in str(err.value) and "\n" not in str(err.value)


def test_vocabulary_is_the_only_check_after_the_tokenizer():
  config = _config()
  assert config.model.vocab_size == -1
  loop.validate_config(config, num_devices=8)
  for bad in (-1, vocab.NUM_SPECIAL):
    with pytest.raises(ValueError, match=f"model.vocab_size={bad} has no tokens beyond"):
      loop.validate_vocabulary(loop.with_vocab_size(config, bad))


def test_prepare_validates_before_reading_data(tmp_path):
  config = _config(batch_size=0)
  config.data = config_lib.data_config("smiles", str(tmp_path / "missing.smi"), tfds_dir=str(tmp_path / "tfds"))
  with pytest.raises(ValueError, match="batch_size=0"):
    loop.prepare(config, str(tmp_path / "run"))
  config.batch_size = 8
  with pytest.raises(FileNotFoundError, match="missing.smi"):  # the same config, valid: now the data is read
    loop.prepare(config, str(tmp_path / "run"))


# ----------------------------------------------------------------------------------------------
# main.py: one line per config / CLI error
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("args,message", [
    (["--config", "configs/quickstart.py", "--config.totl_steps=30"],
     "--config.totl_steps: config has no key 'totl_steps'; did you mean 'total_steps'?"),
    (["--config", "configs/quickstart.py", "--config.foo=1"], "--config.foo: config has no key 'foo'; known: "),
    (["--config", "configs/exlm_smiles_small.py:size=tiny", "--config.exlm.num_copy=2"],
     "config.exlm has no key 'num_copy'; did you mean 'num_copies'?"),
    (["--config", "configs/missing.py:size=tiny"], "config file 'configs/missing.py' not found"),
    (["--config", "configs/quickstart.py:objektive=mlm"], "unknown config argument 'objektive'"),
    # an option the config does not write is accepted; the batch check fires before any data is read
    (["--config", "configs/quickstart.py", "--config.exlm.transitions=ctc", "--config.batch_size=0"],
     "batch_size=0 must be positive"),
    (["--config", "configs/quickstart.py", "--bogus=1"], "Unknown command line flag 'bogus'"),
])
def test_main_reports_config_and_flag_errors_in_one_line(tmp_path, args, message):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  result = subprocess.run([sys.executable, str(REPO / "main.py"), "--workdir", str(tmp_path / "run"), *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode != 0
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr[-3000:]
  assert not (tmp_path / "run" / "config.json").exists()


@pytest.mark.parametrize("path", [p for p in CONFIG_FILES if not p.name.startswith("finetune_")], ids=lambda p: p.stem)
def test_every_pretraining_config_reads_its_own_data_files(path):
  """The data files a config names are read with its own column / documents settings: the first record of each
  is the file's first row (a headerless table is not mistaken for one with a header) and is not empty."""
  from exlm_jax.data import paths, readers  # pylint: disable=g-import-not-at-top
  if paths.data_dir() is None:
    pytest.skip("EXLM_DATA_DIR is not set")
  data = config_lib.load(str(path)).data
  for file in filter(None, (data.path, data.eval_path)):
    if not file.startswith("$DATA/"):
      continue
    local = paths.resolve(file)
    first = next(readers.read_records(local, kind=data.name, column=data.column, documents=data.documents))
    assert first, f"{path.name}: the first record of {file} is empty"
    with open(local, "rb") as handle:
      head = handle.read(4096)
    if not local.endswith(".gz"):
      assert first.split()[0].encode() in head.split(b"\n")[0], f"{path.name}: {file}'s first row was skipped"


@pytest.mark.parametrize("value", [True, False, 3, 2.5e-4, "rope2d", (0, 1, 2), (7,), ("a", "b")])
def test_format_value_is_read_back_as_the_same_value(value):
  """What the sweep and the comparison harness write as --config.key= text, `typed_like` reads back unchanged."""
  assert config_lib.typed_like(value, config_lib.format_value(value), "key") == value
