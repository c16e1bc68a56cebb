"""Extractive QA (SQuAD): the reader on the real articles, tokenizer offsets, windows and labels, the span
head + loss against float64 NumPy, decoding against brute force, the official metric against hand-worked
examples, answer(), and a short jitted optax run showing SquadModel trains on real features."""

import itertools
import json
import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from exlm_jax.data import tokenizers, vocab
from exlm_jax.finetune.squad import decode, evaluate, features as feats, predict, reader
from exlm_jax.finetune.squad.model import MASKED_LOGIT, SquadModel
from exlm_jax.models.encoder import Encoder, ModelConfig
from exlm_jax.objectives.base import encoder_tree_problems

SOURCES = ("$DATA/squad/dev-v2.0.json", "$DATA/squad/train-v2.0.json")


@pytest.fixture(scope="module")
def squad(shared_data):
  return reader.read_squad(SOURCES)


@pytest.fixture(scope="module")
def spm(squad):
  """SentencePiece unigram trained on the three articles themselves (contexts and questions)."""
  texts = list(dict.fromkeys(e.context for e in squad.examples)) + [e.question for e in squad.examples]
  return tokenizers.SentencePieceTokenizer.train(texts, vocab_size=2000, num_threads=1)


def tiny_model_config(vocab_size: int, **kw) -> ModelConfig:
  base = dict(vocab_size=vocab_size, num_layers=2, d_model=32, num_heads=2, mlp_dim=64, max_positions=128,
              dropout_rate=0.0, attention_dropout_rate=0.0)
  return ModelConfig(**dict(base, **kw))


def write_json(path, data):
  path.write_text(json.dumps(data))
  return str(path)


def squad_file(version="v2.0", title="A", qas=None, context="Paris is the capital of France."):
  qas = qas if qas is not None else [{"id": "q1", "question": "What is the capital?", "is_impossible": False,
                                      "answers": [{"text": "Paris", "answer_start": 0}]}]
  return {"version": version, "data": [{"title": title, "paragraphs": [{"context": context, "qas": qas}]}]}


# ----------------------------------------------------------------------------------------------
# Reader
# ----------------------------------------------------------------------------------------------


def test_reader_counts_per_article_match_the_raw_json(shared_data, squad):
  expected = {}
  for name in ("dev-v2.0.json", "train-v2.0.json"):
    for article in json.loads((shared_data / "squad" / name).read_text())["data"]:
      qas = [qa for p in article["paragraphs"] for qa in p["qas"]]
      expected[article["title"]] = dict(
          questions=len(qas), unanswerable=sum(qa["is_impossible"] for qa in qas),
          answerable=sum(not qa["is_impossible"] for qa in qas), paragraphs=len(article["paragraphs"]))
  counts = squad.counts()
  assert squad.version == "v2.0" and set(squad.titles) == set(expected) == {
      "Normans", "Rhine", "Computational_complexity_theory"}
  for title, want in expected.items():
    assert counts[title] == want, title
  assert counts["total"]["questions"] == sum(c["questions"] for c in expected.values())
  assert counts["total"]["unanswerable"] > 0
  assert squad.duplicate_articles == ("Normans",)  # in both files, identical: kept once
  assert squad.misaligned_answers == 0
  for e in squad.examples:
    assert e.is_impossible == (not e.answers)
    assert all(e.context[a.start:a.end] == a.text for a in e.answers)


def test_reader_splits_by_article(squad, shared_data):
  train = reader.read_squad(SOURCES, articles=["Rhine", "Computational_complexity_theory"])
  heldout = reader.read_squad(str(shared_data / "squad" / "dev-v2.0.json"), articles=["Normans"])
  assert len(train) + len(heldout) == len(squad)
  assert not {e.qid for e in train.examples} & {e.qid for e in heldout.examples}
  assert not {e.context for e in train.examples} & {e.context for e in heldout.examples}
  with pytest.raises(ValueError, match="not in .*available: Normans, Rhine"):
    reader.read_squad(SOURCES[0], articles=["Beyonce"])


def test_reader_v11_and_bad_input(tmp_path):
  v11 = squad_file(version="1.1", qas=[{"id": "q1", "question": "Capital?",
                                        "answers": [{"text": "Paris", "answer_start": 0}] * 2}])
  data = reader.read_squad(write_json(tmp_path / "v11.json", v11))
  assert data.version == "v1.1" and not data.examples[0].is_impossible and len(data.examples[0].answers) == 2
  v20 = write_json(tmp_path / "v20.json", squad_file(title="B"))
  with pytest.raises(ValueError, match="mix versions"):
    reader.read_squad([str(tmp_path / "v11.json"), v20])
  other = squad_file(title="B", qas=[{"id": "q1", "question": "Other?", "is_impossible": True, "answers": []}])
  with pytest.raises(ValueError, match="differs between sources"):
    reader.read_squad([v20, write_json(tmp_path / "other.json", other)])
  with pytest.raises(ValueError, match="appears twice"):
    reader.read_squad([v20, write_json(tmp_path / "c.json", squad_file(title="C"))])
  no_answer = squad_file(qas=[{"id": "q", "question": "?", "is_impossible": False, "answers": []}])
  with pytest.raises(ValueError, match="answerable but has no answers"):
    reader.read_squad(write_json(tmp_path / "bad.json", no_answer))
  misaligned = squad_file(qas=[{"id": "q", "question": "?", "is_impossible": False,
                                "answers": [{"text": "Paris", "answer_start": 3}]}])
  assert reader.read_squad(write_json(tmp_path / "mis.json", misaligned)).misaligned_answers == 1
  with pytest.raises(FileNotFoundError, match="not found"):
    reader.read_squad(str(tmp_path / "nope.json"))
  with pytest.raises(ValueError, match="tfds:squad/v2.0:validation"):
    reader.read_squad("tfds:squad")


def test_reader_tfds_needs_tensorflow():
  try:
    import tensorflow  # noqa: F401
    pytest.skip("TensorFlow is installed: the TFDS path would download SQuAD")
  except ImportError:
    pass
  with pytest.raises(ImportError, match="needs TensorFlow"):
    reader.read_squad("tfds:squad/v2.0:validation")


# ----------------------------------------------------------------------------------------------
# Tokenizer offsets
# ----------------------------------------------------------------------------------------------


def check_spans(tok, text):
  """Token spans against the pieces: ids as encode; a piece's surface (▁ -> space, stripped) or its byte group's
  UTF-8 text is exactly text[span]; spans in order; every non-space character in exactly one span group."""
  ids, spans = tok.encode_with_offsets(text)
  assert ids == tok.encode(text) and len(spans) == len(ids)
  covered = np.zeros(len(text), int)
  groups = [list(g) for _, g in itertools.groupby(range(len(ids)), key=lambda i: spans[i])]
  last_end = 0
  for group in groups:
    begin, end = spans[group[0]]
    assert last_end <= begin <= end
    last_end = end
    pieces = [tok.id_to_token(ids[i]) for i in group]
    if pieces[0].startswith("<0x"):
      surface = bytes(int(p[3:5], 16) for p in pieces).decode("utf-8")
    else:
      assert len(group) == 1
      surface = pieces[0].replace("▁", " ")
    assert surface.strip() == text[begin:end]  # whitespace-only pieces: an empty span
    covered[begin:end] += 1
  assert all(covered[i] == 1 for i, ch in enumerate(text) if not ch.isspace())


def test_sentencepiece_offsets_on_real_contexts(spm, squad):
  for context in list(dict.fromkeys(e.context for e in squad.examples))[::10]:
    check_spans(spm, context)
  check_spans(spm, "Zürich  ☃ née\n(1850s) — “Rhine”  ")


def test_byte_offsets_convert_like_sentencepiece_char_offsets(spm):
  """The fallback for sentencepiece < 0.2.2 (byte offsets of the proto) gives the char offsets of 'offset_mapping'."""
  text = "Zürich ☃ née (1850s) “Rhine”"
  char_spans = tokenizers._spm_ids_and_char_spans(spm._sp, text)[1]
  proto = spm._sp.encode(text, return_type="proto")
  assert tokenizers.byte_to_char_spans(text, [(p.begin, p.end) for p in proto.pieces]) == char_spans


def test_smiles_regex_offsets():
  tok = tokenizers.SmilesRegexTokenizer.build(["CC(=O)Oc1ccccc1C(=O)O", "Brc1ccc[nH]1"])
  smiles = "Brc1ccc(Cl)[nH]1"
  ids, spans = tok.encode_with_offsets(smiles)
  assert ids == tok.encode(smiles)
  assert [smiles[b:e] for b, e in spans] == tokenizers.split_smiles(smiles)
  with pytest.raises(tokenizers.UncoveredSmilesError):
    tok.encode_with_offsets("C C")


# ----------------------------------------------------------------------------------------------
# Windows, labels, p_mask
# ----------------------------------------------------------------------------------------------

SMALL = feats.FeatureConfig(seq_len=96, doc_stride=32, max_query_length=16)


def test_every_gold_answer_maps_to_tokens_that_decode_to_it(spm, squad):
  """All gold answers of the real articles: the covering token span's text (cut from the context with the
  offsets, and spm.decode of its ids) equals the answer after normalisation. The only exceptions are gold
  answers that themselves start or end inside a word, whose covering span then holds the answer."""
  checked, cut_words = 0, []
  for e in squad.examples:
    ids, spans = spm.encode_with_offsets(e.context)
    spans = np.asarray(spans)
    for a in e.answers:
      first, last = feats.answer_token_span(spans, a, e.context)
      by_offsets = feats.span_text(e.context, spans, first, last)
      by_decode = spm.decode(ids[first:last + 1])
      checked += 1
      if evaluate.normalize_answer(by_offsets) != evaluate.normalize_answer(a.text):
        assert a.text.strip() in by_offsets and (
            e.context[a.start - 1:a.start].isalnum() and a.text[:1].isalnum() or
            e.context[a.end:a.end + 1].isalnum() and a.text[-1:].isalnum()), (a.text, by_offsets)
        cut_words.append(a.text)
      assert evaluate.normalize_answer(by_decode) == evaluate.normalize_answer(by_offsets)
  assert checked == sum(len(e.answers) for e in squad.examples) > 1500
  assert len(cut_words) <= 3, cut_words


def test_windows_labels_and_p_mask_on_real_articles(spm, squad):
  examples = reader.read_squad(SOURCES, articles=["Rhine"]).examples
  f = feats.build_features(examples, spm, SMALL, training=True)
  assert len(f) > 2 * len(examples)  # contexts really are cut into several windows
  outside = labelled = 0
  for i, e in enumerate(f.examples):
    context_ids, spans = spm.encode_with_offsets(e.context)
    question_ids = spm.encode(e.question)[:SMALL.max_query_length]
    rows = f.windows_of(i)
    starts = f.doc_start[rows]
    assert starts[0] == 0 and np.all(np.diff(starts) == SMALL.doc_stride)
    assert starts[-1] + f.doc_len[rows[-1]] == len(context_ids)  # the windows cover the whole context
    span = feats.answer_token_span(np.asarray(spans), e.answers[0], e.context) if e.answers else None
    for w in rows:
      s, n, off = f.doc_start[w], f.doc_len[w], f.context_offset[w]
      want = [vocab.BOS, *question_ids, vocab.EOS, vocab.EOS, *context_ids[s:s + n], vocab.EOS]
      assert off == len(question_ids) + 3 and list(f.tokens[w, :len(want)]) == want
      assert np.all(f.tokens[w, len(want):] == vocab.PAD)
      allowed = np.zeros(SMALL.seq_len, bool)
      allowed[0] = True
      allowed[off:off + n] = True
      assert np.array_equal(~f.p_mask[w], allowed)
      if span is not None and s <= span[0] and span[1] < s + n:
        labelled += 1
        assert (f.start[w], f.end[w]) == (off + span[0] - s, off + span[1] - s)
        assert list(f.tokens[w, f.start[w]:f.end[w] + 1]) == context_ids[span[0]:span[1] + 1]
      else:
        outside += e.is_impossible is False
        assert f.start[w] == f.end[w] == 0
  assert labelled > 0 and outside == f.stats["answer_outside_window"] > 0
  assert f.stats["questions"] == len(examples) and f.stats["windows"] == len(f)
  assert f.stats["truncated_questions"] == sum(len(spm.encode(e.question)) > 16 for e in examples) > 0
  assert f.stats["unrecoverable_answers"] == f.stats["skipped_questions"] == 0


def test_unrecoverable_answers_are_counted_and_skipped_in_training(spm):
  good = reader.SquadExample("g", "t", "Where?", "The Rhine flows to the sea.", (reader.Answer("Rhine", 4),))
  wrong = reader.SquadExample("w", "t", "Where?", "The Rhine flows to the sea.", (reader.Answer("Rhine", 9),))
  train = feats.build_features([good, wrong], spm, SMALL, training=True)
  evaluation = feats.build_features([good, wrong], spm, SMALL, training=False)
  assert train.stats["unrecoverable_answers"] == train.stats["skipped_questions"] == 1
  assert [e.qid for e in train.examples] == ["g"] and [e.qid for e in evaluation.examples] == ["g", "w"]
  assert evaluation.stats["skipped_questions"] == 0 and evaluation.start[1] == 0
  with pytest.raises(ValueError, match="no room for context"):
    feats.build_features([good], spm, feats.FeatureConfig(seq_len=20, max_query_length=16))


def test_answers_longer_than_a_window_are_counted(spm):
  context = "one two three four five six seven eight nine ten eleven twelve"
  example = reader.SquadExample("q", "t", "Which?", context, (reader.Answer(context, 0),))
  f = feats.build_features([example], spm, feats.FeatureConfig(seq_len=12, doc_stride=2, max_query_length=3))
  assert f.stats["answers_in_no_window"] == 1 and f.stats["answer_outside_window"] == len(f) > 1
  assert np.all(f.start == 0) and np.all(f.end == 0)


# ----------------------------------------------------------------------------------------------
# Head and loss
# ----------------------------------------------------------------------------------------------


def numpy_span_loss(hidden, head, p_mask, start, end, mask):
  """float64 reference: logits = hidden @ w + b, MASKED_LOGIT at p_mask, mean of start / end CE."""
  def logits(name):
    w = np.asarray(head[name]["kernel"], np.float64)[:, 0]
    return np.where(p_mask, MASKED_LOGIT, hidden @ w + float(head[name]["bias"][0]))

  def nll(x, labels):
    z = x - x.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return -logp[np.arange(len(labels)), labels]

  s, e = logits("start"), logits("end")
  per = 0.5 * (nll(s, start) + nll(e, end))
  hit = (s.argmax(-1) == start) & (e.argmax(-1) == end) & mask
  return s, e, per[mask].sum(), mask.sum(), hit.sum()


def test_head_and_loss_match_float64_numpy(spm, squad):
  f = feats.build_features(squad.select(["Normans"]).examples[:12], spm, SMALL, training=True)
  batch = f.batch(np.arange(10), batch_size=12)  # two filler rows
  assert batch["mask"].sum() == 10 and (batch["start"] > 0).any()
  cfg = tiny_model_config(spm.vocab_size)
  model = SquadModel(cfg)
  params = flax.core.unfreeze(flax.linen.meta.unbox(model.init(jax.random.PRNGKey(0), batch)["params"]))
  assert set(params) == {"encoder", "head"} and set(params["head"]) == {"start", "end"}
  assert encoder_tree_problems(params["encoder"], cfg) == []  # a pretrained encoder drops in unchanged
  params["head"]["start"]["bias"] = jnp.array([0.3])  # nonzero biases: exercised, not only initialised
  params["head"]["end"]["bias"] = jnp.array([-0.2])
  loss_sum, weight, metrics = model.apply({"params": params}, batch)
  hidden = Encoder(cfg).apply({"params": params["encoder"]}, jnp.asarray(batch["tokens"]),
                              padding_mask=jnp.asarray(batch["tokens"] == vocab.PAD))
  s, e, want_loss, want_weight, want_hit = numpy_span_loss(np.asarray(hidden, np.float64), params["head"],
                                                           batch["p_mask"], batch["start"], batch["end"],
                                                           batch["mask"])
  np.testing.assert_allclose(float(loss_sum), want_loss, rtol=1e-5)
  assert float(weight) == want_weight == 10
  assert tuple(map(float, metrics["span_accuracy"])) == (want_hit, 10.0) and metrics["loss"][0] == loss_sum
  start, end = model.apply({"params": params}, batch["tokens"], batch["p_mask"], method=SquadModel.logits)
  np.testing.assert_allclose(np.asarray(start), s, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(end), e, rtol=1e-4, atol=1e-5)
  assert np.all(np.asarray(start)[batch["p_mask"]] == MASKED_LOGIT)
  # a row where every position is masked (no <s> either) stays finite, and masked logits get no gradient
  all_masked = dict(batch, p_mask=np.ones_like(batch["p_mask"]))
  loss, grads = jax.jit(jax.value_and_grad(lambda p: model.apply({"params": p}, all_masked)[0]))(params)
  assert np.isfinite(float(loss)) and all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


# ----------------------------------------------------------------------------------------------
# Decoding
# ----------------------------------------------------------------------------------------------


def brute_force(f, start_logits, end_logits, n_best, max_answer_length):
  """Every (window, s, e) of every question, BERT's max-context rule written out, ranked, deduplicated by text."""
  out = {}
  for i, example in enumerate(f.examples):
    rows = list(f.windows_of(i))
    spans = f.context_spans[i]
    candidates = []
    for w in rows:
      for s, e in itertools.product(range(f.tokens.shape[1]), repeat=2):
        if s == 0 or e == 0 or f.p_mask[w, s] or f.p_mask[w, e] or e < s or e - s + 1 > max_answer_length:
          continue
        doc = f.doc_start[w] + s - f.context_offset[w]
        best_window = max(rows, key=lambda r: (
            min(doc - f.doc_start[r], f.doc_start[r] + f.doc_len[r] - 1 - doc) + 0.01 * f.doc_len[r]
            if f.doc_start[r] <= doc < f.doc_start[r] + f.doc_len[r] else -math.inf, -r))
        if best_window != w:
          continue
        first, last = doc, f.doc_start[w] + e - f.context_offset[w]
        text = example.context[spans[first, 0]:spans[last, 1]]
        if text:
          candidates.append((start_logits[w, s] + end_logits[w, e], text))
    nbest = {}
    for score, text in sorted(candidates, key=lambda c: -c[0]):
      nbest.setdefault(text, score)
    out[example.qid] = (list(nbest.items())[:n_best], min(start_logits[w, 0] + end_logits[w, 0] for w in rows))
  return out


def test_decoding_matches_brute_force(spm, squad):
  examples = squad.select(["Computational_complexity_theory"]).examples[:6]
  f = feats.build_features(examples, spm, feats.FeatureConfig(seq_len=40, doc_stride=9, max_query_length=12))
  assert len(f) > 2 * len(examples)
  rng = np.random.default_rng(0)
  start_logits, end_logits = rng.normal(size=f.tokens.shape), rng.normal(size=f.tokens.shape)
  for n_best, max_len in ((7, 4), (20, 30)):
    got = decode.predict_answers(f, start_logits, end_logits, n_best, max_len)
    want = brute_force(f, start_logits, end_logits, n_best, max_len)
    for qid, (nbest, null) in want.items():
      p = got[qid]
      assert [t for t, _ in p.nbest] == [t for t, _ in nbest]
      np.testing.assert_allclose([s for _, s in p.nbest], [s for _, s in nbest], rtol=1e-12)
      assert (p.text, p.score) == p.nbest[0] and math.isclose(p.null_score, null)
      assert examples[[e.qid for e in examples].index(qid)].context[p.start:p.end] == p.text


def test_final_answers_threshold():
  p = {"a": decode.Prediction("a", "x", 2.0, 1.0, (("x", 2.0),)),
       "b": decode.Prediction("b", "y", 1.0, 3.0, (("y", 1.0),))}
  assert decode.final_answers(p, 0.0) == {"a": "x", "b": ""}
  assert decode.final_answers(p, 2.0) == {"a": "x", "b": "y"}  # score_diff 2.0 is not above 2.0
  assert decode.final_answers(p, None) == {"a": "x", "b": "y"}


# ----------------------------------------------------------------------------------------------
# Metric
# ----------------------------------------------------------------------------------------------


def ex(qid, *answers):
  return reader.SquadExample(qid, "t", "?", "ctx", tuple(reader.Answer(a, 0) for a in answers), not answers)


def test_normalisation_and_token_f1_by_hand():
  assert evaluate.normalize_answer("  The Cat,  sat!! ") == "cat sat"
  assert evaluate.normalize_answer("an apple a day") == "apple day"
  assert evaluate.normalize_answer("Theatre-goers") == "theatregoers"  # articles only as whole words
  assert evaluate.exact_match("the Normans.", "Normans") == 1.0
  # pred {cat, sat, on, mat} vs gold {cat, on, mat}: P = 3/4, R = 1, F1 = 6/7
  assert math.isclose(evaluate.f1_score("the cat sat on the mat", "cat on mat"), 6 / 7)
  # repeated tokens count with multiplicity: "x y y" vs "y y z" share y twice, P = R = 2/3
  assert math.isclose(evaluate.f1_score("x y y", "y y z"), 2 / 3)
  assert evaluate.f1_score("", "") == 1.0 and evaluate.f1_score("", "", "v1.1") == 0.0
  assert evaluate.f1_score("", "Paris") == evaluate.f1_score("Paris", "") == 0.0


def test_v11_metric_by_hand():
  examples = [ex("1", "Denver Broncos", "the Denver Broncos"), ex("2", "Santa Clara"), ex("3", "1850s")]
  preds = {"1": "Broncos", "2": "Santa Clara, California", "3": ""}
  # 1: EM 0, F1 max(P=1,R=1/2 -> 2/3); 2: EM 0, F1 P=2/3 R=1 -> 4/5; 3: empty prediction -> 0
  got = evaluate.evaluate(examples, preds, "v1.1")
  assert got["total"] == 3 and got["exact"] == 0.0
  assert math.isclose(got["f1"], 100 * (2 / 3 + 4 / 5) / 3)
  assert evaluate.evaluate(examples, dict(preds, **{"1": "The Denver Broncos!"}), "v1.1")["exact"] == 100 / 3
  with pytest.raises(ValueError, match="no prediction .* for 1 of 3"):
    evaluate.evaluate(examples, {"1": "x", "2": "y"}, "v1.1")


def test_v20_metric_and_thresholds_by_hand():
  examples = [ex("q1", "Paris"), ex("q2", "the Eiffel Tower", "Eiffel Tower"), ex("q3"), ex("q4")]
  preds = {"q1": "Paris", "q2": "Eiffel", "q3": "London", "q4": "Rome"}
  na = {"q1": -2.0, "q2": 0.5, "q3": 1.0, "q4": 2.0}
  got = evaluate.evaluate(examples, preds, "v2.0", na, na_threshold=0.0)
  # threshold 0: only q1 answered -> q1 right, q2 missed, q3 / q4 correctly abstained
  assert (got["exact"], got["f1"], got["total"]) == (75.0, 75.0, 4)
  assert (got["HasAns_exact"], got["HasAns_f1"], got["HasAns_total"]) == (50.0, 50.0, 2)
  assert (got["NoAns_exact"], got["NoAns_f1"], got["NoAns_total"]) == (100.0, 100.0, 2)
  # sweep by na: nothing answered 2; +q1 -> 3 (t=-2); +q2 EM 0 / F1 2/3 -> 3 / 3.667 (t=0.5); +q3 -1; +q4 -1
  assert (got["best_exact"], got["best_exact_thresh"]) == (75.0, -2.0)
  assert math.isclose(got["best_f1"], 100 * (3 + 2 / 3) / 4) and got["best_f1_thresh"] == 0.5
  assert math.isclose(evaluate.evaluate(examples, preds, "v2.0", na, 0.5)["f1"], got["best_f1"])
  # no scores: predictions as given; "" is right exactly on unanswerable questions
  plain = evaluate.evaluate(examples, {"q1": "", "q2": "Eiffel Tower", "q3": "", "q4": "Rome"}, "v2.0")
  assert (plain["exact"], plain["HasAns_exact"], plain["NoAns_exact"]) == (50.0, 50.0, 50.0)
  assert "best_f1" not in plain


def test_v20_tied_scores_move_together_and_answering_nothing_can_win():
  examples = [ex("a", "Paris"), ex("b"), ex("c")]
  preds, na = {"a": "Paris", "b": "x", "c": "y"}, {"a": 1.0, "b": 1.0, "c": 2.0}
  # answer nothing: b, c right (2/3); t = 1 answers a and b together: a right, b wrong (2/3); t = 2: 1/3
  got = evaluate.evaluate(examples, preds, "v2.0", na)
  assert math.isclose(got["best_exact"], 200 / 3) and got["best_exact_thresh"] == 0.0  # below every score
  assert math.isclose(evaluate.evaluate(examples, preds, "v2.0", na, 0.0)["exact"], 200 / 3)


def test_v20_best_threshold_is_the_best_reachable_score():
  """best_f1 / best_exact equal the best of evaluate() over every threshold, ties in na included."""
  rng = np.random.default_rng(1)
  golds = ["red", "blue sky", "", "green", "", "the sun", "", "dark night"] * 3
  examples = [ex(f"q{i}", *([g] if g else [])) for i, g in enumerate(golds)]
  words = ["red", "blue", "sky", "green", "sun", "night", ""]
  preds = {e.qid: " ".join(rng.choice(words, size=rng.integers(1, 3))).strip() for e in examples}
  na = {e.qid: float(rng.integers(-3, 4)) for e in examples}  # integer scores: many ties
  got = evaluate.evaluate(examples, preds, "v2.0", na)
  for name in ("exact", "f1"):
    thresholds = sorted(set(na.values())) + [min(na.values()) - 1.0]
    reachable = max(evaluate.evaluate(examples, preds, "v2.0", na, t)[name] for t in thresholds)
    assert math.isclose(got[f"best_{name}"], reachable)
    assert math.isclose(evaluate.evaluate(examples, preds, "v2.0", na, got[f"best_{name}_thresh"])[name], reachable)


# ----------------------------------------------------------------------------------------------
# answer() and training
# ----------------------------------------------------------------------------------------------


def test_answer_returns_the_best_span_or_no_answer(spm, squad):
  cfg = tiny_model_config(spm.vocab_size)
  e = squad.select(["Normans"]).examples[0]
  config = feats.FeatureConfig(seq_len=64, doc_stride=24, max_query_length=16)
  f = feats.build_features([e], spm, config)
  params = SquadModel(cfg).init(jax.random.PRNGKey(1), f.batch([0]))["params"]
  params = flax.linen.meta.unbox(params)
  text, score, first, last = predict.answer(params, spm, cfg, e.question, e.context, feature_config=config,
                                            null_threshold=None)
  start, end = predict.window_logits(params, cfg, f, batch_size=4)
  (best_text, best_score), = brute_force(f, start, end, 1, 30)[e.qid][0]
  assert text == best_text and e.context[first:last] == text and math.isclose(score, best_score, rel_tol=1e-5)
  # the offsets are a token span's: they start at a token's first character and end at a token's last
  spans = f.context_spans[0]
  assert first in set(spans[:, 0].tolist()) and last in set(spans[:, 1].tolist())
  none, null, *offsets = predict.answer(params, spm, cfg, e.question, e.context, feature_config=config,
                                        null_threshold=-1e9)
  assert none == "" and offsets == [0, 0] and math.isclose(null, float(np.min(start[:, 0] + end[:, 0])), rel_tol=1e-5)


def test_squad_model_trains_on_real_features(spm, squad):
  """A few jitted AdamW steps on real windows (answerable and no-answer) lower the span loss."""
  f = feats.build_features(squad.select(["Rhine"]).examples[:40], spm, SMALL, training=True)
  rows = np.arange(32)
  batch = {k: jnp.asarray(v) for k, v in f.batch(rows).items()}
  assert 0 < int((batch["start"] > 0).sum()) < 32
  cfg = tiny_model_config(spm.vocab_size, dropout_rate=0.1)
  params = flax.linen.meta.unbox(SquadModel(cfg).init(jax.random.PRNGKey(0), batch)["params"])
  optimizer = optax.adamw(3e-3)
  train_model = SquadModel(cfg, deterministic=False)

  @jax.jit
  def step(params, opt_state, key):
    def loss(p):
      loss_sum, weight, _ = train_model.apply({"params": p}, batch, rngs={"dropout": key})
      return loss_sum / weight
    value, grads = jax.value_and_grad(loss)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value

  opt_state = optimizer.init(params)
  losses = []
  for i in range(30):
    params, opt_state, value = step(params, opt_state, jax.random.PRNGKey(i))
    losses.append(float(value))
  eval_loss, weight, _ = SquadModel(cfg).apply({"params": params}, batch)
  assert np.isfinite(losses).all() and np.mean(losses[-5:]) < 0.6 * np.mean(losses[:3]), losses
  assert float(eval_loss / weight) < 0.6 * losses[0]
