"""``import compressor`` pulls in only what every call needs."""

import json
import os
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
# imported on first use only: calibration datasets, the GGUF reader, the Trainer integration
LAZY = ["datasets", "gguf", "transformers.trainer", "compressor.entrypoints.trainer"]


def _imported_after(code: str) -> set[str]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
    }
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True
    )
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_importing_compressor_leaves_the_optional_parts_unimported():
    modules = _imported_after("import compressor")
    assert "compressor.entrypoints.oneshot" in modules  # the probe saw the package
    assert [name for name in LAZY if name in modules] == []


def test_the_trainer_integration_arrives_on_first_use():
    modules = _imported_after("import compressor\ncompressor.CompressionCallback")
    assert "compressor.entrypoints.trainer" in modules and "transformers.trainer" in modules
