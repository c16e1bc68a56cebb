"""Fine-tuning data and metrics: task readers (GLUE, MoleculeNet), splits, encoding and metrics."""

from exlm_jax.finetune.encoding import Tokenizer, encode_examples, truncate_pair  # noqa: F401
from exlm_jax.finetune.metrics import (  # noqa: F401
    GLUE_TASKS, METRIC_NAMES, TASK_TYPES, AucResult, GlueTask, accuracy, compute_metrics, default_metrics,
    f1_binary, glue_task, is_improvement, mae, matthews_corrcoef, multitask_roc_auc, pearson,
    rmse, roc_auc, spearman)
from exlm_jax.finetune.splits import random_split, scaffold_split, stratified_split  # noqa: F401
from exlm_jax.finetune.tasks import (  # noqa: F401
    MOLECULENET, MoleculeTask, Provenance, Split, TaskData, load_glue, load_molecule_csv, load_moleculenet,
    split_molecules)
