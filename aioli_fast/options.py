"""What a mixing loop is told besides its model and corpus: :class:`MixingOptions`, with every default in
one place.

The native trainer builds one from its config (:meth:`aioli_fast.config.RunConfig.mixing_options`, whose
keys take these defaults), and every adapter takes these fields as keywords (the Hugging Face and
Lightning adapters) or as fields of its config (torchtitan's ``AioliDataLoader.Config`` inherits them).
Nothing here imports torch.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError


@dataclass(kw_only=True)
class MixingOptions:
    """How a corpus is mixed and measured, the same for every loop.

    Attributes:
        mixer: a method name (``"aioli"``, ``"odm"``, ``"static"``, ...), or in Python a built
            :class:`~aioli_fast.mixing.Mixer` over the same domains.
        mixer_options: the method's options (docs/mixing.md), for a mixer given by name.
        domains: the corpus domains to train on, in domain-id order (None: all, in the corpus order).
        proportions: ``{domain: weight}``, the prior / static proportions of methods that take them.
        seed: the stream's seed (the order of samples and of domain draws).
        assignment: how the slots of a global batch get their domains: ``categorical`` (i.i.d. draws,
            as the paper) or ``largest_remainder`` (exact counts).
        eval_split: the held-out split of per-domain evaluation and of probe / full-validation
            measurements (None, or a split the corpus lacks: neither).
        eval_batch_size: sequences per forward in evaluation and full-validation measurements.
        eval_max_sequences: at most this many sequences per domain in evaluation and full-validation
            measurements (None: the whole split). 64 by default, so that an evaluation costs about
            ``D x 64 / eval_batch_size`` forwards whatever the size of the held-out split.
        probe_sequences: sequences per domain of the fixed probe (``measurement: probe``).
        num_workers: reader processes of the stream (0: read in the training process).
        prefetch_factor: batches each reader prepares ahead.
    """

    mixer: str = "aioli"
    mixer_options: dict[str, Any] = field(default_factory=dict)
    domains: list[str] | None = None
    proportions: dict[str, float] | None = None
    seed: int = 0
    assignment: str = "categorical"
    eval_split: str | None = "val"
    eval_batch_size: int = 8
    eval_max_sequences: int | None = 64
    probe_sequences: int = 16
    num_workers: int = 0
    prefetch_factor: int = 2

    @classmethod
    def names(cls) -> list[str]:
        """The field names, in declaration order."""
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def default(cls, name: str) -> Any:
        """The default of field ``name`` (a fresh value for a mutable one)."""
        return getattr(cls(), name)

    @classmethod
    def from_keywords(cls, keywords: Mapping[str, Any], owner: str, **defaults: Any) -> MixingOptions:
        """The options a user gave as keywords to ``owner`` (an adapter), over the adapter's own
        ``defaults`` (for example its framework's data-loader settings), over the defaults here. An
        unknown keyword is a ConfigError naming the nearest field."""
        names = cls.names()
        for key in keywords:
            if key not in names:
                near = difflib.get_close_matches(key, names, n=1)
                hint = f"; did you mean {near[0]!r}?" if near else ""
                raise ConfigError(
                    f"{owner} got an unexpected keyword {key!r}{hint} (mixing options: {', '.join(names)})"
                )
        values = {**defaults, **keywords}
        values["mixer_options"] = dict(values.get("mixer_options") or {})
        return cls(**values)

    def picked(self) -> dict[str, Any]:
        """The fields as a dict (shallow: a built mixer stays the same object)."""
        return {name: getattr(self, name) for name in self.names()}
