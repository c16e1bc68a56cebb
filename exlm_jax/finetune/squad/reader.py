"""SQuAD v1.1 / v2.0 questions from the official JSON files or the TFDS `squad` builders.

Official JSON: `{"version", "data": [{"title", "paragraphs": [{"context", "qas": [{"id", "question",
"answers": [{"text", "answer_start"}], "is_impossible"}]}]}]}`; v1.1 has no `is_impossible` (every
question is answerable). A source is a local path, a `$DATA/...` path (exlm_jax.data.paths) or
`tfds:squad/v1.1:<split>` / `tfds:squad/v2.0:<split>` (split train | validation; TensorFlow needed).

Experiments split by article (`articles=`), never by question. An article present in several sources
(e.g. the shared data's Normans in both files) is kept once when the copies are identical and counted in
`duplicate_articles`; differing copies are an error.
"""

from __future__ import annotations

import collections
import dataclasses
import json
from typing import Iterable, Sequence

from exlm_jax.data import paths

VERSIONS = ("v1.1", "v2.0")


@dataclasses.dataclass(frozen=True)
class Answer:
  """A gold answer: its text and the character offset where it starts in the context."""

  text: str
  start: int

  @property
  def end(self) -> int:
    return self.start + len(self.text)


@dataclasses.dataclass(frozen=True)
class SquadExample:
  """One question about one context. answers is empty exactly when is_impossible (v2.0 only)."""

  qid: str
  title: str
  question: str
  context: str
  answers: tuple[Answer, ...]
  is_impossible: bool = False


@dataclasses.dataclass(frozen=True)
class SquadData:
  """Questions in file order, the version, where they came from and what was merged.

  misaligned_answers: answers whose text differs from context[start:start + len(text)] (kept; the
    features count them as unrecoverable).
  duplicate_articles: titles read again from a later source as an identical copy (kept once).
  """

  examples: tuple[SquadExample, ...]
  version: str
  sources: tuple[str, ...]
  misaligned_answers: int = 0
  duplicate_articles: tuple[str, ...] = ()

  def __len__(self) -> int:
    return len(self.examples)

  @property
  def titles(self) -> list[str]:
    return list(dict.fromkeys(e.title for e in self.examples))

  def counts(self) -> dict[str, dict[str, int]]:
    """Per article (and 'total'): questions, answerable, unanswerable, paragraphs (distinct contexts)."""
    out = {}
    for title in [*self.titles, "total"]:
      rows = [e for e in self.examples if title in ("total", e.title)]
      out[title] = dict(questions=len(rows), answerable=sum(not e.is_impossible for e in rows),
                        unanswerable=sum(e.is_impossible for e in rows),
                        paragraphs=len({(e.title, e.context) for e in rows}))
    return out

  def select(self, articles: Sequence[str]) -> "SquadData":
    """Only the questions of `articles` (titles), in file order. Unknown titles are an error."""
    unknown = sorted(set(articles) - set(self.titles))
    if unknown:
      raise ValueError(f"SQuAD articles {unknown} are not in {', '.join(self.sources)}; "
                       f"available: {', '.join(self.titles)}")
    keep = set(articles)
    return dataclasses.replace(self, examples=tuple(e for e in self.examples if e.title in keep))


def read_squad(sources: str | Sequence[str], articles: Sequence[str] | None = None) -> SquadData:
  """Reads SQuAD questions from one or more sources (see the module docstring), optionally only `articles`."""
  sources = (sources,) if isinstance(sources, str) else tuple(sources)
  if not sources:
    raise ValueError("read_squad needs at least one source (a SQuAD JSON path or tfds:squad/<version>:<split>)")
  by_title: dict[str, list[SquadExample]] = {}
  versions, duplicates, misaligned = set(), [], 0
  for source in sources:
    version, examples = _read_tfds(source) if source.startswith("tfds:") else _read_json(source)
    versions.add(version)
    for title, group in _group_by_title(examples).items():
      if title in by_title:
        if by_title[title] != group:
          raise ValueError(f"SQuAD article {title!r} differs between sources {sources}; read it from one only")
        duplicates.append(title)
        continue
      by_title[title] = group
      misaligned += sum(a.text != e.context[a.start:a.end] for e in group for a in e.answers)
  if len(versions) > 1:
    raise ValueError(f"SQuAD sources mix versions {sorted(versions)}; read v1.1 and v2.0 separately")
  examples = tuple(e for group in by_title.values() for e in group)
  _check_unique_ids(examples)
  data = SquadData(examples, versions.pop(), sources, misaligned, tuple(duplicates))
  return data.select(articles) if articles is not None else data


def _group_by_title(examples: Iterable[SquadExample]) -> dict[str, list[SquadExample]]:
  groups: dict[str, list[SquadExample]] = collections.defaultdict(list)
  for e in examples:
    groups[e.title].append(e)
  return dict(groups)


def _check_unique_ids(examples: Sequence[SquadExample]) -> None:
  seen: dict[str, str] = {}
  for e in examples:
    if e.qid in seen:
      raise ValueError(f"SQuAD question id {e.qid!r} appears twice (articles {seen[e.qid]!r} and {e.title!r}); "
                       "select each article once")
    seen[e.qid] = e.title


def _version(raw: str, source: str) -> str:
  version = "v" + str(raw).lstrip("v")
  if version not in VERSIONS:
    raise ValueError(f"{source} has SQuAD version {raw!r}; expected one of {VERSIONS}")
  return version


def _read_json(source: str) -> tuple[str, list[SquadExample]]:
  path = paths.resolve(source)
  try:
    with open(path, encoding="utf-8") as f:
      raw = json.load(f)
  except FileNotFoundError:
    raise FileNotFoundError(f"SQuAD file {path} not found (from {source!r}); check the path or $DATA") from None
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON ({e}); pass an official SQuAD JSON file") from None
  if not isinstance(raw, dict) or "data" not in raw:
    raise ValueError(f"{path} has no top-level 'data' list; pass an official SQuAD JSON file")
  version = _version(raw.get("version", "1.1"), path)
  examples = []
  for article in raw["data"]:
    for paragraph in article["paragraphs"]:
      for qa in paragraph["qas"]:
        examples.append(_example(qa["id"], article.get("title", ""), qa["question"], paragraph["context"],
                                 [(a["text"], a["answer_start"]) for a in qa.get("answers", [])],
                                 qa.get("is_impossible", False), version, path))
  return version, examples


def _example(qid, title, question, context, answers, is_impossible, version, source) -> SquadExample:
  """Builds and checks one question: a context, answers iff answerable, v1.1 never unanswerable."""
  is_impossible = bool(is_impossible)
  answers = tuple(Answer(str(text), int(start)) for text, start in answers)
  if not context.strip():
    raise ValueError(f"SQuAD question {qid!r} in {source} has an empty context; fix or drop it")
  if is_impossible and version == "v1.1":
    raise ValueError(f"SQuAD question {qid!r} in {source} is marked is_impossible in a v1.1 file; set version 2.0")
  if is_impossible == bool(answers):
    what = "unanswerable but has answers" if answers else "answerable but has no answers"
    raise ValueError(f"SQuAD question {qid!r} in {source} is {what}; fix the file")
  return SquadExample(str(qid), str(title), str(question), str(context), answers, is_impossible)


def _read_tfds(source: str) -> tuple[str, list[SquadExample]]:
  """`tfds:squad/<v1.1|v2.0>:<split>` through TFDS (downloads and prepares on first use)."""
  try:
    _, name, split = source.split(":")
    builder, config = name.split("/")
  except ValueError:
    raise ValueError(f"{source!r}: write TFDS sources as tfds:squad/v2.0:validation (or v1.1, split train)") from None
  if builder != "squad":
    raise ValueError(f"{source!r}: only the TFDS 'squad' builders are supported (tfds:squad/v2.0:<split>)")
  version = _version(config, source)
  try:
    import tensorflow  # noqa: F401  tfds needs it to prepare and read `squad`
    import tensorflow_datasets as tfds
  except ImportError:
    raise ImportError(f"{source} needs TensorFlow (pip install tensorflow); or pass the official SQuAD JSON "
                      "files as local / $DATA paths") from None
  text = lambda v: v.decode("utf-8") if isinstance(v, bytes) else str(v)
  examples = []
  for r in tfds.as_numpy(tfds.load(f"squad/{version}", split=split)):
    answers = [(text(t), int(s)) for t, s in zip(r["answers"]["text"], r["answers"]["answer_start"])]
    examples.append(_example(text(r["id"]), text(r["title"]), text(r["question"]), text(r["context"]), answers,
                             r.get("is_impossible", False), version, source))
  return version, examples
