"""The package's layout rules, read off the source with `ast` (no code is run but the registry):

  * everything objective-specific lives with its objective: outside exlm_jax/objectives/ and configs/ no
    registered objective name is a comparison operand, dict key, subscript, `case` pattern or `.get()` key,
    and no `<x>.<objective name>` attribute is read (e.g. `config.exlm`); tests are exempt (they name the
    objectives they test);
  * exlm_jax/objectives/__init__.py is the only list of objective modules (no other module imports two);
  * nothing inside the package imports `exlm_jax.api` (the user-facing entry point sits on top; the package's
    lazy `exlm_jax.load` excepted), and `api` imports no fine-tuning / analysis / training module at import time.
"""

import ast
import pathlib
import subprocess
import sys

from exlm_jax import objectives

ROOT = pathlib.Path(__file__).resolve().parents[1]
NAMES = frozenset(objectives.names())

# (file, name) pairs the rules allow, each with its reason.
ALLOWED = {
    # The analysis tool called `repeated_mlm` (the pilot's ratio grid) is a tool name, not an objective branch.
    ("exlm_jax/analysis/__main__.py", "repeated_mlm"),
    ("exlm_jax/analysis/repeated_mlm.py", "repeated_mlm"),
}


def _sources(*patterns):
  for pattern in patterns:
    for path in sorted(ROOT.glob(pattern)):
      rel = path.relative_to(ROOT).as_posix()
      yield rel, ast.parse(path.read_text(), rel)


def _names_in(node) -> list[str]:
  """Objective names among the string constants of `node` (a constant, or a tuple / list / set of them)."""
  items = node.elts if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else [node]
  return [i.value for i in items if isinstance(i, ast.Constant) and i.value in NAMES]


def objective_branches(tree) -> list[tuple[int, str, str]]:
  """(line, name, how) for every use of an objective name as a branch / lookup key in `tree`."""
  found = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Compare):
      uses = [(n, "comparison") for operand in (node.left, *node.comparators) for n in _names_in(operand)]
    elif isinstance(node, ast.Dict):
      uses = [(n, "dict key") for key in node.keys if key is not None for n in _names_in(key)]
    elif isinstance(node, ast.Subscript):
      uses = [(n, "subscript") for n in _names_in(node.slice)]
    elif isinstance(node, ast.MatchValue):
      uses = [(n, "case pattern") for n in _names_in(node.value)]
    elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get":
      uses = [(n, ".get() key") for n in _names_in(node.args[0])] if node.args else []
    elif isinstance(node, ast.Attribute) and node.attr in NAMES:
      uses = [(node.attr, "attribute")]
    else:
      uses = []
    found += [(node.lineno, name, how) for name, how in uses]
  return found


def test_objective_names_are_not_branched_on_outside_objectives():
  problems = [f"{rel}:{line}: {name!r} as {how}"
              for rel, tree in _sources("exlm_jax/**/*.py", "bench/*.py", "launch/*.py", "main.py")
              if not rel.startswith("exlm_jax/objectives/")
              for line, name, how in objective_branches(tree) if (rel, name) not in ALLOWED]
  assert not problems, "objective-specific code outside exlm_jax/objectives/:\n" + "\n".join(problems)


def test_the_rule_catches_every_form():
  code = """
if config.objective == "exlm": pass
x = {"maelm": 1}["mlm"]
y = config.get("repeated_mlm", {}) if objective in ("mlm", "other") else config.exlm
match objective:
  case "maelm": pass
"""
  found = sorted((name, how) for _, name, how in objective_branches(ast.parse(code)))
  assert found == sorted([("exlm", "comparison"), ("maelm", "dict key"), ("mlm", "subscript"),
                          ("repeated_mlm", ".get() key"), ("mlm", "comparison"), ("exlm", "attribute"),
                          ("maelm", "case pattern")])
  assert not objective_branches(ast.parse('label = "exlm k=4"; names = ("mlm", "exlm"); f(objective="mlm")'))


def _imported_modules(tree, top_level_only: bool = False) -> list[str]:
  """Dotted names of the modules `tree` imports (`from a import b` gives 'a.b' and 'a')."""
  nodes = tree.body if top_level_only else ast.walk(tree)
  out = []
  for node in nodes:
    if isinstance(node, ast.Import):
      out += [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module:
      out += [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
  return out


def test_the_registry_is_the_only_list_of_objective_modules():
  modules = {f"exlm_jax.objectives.{name}" for name in NAMES}
  problems = [f"{rel} imports {sorted(set(_imported_modules(tree)) & modules)}"
              for rel, tree in _sources("exlm_jax/**/*.py", "bench/*.py", "launch/*.py", "main.py")
              if rel != "exlm_jax/objectives/__init__.py" and len(set(_imported_modules(tree)) & modules) > 1]
  assert not problems, "only exlm_jax/objectives/__init__.py lists the objective modules:\n" + "\n".join(problems)


def test_no_package_module_imports_api():
  problems = [rel for rel, tree in _sources("exlm_jax/**/*.py")
              if rel not in ("exlm_jax/api.py", "exlm_jax/__init__.py")
              and "exlm_jax.api" in _imported_modules(tree)]
  assert not problems, f"these modules import exlm_jax.api (use exlm_jax.run_store): {problems}"


def test_api_imports_no_finetune_analysis_or_train_module_at_import_time():
  (_, tree), = _sources("exlm_jax/api.py")
  upper = ("exlm_jax.finetune", "exlm_jax.analysis", "exlm_jax.train")
  assert not [m for m in _imported_modules(tree, top_level_only=True) if m.startswith(upper)]
  code = ("import sys, exlm_jax.api; loaded = [m for m in sys.modules if m.startswith(%r)]; "
          "assert not loaded, loaded" % (upper,))
  subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
