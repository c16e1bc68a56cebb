"""The repository explains itself: no pointers to design notes kept outside it.

What a reader of the code needs is in docstrings or in docs/design.md, whose sections are numbered
"§N" / "§N.M". Scanned: every file git tracks (or would track) under exlm_jax/, configs/, launch/,
bench/, tests/, docs/, plus README.md and main.py (this file excepted). A file fails when it
  * names a document outside the repository: the design-notes file in capitals, the exlm-/maelm- reference
    notes, "reference §...", the anchors notes / "anchors §...", the shared specs folder;
  * carries a section sign that is not part of a pointer "docs/design.md §N" (continued as
    "docs/design.md §2, §3" or "docs/design.md §2-§3"); docs/design.md itself may write "§N";
  * points at a section docs/design.md does not have.
docs/design.md must number its sections uniquely and put `<a id="sN-M"></a>` right before each.
"""

from __future__ import annotations

import pathlib
import re
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCOPE = ("exlm_jax", "configs", "launch", "bench", "tests", "docs", "README.md", "main.py")
DESIGN = "docs/design.md"
THIS = "tests/test_self_contained.py"

_SECTION = r"§\d+(?:\.\d+)*"
# A pointer into our own design document, possibly naming several sections.
_POINTER = re.compile(rf"docs/design\.md[ \t]+{_SECTION}(?:[ \t]*(?:,|and|or|-|–)[ \t]*{_SECTION})*")
_OUTSIDE = re.compile(  # the capitalised notes file is case-sensitive: docs/design.md is ours
    r"DESIGN\.md|(?i:\b(?:exlm|maelm)-reference\b|-reference\.md|reference(?: notes)?\s*§|anchors\.md|anchors\s*§"
    r"|shared[/]specs)")
_HEADING = re.compile(r"^#{2,6}[ \t]+§(\d+(?:\.\d+)*)[ \t]", re.MULTILINE)


def design_sections(text: str) -> list[str]:
  """Section numbers ('4', '4.2', ...) of docs/design.md's headings, in order."""
  return _HEADING.findall(text)


def anchor_problems(text: str) -> list[str]:
  """Headings of docs/design.md that are numbered twice or lack their `<a id="sN-M"></a>` line."""
  lines = text.splitlines()
  problems, seen = [], set()
  for i, line in enumerate(lines):
    match = _HEADING.match(line)
    if not match:
      continue
    number = match.group(1)
    if number in seen:
      problems.append(f"{DESIGN}:{i + 1}: section §{number} is numbered twice")
    seen.add(number)
    anchor = f'<a id="s{number.replace(".", "-")}"></a>'
    if i == 0 or lines[i - 1].strip() != anchor:
      problems.append(f"{DESIGN}:{i + 1}: put {anchor} on the line before the heading of §{number}")
  return problems


def _line_of(text: str, offset: int) -> int:
  return text.count("\n", 0, offset) + 1


def pointer_problems(text: str, sections: set[str], own: bool = False) -> list[tuple[int, str]]:
  """(line, what is wrong) for one file's text; `own` = the text is docs/design.md itself."""
  out = []
  for match in _OUTSIDE.finditer(text):
    out.append((_line_of(text, match.start()), f"{match.group(0)!r} names a document outside the repository; "
                "explain it here or point at docs/design.md §N"))
  cited = []  # (offset, section) of every section this text points at
  if own:
    cited = [(m.start(), m.group(0)[1:]) for m in re.finditer(_SECTION, text)]
  else:
    kept = []
    for match in _POINTER.finditer(text):
      cited += [(match.start(), s[1:]) for s in re.findall(_SECTION, match.group(0))]
      kept.append((match.start(), match.end()))
    rest = list(text)
    for start, end in kept:
      rest[start:end] = " " * (end - start)  # same length, so offsets (and line numbers) stay put
    rest = "".join(rest)
    for match in re.finditer(rf"\(?{_SECTION}\)?|§", rest):
      out.append((_line_of(text, match.start()), f"{match.group(0)!r} is not a pointer 'docs/design.md §N'"))
  for offset, section in cited:
    if section not in sections:
      out.append((_line_of(text, offset), f"§{section} is not a section of {DESIGN}"))
  return sorted(set(out))


def scanned_files() -> list[str]:
  """Repository-relative paths in SCOPE that git tracks or would track (untracked, not ignored)."""
  result = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", "--", *SCOPE],
                          cwd=ROOT, capture_output=True, check=False)
  if result.returncode != 0:
    pytest.fail(f"git ls-files failed in {ROOT} ({result.stderr.decode().strip()}); run the tests in a git checkout")
  paths = sorted({p for p in result.stdout.decode().split("\0") if p})
  return [p for p in paths if p != THIS and (ROOT / p).is_file()]


def _text(path: str) -> str | None:
  raw = (ROOT / path).read_bytes()
  return None if b"\0" in raw else raw.decode("utf-8", errors="replace")  # binary files hold no prose


# ----------------------------------------------------------------------------------------------
# The checker on known text (so the repository test below cannot pass by finding nothing)
# ----------------------------------------------------------------------------------------------

SECTIONS = {"2", "2.1", "4", "4.2", "12"}


@pytest.mark.parametrize("text", [
    "Mask selection (DESIGN" ".md §2), inside the jitted step.",  # split: the source must not name it
    "normalisation is global (maelm-reference §10.9);",
    "MAE-LM: removed (maelm-reference" ".md §2-§4).",
    "the posteriors of reference §4.4 directly",
    "# Reference §2.3: k = 3",
    "Axes are Auto (anchors §3).",
    "FLOPs (anchors.md §5-§6).",
    "see /work/shared" "/specs for details",
    "copies of their last token (§9.4).",
    "entropy (ExLM §8.2): mean entropy",
    "Reference optimiser (§5.2), scaled down.",
    "papers' formulas (reference notes §2.4, §2.3, §3)",
    "see docs/design.md §99",
    "see docs/design.md §4.7",
])
def test_checker_flags_outside_pointers(text):
  assert pointer_problems(text, SECTIONS), text


@pytest.mark.parametrize("text", [
    "see docs/design.md §4.2",
    "the static bounds (docs/design.md §2, §4) hold",
    "docs/design.md §2-§4 and docs/design.md §12",
    "import numpy_reference as ref; config.copy_and_resolve_references(); reference_config('base')",
    "float64 numpy reference of the loss; the cross-reference table",
])
def test_checker_accepts_own_pointers_and_plain_words(text):
  assert pointer_problems(text, SECTIONS) == []


def test_checker_wants_a_pointer_on_one_line():
  assert [line for line, _ in pointer_problems("see docs/design.md\n§4 for the rule", SECTIONS)] == [2]


def test_checker_in_design_md_accepts_own_sections_only():
  assert pointer_problems("As §4.2 says, and §12.", SECTIONS, own=True) == []
  assert [msg for _, msg in pointer_problems("see §5", SECTIONS, own=True)] == [f"§5 is not a section of {DESIGN}"]
  assert pointer_problems("the notes' DESIGN" ".md", SECTIONS, own=True)


def test_anchor_check():
  good = '<a id="s1"></a>\n## §1 One\n\n<a id="s1-1"></a>\n### §1.1 Sub\n'
  assert design_sections(good) == ["1", "1.1"] and anchor_problems(good) == []
  assert len(anchor_problems("## §1 One\n")) == 1
  assert len(anchor_problems('<a id="s1"></a>\n## §1 One\n<a id="s1"></a>\n## §1 Again\n')) == 1


# ----------------------------------------------------------------------------------------------
# The repository
# ----------------------------------------------------------------------------------------------


def test_design_md_sections_are_numbered_and_anchored():
  text = (ROOT / DESIGN).read_text(encoding="utf-8")
  assert len(design_sections(text)) >= 10, f"{DESIGN} should have numbered sections '## §N Title'"
  assert anchor_problems(text) == []


def test_repository_points_only_inside_itself():
  design = (ROOT / DESIGN).read_text(encoding="utf-8")
  sections = set(design_sections(design))
  files = scanned_files()
  assert DESIGN in files and "README.md" in files and len(files) > 50, files
  problems = []  # one entry per offending line
  for path in files:
    text = _text(path)
    if text is None:
      continue
    by_line: dict[int, list[str]] = {}
    for line, msg in pointer_problems(text, sections, own=path == DESIGN):
      by_line.setdefault(line, []).append(msg)
    problems += [f"{path}:{line}: " + "; ".join(msgs) for line, msgs in sorted(by_line.items())]
  assert not problems, f"{len(problems)} line(s) point outside the repository:\n" + "\n".join(problems)
