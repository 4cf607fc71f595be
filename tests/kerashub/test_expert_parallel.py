"""`expert_parallel_layout_map` shards a sparsified KerasHub backbone's
experts: 8 simulated devices with JAX in their own process
(`expert_parallel_worker.py`), in the suite's JAX run."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO
from tests.kerashub import expert_parallel_worker

WORKER = REPO / "tests" / "kerashub" / "expert_parallel_worker.py"


# The worker runs JAX whatever this suite's backend: once is enough.
@pytest.mark.only_backend("jax")
def test_sparsified_backbones_shard_their_experts(tmp_path):
    env = {
        **os.environ,
        "KERAS_BACKEND": "jax",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": os.pathsep.join(
            [str(REPO), str(REPO / "src"), os.environ.get("PYTHONPATH", "")]
        ),
    }
    report_path = tmp_path / "report.json"
    run = subprocess.run(
        [sys.executable, str(WORKER), str(report_path)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert report_path.exists(), (
        f"worker wrote no report (rc={run.returncode}):\n{run.stderr[-4000:]}"
    )
    report = json.loads(report_path.read_text())
    assert sorted(report) == sorted(expert_parallel_worker.FAMILIES)
    failed = {family: r["detail"] for family, r in report.items() if not r["ok"]}
    assert not failed, json.dumps(failed, indent=1)[:8000]
