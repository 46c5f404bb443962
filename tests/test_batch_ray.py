"""`minicpmv run --ray`: the batch on a local two-node Ray cluster with Ray Data (2 engine
actors), equal to the local run record for record, and resumable. Slow: behind the `ray`
marker, `python -m pytest -m ray tests/test_batch_ray.py`."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from ray_cluster import LocalRayCluster

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def cluster():
    c = LocalRayCluster(nodes=2, cpus_per_node=2)
    yield c
    c.stop()


@pytest.fixture(scope="module")
def requests_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("batch_ray")
    image = folder / "photo.png"
    Image.fromarray(np.random.RandomState(4).randint(0, 255, (60, 80, 3)).astype("uint8")).save(image)
    lines = []
    for i in range(12):
        text = {"type": "text", "text": f"Item {i}: describe {i * 5 % 7}."}
        if i == 4:
            lines.append('{"id": "q4", "messages": [')  # torn JSON: an error record, not a stop
        elif i == 7:
            lines.append(json.dumps({"id": "q7", "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": str(folder / "missing.png")}}, text]}], "max_tokens": 3}))
        elif i % 3 == 0:
            lines.append(json.dumps({"id": f"q{i}", "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": str(image)}}, text]}], "max_tokens": 4, "temperature": 0}))
        else:
            lines.append(json.dumps({"id": f"q{i}", "messages": [{"role": "user", "content": [text]}],
                                     "max_tokens": 2 + i % 4, "temperature": 0}))
    path = folder / "requests.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def run(args, env=None):
    return subprocess.run([sys.executable, "-m", "minicpmv.cli", "run", *map(str, args), "--quiet"],
                          capture_output=True, text=True, timeout=900, env={**os.environ, **(env or {})})


def records(path) -> dict[str, dict]:
    out = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        assert record["id"] not in out, f"{record['id']} answered twice"
        out[record["id"]] = record
    return out


def test_ray_data_batch_equals_the_local_run_and_resumes(cluster, tiny46_dir, requests_file, tmp_path):
    common = ["--model", tiny46_dir, "--dtype", "float32", "--device", "cpu", "--threads", "1"]
    local = tmp_path / "local.jsonl"
    done = run([requests_file, "--out", local, *common])
    assert done.returncode == 0, done.stderr
    expected = records(local)
    assert len(expected) == 12 and "error" in expected["line-5"] and "error" in expected["q7"]

    on_ray = tmp_path / "ray.jsonl"
    ray_args = [requests_file, "--out", on_ray, *common, "--ray", "--ray-concurrency", "2", "--ray-batch-size", "3"]
    env = {"RAY_ADDRESS": cluster.address}
    done = run(ray_args, env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert records(on_ray) == expected

    # a run stopped halfway: half the answers are in the output; the rest come from Ray
    partial = tmp_path / "partial.jsonl"
    first_half = {"q0", "q1", "q2", "line-5", "q5"}
    kept = [line for line in local.read_text().splitlines() if json.loads(line)["id"] in first_half]
    partial.write_text("\n".join(kept) + "\n")
    ray_args[2] = partial
    done = run(ray_args, env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert records(partial) == expected
