"""Matched baselines by construction: every method config's `objective=mlm` differs from it only in the objective
(and MLM++'s `budget=equal_flops` only in its resolved total_steps), and equal_flops spends the method's FLOPs."""

import pytest

from exlm_jax import config_lib
from exlm_jax.train import flops, loop

# (method config, its method) -- every config whose objective has a baseline to be matched against.
METHOD_CONFIGS = [("exlm_smiles_small.py", "exlm"), ("exlm_text_small.py", "exlm"), ("maelm_smiles_small.py", "maelm"),
                  ("maelm_text_small.py", "maelm"), ("exlm_base.py", "exlm"), ("maelm_base.py", "maelm"),
                  ("maelm_large.py", "maelm"), ("quickstart.py", "exlm"), ("quickstart.py:method=maelm", "maelm")]
BASELINE = "mlm"


def _flat(tree, prefix=""):
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict) and value:
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def _spec(config_file: str, extra: str) -> str:
  return f"configs/{config_file}{',' if ':' in config_file else ':'}{extra}"


def _differences(a, b) -> set[str]:
  fa, fb = _flat(a.to_dict()), _flat(b.to_dict())
  return {k for k in fa.keys() | fb.keys() if fa.get(k, "<absent>") != fb.get(k, "<absent>")}


@pytest.mark.parametrize("config_file,method", METHOD_CONFIGS)
def test_matched_baseline_differs_only_in_the_objective(config_file, method):
  spec = f"configs/{config_file}"
  original = config_lib.load(spec)
  assert original.objective == method
  for budget in config_lib.BUDGETS:
    baseline = config_lib.load(_spec(config_file, f"objective={BASELINE},budget={budget}"))
    assert baseline.objective == BASELINE and baseline.budget == budget
    allowed = {"objective", "budget"}
    differing = {k for k in _differences(original, baseline)
                 if k not in ("matched_to", method) and not k.startswith(("matched_to.", f"{method}."))}
    assert differing <= allowed, differing
    assert baseline.matched_to.objective == method and baseline.matched_to.total_steps == original.total_steps
    assert baseline.matched_to.options.to_dict() == (original[method].to_dict() if method in original else {})
    assert method not in baseline


@pytest.mark.parametrize("baseline_file,method_file", [("mlm_smiles_small.py", "exlm_smiles_small.py"),
                                                       ("mlm_text_small.py", "exlm_text_small.py")])
def test_mlm_baselines_are_their_method_configs_with_objective_mlm(baseline_file, method_file):
  for args, method_args in (("", ""), (":size=tiny", "size=tiny,"), (":budget=equal_flops", "budget=equal_flops,")):
    assert (config_lib.load(f"configs/{baseline_file}{args}").to_dict()
            == config_lib.load(f"configs/{method_file}:{method_args}objective=mlm").to_dict())


@pytest.mark.parametrize("config_file,method", METHOD_CONFIGS[:4])
def test_equal_flops_resolution_is_the_flops_ratio(config_file, method):
  """total_steps of MLM++ = round(F_method * steps / F_mlm), F from the method's own (independently loaded)
  config and the baseline's, at the same vocabulary (packed configs: the same resolved examples-per-block)."""
  def as_prepared(config):  # what loop.prepare fills in from the data
    config = loop.with_vocab_size(config, 600)
    if config.data.packing:
      config.data.max_examples_per_block = 5
    return config

  method_config = as_prepared(config_lib.load(f"configs/{config_file}"))
  mlmpp = as_prepared(config_lib.load(_spec(config_file, f"objective={BASELINE},budget=equal_flops")))
  f_method = flops.train_flops_per_step(method_config)
  f_mlm = flops.train_flops_per_step(as_prepared(config_lib.load(_spec(config_file, f"objective={BASELINE}"))))
  resolved = flops.resolve_budget(mlmpp)
  assert resolved.total_steps == round(f_method * method_config.total_steps / f_mlm)
  assert resolved.total_steps > method_config.total_steps  # both methods cost more per step than MLM
  assert abs(resolved.total_steps * f_mlm - method_config.total_steps * f_method) <= f_mlm  # within one step
  assert flops.resolve_budget(method_config).total_steps == method_config.total_steps  # budget=steps: unchanged


def test_budget_errors_are_one_line():
  with pytest.raises(ValueError, match="budget='flops'"):
    config_lib.load("configs/exlm_smiles_small.py:objective=mlm,budget=flops")
  with pytest.raises(ValueError, match="matches a baseline to another method"):
    config_lib.load("configs/exlm_smiles_small.py:budget=equal_flops")
  orphan = config_lib.pretrain_config(BASELINE, "tiny", budget="equal_flops")
  orphan.model.vocab_size = 40
  with pytest.raises(ValueError, match="needs the method it matches"):
    flops.resolve_budget(orphan)


@pytest.mark.data
def test_the_run_resolves_equal_flops_once_the_vocabulary_is_known(shared_data, tmp_path):
  """prepare (the run's validation pass) replaces total_steps after the tokenizer gave the vocabulary."""
  del shared_data
  config = config_lib.load("configs/exlm_smiles_small.py:size=tiny,objective=mlm,budget=equal_flops")
  config.data.tfds_dir = str(tmp_path / "tfds")
  _, resolved, setup, _ = loop.prepare(config, str(tmp_path / "run"))
  method = flops.method_config(resolved)
  expected = round(flops.train_flops_per_step(method) * config.total_steps / flops.train_flops_per_step(resolved))
  assert resolved.total_steps == expected > config.total_steps
  assert setup.config.total_steps == expected  # the schedule is built for the resolved horizon
