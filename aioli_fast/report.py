"""``aioli-fast report``: compare run directories in a Markdown page with figures.

A run directory is what ``aioli-fast train`` writes: ``config.yaml`` (always, written first),
``metrics.jsonl`` (training and evaluation records, see :mod:`aioli_fast.train.logger`) and, once the run
has finished, ``final.json``. A run without ``final.json`` (still training, stopped or crashed) is
reported as *unfinished* from its metrics; a last metrics line without its newline in such a run is
the one being written and is ignored. Anything else that cannot be read, and a field the report reads
that has the wrong type, is an :class:`AioliError` naming the file (and line, and field).

The report (``--out``, default ``./report``) holds ``report.md`` and the figures it links, with
relative links so the folder can be moved or committed as a whole:

- ``train_loss.png``: training loss, then one panel per domain (the per-domain training loss of each
  logging window), one line per run;
- ``proportions.png``: one panel per run, the mixture proportions over the steps as stacked areas;
- ``val_loss.png`` (when a run has evaluation records or a final validation): validation loss, one panel
  for the average and one per domain, one line per run; a finished run's last point is its final.json.

The report is all or nothing: everything is read, checked and drawn before the first file is written,
and the files are renamed into place together (``report.md`` last), so a failure leaves ``--out`` as it
was. Figures are drawn with matplotlib's Agg canvas (no display, no pyplot state). Domains are matched
across runs by name, in the order they are first seen.
"""

from __future__ import annotations

import io
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import yaml

from .config import yaml_problem
from .errors import AioliError
from .fileio import ensure_writable_dir

FIGURES = ("train_loss.png", "proportions.png", "val_loss.png")


@dataclass
class RunData:
    """What a report needs of one run directory."""

    path: Path
    config: dict
    train: list[dict] = field(default_factory=list)  # training records, by step (one per step)
    evals: list[dict] = field(default_factory=list)  # evaluation records, by step
    final: dict | None = None  # final.json; None for an unfinished run
    label: str = ""

    @property
    def finished(self) -> bool:
        return self.final is not None

    @property
    def domains(self) -> list[str]:
        """The run's domains: final.json's, else the config's, else those named by the records."""
        if self.final and isinstance(self.final.get("domains"), list):
            return [str(d) for d in self.final["domains"]]
        configured = (self.config.get("data") or {}).get("domains")
        if isinstance(configured, list) and configured:
            return [str(d) for d in configured]
        names: dict[str, None] = {}
        for record in self.train:
            names.update(dict.fromkeys(record.get("domain_loss") or {}))
            names.update(dict.fromkeys(record.get("proportions") or {}))
        return list(names)

    @property
    def method(self) -> str:
        if self.final and isinstance(self.final.get("mixer"), dict) and "method" in self.final["mixer"]:
            return str(self.final["mixer"]["method"])
        return str((self.config.get("mixing") or {}).get("method", "?"))

    @property
    def planned_steps(self) -> int | None:
        steps = (self.config.get("train") or {}).get("steps")
        return steps if isinstance(steps, int) else None

    @property
    def steps(self) -> int | None:
        if self.final is not None and isinstance(self.final.get("steps"), int):
            return self.final["steps"]
        return self.train[-1]["step"] if self.train else None

    @property
    def tokens(self) -> int | None:
        if self.final is not None and isinstance(self.final.get("tokens"), int):
            return self.final["tokens"]
        return self.train[-1].get("tokens") if self.train else None

    @property
    def tokens_per_s(self) -> float | None:
        """final.json's figure; for an unfinished run, the logging windows' tokens over their time.

        A window's time is its tokens over its ``tokens_per_s`` (``elapsed_s`` restarts on resume).
        """
        if self.final is not None:
            return self.final.get("tokens_per_s")
        tokens = seconds = 0.0
        previous = 0
        for record in self.train:
            total, rate = record.get("tokens"), record.get("tokens_per_s")
            if not _is_number(total):
                continue
            window = total - previous
            previous = total
            if _is_number(rate) and rate > 0 and window > 0:
                tokens += window
                seconds += window / rate
        return tokens / seconds if seconds > 0 else None

    @property
    def proportions(self) -> dict[str, float]:
        """The latest proportions: final.json's, else the last training record's."""
        if self.final is not None and isinstance(self.final.get("proportions"), dict):
            return self.final["proportions"]
        return (self.train[-1].get("proportions") or {}) if self.train else {}

    def status(self) -> str:
        if self.finished:
            return "finished"
        planned = self.planned_steps
        done = self.steps or 0
        return f"unfinished ({done} of {planned} steps)" if planned else f"unfinished ({done} steps)"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class _Damaged(Exception):
    """A field of a run file that is not what the report reads there (the message names the field)."""


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, (str, int, float)):
        text = repr(value)
        return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"
    return type(value).__name__


def _fail(field_name: str, rule: str, value: Any) -> NoReturn:
    raise _Damaged(f"'{field_name}' must be {rule}, got {_describe(value)}")


def _mapping(value: Any, field_name: str, *, null: bool = False) -> dict:
    if value is None and null:
        return {}
    if not isinstance(value, dict):
        _fail(field_name, "a mapping or null" if null else "a mapping", value)
    return value


def _number_or_null(value: Any, field_name: str) -> None:
    if value is not None and not _is_number(value):
        _fail(field_name, "a number or null", value)


def _count(value: Any, field_name: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        _fail(field_name, "a non-negative integer", value)


def _names(value: Any, field_name: str, *, null: bool = False) -> None:
    if value is None and null:
        return
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        _fail(field_name, "a list of names or null" if null else "a list of names", value)


def _string(value: Any, field_name: str) -> None:
    if not isinstance(value, str):
        _fail(field_name, "a string", value)


def _check_results(value: Any, field_name: str) -> None:
    """An evaluation result: ``{"domains": {d: {"loss", "ppl", ...}}, "average": {"loss", "ppl"}}``."""
    results = _mapping(value, field_name)
    if "domains" in results:
        for domain, per_domain in _mapping(results["domains"], f"{field_name}.domains").items():
            per_domain = _mapping(per_domain, f"{field_name}.domains.{domain}")
            for key in ("loss", "ppl"):
                if key in per_domain:
                    _number_or_null(per_domain[key], f"{field_name}.domains.{domain}.{key}")
    if "average" in results:
        average = _mapping(results["average"], f"{field_name}.average")
        for key in ("loss", "ppl"):
            if key in average:
                _number_or_null(average[key], f"{field_name}.average.{key}")


def _check_final(final: dict) -> None:
    """The fields of final.json that the report reads; a field that is absent is taken from elsewhere
    (the metrics, the config), one that is there must have the type the trainer writes."""
    for key in ("steps", "tokens"):
        if key in final:
            _count(final[key], key)
    if "tokens_per_s" in final:
        _number_or_null(final["tokens_per_s"], "tokens_per_s")
    if "domains" in final:
        _names(final["domains"], "domains")
    if "proportions" in final:
        for domain, value in _mapping(final["proportions"], "proportions").items():
            _number_or_null(value, f"proportions.{domain}")
    if "mixer" in final:
        mixer = _mapping(final["mixer"], "mixer")
        if "method" in mixer:
            _string(mixer["method"], "mixer.method")
    for split in ("val", "test"):
        if split in final:
            _check_results(final[split], split)
    if "average" in final:
        for key, value in _mapping(final["average"], "average").items():
            _number_or_null(value, f"average.{key}")


def _check_config(config: dict) -> None:
    """The keys of config.yaml that the report reads (a section may be null: the defaults)."""
    data = _mapping(config.get("data"), "data", null=True)
    mixing = _mapping(config.get("mixing"), "mixing", null=True)
    train = _mapping(config.get("train"), "train", null=True)
    if "domains" in data:
        _names(data["domains"], "data.domains", null=True)
    if "method" in mixing:
        _string(mixing["method"], "mixing.method")
    if "steps" in train and (not isinstance(train["steps"], int) or isinstance(train["steps"], bool)):
        _fail("train.steps", "an integer", train["steps"])


def _check_record(record: Any) -> str | None:
    """Why ``record`` is not a valid metrics record, or None when it is."""
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    step = record.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        return f"'step' must be a non-negative integer, got {step!r}"
    for key in ("domain_loss", "proportions"):
        if key in record:
            value = record[key]
            if not isinstance(value, dict) or not all(v is None or _is_number(v) for v in value.values()):
                return f"'{key}' must map domains to numbers or null"
    if "loss" in record and record["loss"] is not None and not _is_number(record["loss"]):
        return f"'loss' must be a number, got {record['loss']!r}"
    if "eval" in record and not isinstance(record["eval"], dict):
        return "'eval' must be an object of splits"
    try:
        for key in ("tokens", "tokens_per_s"):
            if key in record:
                _number_or_null(record[key], key)
        if "eval" in record and "val" in record["eval"]:
            _check_results(record["eval"]["val"], "eval.val")
    except _Damaged as exc:
        return str(exc)
    return None


def read_metrics(path: Path, *, tolerate_partial_last_line: bool = False) -> tuple[list[dict], list[dict]]:
    """(training records, evaluation records) of a ``metrics.jsonl``, each sorted by step.

    A step logged twice (a resumed run whose log was not truncated) keeps the record written last.
    Records of other kinds (neither ``loss`` nor ``eval``) are skipped. A damaged line is an
    :class:`AioliError` naming the file and line, except a last line without its newline when
    ``tolerate_partial_last_line`` (a run still writing it).
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise AioliError(f"cannot read {path}: {exc.strerror or exc}") from exc
    lines = data.splitlines(keepends=True)
    train: dict[int, dict] = {}
    evals: dict[int, dict] = {}
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        partial = number == len(lines) and not raw.endswith(b"\n")
        try:
            record = json.loads(raw)
            problem = _check_record(record)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            problem = f"not valid JSON ({exc.msg if isinstance(exc, json.JSONDecodeError) else exc.reason})"
        if problem is not None:
            if partial and tolerate_partial_last_line:
                break
            raise AioliError(f"{path}:{number}: damaged metrics record: {problem}")
        if "eval" in record:
            evals[record["step"]] = record
        elif "loss" in record:
            train[record["step"]] = record
    return [train[s] for s in sorted(train)], [evals[s] for s in sorted(evals)]


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_bytes())
    except OSError as exc:
        raise AioliError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AioliError(f"{path} is damaged: not valid JSON ({exc})") from exc
    if not isinstance(value, dict):
        raise AioliError(f"{path} is damaged: expected a JSON object, got {type(value).__name__}")
    return value


def load_run(path: str | Path) -> RunData:
    """Read one run directory (config.yaml, metrics.jsonl if any, final.json if any)."""
    path = Path(path)
    if not path.is_dir():
        what = "does not exist" if not path.exists() else "is not a directory"
        raise AioliError(f"{path} {what}; expected a run directory (train.out_dir/train.name)")
    config_path = path / "config.yaml"
    if not config_path.is_file():
        raise AioliError(f"{path} is not a run directory: it has no config.yaml")
    try:
        raw = config_path.read_bytes()
    except OSError as exc:
        raise AioliError(f"cannot read {config_path}: {exc.strerror or exc}") from exc
    try:
        config = yaml.safe_load(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise AioliError(f"{config_path} is damaged: not UTF-8 text (byte {exc.start})") from exc
    except yaml.YAMLError as exc:
        raise AioliError(f"{config_path} is damaged: not valid YAML ({yaml_problem(exc)})") from exc
    if not isinstance(config, dict):
        raise AioliError(f"{config_path} is damaged: expected a mapping of config sections")
    try:
        _check_config(config)
    except _Damaged as exc:
        raise AioliError(f"{config_path} is damaged: {exc}") from None
    final_path = path / "final.json"
    final = _read_json(final_path) if final_path.exists() else None
    if final is not None:
        try:
            _check_final(final)
        except _Damaged as exc:
            raise AioliError(f"{final_path} is damaged: {exc}") from None
    train, evals = [], []
    metrics_path = path / "metrics.jsonl"
    if metrics_path.exists():
        train, evals = read_metrics(metrics_path, tolerate_partial_last_line=final is None)
    return RunData(path=path, config=config, train=train, evals=evals, final=final, label=path.name)


def _label_runs(runs: list[RunData]) -> None:
    """Distinct labels: the directory name, with parents added where names repeat."""
    for depth in range(1, 4):
        labels = ["/".join(r.path.resolve().parts[-depth:]) for r in runs]
        if len(set(labels)) == len(labels):
            break
    else:
        labels = [f"{label} ({i + 1})" for i, label in enumerate(labels)]
    for run, label in zip(runs, labels):
        run.label = label


def _all_domains(runs: list[RunData]) -> list[str]:
    names: dict[str, None] = {}
    for run in runs:
        names.update(dict.fromkeys(run.domains))
    return list(names)


# --- figures ----------------------------------------------------------------------------------------


def _new_figure(panels: int, *, panel_width: float = 4.6, panel_height: float = 3.2, columns: int = 3):
    from matplotlib.figure import Figure

    cols = min(columns, panels)
    rows = -(-panels // cols)
    fig = Figure(figsize=(panel_width * cols, panel_height * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[panels:]:
        ax.set_visible(False)
    return fig, axes[:panels]


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _value(v: Any) -> float:
    return float(v) if _is_number(v) else math.nan


def _run_colors(runs: list[RunData]) -> dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if len(runs) <= 10 else "tab20"]
    return {run.label: cmap(i % cmap.N) for i, run in enumerate(runs)}


def plot_train_loss(runs: list[RunData], domains: list[str]) -> bytes:
    """Training loss and per-domain training loss against step, one line per run."""
    fig, axes = _new_figure(1 + len(domains))
    colors = _run_colors(runs)
    titles = ["training loss (all domains)", *(f"{d}: training loss" for d in domains)]
    for i, ax in enumerate(axes):
        for run in runs:
            steps = [r["step"] for r in run.train]
            if i == 0:
                ys = [_value(r.get("loss")) for r in run.train]
            else:
                ys = [_value((r.get("domain_loss") or {}).get(domains[i - 1])) for r in run.train]
            if steps and not all(math.isnan(y) for y in ys):
                ax.plot(steps, ys, label=run.label, color=colors[run.label], linewidth=1.4)
        ax.set_title(titles[i], fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    return _png(fig)


@dataclass
class ProportionPanel:
    """One panel of a proportions figure: per domain the proportion at each of ``steps`` and, optionally,
    a band around it (``band[domain] = (low, high)``, e.g. the range over seeds)."""

    title: str
    steps: list[int]
    values: dict[str, list[float]]
    band: dict[str, tuple[list[float], list[float]]] = field(default_factory=dict)


def run_panels(runs: list[RunData], domains: list[str]) -> list[ProportionPanel]:
    """One panel per run: its logged proportions (a domain it does not log at 0)."""
    panels = []
    for run in runs:
        records = [r for r in run.train if r.get("proportions")]
        # a record's proportions are those of its window's last step: drawn over the window, back to the
        # previous record (the first one back to step 0)
        if records and records[0]["step"] > 0:
            records = [{**records[0], "step": 0}, *records]
        values = {d: [_value(r["proportions"].get(d)) for r in records] for d in domains}
        values = {d: [0.0 if math.isnan(v) else v for v in row] for d, row in values.items()}
        panels.append(ProportionPanel(f"{run.label} ({run.method})", [r["step"] for r in records], values))
    return panels


def plot_proportions(
    panels: list[ProportionPanel], domains: list[str], *, stacked: bool = True, title: str | None = None
) -> bytes:
    """One panel per entry of ``panels``: the proportions of every domain over the steps, as stacked
    areas (``stacked``, the report's runs) or as lines with their bands shaded (a sweep's means over
    seeds, kept off 0 and 1 so that a proportion there stays visible)."""
    from matplotlib import colormaps

    fig, axes = _new_figure(len(panels), columns=2, panel_width=5.6, panel_height=3.4)
    cmap = colormaps["tab10" if len(domains) <= 10 else "tab20"]
    colors = [cmap(i % cmap.N) for i in range(len(domains))]
    for ax, panel in zip(axes, panels):
        steps = panel.steps
        if steps and stacked:
            stacks = [panel.values[d] for d in domains]
            ax.stackplot(steps, stacks, labels=domains, colors=colors, alpha=0.85, step="pre")
        elif steps:
            for d, color in zip(domains, colors):
                ax.plot(steps, panel.values[d], color=color, label=d, linewidth=1.4)
                if d in panel.band:
                    ax.fill_between(steps, *panel.band[d], color=color, alpha=0.18, linewidth=0)
        else:
            ax.text(0.5, 0.5, "no proportions logged", ha="center", va="center", transform=ax.transAxes)
        if steps:
            ax.set_xlim(steps[0], steps[-1] if steps[-1] > steps[0] else steps[0] + 1)
        ax.set_ylim(*((0, 1) if stacked else (-0.02, 1.02)))
        ax.set_title(panel.title, fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel("proportion")
    handles, labels = axes[0].get_legend_handles_labels()
    if not handles:  # the first panel has none: draw the legend from the colours alone
        from matplotlib.patches import Patch

        handles, labels = [Patch(color=c) for c in colors], domains
    fig.legend(handles, labels, loc="outside right upper", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return _png(fig)


def validation_points(run: RunData) -> list[tuple[int, dict]]:
    """(step, validation results) from the evaluation records, then the final validation if any."""
    points = [(r["step"], r["eval"]["val"]) for r in run.evals if isinstance(r["eval"].get("val"), dict)]
    if run.final is not None and isinstance(run.final.get("val"), dict) and _is_number(run.steps):
        if not points or points[-1][0] < run.steps:
            points.append((run.steps, run.final["val"]))
    return points


def plot_val_loss(runs: list[RunData], domains: list[str]) -> bytes:
    """Validation loss (average over domains, then per domain) against step, one line per run."""
    fig, axes = _new_figure(1 + len(domains))
    colors = _run_colors(runs)
    for i, ax in enumerate(axes):
        for run in runs:
            points = validation_points(run)
            if i == 0:
                ys = [_value((res.get("average") or {}).get("loss")) for _, res in points]
            else:
                ys = [
                    _value(((res.get("domains") or {}).get(domains[i - 1]) or {}).get("loss"))
                    for _, res in points
                ]
            if points and not all(math.isnan(y) for y in ys):
                steps = [s for s, _ in points]
                ax.plot(steps, ys, marker="o", markersize=3, label=run.label, color=colors[run.label])
        title = "validation loss (average)" if i == 0 else f"{domains[i - 1]}: validation loss"
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    return _png(fig)


# --- the Markdown page ------------------------------------------------------------------------------


def _cell(value: Any, fmt: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if _is_number(value) and fmt:
        return format(value, fmt)
    return str(value).replace("|", "\\|")


def _table(header: list[str], rows: list[list[str]], numeric_from: int = 1) -> list[str]:
    align = ["---" if i < numeric_from else "---:" for i in range(len(header))]
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _average(run: RunData, key: str) -> Any:
    if run.final is None:
        return None
    return (run.final.get("average") or {}).get(key)


def render_markdown(runs: list[RunData], domains: list[str], figures: list[str], out: Path) -> str:
    """The text of report.md (figures and run directories linked relative to ``out``)."""
    lines = ["# Run comparison", ""]
    for run in runs:
        link = Path(os.path.relpath(run.path.resolve(), out.resolve())).as_posix()
        lines.append(f"- **{_cell(run.label)}**: [`{link}`]({link}), {run.status()}")
    lines += ["", "## Summary", ""]
    header = ["run", "method", "steps", "tokens", "tokens/s"]
    header += ["val loss", "val ppl", "test loss", "test ppl"]
    rows = [
        [
            _cell(run.label) + ("" if run.finished else " (unfinished)"),
            _cell(run.method),
            _cell(run.steps),
            _cell(run.tokens, ","),
            _cell(run.tokens_per_s, ",.0f"),
            _cell(_average(run, "val_loss"), ".4f"),
            _cell(_average(run, "val_ppl"), ".3f"),
            _cell(_average(run, "test_loss"), ".4f"),
            _cell(_average(run, "test_ppl"), ".3f"),
        ]
        for run in runs
    ]
    lines += _table(header, rows, numeric_from=2)
    lines += [
        "",
        "Loss: mean token negative log-likelihood in nats; ppl = exp(loss); the val and test figures are "
        "plain means over the domains (final.json). Unfinished runs have none.",
    ]
    for split, title in (("test", "Per-domain test perplexity"), ("val", "Per-domain validation perplexity")):
        if not any(run.final is not None and isinstance(run.final.get(split), dict) for run in runs):
            continue
        rows = []
        for run in runs:
            per_domain = ((run.final or {}).get(split) or {}).get("domains") or {}
            rows.append(
                [_cell(run.label), *(_cell((per_domain.get(d) or {}).get("ppl"), ".3f") for d in domains)]
            )
        lines += ["", f"## {title}", "", *_table(["run", *domains], rows)]
    rows = [[_cell(run.label), *(_cell(run.proportions.get(d), ".3f") for d in domains)] for run in runs]
    lines += ["", "## Final proportions", "", *_table(["run", *domains], rows)]
    captions = {
        "train_loss.png": "Training loss",
        "proportions.png": "Mixture proportions",
        "val_loss.png": "Validation loss",
    }
    for name in figures:
        lines += ["", f"## {captions[name]}", "", f"![{captions[name]}]({name})"]
    return "\n".join(lines) + "\n"


@dataclass
class Report:
    """A written report: ``report.md``, the figures it links, and the runs it compares."""

    path: Path
    figures: list[Path]
    runs: list[RunData]


def write_report(run_dirs: list[str | Path], out: str | Path = "report") -> Report:
    """Read ``run_dirs``, write the figures and ``report.md`` to the folder ``out``.

    All or nothing: every run is read and checked and every file drawn before anything is written; the
    files are then written beside their places and renamed into them, report.md last. A failure leaves
    ``out`` as it was. Figures of an earlier report in ``out`` that this one does not draw are removed,
    so report.md and the folder agree.
    """
    if not run_dirs:
        raise AioliError("no run directory given")
    runs = [load_run(p) for p in run_dirs]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise AioliError("the report needs matplotlib: pip install 'matplotlib>=3.7'") from None
    _label_runs(runs)
    domains = _all_domains(runs)
    out = Path(out)
    files = {
        "train_loss.png": plot_train_loss(runs, domains),
        "proportions.png": plot_proportions(run_panels(runs, domains), domains),
    }
    if any(validation_points(run) for run in runs):
        files["val_loss.png"] = plot_val_loss(runs, domains)
    figures = list(files)
    files["report.md"] = render_markdown(runs, domains, figures, out).encode("utf-8")
    _write_files(out, files, stale=[name for name in FIGURES if name not in files])
    return Report(out / "report.md", [out / name for name in figures], runs)


def _write_files(out: Path, files: dict[str, bytes], stale: list[str]) -> None:
    """Write ``files`` (name -> content, renamed into place in this order) into the folder ``out`` and
    remove the files named by ``stale``, all or nothing: nothing is replaced unless every file has been
    written in full; an :class:`AioliError` otherwise, with ``out`` as it was."""
    created = not out.exists()
    out = ensure_writable_dir(out, "report directory")
    for name in [*files, *stale]:
        target = out / name
        if target.is_dir() and not target.is_symlink():
            raise AioliError(f"{target} is in the way: a folder where the report writes a file")
    staged: dict[str, str] = {}
    done = False
    try:
        for name, data in files.items():
            fd, staged[name] = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=out)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        last = list(files)[-1]
        for name in files:
            if name == last:
                for old in stale:
                    (out / old).unlink(missing_ok=True)
            os.replace(staged[name], out / name)
            del staged[name]
        done = True
    except OSError as exc:
        raise AioliError(f"cannot write the report to {out}: {exc.strerror or exc}") from exc
    finally:
        for tmp in staged.values():
            Path(tmp).unlink(missing_ok=True)
        if created and not done:
            try:
                out.rmdir()  # made for this report, which was not written
            except OSError:
                pass
