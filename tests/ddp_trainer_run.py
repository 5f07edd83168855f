"""One IVONTrainer run, launched by tests/test_trainer_parity.py alone or under torchrun (2 processes, gloo)."""

import gc
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import DataCollatorWithPadding, TrainingArguments

from bayes_adalora.build import build_trainable_model
from bayes_adalora.config import TrainConfig
from bayes_adalora.hf_trainer import IVONTrainer
from bayes_adalora.models import load_model
from bayes_adalora.tasks import get_task
from test_hf_trainer import adalora_ranks, read_sst2

model_path, glue_dir, out, per_device = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(1)
torch.manual_seed(0)
config = TrainConfig(method="bayes-adalora", init_r=4, target_r=2, tinit=2, tfinal=3, delta_t=1)
tokenizer, base, fresh = load_model(model_path, get_task("sst2"), False)
model = build_trainable_model(base, config, 10, fresh)
args = TrainingArguments(output_dir=str(out / "trainer"), report_to=[], use_cpu=True, save_strategy="no",
                         logging_strategy="no", per_device_train_batch_size=per_device, learning_rate=0.5,
                         max_grad_norm=0.0, max_steps=10, seed=0, disable_tqdm=True)
trainer = IVONTrainer(model=model, args=args, train_dataset=read_sst2(glue_dir, "train", tokenizer),
                      data_collator=DataCollatorWithPadding(tokenizer), config=config)
trainer.train()
ranks = adalora_ranks(model)
every = [None] * (dist.get_world_size() if dist.is_initialized() else 1)
if dist.is_initialized():
    dist.all_gather_object(every, ranks)
else:
    every = [ranks]
if trainer.args.process_index == 0:
    weights = {n: p.detach().tolist() for n, p in model.named_parameters() if p.requires_grad}
    sync = trainer.ivon_optimizer.sync
    (out / "result.json").write_text(json.dumps({"ranks": every, "weights": weights, "sync": sync,
                                                 "world": trainer.args.world_size}))
# what holds the process group (DDP's reducer, in the Trainer's wrapped model) goes first, then the group: one
# left to the interpreter's exit can abort the process (gloo's threads still hold tensors) after its result is written
del trainer, model
gc.collect()
if dist.is_initialized():
    dist.destroy_process_group()
