"""Alert rules: what fires, what is skipped, what a bad audit file says, what a webhook receives."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from scheduler.alerts import ClassFact, QualityFact, RunFacts, evaluate, run_rules
from scheduler.audit_outcome import EXIT_ALERT, EXIT_NOT_EVALUATED, EXIT_OK, EXIT_RUN_FAILED, AuditOutcome
from scheduler.audits import AuditError, load_audits
from scheduler.webhooks import DeliveryError, Notification, build_notification, post, webhook_url
from schema.alert_rules import AlertRules, WebhookTarget
from schema.models import Alert, AlertState
from workers import metrics

SECRET_URL_PATH = "/services/T0AUDIT/B0HOOK/s3cr3t-t0ken-9f8e7d"


def drift(method: str, cls: int, name: str, corr: float, drifted: bool) -> ClassFact:
    return ClassFact(method, "features", cls, name, corr, 1 - corr, drifted)


def facts(**changes: object) -> RunFacts:
    base: dict[str, object] = {
        "run_id": "r2",
        "audit_name": "nightly",
        "status": "finished",
        "n_items": 200,
        "n_failed": 1,
        "duration_s": 120.0,
        "finished_at": datetime(2026, 11, 30, 2, 5, tzinfo=UTC),
        "baseline_run_id": "r1",
        "drift": [
            drift("gradcam", 0, "circle", 0.95, False),
            drift("gradcam", 1, "square", 0.31, True),
            drift("cam", 1, "square", 0.42, True),
        ],
        "quality": [QualityFact("gradcam", "features", 50, 0.86), QualityFact("cam", "features", 50, 0.97)],
    }
    base.update(changes)
    return RunFacts(**base)  # type: ignore[arg-type]


def by_rule(rules: dict[str, object], run: RunFacts) -> dict[str, tuple[str, float | None]]:
    return {j.rule: (j.state, j.value) for j in evaluate(AlertRules.model_validate(rules), run)}


# --------------------------------------------------------------------------- evaluation


def test_each_rule_fires_on_its_side_of_the_threshold() -> None:
    rules = {
        "drifted_classes": {"above": 1},
        "mean_correlation": {"below": 0.5},
        "pointing_game": {"below": 0.9, "method": "gradcam"},
        "failed_items": {"above": 0.01},
        "status": ["partial", "failed"],
        "duration_s": {"above": 60},
    }
    judged = by_rule(rules, facts())
    assert judged == {
        "drifted_classes": ("fired", 2.0),
        "mean_correlation": ("fired", 0.31),
        "pointing_game": ("fired", 0.86),
        "failed_items": ("ok", 0.005),
        "status": ("ok", None),
        "duration_s": ("fired", 120.0),
    }
    quiet = by_rule(
        {**rules, "drifted_classes": {"above": 2}, "mean_correlation": {"below": 0.31}},
        facts(status="partial", n_failed=3, duration_s=60.0),
    )
    assert quiet["drifted_classes"] == ("ok", 2.0)
    assert quiet["mean_correlation"] == ("ok", 0.31)  # strictly below
    assert quiet["failed_items"] == ("fired", 0.015)
    assert quiet["status"] == ("fired", None)
    assert quiet["duration_s"] == ("ok", 60.0)


def test_rules_restricted_to_a_method_look_only_at_it() -> None:
    judged = by_rule(
        {"drifted_classes": {"above": 0, "method": "cam"}, "pointing_game": {"below": 0.9, "method": "cam"}},
        facts(),
    )
    assert judged == {"drifted_classes": ("fired", 1.0), "pointing_game": ("ok", 0.97)}
    fired = evaluate(AlertRules.model_validate({"drifted_classes": {"above": 0}}), facts())[0]
    assert [c["class"] for c in fired.detail["classes"]] == ["square", "square"]  # least similar first


def test_first_run_skips_drift_rules_and_says_why() -> None:
    rules = AlertRules.model_validate(
        {"drifted_classes": {"above": 0}, "mean_correlation": {"below": 0.8}, "failed_items": {"above": 0}}
    )
    judged = evaluate(rules, facts(baseline_run_id=None, drift=None))
    states = {j.rule: j.state for j in judged}
    assert states == {"drifted_classes": "skipped", "mean_correlation": "skipped", "failed_items": "fired"}
    assert all("first run of audit 'nightly'" in j.message for j in judged if j.state == "skipped")


def test_quality_rule_without_boxes_is_skipped_not_fired() -> None:
    judged = by_rule({"pointing_game": {"below": 0.9}}, facts(quality=[]))
    assert judged == {"pointing_game": ("skipped", None)}


def test_an_empty_rule_set_is_no_rules() -> None:
    assert run_rules({"alerts": {"status": None}, "notify": []}) == (None, [])
    assert run_rules({"alerts": None})[0] is None
    rules, targets = run_rules({"alerts": {"status": ["failed"]}, "notify": [{"webhook": "${HOOK}"}]})
    assert rules is not None and rules.status == ["failed"] and targets[0].variable == "HOOK"


def test_exit_codes() -> None:
    fired = Alert(rule="status", state=AlertState.FIRED)
    quiet = Alert(rule="status", state=AlertState.OK)
    assert AuditOutcome("finished", True, [quiet]).exit_code == EXIT_OK
    assert AuditOutcome("finished", False, []).exit_code == EXIT_OK
    assert AuditOutcome("partial", True, [fired]).exit_code == EXIT_ALERT
    assert AuditOutcome("failed", True, [fired]).exit_code == EXIT_RUN_FAILED
    assert AuditOutcome("finished", True, None).exit_code == EXIT_NOT_EVALUATED
    assert len({EXIT_OK, EXIT_ALERT, EXIT_RUN_FAILED, EXIT_NOT_EVALUATED, 2}) == 5


# --------------------------------------------------------------------------- validation


AUDIT = """\
audits:
  - name: nightly
    schedule: "0 2 * * *"
    source: /data/manifest.jsonl
    methods: [gradcam, cam]
{extra}
"""


def load(tmp_path: Path, extra: str) -> object:
    path = tmp_path / "audits.yaml"
    path.write_text(AUDIT.format(extra=extra))
    return load_audits(path)


def refused(tmp_path: Path, extra: str) -> str:
    with pytest.raises(AuditError) as caught:
        load(tmp_path, extra)
    return str(caught.value)


def test_a_valid_audit_carries_its_rules_into_the_run_spec(tmp_path: Path) -> None:
    audits = load(
        tmp_path,
        "    alerts:\n"
        "      drifted_classes: {above: 0}\n"
        "      pointing_game: {below: 0.9, method: GradCAM}\n"
        "      status: [partial, failed]\n"
        "    notify:\n"
        "      - webhook: ${CAMAUDIT_ALERT_WEBHOOK}\n",
    )
    spec = audits["nightly"].run_spec()  # type: ignore[index]
    config = spec.model_dump()
    assert config["alerts"]["pointing_game"] == {"below": 0.9, "method": "gradcam"}
    assert config["notify"] == [{"webhook": "${CAMAUDIT_ALERT_WEBHOOK}"}]


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ("    alerts:\n      drifted_clases: {above: 0}\n", "did you mean drifted_classes?"),
        ("    alert:\n      status: [failed]\n", "(did you mean alerts"),
        ("    alerts:\n      mean_correlation: {below: 0.8, methd: cam}\n", "did you mean method?"),
        ("    alerts:\n      status: [partail]\n", "did you mean partial?"),
        ("    alerts:\n      pointing_game: {below: 0.9, method: gradcm}\n", "did you mean gradcam?"),
        ("    alerts:\n      pointing_game: {below: 1.5}\n", "less than or equal to 1"),
        ("    alerts:\n      failed_items: {above: 2}\n", "less than 1"),
        ("    alerts:\n      drifted_classes: {above: -1}\n", "greater than or equal to 0"),
        ("    alerts:\n      duration_s: {above: 0}\n", "greater than 0"),
        ("    alerts:\n      mean_correlation: {above: 0.8}\n", "valid keys here: method, below"),
        ("    notify:\n      - slack: ${X}\n", "valid keys here: webhook"),
    ],
)
def test_bad_rules_fail_at_load_with_the_closest_valid_names(
    tmp_path: Path, extra: str, expected: str
) -> None:
    assert expected in refused(tmp_path, extra)


def test_a_webhook_url_in_the_file_is_refused_without_being_echoed(tmp_path: Path) -> None:
    url = f"https://hooks.example.com{SECRET_URL_PATH}"
    message = refused(tmp_path, f"    notify:\n      - webhook: {url}\n")
    assert "${CAMAUDIT_ALERT_WEBHOOK}" in message
    assert "s3cr3t" not in message and "hooks.example.com" not in message
    other = refused(tmp_path, f"    notify:\n      - webhok: {url}\n")
    assert "did you mean webhook?" in other and "s3cr3t" not in other


# --------------------------------------------------------------------------- webhook


class Receiver:
    """A webhook receiver on 127.0.0.1 that records each POST and answers ``status``
    (or the ``answers`` given, one per POST, first)."""

    def __init__(self, status: int = 200, answers: tuple[int, ...] = ()) -> None:
        self.status = status
        self.answers = list(answers)
        self.posts: list[tuple[str, dict[str, object]]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                receiver.posts.append((self.path, json.loads(self.rfile.read(length))))
                self.send_response(receiver.answers.pop(0) if receiver.answers else receiver.status)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{SECRET_URL_PATH}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def test_notification_body_is_slack_text_plus_fields(receiver: Receiver) -> None:
    run = facts()
    rules = AlertRules.model_validate({"drifted_classes": {"above": 0}, "mean_correlation": {"below": 0.5}})
    alerts = [
        Alert(
            rule=j.rule,
            state=j.state,
            value=j.value,
            threshold=j.threshold,
            message=j.message,
            detail=j.detail,
        )
        for j in evaluate(rules, run)
    ]
    note = build_notification(run, alerts, "https://camaudit.example.org/")
    assert post(receiver.url, note, timeout_s=5) == 200
    [(path, body)] = receiver.posts
    assert path == SECRET_URL_PATH
    assert body["audit"] == "nightly" and body["run_id"] == "r2"
    assert [a["rule"] for a in body["alerts"]] == ["drifted_classes", "mean_correlation"]  # type: ignore[index]
    assert [c["class"] for c in body["drifted_classes"]] == ["square", "square"]  # type: ignore[index]
    assert body["links"] == {
        "run": "https://camaudit.example.org/runs/r2",
        "drift": "https://camaudit.example.org/drift?a=r1&b=r2",
    }
    text = str(body["text"])
    assert "nightly" in text and "square (gradcam/features, r=0.31)" in text and "/runs/r2" in text
    assert "s3cr3t" not in json.dumps(body)


def test_class_names_cannot_mention_a_slack_channel() -> None:
    run = facts(drift=[drift("gradcam", 3, "<!channel> & co", 0.1, True)])
    rules = AlertRules.model_validate({"drifted_classes": {"above": 0}})
    alerts = [
        Alert(rule=j.rule, state=j.state, message=j.message, detail=j.detail) for j in evaluate(rules, run)
    ]
    body = build_notification(run, alerts, None).body
    assert "&lt;!channel&gt; &amp; co (gradcam/features" in str(body["text"]) and "<!" not in str(
        body["text"]
    )
    assert body["drifted_classes"][0]["class"] == "<!channel> & co"  # type: ignore[index]
    assert body["links"] == {}


def test_delivery_errors_never_quote_the_url(receiver: Receiver) -> None:
    note = Notification({"text": "x"})
    receiver.status = 500
    with pytest.raises(DeliveryError, match="HTTP 500") as answered:
        post(receiver.url, note, timeout_s=5)
    down = receiver.url
    receiver.close()
    with pytest.raises(DeliveryError, match="connection refused") as refused_:
        post(down, note, timeout_s=5)
    for caught in (answered, refused_):
        assert "s3cr3t" not in str(caught.value) and "127.0.0.1" not in str(caught.value)
    target = WebhookTarget(webhook="${CAMAUDIT_TEST_HOOK}")
    with pytest.raises(DeliveryError, match="CAMAUDIT_TEST_HOOK is not set"):
        webhook_url(target, {})
    with pytest.raises(DeliveryError, match="http:// or https://") as bad:
        webhook_url(target, {"CAMAUDIT_TEST_HOOK": "ftp://x/s3cr3t"})
    assert "s3cr3t" not in str(bad.value)
    assert webhook_url(target, {"CAMAUDIT_TEST_HOOK": down}) == down


# --------------------------------------------------------------------------- metrics


def test_audit_gauges_follow_the_last_finalised_run() -> None:
    metrics.record_audit(facts(audit_name="gauges"), fired=2)
    value = metrics.REGISTRY.get_sample_value
    assert value("camaudit_audit_drifted_classes", {"audit": "gauges"}) == 2
    assert value("camaudit_audit_worst_class_correlation", {"audit": "gauges"}) == pytest.approx(0.31)
    assert value("camaudit_audit_pointing_game", {"audit": "gauges", "method": "gradcam"}) == pytest.approx(
        0.86
    )
    assert value("camaudit_audit_failed_fraction", {"audit": "gauges"}) == pytest.approx(0.005)
    assert value("camaudit_audit_duration_seconds", {"audit": "gauges"}) == 120
    assert value("camaudit_audit_alerts_fired", {"audit": "gauges"}) == 2
    finished = datetime(2026, 11, 30, 2, 5, tzinfo=UTC)
    assert value("camaudit_audit_last_success_timestamp_seconds", {"audit": "gauges"}) == finished.timestamp()
    # A later run without a baseline: no stale drift figures, the last success stays.
    metrics.record_audit(facts(audit_name="gauges", baseline_run_id=None, drift=None, status="failed"))
    assert value("camaudit_audit_drifted_classes", {"audit": "gauges"}) is None
    assert value("camaudit_audit_last_success_timestamp_seconds", {"audit": "gauges"}) == finished.timestamp()
    assert b'camaudit_audit_failed_fraction{audit="gauges"}' in generate_latest(metrics.REGISTRY)
