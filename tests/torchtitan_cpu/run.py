"""One torchtitan training run with the aioli_fast adapter, on the CPU (tests/test_integration_torchtitan.py).

``python run.py CORPUS DUMP_FOLDER OUT.json STEPS [LOAD_STEP]``, alone or under torchrun: trains the
llama3 debug model (SDPA attention) with Aioli mixing, checkpoints every 3 steps, and writes per
micro-batch (step, loss, proportions), the learned proportions and a weights digest to OUT.json (one
file per rank: ``OUT.json`` with ``.rank<r>`` before the suffix when there are several).
"""

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from torchtitan_cpu import allow_cpu  # noqa: E402

allow_cpu()
for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}.items():
    os.environ.setdefault(key, value)
os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
os.environ.setdefault("MASTER_PORT", str(29600 + os.getpid() % 300))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torchtitan.models.common.attention import FlexAttention, ScaledDotProductAttention  # noqa: E402
from torchtitan.models.llama3.config_registry import llama3_debugmodel  # noqa: E402

from aioli_fast.integrations.torchtitan import AioliTrainer, aioli_config  # noqa: E402


class Recording(AioliTrainer):
    """Records every training micro-batch's step, loss and the proportions it was drawn with."""

    @dataclass(kw_only=True, slots=True)
    class Config(AioliTrainer.Config):
        pass

    def __init__(self, config):
        super().__init__(config)
        self.record, self.seen = [], []

    def _forward_backward_body(self, inputs, labels, global_valid_tokens, extra_kwargs):
        local = inputs.to_local() if hasattr(inputs, "to_local") else inputs  # (a DTensor under full_dtensor)
        self.seen += [hash(tuple(row.tolist())) for row in local]
        loss = super()._forward_backward_body(inputs, labels, global_valid_tokens, extra_kwargs)
        self.record.append([self.step, float(loss.detach()), list(self.mixing.host_proportions)])
        return loss


def _full(p):
    return p.full_tensor() if hasattr(p, "full_tensor") else p


def main(corpus, dump, out, steps, load_step=None):
    from torchtitan.tools.logging import init_logger

    init_logger()  # as torchtitan.train does: its console at INFO
    base = llama3_debugmodel()
    # FlexAttention has no backward on the CPU: the same model with SDPA
    for _, _, parent, attr in list(base.model_spec.model.traverse(FlexAttention.Config)):
        setattr(parent, attr, ScaledDotProductAttention.Config())
    config = aioli_config(
        base,
        corpus,
        aioli_eval_every=6,
        config_class=Recording.Config,
        mixer="aioli",
        mixer_options={
            "measurement": "train",
            "sweeps": 1,
            "block_steps": 2,
            "update": "cumulative",
            "eta": 2.0,
            "round_steps": 9,
            "learn_fraction": 1.0,
            "prior_steps": 0,
            "max_learn_share": 1.0,
            "one_hot_factor": 0.625,
        },
        seed=3,
        eval_batch_size=4,
    )
    config.dump_folder = dump
    config.training.steps = steps
    config.training.local_batch_size = 2
    config.training.global_batch_size = 4 * int(os.environ["WORLD_SIZE"])  # accumulation 2
    config.validator.enable = False
    config.checkpoint.enable = True
    config.checkpoint.interval = 3
    config.checkpoint.last_save_model_only = False
    if load_step is not None:
        config.checkpoint.load_step = load_step
    config.metrics.log_freq = 3
    config.parallelism.spmd_backend = "full_dtensor"
    torch.manual_seed(0)
    trainer = config.build()
    try:
        trainer.train()
        rank = dist.get_rank()
        result = {
            "world_size": dist.get_world_size(),
            "record": trainer.record,
            "seen": trainer.seen,
            "learned": trainer.mixing.mixer.state_dict()["proportions"].tolist(),
            "eval": trainer.last_eval,
            "weights": sum(
                float(_full(p).detach().double().sum()) for p in trainer.model_parts[0].parameters()
            ),
        }
        path = Path(out)
        if dist.get_world_size() > 1:
            path = path.with_name(f"{path.stem}.rank{rank}{path.suffix}")
        path.write_text(json.dumps(result))
    finally:
        trainer.close()
        if dist.is_initialized():
            dist.destroy_process_group()


def flex_forward(corpus, out):
    """The llama3 debug recipe as it is (FlexAttention, document masks from the loader's positions):
    on the CPU, where FlexAttention has no backward, its forward: a training micro-batch's loss and
    the per-domain evaluation."""
    from torchtitan.models.common.attention import BlockMask

    from aioli_fast.integrations.torchtitan import document_positions

    config = aioli_config(llama3_debugmodel(), corpus, mixer="stratified", eval_batch_size=4)
    config.dump_folder = str(Path(out).parent / "flex-dump")
    config.training.steps = 2
    config.training.local_batch_size = 2
    config.training.global_batch_size = 2
    config.validator.enable = False
    config.metrics.log_freq = 1
    torch.manual_seed(0)
    trainer = config.build()
    try:
        mixing, model = trainer.mixing, trainer.model_parts[0]
        batch = mixing.micro_batches(mixing.stream.__next__(), 2)[0]  # a training micro-batch's rows
        ids = batch["input_ids"]
        positions = document_positions(ids, mixing.manifest.eos_id)
        raw = {"input": ids, "positions": positions, "domain_ids": batch["domain_ids"]}
        inputs, labels, extra = trainer.post_dataloading_process(raw, batch["labels"])
        with torch.no_grad():
            loss, _ = trainer.loss_fn(model(inputs, **extra), labels, domain_ids=trainer._domain_ids)
        result = {
            "masks": type(extra.get("attention_masks")).__name__,
            "is_block_mask": isinstance(extra.get("attention_masks"), BlockMask),
            "documents": int((positions == 0).sum()),
            "loss": float(loss),
            "eval": mixing.evaluate_domains(trainer.logits_of, model, prefix="val"),
        }
        Path(out).write_text(json.dumps(result))
    finally:
        trainer.close()
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[0] == "--flex":
        flex_forward(args[1], args[2])
    else:
        main(args[0], args[1], args[2], int(args[3]), int(args[4]) if len(args) > 4 else None)
