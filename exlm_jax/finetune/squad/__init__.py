"""Extractive question answering (SQuAD 1.1 / 2.0): the benchmark MAE-LM and ExLM report beside GLUE.

  reader    official JSON / TFDS `squad` -> SquadData (questions, per-article counts)
  features  questions -> windows `<s> question </s> </s> context </s>`, span labels, p_mask, offsets
  model     SquadModel: Encoder + two Linear(D->1) span scorers, loss = mean of start / end CE
  decode    window logits -> best span per question (n-best, max answer length, null score)
  evaluate  the official v1.1 / v2.0 EM / F1 (HasAns / NoAns, best thresholds)
  predict   window_logits over features, answer(question, context)
"""
