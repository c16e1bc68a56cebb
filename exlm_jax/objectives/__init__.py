"""Pretraining objectives, registered by name. The trainer looks them up and never branches on them.

An objective is an `Objective` (see `base.py`): a Linen model factory, a pure loss function
`loss_fn(model, params, tokens, rng, step?, train) -> (loss_sum, (weight, metrics))`, and the
encoder-only hand-off used by fine-tuning.
"""

from exlm_jax.objectives.base import Objective, get, names, register, with_defaults  # noqa: F401

# Import the built-in objectives so they register themselves.
from exlm_jax.objectives import exlm, maelm, mlm, repeated_mlm  # noqa: F401,E402
