"""Evaluate one checkpoint in however many processes launched this script, and write the metrics:
`torchrun --nproc_per_node N tests/eval_ranks.py CHECKPOINT VALIDATION PARALLEL OUT.json`."""

import json
import os
import sys
from pathlib import Path

from mlm_pretrain.launch import start_accelerator
from mlm_pretrain.objectives import build_objective
from mlm_pretrain.packing import TokenInfo
from mlm_pretrain.parallel import parallelize
from mlm_pretrain.recipe import load_recipe
from mlm_pretrain.schema import PretrainRecipe
from mlm_pretrain.tokenizer import load_tokenizer
from mlm_pretrain.trainer import evaluate

checkpoint, validation, parallel, out = sys.argv[1:]
overrides = [
    f"model.init_from={checkpoint}",
    f"data.tokenizer={checkpoint}",
    f"data.validation=[{validation}]",
    "data.seq_len=32",
    "optim.batch_size=6",
    "optim.micro_batch_size=2",
    "impl.eval_blocks=1000",
    f"impl.parallel={parallel}",
    "impl.threads=1",
]
recipe = load_recipe(PretrainRecipe, Path(__file__).parent.parent / "recipes" / "tiny.yaml", overrides)
accelerator = start_accelerator(Path(out).parent, cpu=True)
tokenizer = load_tokenizer(checkpoint)
objective = parallelize(build_objective(recipe, tokenizer, compile=False), recipe.impl, accelerator)
metrics = evaluate(accelerator.unwrap_model(objective), recipe, tokenizer, TokenInfo(tokenizer), accelerator)
if accelerator.is_main_process:
    Path(out).write_text(json.dumps(metrics))
accelerator.end_training()
# The model wrapped for DDP keeps the process group, and its gloo worker threads, alive past
# end_training; when a worker is still releasing the evaluation's all-reduce as the interpreter
# finalizes, the process aborts (`terminate called without an active exception`, about 1 run in 12
# with 3 processes on a busy 2-core machine). Everything is written: leave without finalizing.
os._exit(0)
