"""What runs the model and the optimizer: plain PyTorch in one process, or DeepSpeed ZeRO over many.

Both engines have the same small interface, so the training loop does not know which one it drives:

    out = engine.forward(input_ids, labels, domain_ids, num_domains)   # one micro-batch
    engine.backward(out.loss)      # scaled by 1 / micro-batches per step
    engine.step()                  # after every micro-batch; the optimizer steps on the last one
    engine.set_lr(lr)              # the LR of the coming optimizer step (a pure function of the step)
    engine.save(folder) / engine.load(folder)   # model and optimizer state; every rank calls them
    engine.full_state_dict()       # the whole model's weights on rank 0 (gathered under ZeRO-3)

The learning-rate schedule is not an object with state: the loop sets the LR of every step from the step
number (:func:`aioli_fast.train.components.lr_at`), so a checkpoint's step restores it exactly.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from ..config import RunConfig, merge_mappings
from ..device import autocast_context
from ..distributed import DistInfo, all_ok, collectives, group_info
from ..errors import ConfigError
from ..fileio import say
from ..model import GPT, ModelOutput

# --------------------------------------------------------------------------------------------------
# processes


def resolve_backend(cfg: RunConfig, world_size: int) -> str:
    """``torch`` or ``deepspeed`` for ``engine.backend`` (auto: DeepSpeed for >1 process or ZeRO >= 1)."""
    e = cfg.engine
    if e.backend == "auto":
        return "deepspeed" if world_size > 1 or e.zero_stage > 0 else "torch"
    if e.backend == "torch" and world_size > 1:
        raise ConfigError(
            f"engine.backend=torch trains in one process, but this run was launched with {world_size}; "
            "use engine.backend=deepspeed (or auto)"
        )
    return e.backend


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(cfg: RunConfig, info: DistInfo, device: torch.device) -> None:
    """Start the process group for a DeepSpeed run (a group of one for a single process), once per
    process: later runs in the same process reuse it."""
    if dist.is_initialized():
        return
    if info.world_size == 1:  # a single process: DeepSpeed still wants a process group
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
    backend = cfg.engine.dist_backend
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise ConfigError("engine.dist_backend=nccl needs CUDA devices; use gloo on the CPU")
    import_deepspeed(device)
    import deepspeed

    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)


def import_deepspeed(device: torch.device):
    """Import DeepSpeed with the accelerator that matches ``device`` (CPU runs set DS_ACCELERATOR=cpu)."""
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
    except ImportError as exc:  # pragma: no cover - deepspeed is a dependency
        raise ConfigError(f"engine.backend=deepspeed needs the deepspeed package ({exc})") from exc
    return deepspeed


# --------------------------------------------------------------------------------------------------
# parameter groups


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on matrices only (not on biases and norms)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, cfg: RunConfig) -> torch.optim.AdamW:
    """torch AdamW with the groups of :func:`param_groups`."""
    o = cfg.optim
    return torch.optim.AdamW(
        param_groups(model, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps
    )


# --------------------------------------------------------------------------------------------------
# engines


class _Engine:
    """What both engines share: the optimizer's learning rate, set by the loop every step."""

    optimizer: torch.optim.Optimizer
    #: whether skipped steps are part of normal training (fp16 loss scaling skips overflowing steps)
    loss_scaling: bool = False

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:  # ZeRO's optimizers pass their groups through
            group["lr"] = lr


class TorchEngine(_Engine):
    """One process, torch AdamW, autocast for bf16, gradient accumulation over ``micro_steps``."""

    kind = "torch"

    def __init__(self, model: GPT, cfg: RunConfig, device: torch.device, precision: str, micro_steps: int):
        self.module = model.to(device)
        if cfg.train.compile:
            self.module.compile()  # in place: parameter names and checkpoints are unchanged
        self.device, self.precision = device, precision
        self.optimizer = build_optimizer(self.module, cfg)
        self.grad_clip = cfg.optim.grad_clip
        self.skip_nonfinite = cfg.train.on_nan == "skip"
        self.micro_steps = micro_steps
        self._micro = 0
        self.skipped_steps = 0

    def forward(self, *args, **kwargs) -> ModelOutput:
        with autocast_context(self.device, self.precision):
            return self.module(*args, **kwargs)

    @property
    def loss_grad_scale(self) -> float:
        """The gradient :meth:`backward` sends to the loss (the kernels' gradient contract)."""
        return 1.0 / self.micro_steps

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.micro_steps).backward()

    def step(self) -> None:
        self._micro += 1
        if self._micro < self.micro_steps:
            return
        self._micro = 0
        params = [p for p in self.module.parameters() if p.grad is not None]
        if self.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        elif self.skip_nonfinite:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if self.skip_nonfinite and not bool(torch.isfinite(norm)):  # one host read per step, on request
            self.skipped_steps += 1
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def train(self, mode: bool = True) -> None:
        self.module.train(mode)

    def save(self, folder: Path) -> None:
        torch.save(
            {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict()},
            folder / "engine.pt",
        )

    def load(self, folder: Path, saved_world_size: int = 1) -> None:
        # the run checks that the checkpoint is of this engine, and this engine runs in one process
        state = torch.load(folder / "engine.pt", map_location=self.device, weights_only=True)
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()


#: the folder of a run checkpoint that holds its conversion to DeepSpeed's universal checkpoint
UNIVERSAL = "universal"


def convert_to_universal(source: Path, target: Path) -> None:
    """Convert the DeepSpeed checkpoint folder ``source`` (one tag) to a universal checkpoint at
    ``target`` with DeepSpeed's ``ds_to_universal``, atomically: a partial conversion is never left at
    ``target``. It runs in a fresh interpreter (its worker pool must not fork a training process, whose
    threads can deadlock the children); its console output is shown only when it fails."""
    staging = target.parent.with_name(f".{target.parent.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(source)]
    cmd += ["--output_folder", str(staging / target.name), "--num_extract_workers"]
    cmd += [str(max(1, min(4, os.cpu_count() or 1))), "--num_merge_workers", "1"]
    cmd += ["--inject_missing_state"]  # checkpoints saved without universal_checkpoint_info convert too
    say(f"converting {source} to a universal checkpoint for another number of processes")
    try:
        done = subprocess.run(
            cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}
        )
    except OSError as exc:
        raise ConfigError(f"cannot run DeepSpeed's checkpoint converter ({exc})") from exc
    if done.returncode != 0 or not (staging / target.name).is_dir():
        shutil.rmtree(staging, ignore_errors=True)
        output = (done.stdout + done.stderr).strip()
        if output:
            say(f"DeepSpeed's output while converting:\n{output[-3000:]}")
        lines = [x for x in done.stderr.strip().splitlines() if x.strip()]
        raise ConfigError(
            f"cannot convert {source} to a universal checkpoint ({lines[-1] if lines else 'no output'}); "
            "resume on the number of processes that wrote it"
        )
    if target.parent.exists():
        shutil.rmtree(target.parent)
    os.replace(staging, target.parent)


def deepspeed_config(cfg: RunConfig, world_size: int, micro: int, micro_steps: int, precision: str) -> dict:
    """The DeepSpeed config of a run: batch sizes, ZeRO stage, AdamW, clipping, bf16; plus the user's file."""
    o, e = cfg.optim, cfg.engine
    zero: dict = {"stage": e.zero_stage}
    if e.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if e.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    config = {
        "train_batch_size": micro * micro_steps * world_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": micro_steps,
        "zero_optimization": zero,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": o.lr,
                "betas": [o.beta1, o.beta2],
                "eps": o.eps,
                "weight_decay": o.weight_decay,
                "torch_adam": e.torch_adam,
            },
        },
        "gradient_clipping": o.grad_clip,
        "bf16": {"enabled": precision == "bf16"},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if e.deepspeed_config:
        path = Path(e.deepspeed_config)
        try:
            extra = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"engine.deepspeed_config {path}: cannot read it as JSON ({exc})") from exc
        if not isinstance(extra, dict):
            raise ConfigError(f"engine.deepspeed_config {path}: expected a JSON object")
        for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
            if key in extra and extra[key] != config[key]:
                raise ConfigError(
                    f"engine.deepspeed_config sets {key}={extra[key]}, but train.batch_size / "
                    f"micro_batch_size give {config[key]}; set the batch in the run config only"
                )
        config = merge_mappings(config, extra)
    return config


class DeepSpeedEngine(_Engine):
    """``deepspeed.initialize`` with the config of :func:`deepspeed_config`; ZeRO stages 0-3."""

    kind = "deepspeed"
    TAG = "engine"

    def __init__(
        self,
        model: GPT,
        cfg: RunConfig,
        device: torch.device,
        precision: str,
        micro: int,
        micro_steps: int,
        world_size: int,
    ):
        deepspeed = import_deepspeed(device)
        if cfg.train.on_nan == "skip" and cfg.engine.zero_stage == 0:
            raise ConfigError(
                "train.on_nan=skip under DeepSpeed needs engine.zero_stage >= 1 (the ZeRO optimizers skip a "
                "step whose gradient norm is not finite); use train.on_nan=stop or a ZeRO stage"
            )
        if cfg.train.on_nan == "skip" and cfg.optim.grad_clip <= 0:
            raise ConfigError(
                "train.on_nan=skip under DeepSpeed needs optim.grad_clip > 0 (the gradient norm is what "
                "detects a non-finite step)"
            )
        self.config = deepspeed_config(cfg, world_size, micro, micro_steps, precision)
        self.device, self.precision = device, precision
        self.zero_stage = cfg.engine.zero_stage
        model = model.to(device)
        if cfg.train.compile:
            model.compile()  # in place, before DeepSpeed wraps it: the engine calls the compiled module
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model,
            model_parameters=param_groups(model, cfg.optim.weight_decay),
            config=self.config,
        )
        self.module = self.engine.module

    @property
    def skipped_steps(self) -> int:
        return int(self.engine.skipped_steps)

    @property
    def loss_scaling(self) -> bool:
        return bool(self.config.get("fp16", {}).get("enabled", False))

    # backward (gradient reduction), step and, under ZeRO-3 (which gathers the weights), forward run
    # DeepSpeed's collectives: over several processes their failures are lost peers (CollectiveError)

    def forward(self, *args, **kwargs) -> ModelOutput:
        # bf16 runs hold bf16 weights (DeepSpeed's bf16 mode); the loss kernels compute in fp32
        if self.zero_stage != 3:
            return self.engine(*args, **kwargs)  # no collective: a failure here is the model's
        with collectives():
            return self.engine(*args, **kwargs)

    @property
    def loss_grad_scale(self) -> float:
        """The gradient :meth:`backward` sends to the loss (the kernels' gradient contract; an fp16
        loss scale, when DeepSpeed applies one, is a uniform factor backward still handles)."""
        return 1.0 / self.config["gradient_accumulation_steps"]

    def backward(self, loss: torch.Tensor) -> None:
        with collectives():
            self.engine.backward(loss)  # scales by 1 / gradient_accumulation_steps

    def step(self) -> None:
        with collectives():
            self.engine.step()

    def train(self, mode: bool = True) -> None:
        self.engine.train(mode)

    def save(self, folder: Path) -> None:
        # universal_checkpoint_info: what deepspeed.checkpoint.ds_to_universal requires to convert the
        # checkpoint for a run on another number of processes (an empty record suffices for this model)
        self.engine.save_checkpoint(
            str(folder), tag=self.TAG, save_latest=False, client_state={"universal_checkpoint_info": {}}
        )

    def load(self, folder: Path, saved_world_size: int | None = None) -> None:
        """Load the checkpoint in ``folder``. Written by another number of processes
        (``saved_world_size``) under ZeRO, it is first converted to DeepSpeed's universal checkpoint
        (once, by rank 0, into ``folder/universal``), which DeepSpeed loads on any number of processes."""
        world = dist.get_world_size() if dist.is_initialized() else 1
        if saved_world_size is None or saved_world_size == world or self.zero_stage == 0:
            self._load(folder)  # without ZeRO every rank holds the whole optimizer state: it loads as is
            return
        universal = folder / UNIVERSAL
        error = None
        if group_info().is_main and not (universal / self.TAG).is_dir():
            try:
                convert_to_universal(folder / self.TAG, universal / self.TAG)
            except Exception as exc:  # noqa: BLE001 - reported to every rank below
                error = exc
        if not all_ok(error is None, self.device):
            if error is not None:
                raise error
            raise ConfigError(f"rank 0 could not convert {folder / self.TAG} to a universal checkpoint")
        config = self.engine._config  # DeepSpeed reads the switch from its config at load time
        config.load_universal_checkpoint = True
        try:
            self._load(universal)
        finally:
            config.load_universal_checkpoint = False

    def _load(self, folder: Path) -> None:
        path, _ = self.engine.load_checkpoint(
            str(folder), tag=self.TAG, load_optimizer_states=True, load_lr_scheduler_states=False
        )
        if path is None:
            raise ConfigError(f"no DeepSpeed checkpoint under {folder / self.TAG}")

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Every weight in full on rank 0 (other ranks get an empty dict); gathered under ZeRO-3."""
        deepspeed = import_deepspeed(self.device)
        gathered = contextlib.nullcontext()
        if self.engine.zero_optimization_stage() == 3:
            params = list(self.module.parameters())
            gathered = deepspeed.zero.GatheredParameters(params, modifier_rank=None)
        with gathered:
            state = {k: v.detach().float().cpu().clone() for k, v in self.module.state_dict().items()}
        return state if group_info().is_main else {}
