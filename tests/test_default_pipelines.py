"""Every built-in target's resolved default pipeline, pinned by a checked-in golden.

The resolved string (every option spelled out, defaults included) is what artifacts record, so a
changed option default or a target's changed `default_pipeline` changes what users get: it must
show in review as a change to tests/golden/default_pipelines.json. To accept an intended change:

    EDGECC_UPDATE_GOLDEN=1 .venv/bin/python -m pytest -q tests/test_default_pipelines.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from edgecc.core.pipeline import parse_pipeline
from edgecc.core.target import list_targets

GOLDEN = Path(__file__).parent / "golden" / "default_pipelines.json"
UPDATE = "EDGECC_UPDATE_GOLDEN"


def test_resolved_default_pipelines_match_the_golden():
    got = {t.name: str(parse_pipeline(t.default_pipeline).resolved()) for t in list_targets()}
    if os.environ.get(UPDATE) == "1":
        GOLDEN.write_text(json.dumps(got, indent=2, sort_keys=True) + "\n")
    want = json.loads(GOLDEN.read_text())
    changed = [f"  {name}:\n    golden {want.get(name)!r}\n    now    {got.get(name)!r}"
               for name in sorted(want.keys() | got.keys()) if want.get(name) != got.get(name)]
    assert not changed, (
        "resolved default pipelines differ from " + str(GOLDEN) + ":\n" + "\n".join(changed) +
        f"\nIf the change is intended, rewrite the golden with {UPDATE}=1 .venv/bin/python -m pytest "
        "tests/test_default_pipelines.py and commit it with the change.")
