"""setup.cfg declares exactly the third-party packages the code imports (an AST scan, nothing is imported).

Rules, checked on the repository and, to pin the checker itself, on small constructed trees:
- every third-party import under exlm_jax/, configs/, main.py, launch/ and bench/ is declared in
  install_requires or an extra; tests/ may also use the `test` extra;
- every declared distribution is imported somewhere (install_requires and the non-test extras by the
  code, `test` by the tests), except the few in USED_WITHOUT_IMPORT; an extra that repeats a core
  distribution with options (jax[tpu]) is a variant and needs no import of its own;
- a distribution that only an extra declares is optional: it is imported inside a function (or under
  `try: ... except ImportError`), or at module level only in an optional module, one that the entry
  points and package `__init__`s never reach through module-level imports.
"""

import ast
import configparser
import pathlib
import re
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
CODE = ("exlm_jax", "configs", "main.py", "launch", "bench")
TEST_EXTRA = "test"

# Import name -> distribution name, where they differ by more than '-' vs '_' and case.
DISTRIBUTION = {"sklearn": "scikit-learn", "absl": "absl-py", "yaml": "PyYAML", "orbax": "orbax-checkpoint",
                "PIL": "pillow", "google.protobuf": "protobuf"}
# Declared, needed at run time, never imported by name.
USED_WITHOUT_IMPORT = {
    "pyarrow": "pandas.read_parquet's engine (GLUE parquet files in finetune/tasks.py)",
    "pytest-xdist": "the pytest plugin behind `pytest -n` (README, .ci/run)",
}
_IMPORT_CALLS = ("import_module", "importorskip")  # importlib.import_module("x"), pytest.importorskip("x")


def _norm(name: str) -> str:
  return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(line: str) -> str:
  return _norm(re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", line.strip()).group(0))


def read_setup_cfg(path: pathlib.Path) -> tuple[set[str], dict[str, set[str]]]:
  """(install_requires names, {extra: names}), names normalised ('scikit-learn')."""
  cfg = configparser.ConfigParser()
  cfg.read(path)
  lines = lambda text: [x for x in text.splitlines() if x.strip() and not x.strip().startswith("#")]  # noqa: E731
  core = {_requirement_name(x) for x in lines(cfg.get("options", "install_requires", fallback=""))}
  extras = {}
  if cfg.has_section("options.extras_require"):
    extras = {k: {_requirement_name(x) for x in lines(v)} for k, v in cfg.items("options.extras_require")}
  return core, extras


def _catches_import_error(node: ast.Try) -> bool:
  names = {n.id for h in node.handlers if h.type is not None
           for n in ast.walk(h.type) if isinstance(n, ast.Name)}
  return bool(names & {"ImportError", "ModuleNotFoundError"})


def scan_imports(path: pathlib.Path, module: str) -> list[tuple[str, bool]]:
  """(absolute module name, at module level?) for each import in a file; relative imports resolved."""
  found = []

  def visit(node, eager):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
      eager = False
    elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
      eager = False
    if isinstance(node, ast.Import):
      found.extend((a.name, eager) for a in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:  # relative: level 1 is the file's own package
        package = (module if path.name == "__init__.py" else module.rpartition(".")[0]).split(".")
        base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
      found.append((base, eager))
      found.extend((f"{base}.{a.name}", eager) for a in node.names if a.name != "*")
    elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in _IMPORT_CALLS
          and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
      found.append((node.args[0].value, False))
    if isinstance(node, ast.Try) and _catches_import_error(node):
      for child in node.body:
        visit(child, False)
      for child in [*node.handlers, *node.orelse, *node.finalbody]:
        visit(child, eager)
      return
    for child in ast.iter_child_nodes(node):
      visit(child, eager)

  visit(ast.parse(path.read_text(encoding="utf-8")), True)
  return found


def _module_name(root: pathlib.Path, path: pathlib.Path) -> str:
  parts = list(path.relative_to(root).with_suffix("").parts)
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _files(root: pathlib.Path, names) -> list[pathlib.Path]:
  out = []
  for name in names:
    p = root / name
    out += [p] if p.is_file() else sorted(p.rglob("*.py"))
  return out


def dependency_problems(root: pathlib.Path) -> list[str]:
  """One line per undeclared import, unused declaration or optional package needed at import time."""
  core, extras = read_setup_cfg(root / "setup.cfg")
  optional = {d for name, dists in extras.items() if name != TEST_EXTRA for d in dists} - core
  code, tests = _files(root, CODE), _files(root, ["tests"])
  # Top-level names of our own: the packages, and scripts / test helpers imported from their folder.
  local = {"exlm_jax", "configs", "bench", "launch", "tests"} | {
      p.stem for folder in ("", "configs", "bench", "launch", "tests") for p in (root / folder).glob("*.py")}
  std = set(sys.stdlib_module_names)
  modules = {_module_name(root, p): p for p in code}

  def distribution(name: str) -> str | None:
    top = name.split(".")[0]
    if top in local or top in std or top == "__future__":
      return None
    return _norm(DISTRIBUTION.get(".".join(name.split(".")[:2]), DISTRIBUTION.get(top, top)))

  problems, reported, used, eager_optional, eager_local = [], set(), set(), {}, {}
  for path in [*code, *tests]:
    is_test = path in tests
    allowed = core | optional | (extras.get(TEST_EXTRA, set()) if is_test else set())
    module = _module_name(root, path)
    for name, eager in scan_imports(path, module):
      dist = distribution(name)
      rel = path.relative_to(root)
      if dist is None:
        if eager and not is_test:  # `import a.b.c` loads a, a.b and a.b.c
          prefixes = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 2)}
          eager_local.setdefault(module, set()).update(prefixes & modules.keys())
        continue
      if dist not in allowed and (rel, dist) not in reported:
        reported.add((rel, dist))
        problems.append(f"{rel} imports {name!r} but setup.cfg does not declare {dist!r}: add it to install_requires "
                        "(or an extra when optional)")
      used.add((dist, is_test))
      if dist in optional and eager and not is_test:
        eager_optional.setdefault(module, set()).add(dist)

  for dist in sorted(core | optional):
    if (dist, False) not in used and dist not in USED_WITHOUT_IMPORT:
      problems.append(f"setup.cfg declares {dist!r} but nothing under {', '.join(CODE)} imports it: remove it")
  for dist in sorted(extras.get(TEST_EXTRA, set()) - core - optional):
    if (dist, True) not in used and dist not in USED_WITHOUT_IMPORT:
      problems.append(f"setup.cfg's '{TEST_EXTRA}' extra declares {dist!r} but no test imports it: remove it")

  # Modules loaded whenever the package is used must not need an optional package at import time.
  roots = [m for m, p in modules.items() if p.name == "__init__.py" or not m.startswith("exlm_jax")]
  seen, stack = {}, [(m, (m,)) for m in roots]
  while stack:
    module, chain = stack.pop()
    if module in seen:
      continue
    seen[module] = chain
    stack += [(m, chain + (m,)) for m in eager_local.get(module, ())]
  for module, chain in sorted(seen.items()):
    for dist in sorted(eager_optional.get(module, ())):
      problems.append(f"{' -> '.join(chain)} imports optional {dist!r} at module level; import it inside the "
                      "function that needs it, or only from a module the core does not import at module level")
  return problems


def test_setup_cfg_declares_exactly_what_is_imported():
  problems = dependency_problems(REPO)
  assert not problems, "\n".join(problems)


def _tree(tmp_path, files: dict[str, str], extras: str = "") -> pathlib.Path:
  setup = ("[options]\ninstall_requires =\n    numpy>=1.26\n    scikit-learn>=1.4\n"
           "[options.extras_require]\ntest =\n    pytest>=8.0\n"
           "hf =\n    torch>=2.0\n    transformers>=4.0\n" + extras)
  (tmp_path / "setup.cfg").write_text(setup)
  files = {"exlm_jax/__init__.py": "", "exlm_jax/core.py": "import numpy\nfrom sklearn import metrics\n",
           "tests/test_x.py": "import pytest\nimport numpy_reference\n", "tests/numpy_reference.py": "", **files}
  for name, text in files.items():
    (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / name).write_text(text)
  return tmp_path


HF_MODULE = "import torch\n\ndef load():\n  import transformers\n  return transformers\n"


def test_optional_extra_imported_lazily_or_in_an_optional_module_passes(tmp_path):
  root = _tree(tmp_path, {"exlm_jax/hf.py": HF_MODULE,
                          "main.py": "import exlm_jax.core\n\ndef export():\n  from exlm_jax import hf\n",
                          "exlm_jax/guarded.py": "try:\n  import torch\nexcept ImportError:\n  torch = None\n"},
               extras="tpu =\n    numpy[extra]>=1.26\n")  # a variant of a core distribution: no import needed
  assert dependency_problems(root) == []


@pytest.mark.parametrize("files,expected", [
    ({"exlm_jax/core.py": "import numpy\nimport sklearn\nimport scipy.stats\n"},
     "imports 'scipy.stats' but setup.cfg does not declare 'scipy'"),
    ({"exlm_jax/core.py": "import numpy\n"}, "declares 'scikit-learn' but nothing under"),
    ({"tests/test_x.py": "import numpy_reference\n"}, "'test' extra declares 'pytest' but no test imports it"),
    ({"exlm_jax/hf.py": HF_MODULE, "main.py": "from exlm_jax import hf\n"},
     "main -> exlm_jax.hf imports optional 'torch' at module level"),
    ({"exlm_jax/hf.py": HF_MODULE, "exlm_jax/__init__.py": "from . import hf\n"},
     "exlm_jax -> exlm_jax.hf imports optional 'torch' at module level"),
])
def test_checker_reports_each_kind_of_problem(tmp_path, files, expected):
  files.setdefault("exlm_jax/hf.py", HF_MODULE)
  problems = dependency_problems(_tree(tmp_path, files))
  assert len(problems) == 1 and expected in problems[0], problems
