"""Fine-tuning on GLUE-style tasks: task registry, the training loop, the TF-IDF baseline, result tables."""

from mlm_pretrain.finetune.baseline import tfidf_baseline
from mlm_pretrain.finetune.tasks import GLUE_TASKS, Task, load_task
from mlm_pretrain.finetune.train import FinetuneConfig, finetune

__all__ = ["GLUE_TASKS", "FinetuneConfig", "Task", "finetune", "load_task", "tfidf_baseline"]
