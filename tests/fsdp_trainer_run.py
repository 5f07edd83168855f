"""One `make_trainer` run, launched by tests/test_fsdp.py under torchrun (2 processes, gloo), with the model
sharded by FSDP2 (`config.fsdp`) or whole in each process (DDP): writes every process's final rank pattern and
the trained weights, gathered whole (process 0).

Usage: fsdp_trainer_run.py MODEL GLUE_DIR OUT PER_DEVICE_BATCH METHOD none|full_shard|shard_grad_op
"""

import gc
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import AutoTokenizer, TrainingArguments

from bayes_adalora.adapters import adapter_ranks
from bayes_adalora.config import TrainConfig
from bayes_adalora.hf_trainer import make_trainer
from bayes_adalora.sharding import gather_rows, local_shard, model_is_sharded
from test_hf_trainer import read_sst2

model_path, glue_dir, out, per_device, method, fsdp = (sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]),
                                                       int(sys.argv[4]), sys.argv[5], sys.argv[6])
torch.set_num_threads(1)
world = int(os.environ.get("WORLD_SIZE", "1"))
config = TrainConfig(method=method, init_r=4, target_r=2, tinit=2, tfinal=3, delta_t=1,
                     fsdp=None if fsdp == "none" else fsdp)
# evaluated at step 5: with shard_grad_op the blocks stay gathered after it, and the Trainer shards them again
args = TrainingArguments(output_dir=str(out / "trainer"), report_to=[], use_cpu=True, save_strategy="no",
                         logging_strategy="no", eval_strategy="steps", eval_steps=5, per_device_eval_batch_size=8,
                         per_device_train_batch_size=per_device,
                         learning_rate=0.5 if config.uses_ivon else 1e-3, max_grad_norm=0.0, max_steps=10, seed=0,
                         disable_tqdm=True)
tokenizer = AutoTokenizer.from_pretrained(model_path)
trainer = make_trainer(model_path, read_sst2(glue_dir, "train", tokenizer), read_sst2(glue_dir, "dev", tokenizer),
                       config, args)
trainer.train()
model = trainer.model
ranks = adapter_ranks(model)
weights = {n: gather_rows(p, local_shard(p)) for n, p in model.named_parameters() if p.requires_grad}
every = [None] * world
if world > 1:
    dist.all_gather_object(every, ranks)
else:
    every = [ranks]
if trainer.args.process_index == 0:
    (out / "result.json").write_text(json.dumps({"ranks": every, "sharded": model_is_sharded(model),
                                                 "weights": {n: t.tolist() for n, t in weights.items()},
                                                 "trainer": type(trainer).__name__}))
del trainer, model, weights  # what holds the process group goes first, then the group
gc.collect()
if world > 1:
    dist.destroy_process_group()
