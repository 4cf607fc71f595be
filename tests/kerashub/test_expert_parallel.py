"""`expert_parallel_layout_map` shards a sparsified KerasHub backbone's
experts: 8 simulated devices with JAX in their own process
(`expert_parallel_worker.py`), in the suite's JAX run."""

import json
import os

import pytest

from tests.conftest import REPO
from tests.conftest import run_on_eight_devices
from tests.conftest import worker_report
from tests.kerashub import expert_parallel_worker

WORKER = REPO / "tests" / "kerashub" / "expert_parallel_worker.py"


# The worker runs JAX whatever this suite's backend: once is enough.
@pytest.mark.only_backend("jax")
def test_sparsified_backbones_shard_their_experts(tmp_path):
    python_path = os.pathsep.join(
        [str(REPO), str(REPO / "src"), os.environ.get("PYTHONPATH", "")]
    )
    report_path = tmp_path / "report.json"
    run = run_on_eight_devices(WORKER, report_path, 600, PYTHONPATH=python_path)
    report = worker_report(report_path, run)
    assert sorted(report) == sorted(expert_parallel_worker.FAMILIES)
    failed = {family: r["detail"] for family, r in report.items() if not r["ok"]}
    assert not failed, json.dumps(failed, indent=1)[:8000]
