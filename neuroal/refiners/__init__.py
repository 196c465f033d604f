"""Mask refiners, by name (see `neuroal.refiners.base`): DSnoT."""

from neuroal.refiners.base import REFINERS, Refiner  # noqa: F401
from neuroal.refiners import dsnot  # noqa: F401,E402  (registers the built-ins)
