"""The published JSON schema of the run config (docs/config.schema.json) is current and usable."""

from __future__ import annotations

import json
from pathlib import Path

from factorlm.pipeline.config import json_schema, json_schema_text

SCHEMA = Path(__file__).resolve().parents[2] / "docs" / "config.schema.json"
REGENERATE = (
    'python -c "from factorlm.pipeline.config import json_schema_text as t; '
    "open('docs/config.schema.json', 'w').write(t())\""
)


def test_published_schema_is_current() -> None:
    assert SCHEMA.read_text(encoding="utf-8") == json_schema_text(), (
        f"docs/config.schema.json is stale; regenerate it with: {REGENERATE}"
    )


def test_schema_carries_defaults_ranges_and_choices() -> None:
    schema = json_schema()
    defs = schema["$defs"]
    ratio = defs["CompressConfig"]["properties"]["ratio"]
    assert (ratio["default"], ratio["exclusiveMinimum"], ratio["exclusiveMaximum"]) == (0.6, 0, 1)
    assert "Fraction" in ratio["description"]
    method = defs["CompressConfig"]["properties"]["method"]
    assert method["default"] == "whiten" and "fwsvd" in method["enum"]
    assert defs["RecoverConfig"]["properties"]["steps"]["default"] == 300
    assert defs["CompressConfig"]["additionalProperties"] is False
    assert set(schema["properties"]) >= {"compress", "build", "benchmark", "recover", "output_dir"}
    json.dumps(schema)  # plain JSON
