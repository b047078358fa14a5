"""The docs document what the code has: a new CompressionConfig field cannot land undocumented."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from lowrank_vit import CompressionConfig

API_DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"


def test_every_compression_config_field_is_in_the_api_table():
    text = API_DOC.read_text()
    start = text.index("\n## CompressionConfig\n")
    table = text[start:text.index("\n## ", start + 1)]
    documented = set(re.findall(r"`([a-z_0-9]+)`", table))
    fields = {field.name for field in dataclasses.fields(CompressionConfig)}
    assert fields - documented == set()
