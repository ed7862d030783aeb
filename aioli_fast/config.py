"""Run configuration: YAML files loaded into typed dataclasses.

Every section is a dataclass; loading checks each key against the fields (an unknown key is an error
that names it and the nearest valid key) and each value against the field's type. ``key=value``
overrides from the command line use dotted paths (``train.steps=200``) and YAML values
(``mixing.proportions=[0.5, 0.5]``). The resolved config is written into every run directory.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import importlib.util
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError
from .options import MixingOptions


@dataclass
class ModelSection:
    """The decoder. ``preset`` gives the shape; any other field set here overrides the preset."""

    preset: str = "tiny"
    vocab_size: int | None = None  # default: the corpus vocabulary rounded up to a multiple of 64
    max_seq_len: int | None = None  # default: the corpus seq_len
    d_model: int | None = None
    n_layers: int | None = None
    n_heads: int | None = None
    d_ff: int | None = None
    rotary_fraction: float | None = None


@dataclass
class DataSection:
    """The prepared corpus (output of ``aioli-fast prepare``)."""

    path: str = ""
    domains: list[str] | None = None  # a subset, in domain-id order; default all, in manifest order
    # categorical (i.i.d., as the paper) | largest_remainder
    assignment: str = MixingOptions.assignment
    # DataLoader processes reading shards; 0 reads in the training process
    num_workers: int = MixingOptions.num_workers
    prefetch_factor: int = MixingOptions.prefetch_factor  # batches each worker prepares ahead
    on_error: str = "raise"  # raise | skip (bad samples replaced, counted and warned about)
    # a corpus on object storage (data.path an s3:// gs:// https:// ... URL): where its shards are cached,
    # the cache's bound in GiB, and fsspec options of the filesystem (docs/data.md)
    cache_dir: str | None = None  # default $AIOLI_CACHE_DIR or ~/.cache/aioli_fast
    cache_gb: float | None = None  # default $AIOLI_CACHE_GB or 50
    storage_options: dict[str, Any] | None = None

    def manifest(self):
        """The corpus at ``path`` (a folder or a URL, read through the cache)."""
        from .data import load_manifest

        return load_manifest(
            self.path, cache_dir=self.cache_dir, cache_gb=self.cache_gb, storage_options=self.storage_options
        )

    def check(self) -> None:
        """Ranges and choices of the data options (called by :meth:`RunConfig.validate`)."""
        from .data.stream import ASSIGNMENT_RULES, ON_ERROR

        if self.assignment not in ASSIGNMENT_RULES:
            raise ConfigError(
                f"data.assignment must be one of {', '.join(ASSIGNMENT_RULES)}; got {self.assignment!r}"
            )
        if self.on_error not in ON_ERROR:
            raise ConfigError(f"data.on_error must be one of {', '.join(ON_ERROR)}; got {self.on_error!r}")
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {self.num_workers}")
        if self.prefetch_factor < 1:
            raise ConfigError(f"data.prefetch_factor must be >= 1, got {self.prefetch_factor}")
        if self.cache_gb is not None and not self.cache_gb > 0:
            raise ConfigError(f"data.cache_gb must be positive, got {self.cache_gb}")


@dataclass
class MixingSection:
    """How the mixture proportions are set (docs/mixing.md has every method).

    ``static`` needs ``proportions`` (domain -> weight); for ``aioli`` they are the prior. Every other
    key is an option of a registered mixer (its ``OPTIONS``, which also give the defaults and types), so
    a mixer added with :func:`aioli_fast.mixing.register_mixer` takes its options from YAML as the
    built-in ones do. An option left unset means the method's default; setting an option the chosen
    method does not use is an error when the mixer is built.
    """

    method: str = "stratified"
    proportions: dict[str, float] | None = None
    probe_sequences: int = MixingOptions.probe_sequences  # per domain, for measurement: probe
    settings: dict[str, Any] = field(default_factory=dict)  # the options that are set (YAML: beside method)

    @classmethod
    def from_mapping(cls, data: Any, prefix: str) -> MixingSection:
        """The section from its YAML mapping: the fixed keys, then options checked against the registry."""
        from .mixing import option_types

        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"{prefix}: expected a mapping, got {type(data).__name__} {data!r}")
        hints = typing.get_type_hints(cls)
        method = data.get("method", cls.method)
        types_by_name = option_types(method if isinstance(method, str) else None)
        fixed: dict[str, Any] = {}
        settings: dict[str, Any] = {}
        for key, value in data.items():
            path = f"{prefix}.{key}"
            if key in MIXING_KEYS:
                fixed[key] = _coerce(value, hints[key], path)
            elif key in types_by_name:
                value = _coerce(value, typing.Optional[types_by_name[key]], path)  # noqa: UP045
                if value is not None:
                    settings[key] = value
            elif value is not None:  # null is "unset" (an option of a mixer not registered in this process)
                _unknown_key(path, str(key), prefix, [*MIXING_KEYS[:2], *types_by_name, MIXING_KEYS[2]])
        return cls(**fixed, settings=settings)

    def options(self) -> dict:
        """The method options that are set (everything but method, proportions and probe_sequences)."""
        return dict(self.settings)

    def option(self, name: str) -> Any:
        """The value of option ``name`` when it is set, else None (the method's default applies)."""
        return self.settings.get(name)

    def to_dict(self) -> dict:
        """The section as it is written in YAML: every option of every registered mixer, None if unset."""
        from .mixing import option_types

        names = [*option_types(self.method), *(k for k in self.settings)]
        return {
            "method": self.method,
            "proportions": copy.deepcopy(self.proportions),
            **{name: copy.deepcopy(self.settings.get(name)) for name in dict.fromkeys(names)},
            "probe_sequences": self.probe_sequences,
        }


#: the keys of the mixing section that are not method options
MIXING_KEYS = ("method", "proportions", "probe_sequences")


@dataclass
class OptimSection:
    """AdamW with linear warm-up and cosine decay to ``min_lr_ratio * lr``."""

    lr: float = 5e-4
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    warmup_steps: int = 500
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0  # 0 disables clipping


@dataclass
class TrainSection:
    """The loop. ``batch_size`` sequences per optimizer step over all ranks (the global batch); each rank
    takes ``batch_size / world_size`` of them in micro-batches of ``micro_batch_size``."""

    steps: int = 1000
    batch_size: int = 8
    micro_batch_size: int | None = None  # per rank; default: batch_size / world_size (no accumulation)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 | fp32
    log_every: int = 10
    out_dir: str = "runs"
    name: str | None = None  # default: the config file's stem
    overwrite: bool = False
    progress: bool = True
    on_nan: str = "stop"  # stop | skip (a step whose loss or gradients are not finite is not applied)
    max_skipped_fraction: float = 0.05  # on_nan=skip: more skipped steps than this share of steps fails
    tensorboard: str = "auto"  # auto (when the tensorboard package is installed) | on | off
    compile: bool = False  # torch.compile the model (its loss is one registered operator: one graph)
    threads: int | None = None  # CPU threads per process; default: OMP_NUM_THREADS, else cores / processes


@dataclass
class EngineSection:
    """What runs the model and optimizer: plain PyTorch (one process) or DeepSpeed (ZeRO, many processes).

    ``auto`` picks DeepSpeed when the run was launched with more than one process (``torchrun``, the
    ``deepspeed`` launcher) or ``zero_stage`` is at least 1, and plain PyTorch otherwise.
    """

    backend: str = "auto"  # auto | torch | deepspeed
    zero_stage: int = 0  # DeepSpeed ZeRO stage 0-3
    dist_backend: str = "auto"  # auto (nccl on CUDA, gloo on CPU) | nccl | gloo
    torch_adam: bool = True  # DeepSpeed: torch's AdamW (False: DeepSpeed's compiled FusedAdam, CUDA)
    offload_optimizer: bool = False  # DeepSpeed ZeRO >= 1: optimizer state in host memory
    deepspeed_config: str | None = None  # a JSON file of DeepSpeed keys merged over the generated ones

    def check(self) -> None:
        if self.backend not in ("auto", "torch", "deepspeed"):
            raise ConfigError(f"engine.backend must be one of auto, torch, deepspeed; got {self.backend!r}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"engine.zero_stage must be 0, 1, 2 or 3; got {self.zero_stage}")
        if self.backend == "torch" and self.zero_stage:
            raise ConfigError(
                f"engine.zero_stage={self.zero_stage} needs engine.backend=deepspeed (or auto), not torch"
            )
        if self.dist_backend not in ("auto", "nccl", "gloo"):
            raise ConfigError(
                f"engine.dist_backend must be one of auto, nccl, gloo; got {self.dist_backend!r}"
            )
        if self.offload_optimizer and self.zero_stage == 0:
            raise ConfigError("engine.offload_optimizer needs engine.zero_stage >= 1")


@dataclass
class CheckpointSection:
    """Checkpoints of the whole run (model, optimizer, mixer, data stream, RNG, step) for resume."""

    every: int = 0  # steps between checkpoints; 0: none during training (SIGTERM still writes one)
    keep_last: int = 2  # checkpoints kept; older ones are deleted once a newer one is complete
    resume: str = "auto"  # auto (the run directory's latest checkpoint, if any) | never | PATH
    on_sigterm: bool = True  # SIGTERM: finish the step, write a checkpoint, exit with status 143
    dir: str | None = None  # default: RUN_DIR/checkpoints (must be shared by all nodes)
    # resume on a corpus other than the checkpoint's (prepared again) on purpose: the model, optimizer and
    # mixer continue, the data stream starts afresh on the new corpus at the resumed step
    new_corpus: bool = False

    def check(self) -> None:
        if self.every < 0:
            raise ConfigError(f"checkpoint.every must be >= 0, got {self.every}")
        if self.keep_last < 1:
            raise ConfigError(f"checkpoint.keep_last must be >= 1, got {self.keep_last}")
        if not self.resume:
            raise ConfigError("checkpoint.resume must be auto, never or a checkpoint directory")


@dataclass
class EvalSection:
    """Per-domain evaluation on the held-out splits."""

    every: int = 0  # validation every N steps during training; 0: only at the end
    batch_size: int = 16
    max_sequences: int | None = None  # per domain and split; default: the whole split


WANDB_MODES = ("online", "offline", "disabled")


@dataclass
class WandbSection:
    """Weights & Biases: the scalars TensorBoard gets (loss, per-domain losses, proportions, mixer and
    data metrics, evaluations), logged by rank 0 when ``project`` is set."""

    project: str | None = None  # set to log to W&B
    name: str | None = None  # the run's name; default train.name
    entity: str | None = None  # a team or user; default the account's
    mode: str = "online"  # online | offline (written locally, `wandb sync` later) | disabled
    dir: str | None = None  # where wandb writes its files; default the run directory


@dataclass
class LoggingSection:
    """Where the metrics go besides ``metrics.jsonl`` (TensorBoard: ``train.tensorboard``)."""

    wandb: WandbSection = field(default_factory=WandbSection)


@dataclass
class RunConfig:
    """A complete training run."""

    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    mixing: MixingSection = field(default_factory=MixingSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    engine: EngineSection = field(default_factory=EngineSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)

    def to_dict(self) -> dict:
        return {
            f.name: self.mixing.to_dict() if f.name == "mixing" else dataclasses.asdict(getattr(self, f.name))
            for f in dataclasses.fields(self)
        }

    def mixing_options(self) -> MixingOptions:
        """What the run tells its mixing loop, as the adapters are told it (the held-out split of
        measurements is ``val``; the stream's seed is ``train.seed``)."""
        return MixingOptions(
            mixer=self.mixing.method,
            mixer_options=self.mixing.options(),
            domains=copy.deepcopy(self.data.domains),
            proportions=copy.deepcopy(self.mixing.proportions),
            seed=self.train.seed,
            assignment=self.data.assignment,
            eval_split="val",
            eval_batch_size=self.eval.batch_size,
            eval_max_sequences=self.eval.max_sequences,
            probe_sequences=self.mixing.probe_sequences,
            num_workers=self.data.num_workers,
            prefetch_factor=self.data.prefetch_factor,
        )

    def validate(self) -> None:
        """Checks that no single type can express: ranges, finiteness, cross-field agreement."""
        t, o, e = self.train, self.optim, self.eval
        checks = [
            ("train.steps", t.steps, t.steps >= 1, ">= 1"),
            ("train.batch_size", t.batch_size, t.batch_size >= 1, ">= 1"),
            ("train.log_every", t.log_every, t.log_every >= 1, ">= 1"),
            ("train.seed", t.seed, t.seed >= 0, ">= 0"),
            ("train.threads", t.threads, t.threads is None or t.threads >= 1, ">= 1 (or null: default)"),
            (
                "train.max_skipped_fraction",
                t.max_skipped_fraction,
                0 <= t.max_skipped_fraction <= 1,
                "in [0, 1]",
            ),
            ("eval.batch_size", e.batch_size, e.batch_size >= 1, ">= 1"),
            ("eval.every", e.every, e.every >= 0, ">= 0"),
            (
                "eval.max_sequences",
                e.max_sequences,
                e.max_sequences is None or e.max_sequences >= 1,
                ">= 1 (or null for all)",
            ),
            ("optim.lr", o.lr, math.isfinite(o.lr) and o.lr > 0, "finite and > 0"),
            (
                "optim.weight_decay",
                o.weight_decay,
                math.isfinite(o.weight_decay) and o.weight_decay >= 0,
                "finite and >= 0",
            ),
            ("optim.beta1", o.beta1, 0 <= o.beta1 < 1, "in [0, 1)"),
            ("optim.beta2", o.beta2, 0 <= o.beta2 < 1, "in [0, 1)"),
            ("optim.eps", o.eps, math.isfinite(o.eps) and o.eps > 0, "finite and > 0"),
            ("optim.warmup_steps", o.warmup_steps, o.warmup_steps >= 0, ">= 0"),
            ("optim.min_lr_ratio", o.min_lr_ratio, 0 <= o.min_lr_ratio <= 1, "in [0, 1]"),
            (
                "optim.grad_clip",
                o.grad_clip,
                math.isfinite(o.grad_clip) and o.grad_clip >= 0,
                "finite and >= 0 (0 disables clipping)",
            ),
        ]
        for key, value, ok, rule in checks:
            if not ok:
                raise ConfigError(f"{key} must be {rule}, got {value}")
        if t.compile and self.engine.backend != "torch" and self.engine.zero_stage == 3:
            raise ConfigError(
                "train.compile=true with engine.zero_stage=3 is not supported (ZeRO-3 gathers parameters "
                "in hooks the compiled graph would have to trace); use ZeRO-1/2, or train.compile=false"
            )
        w = self.logging.wandb
        if w.mode not in WANDB_MODES:
            raise ConfigError(f"logging.wandb.mode must be one of {', '.join(WANDB_MODES)}; got {w.mode!r}")
        if w.project is not None and w.mode != "disabled" and importlib.util.find_spec("wandb") is None:
            raise ConfigError(
                "logging.wandb.project is set but the wandb package is not installed: pip install wandb, "
                "or leave logging.wandb.project unset"
            )
        mb = t.micro_batch_size
        if mb is not None and (mb < 1 or t.batch_size % mb):
            raise ConfigError(
                f"train.micro_batch_size ({mb}) must be positive and divide train.batch_size ({t.batch_size})"
            )
        if t.on_nan not in ("stop", "skip"):
            raise ConfigError(f"train.on_nan must be stop or skip; got {t.on_nan!r}")
        if t.tensorboard not in ("auto", "on", "off"):
            raise ConfigError(f"train.tensorboard must be one of auto, on, off; got {t.tensorboard!r}")
        if t.precision not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"train.precision must be one of auto, bf16, fp32; got {t.precision!r}")
        if not _DEVICE_RE.fullmatch(t.device):
            raise ConfigError(f"train.device must be auto, cpu, cuda or cuda:N; got {t.device!r}")
        if t.name is not None and (not t.name or t.name in (".", "..") or "/" in t.name or "\\" in t.name):
            raise ConfigError(f"train.name must be a plain folder name (no '/' or '..'); got {t.name!r}")
        if self.mixing.probe_sequences < 1:
            raise ConfigError(f"mixing.probe_sequences must be >= 1, got {self.mixing.probe_sequences}")
        if not self.data.path:
            raise ConfigError("data.path is not set: point it at a corpus made by `aioli-fast prepare`")
        self.data.check()
        self.engine.check()
        self.checkpoint.check()


_DEVICE_RE = re.compile(r"auto|cpu|cuda(:\d+)?")
#: string options whose documented values include ``on`` and ``off``, which YAML 1.1 reads as booleans:
#: a boolean there means the word
ON_OFF_KEYS = ("train.tensorboard",)
_FLOAT_RE = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp, key: str):
    """Check ``value`` against the annotation ``tp``; returns the value (ints accepted for floats)."""
    if tp is Any:
        return value  # passed on as given (data.storage_options' values)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[0]
    if tp is MixingSection:
        return MixingSection.from_mapping(value, key)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        kt, vt = typing.get_args(tp)
        return {_coerce(k, kt, f"{key} key"): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str) and _FLOAT_RE.match(value.strip()):
        return float(value)  # YAML 1.1 reads "1e-3" (no dot) as a string
    if tp is str and isinstance(value, bool) and key in ON_OFF_KEYS:
        return "on" if value else "off"  # `tensorboard: off` unquoted
    if tp in (int, float, str, bool):
        if type(value) is not tp:
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {tp}")  # a bug in a section definition


def _build(cls, data, prefix: str):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            _unknown_key(path, str(key), prefix, names)
        kwargs[key] = _coerce(value, hints[key], path)
    return cls(**kwargs)


def _unknown_key(path: str, key: str, prefix: str, names: list[str]) -> typing.NoReturn:
    near = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
    hint = f"; did you mean '{prefix + '.' if prefix else ''}{near[0]}'?" if near else ""
    raise ConfigError(f"unknown config key '{path}'{hint} (valid keys here: {', '.join(names)})")


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value (for example train.steps=100)")
    key, raw = text.split("=", 1)
    if not key.strip():
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({yaml_problem(exc)})") from exc
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Set dotted ``key=value`` overrides into a raw config mapping (values parsed as YAML)."""
    for text in overrides:
        path, value = _parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: '{part}' is not a section")
            node = child
        node[path[-1]] = value
    return data


def config_from_dict(data: dict, overrides: list[str] | None = None) -> RunConfig:
    """Build and validate a RunConfig from a raw mapping plus overrides."""
    data = apply_overrides(dict(data or {}), list(overrides or []))
    cfg = _build(RunConfig, data, "")
    cfg.validate()
    return cfg


def merge_mappings(base: dict, over: dict) -> dict:
    """A deep copy of ``base`` with ``over`` merged in: nested mappings merge key by key, anything else
    in ``over`` replaces the value in ``base``."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_mappings(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML error on one line: where (line and column, 1-based) and what, without the echoed source."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        context = f"{exc.context}, " if exc.context else ""
        return f"{where}{context}{exc.problem}"
    if isinstance(exc, yaml.reader.ReaderError):
        return f"character {exc.position}: {' '.join(str(exc).splitlines()[0].split())}"
    return " ".join(str(exc).split())


def read_yaml_mapping(path: str | Path, what: str) -> dict:
    """A YAML file whose top level is a mapping (empty file: {}); ConfigError naming the problem.

    The file must be UTF-8 text (a BOM is allowed); anything else, or a file that cannot be read, is a
    ConfigError naming the file (and the first byte that is not UTF-8).
    """
    path = Path(path)
    if not path.is_file():
        if path.exists():
            raise ConfigError(f"{what} {path} is not a file")
        raise ConfigError(f"{what} not found: {path}")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path} is not UTF-8 text (byte {exc.start}: {raw[exc.start : exc.start + 1]!r}); "
            f"save the {what} as UTF-8"
        ) from exc
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {yaml_problem(exc)}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML config file (or none: the defaults) and apply ``key=value`` overrides."""
    data = read_yaml_mapping(path, "config file") if path is not None else {}
    cfg = config_from_dict(data, overrides)
    if cfg.train.name is None and path is not None:
        cfg.train.name = Path(path).stem
    return cfg


def dump_config(cfg: RunConfig) -> str:
    """The config as YAML text (what is written into a run directory)."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
