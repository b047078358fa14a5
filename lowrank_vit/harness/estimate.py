"""Moved to :mod:`lowrank_vit.repro.estimate` (this path warns and goes away in the next release)."""

from lowrank_vit.harness import forward

forward(__name__)
