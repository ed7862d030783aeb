"""Data mixing: the mixer interface, its registry, and the mixers.

``build_mixer(method, domains, ...)`` is the one place a method name is looked up.
"""

from . import static  # noqa: F401 - registers "stratified" and "static"
from .base import MIXERS, Mixer, build_mixer, register_mixer

__all__ = ["MIXERS", "Mixer", "build_mixer", "register_mixer"]
