"""An audit that raises its hand: the same audit twice with new weights in between, a webhook
receiver on 127.0.0.1, the exit code, the stored alert; and a receiver that is down."""

from __future__ import annotations

import json
import os
import shutil
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from sqlalchemy import MetaData, select

from scheduler.analysis.report import ReportOptions, build_report
from scheduler.audit_outcome import EXIT_ALERT, EXIT_OK
from scheduler.web import create_app
from schema.db import get_engine, session_scope
from schema.models import Alert, ClassDrift, Run
from tests.plugins.services import WorkerProcess, wait_until
from tests.test_alerts import SECRET_URL_PATH, Receiver
from tests.test_e2e_embedded import run_cli
from workers.models import DEMO_CHECKPOINT, load_model
from workers.synth import make_dataset

SECRETS = (SECRET_URL_PATH, "s3cr3t-t0ken")


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("alert-data"), 8, seed=41)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def write_audit(path: Path, manifest: Path, checkpoint: Path, out: Path, alerts: str) -> Path:
    path.write_text(
        "audits:\n"
        "  - name: nightly\n"
        "    schedule: '0 2 * * *'\n"
        f"    source: '{manifest}'\n"
        "    model: demo\n"
        f"    checkpoint: '{checkpoint}'\n"
        "    methods: [gradcam]\n"
        "    targets: all\n"
        f"    output: '{out}'\n"
        f"    alerts: {alerts}\n"
        "    notify:\n"
        "      - webhook: ${CAMAUDIT_ALERT_WEBHOOK}\n"
    )
    return path


def retrain(checkpoint: Path) -> None:
    """New weights in the same file: the last conv block and the head re-initialised."""
    model = load_model("demo", checkpoint).model
    torch.manual_seed(7)
    for module in [*model.features[-1].modules(), model.fc]:
        if isinstance(module, torch.nn.Conv2d | torch.nn.Linear | torch.nn.BatchNorm2d):
            module.reset_parameters()
    saved = torch.load(checkpoint, weights_only=True)
    saved["state_dict"] = model.state_dict()
    torch.save(saved, checkpoint)


def audit_env(tmp_path: Path, webhook: str, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "CAMAUDIT_DATABASE_URL": f"sqlite:///{tmp_path / 'runs.db'}",
        "CAMAUDIT_ALERT_WEBHOOK": webhook,
        "CAMAUDIT_PUBLIC_URL": "https://camaudit.example.org",
        "CAMAUDIT_LOG_LEVEL": "DEBUG",  # the URL must not leak even into debug logs
        "CAMAUDIT_ALERT_BACKOFF_S": "0.05",
        **extra,
    }


def assert_no_secret(*texts: str) -> None:
    for text in texts:
        for secret in SECRETS:
            assert secret not in text


def every_row(db: str) -> str:
    """All rows of all tables, as text: the secret must be in none of them."""
    engine = get_engine(db)
    meta = MetaData()
    meta.reflect(engine)
    with engine.connect() as conn:
        return "\n".join(repr(row) for table in meta.sorted_tables for row in conn.execute(table.select()))


def test_weights_changed_between_two_audit_runs_fire_one_webhook(
    manifest: Path, receiver: Receiver, tmp_path: Path
) -> None:
    checkpoint = tmp_path / "model.pt"
    shutil.copy(DEMO_CHECKPOINT, checkpoint)
    audits = write_audit(
        tmp_path / "audits.yaml", manifest, checkpoint, tmp_path / "out", "{drifted_classes: {above: 0}}"
    )
    env = audit_env(tmp_path, receiver.url)
    db = env["CAMAUDIT_DATABASE_URL"]
    command = ("audit", "run", "nightly", "--audits", str(audits), "--wait", "--json")

    first = run_cli(*command, env=env)
    assert first.returncode == EXIT_OK, first.stderr
    first_info = json.loads(first.stdout)
    [skipped] = first_info["alerts"]
    assert (skipped["rule"], skipped["state"]) == ("drifted_classes", "skipped")
    assert "first run of audit 'nightly'" in skipped["message"]
    assert receiver.posts == []

    retrain(checkpoint)
    second = run_cli(*command, env=env)
    assert second.returncode == EXIT_ALERT, second.stderr
    info = json.loads(second.stdout)
    assert info["status"] == "finished" and info["baseline_run_id"] == first_info["run_id"]
    assert info["exit_code"] == EXIT_ALERT
    [fired] = info["alerts"]
    assert fired["state"] == "fired" and fired["delivered_at"] is not None

    with session_scope(db) as s:
        names = s.execute(select(Run.class_names).where(Run.id == info["run_id"])).scalar_one()
        drifted = {
            names[c]
            for c in s.execute(
                select(ClassDrift.target_class).where(ClassDrift.run_id == info["run_id"], ClassDrift.drifted)
            ).scalars()
        }
        [row] = s.execute(select(Alert).where(Alert.run_id == info["run_id"])).scalars().all()
    assert drifted, "the retrained model should have moved some class's attention"
    assert (row.rule, row.state, row.value, row.attempts) == ("drifted_classes", "fired", len(drifted), 1)
    assert row.delivered_at is not None and row.last_error is None

    [(path, body)] = receiver.posts  # exactly one POST, for the second run only
    assert path == SECRET_URL_PATH
    assert body["run_id"] == info["run_id"] and body["audit"] == "nightly"
    assert {c["class"] for c in body["drifted_classes"]} == drifted  # type: ignore[union-attr]
    assert all(f"{name} (gradcam/" in str(body["text"]) for name in drifted)
    assert body["links"]["run"] == f"https://camaudit.example.org/runs/{info['run_id']}"  # type: ignore[index]

    web = TestClient(create_app(db), base_url="http://localhost")
    runs_page = web.get("/").text
    run_page = web.get(f"/runs/{info['run_id']}").text
    assert 'data-alerts="1"' in runs_page and "drifted_classes" in run_page
    assert_no_secret(
        first.stdout, first.stderr, second.stdout, second.stderr, every_row(db), runs_page, run_page
    )
    assert "DEBUG" in second.stderr or "debug" in second.stderr.lower()


def test_a_receiver_that_is_down_is_retried_and_the_run_still_finishes(
    manifest: Path, tmp_path: Path
) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    checkpoint = tmp_path / "model.pt"
    shutil.copy(DEMO_CHECKPOINT, checkpoint)
    audits = write_audit(
        tmp_path / "audits.yaml", manifest, checkpoint, tmp_path / "out", "{status: [finished]}"
    )
    env = audit_env(tmp_path, f"http://127.0.0.1:{port}{SECRET_URL_PATH}", CAMAUDIT_ALERT_ATTEMPTS="3")

    proc = run_cli("audit", "run", "nightly", "--audits", str(audits), "--wait", "--json", env=env)
    assert proc.returncode == EXIT_ALERT, proc.stderr
    info = json.loads(proc.stdout)
    assert info["status"] == "finished"
    with session_scope(env["CAMAUDIT_DATABASE_URL"]) as s:
        [row] = s.execute(select(Alert).where(Alert.run_id == info["run_id"])).scalars().all()
        status = s.execute(select(Run.status).where(Run.id == info["run_id"])).scalar_one()
    assert status == "finished"
    assert (row.rule, row.state, row.attempts, row.delivered_at) == ("status", "fired", 3, None)
    assert "connection refused" in (row.last_error or "")
    assert proc.stderr.count("retrying in") == 2 and "not delivered after 3 attempts" in proc.stderr
    report = build_report(
        env["CAMAUDIT_DATABASE_URL"], info["run_id"], ReportOptions(regions=1, max_classes=1)
    )
    alerts_section = report.split('<section id="alerts">', 1)[1].split("</section>", 1)[0]
    assert "run ended finished" in alerts_section and "not delivered after 3 attempt(s)" in alerts_section
    assert_no_secret(proc.stdout, proc.stderr, every_row(env["CAMAUDIT_DATABASE_URL"]), report)


def test_on_a_worker_a_refused_post_is_retried_on_the_control_queue(
    manifest: Path,
    postgres_url: str,
    redis_url: str,
    start_worker: Callable[..., WorkerProcess],
    tmp_path: Path,
) -> None:
    receiver = Receiver(answers=(503,))
    try:
        checkpoint = tmp_path / "model.pt"
        shutil.copy(DEMO_CHECKPOINT, checkpoint)
        audits = write_audit(
            tmp_path / "audits.yaml", manifest, checkpoint, tmp_path / "out", "{status: [finished]}"
        )
        shared = {"CAMAUDIT_DATABASE_URL": postgres_url, "CAMAUDIT_BROKER_URL": redis_url}
        worker = start_worker(
            {**shared, "CAMAUDIT_ALERT_WEBHOOK": receiver.url, "CAMAUDIT_ALERT_BACKOFF_S": "0.2"}
        )
        # The command that starts the audit does not need the webhook: the control worker sends it.
        cli_env = {k: v for k, v in os.environ.items() if k != "CAMAUDIT_ALERT_WEBHOOK"}
        proc = run_cli(
            "audit", "run", "nightly", "--audits", str(audits), "--wait", "--json", env={**cli_env, **shared}
        )
        assert proc.returncode == EXIT_ALERT, proc.stderr
        info = json.loads(proc.stdout)
        assert info["status"] == "finished" and [a["rule"] for a in info["alerts"]] == ["status"]

        def delivered() -> Alert | None:
            with session_scope(postgres_url) as s:
                return s.execute(
                    select(Alert).where(Alert.run_id == info["run_id"], Alert.delivered_at.is_not(None))
                ).scalar_one_or_none()

        row = wait_until(delivered, timeout=60, what="the retried webhook POST to be recorded")
        assert isinstance(row, Alert)
        assert (row.attempts, row.last_error) == (
            2,
            "webhook 1 (${CAMAUDIT_ALERT_WEBHOOK}): receiver answered HTTP 503",
        )
        assert [path for path, _ in receiver.posts] == [SECRET_URL_PATH, SECRET_URL_PATH]
        assert all(body["run_id"] == info["run_id"] for _, body in receiver.posts)
        assert "camaudit.deliver_alerts" in worker.log()
        assert_no_secret(proc.stdout, proc.stderr, worker.log(), every_row(postgres_url))
    finally:
        receiver.close()
