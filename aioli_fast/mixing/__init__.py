"""Data mixing: the LMO mathematics (``lmo``), the mixer interface and registry, and the mixers.

``build_mixer(method, domains, ...)`` is the one place a method name is looked up.
"""

from . import aioli, doge, doremi, odm, skillit, static  # noqa: F401 - register the mixers
from .base import MEASUREMENTS, MIXERS, Mixer, build_mixer, option_types, register_mixer
from .sums import DomainSums

__all__ = ["MEASUREMENTS", "MIXERS", "DomainSums", "Mixer", "build_mixer", "option_types", "register_mixer"]
