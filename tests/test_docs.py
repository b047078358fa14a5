"""The README documents what the code has: a new CompressionConfig field cannot land undocumented."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from lowrank_vit import CompressionConfig

README = Path(__file__).resolve().parents[1] / "README.md"


def test_every_compression_config_field_is_in_the_readme_table():
    text = README.read_text()
    table = text[text.index("### CompressionConfig"):text.index("Which layers:")]
    documented = set(re.findall(r"`([a-z_0-9]+)`", table))
    fields = {field.name for field in dataclasses.fields(CompressionConfig)}
    assert fields - documented == set()
