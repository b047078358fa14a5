"""Moved to :mod:`lowrank_vit.cli.finetune` (this path warns and goes away in the next release)."""

from lowrank_vit.harness import forward

forward(__name__)
