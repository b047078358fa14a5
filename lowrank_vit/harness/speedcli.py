"""Moved to :mod:`lowrank_vit.cli.speed` (this path warns and goes away in the next release)."""

from lowrank_vit.harness import forward

forward(__name__)
