"""Pretraining objectives, registered by name. The trainer looks them up and never branches on them.

An objective is an `Objective` (see `base.py`): a Linen model factory, a pure loss function
`loss_fn(model, params, tokens, rng, step?, train) -> (loss_sum, (weight, metrics))`, the encoder-only
hand-off used by fine-tuning, and everything else that is objective-specific (FLOPs model, predict_masked
rule, what the analyses measure). The import below is the only list of objective modules: adding an
objective means adding its file here and its config.
"""

from exlm_jax.objectives.base import Objective, get, names, register, with_defaults  # noqa: F401

# Import the built-in objectives so they register themselves.
from exlm_jax.objectives import exlm, maelm, mlm, repeated_mlm  # noqa: F401,E402

BASELINE = mlm.OBJECTIVE.name  # what the others are compared against (bench: step-time ratios)
