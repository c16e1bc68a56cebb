"""Every launch command the repository quotes (README files, docs/, docstrings and comments of the code) names a
config that exists, with arguments that parse and `--config.key=value` overrides that apply, through the same
loader main.py uses. A renamed config or option cannot leave a dead command behind in the documentation."""

import importlib.util
import pathlib
import re
import shlex

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("exlm_main", ROOT / "main.py")
entry = importlib.util.module_from_spec(_spec)  # the repository's main.py: its load_config runs a command
_spec.loader.exec_module(entry)
DOCUMENTS = ("README.md", "launch/README.md", "bench/README.md", "docs/*.md", "main.py", "exlm_jax/**/*.py",
             "configs/*.py", "launch/*.py", "launch/*.sh", "launch/*.sbatch", "bench/*.py", "bench/*.sh")
COMMAND = re.compile(r"python3? (?:main\.py|launch/\w+\.py|bench/\w+\.py)\b[^\n]*")


def _joined_lines(text: str) -> list[str]:
  """Lines with shell continuations (a trailing backslash) joined to the next line."""
  return re.sub(r"\\\n\s*#?\s*", " ", text).splitlines()


def documented_commands() -> list[tuple[str, str]]:
  """(where, command) for every quoted command that passes `--config configs/...`."""
  found = []
  for pattern in DOCUMENTS:
    for path in sorted(ROOT.glob(pattern)):
      for number, line in enumerate(_joined_lines(path.read_text(encoding="utf-8")), 1):
        for match in COMMAND.finditer(line):
          command = match.group(0).split("`")[0].split("  #")[0].strip().rstrip(")")
          if "--config configs/" in command or "--config=configs/" in command:
            found.append((f"{path.relative_to(ROOT)}:{number}", command))
  return found


def config_arguments(command: str) -> tuple[str, list[str]]:
  """(config spec, ['--config.key=value', ...]) of one command line."""
  words = shlex.split(command.replace("'$DATA", "'DATA"), comments=True)
  spec = None
  for index, word in enumerate(words):
    if word == "--config":
      spec = words[index + 1]
    elif word.startswith("--config="):
      spec = word.split("=", 1)[1]
  return spec, [w for w in words if w.startswith(entry.OVERRIDE_PREFIX)]


COMMANDS = documented_commands()


def test_the_documentation_quotes_commands_for_most_configs():
  """The scan finds what it should: commands in README, the configs' own docstrings and launch/."""
  places = {where.split(":")[0] for where, _ in COMMANDS}
  assert "README.md" in places and "main.py" in places
  named = {config_arguments(c)[0].split(":")[0] for _, c in COMMANDS}
  assert len(named) >= 10, named


@pytest.mark.parametrize("where,command", COMMANDS, ids=[w for w, _ in COMMANDS])
def test_documented_command_loads(where, command):
  spec, overrides = config_arguments(command)
  assert spec, f"{where}: no config spec in {command!r}"
  config = entry.load_config(spec, overrides)
  assert "objective" in config or "finetune" in config, where
