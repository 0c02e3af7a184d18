"""Fleets for real: a Dask LocalCluster (2 worker processes) and an S3-compatible server on localhost (moto's
standalone server, started and stopped here) holding a bucket of HF, TensorBoard and W&B runs, one of them with a
truncated event file and one an object the workers may not read.

The bucket is a copy of a local tree; what autopsy says about each run in the bucket must be what it says about the
same run on disk, with the URL in place of the local path. All traffic goes to 127.0.0.1.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from test_fleet import make_fleet

from autopsy.errors import UnreadableError
from autopsy.fleet import analyze_many
from autopsy.report import render
from helpers.paths import REAL_LOGS, RUNS, needs_shared
from helpers.procs import stop
from helpers.wandb_runs import nan151_rows, write_runs

BUCKET = "runs"


@pytest.fixture(scope="module")
def client():
    from distributed import Client, LocalCluster

    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None) as c,
        Client(c) as cl,
    ):
        yield cl


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_up(url: str, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/moto-api/", timeout=2):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError("moto server did not come up")


def _bucket_tree(root: Path) -> Path:
    """The tree the bucket holds: HF runs (with checkpoints), a TensorBoard-only run, a run whose event file was
    cut mid-record, a W&B offline run, and a run in a prefix the reader may not read."""
    tree = root / BUCKET
    shutil.copytree(RUNS / "nan-at-31", tree / "hf" / "nan-at-31")
    shutil.copytree(RUNS / "healthy", tree / "hf" / "healthy")
    specs = make_fleet.plan_fleet(2, steps=200, seed=7, rule="lr")
    for spec, name in zip(specs, ("tb-only", "cut")):
        spec.name = name
        make_fleet.write_run(tree / "tb", spec, steps=200)
    (tree / "tb" / "tb-only" / "trainer_state.json").unlink()
    event = next((tree / "tb" / "cut").rglob("events.out.tfevents.*"))
    event.write_bytes(event.read_bytes()[:-37])  # a crash mid-write: the last record is cut off
    write_runs([{"dir": str(tree / "wb"), "id": "nan151", "config": {"learning_rate": 1e-3}, "rows": nan151_rows()}])
    (tree / "locked").mkdir()
    shutil.copy(RUNS / "healthy" / "trainer_state.json", tree / "locked" / "trainer_state.json")
    return tree


def _populate(endpoint: str, tree: Path) -> dict[str, str]:
    """Upload the tree, make a reader who may list everything and read all but ``locked/``, switch auth on."""
    import boto3

    admin = {"endpoint_url": endpoint, "region_name": "us-east-1", "aws_access_key_id": "admin",
             "aws_secret_access_key": "admin"}
    s3, iam = boto3.client("s3", **admin), boto3.client("iam", **admin)
    s3.create_bucket(Bucket=BUCKET)
    for path in sorted(p for p in tree.rglob("*") if p.is_file()):
        s3.upload_file(str(path), BUCKET, path.relative_to(tree).as_posix())
    iam.create_user(UserName="reader")
    policy = {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": ["s3:ListBucket", "s3:GetObject"],
         "Resource": [f"arn:aws:s3:::{BUCKET}", f"arn:aws:s3:::{BUCKET}/*"]},
        {"Effect": "Deny", "Action": "s3:GetObject", "Resource": f"arn:aws:s3:::{BUCKET}/locked/*"}]}
    iam.put_user_policy(UserName="reader", PolicyName="read", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName="reader")["AccessKey"]
    req = urllib.request.Request(endpoint + "/moto-api/reset-auth", data=b"0", method="POST",
                                 headers={"Content-Type": "text/plain"})
    urllib.request.urlopen(req, timeout=10).close()  # from now on every request is checked against IAM
    return {"key": key["AccessKeyId"], "secret": key["SecretAccessKey"]}


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory):
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_up(endpoint, proc)
        tree = _bucket_tree(tmp_path_factory.mktemp("s3"))
        creds = _populate(endpoint, tree)
        options = {**creds, "endpoint_url": endpoint, "client_kwargs": {"region_name": "us-east-1"}}
        yield {"endpoint": endpoint, "tree": tree, "creds": creds, "options": options}
    finally:
        stop(proc)


def _runs(report: Any) -> dict[str, dict[str, Any]]:
    data = json.loads(render(report, "json"))
    return {(r["path"], r["run"]): r for r in data["runs"]}


def _as_url(entry: dict[str, Any], tree: Path) -> dict[str, Any]:
    return json.loads(json.dumps(entry).replace(str(tree), f"s3://{BUCKET}"))


def test_s3_runs_on_a_dask_cluster_read_as_the_same_runs_on_disk(s3, client):
    remote = analyze_many([f"s3://{BUCKET}"], client=client, storage_options=s3["options"])
    local = analyze_many([s3["tree"]], jobs=1)
    got, want = _runs(remote), {k: _as_url(v, s3["tree"]) for k, v in _runs(local).items()}
    want = {(p.replace(str(s3["tree"]), f"s3://{BUCKET}"), n): v for (p, n), v in want.items()}
    locked = f"s3://{BUCKET}/locked"
    assert set(got) == set(want)
    for key, entry in want.items():
        if key[0] != locked:
            assert got[key] == entry, key
    assert got[(f"s3://{BUCKET}/hf/nan-at-31", "nan-at-31")]["status"] == "failed"  # the committed NaN run
    assert got[(f"s3://{BUCKET}/hf/nan-at-31", "nan-at-31")]["restart"].startswith(f"restart from s3://{BUCKET}/hf/")


def test_an_object_the_worker_may_not_read_is_one_line_for_its_run(s3, client):
    remote = analyze_many([f"s3://{BUCKET}"], client=client, storage_options=s3["options"])
    (entry,) = [r for (p, _), r in _runs(remote).items() if p == f"s3://{BUCKET}/locked"]
    (finding,) = [f for f in entry["findings"] if f["signature"] == "source_damaged"]
    assert entry["verdict"].startswith("worth a look: source_damaged")
    assert finding["evidence"]["file"] == f"s3://{BUCKET}/locked/trainer_state.json"
    assert "Access Denied" in finding["evidence"]["problem"] and "\n" not in finding["summary"]
    others = [r for (p, _), r in _runs(remote).items() if p != f"s3://{BUCKET}/locked"]
    assert others and all(r["status"] != "no_data" for r in others)


def test_a_truncated_event_file_in_the_bucket_is_salvaged_and_reported(s3, client):
    remote = analyze_many([f"s3://{BUCKET}/tb"], client=client, storage_options=s3["options"])
    runs = {r["run"]: r for r in json.loads(render(remote, "json"))["runs"]}
    cut = runs["cut"]
    damaged = [f for f in cut["findings"] if f["signature"] == "source_damaged"]
    assert len(damaged) == 1
    assert damaged[0]["evidence"]["file"].startswith(f"s3://{BUCKET}/tb/cut/runs/")
    assert "truncated" in damaged[0]["summary"]
    assert cut["status"] != "no_data" and runs["tb-only"]["status"] != "no_data"


def test_credentials_and_endpoint_from_the_aws_variables(s3, monkeypatch, client):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3["endpoint"])
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3["creds"]["key"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3["creds"]["secret"])
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    one = analyze_many([f"s3://{BUCKET}/hf"], jobs=1)
    two = analyze_many([f"s3://{BUCKET}/hf"], jobs=2)  # pool processes get this process' variables
    dask = analyze_many([f"s3://{BUCKET}/hf"], client=client, storage_options=s3["options"])
    assert render(one, "json") == render(two, "json") == render(dask, "json")
    assert [r.run for r in one.runs] == ["healthy", "nan-at-31"]


def test_a_listing_the_credentials_cannot_make_is_one_line(s3):
    bad = {**s3["options"], "secret": "wrong"}
    with pytest.raises(UnreadableError) as err:
        analyze_many([f"s3://{BUCKET}"], jobs=1, storage_options=bad)
    assert str(err.value).startswith(f"cannot list s3://{BUCKET}") and "\n" not in str(err.value)


def test_three_modes_identical_on_a_generated_fleet(tmp_path, client):
    root = tmp_path / "fleet"
    make_fleet.write_fleet(root, runs=24, steps=300, seed=9, rule="mixed")
    one = render(analyze_many([root], jobs=1), "json")
    assert render(analyze_many([root], jobs=2), "json") == one
    assert render(analyze_many([root], client=client), "json") == one


def test_three_modes_identical_on_real_logs(client):
    needs_shared(REAL_LOGS)
    one = json.loads(render(analyze_many([REAL_LOGS], jobs=1), "json"))
    # equal as JSON values: the key order of a TensorBoard hparams map follows each process' string hashing
    assert json.loads(render(analyze_many([REAL_LOGS], jobs=2), "json")) == one
    assert json.loads(render(analyze_many([REAL_LOGS], client=client), "json")) == one
