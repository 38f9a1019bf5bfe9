"""pipeline.provenance.code_version: one hash helper for simulation, training and cache keys."""

from __future__ import annotations

import hashlib
import re

from pipeline import provenance


def test_code_version_is_the_hash_of_the_named_sources():
    version = provenance.code_version("simulation", "pipeline/batches.py")
    assert re.fullmatch(r".+\+[0-9a-f]{12}", version)
    digest = hashlib.sha256()
    files = [*sorted((provenance.ROOT / "simulation").glob("*.py")), provenance.ROOT / "pipeline" / "batches.py"]
    for file in files:
        digest.update(file.relative_to(provenance.ROOT).as_posix().encode() + b"\0" + file.read_bytes() + b"\0")
    assert version.endswith("+" + digest.hexdigest()[:12])


def test_code_version_depends_on_which_sources():
    assert provenance.code_version("model") == provenance.code_version("model")
    assert provenance.code_version("model") != provenance.code_version("simulation")
    assert provenance.code_version("model") != provenance.code_version("model", "pipeline/batches.py")
