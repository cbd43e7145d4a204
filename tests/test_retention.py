"""Retention deletes whole runs of one audit: the right ones, and only after its values are checked."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, update
from typer.testing import CliRunner

from scheduler.audits import AuditError, load_audits
from scheduler.cli import app
from scheduler.gc import GcError
from scheduler.retention import apply_retention, expired_runs, retain_after
from schema.db import session_scope, upgrade
from schema.models import Item, Run, RunStatus
from schema.retention import Retention, parse_duration
from tests.test_results_pg import seed_run

NOW = datetime(2026, 11, 30, 3, 0, tzinfo=UTC)


def add_run(
    url: str, run_id: str, age_days: float, *, audit: str = "nightly", status: str = RunStatus.FINISHED
) -> None:
    seed_run(url, run_id, n_items=2, status=status)
    with session_scope(url) as session:
        session.execute(
            update(Run)
            .where(Run.id == run_id)
            .values(audit_name=audit, created_at=NOW - timedelta(days=age_days))
        )


@pytest.fixture
def url(tmp_path: Path) -> str:
    """Five finished nightly runs 1..200 days old, an older one still running, another audit's old run."""
    found = f"sqlite:///{tmp_path / 'r.db'}"
    upgrade(found)
    for run_id, age in (("d1", 1), ("d10", 10), ("d40", 40), ("d100", 100), ("d200", 200)):
        add_run(found, run_id, age)
    add_run(found, "stuck", 300, status=RunStatus.RUNNING)
    add_run(found, "weekly-old", 400, audit="weekly")
    return found


def run_ids(url: str) -> set[str]:
    with session_scope(url) as session:
        return set(session.execute(select(Run.id)).scalars())


def test_keep_last_older_than_and_both_choose_the_right_runs(url: str) -> None:
    def chosen(**rule: object) -> list[str]:
        return expired_runs(url, "nightly", Retention.model_validate(rule), now=NOW)

    # "stuck" is the oldest, but running: never chosen, though it counts among the newest N.
    assert chosen(keep_last=2) == ["d200", "d100", "d40"]
    assert chosen(keep_last=6) == []
    assert chosen(older_than="30d") == ["d200", "d100", "d40"]
    assert chosen(older_than="2400h") == ["d200", "d100"]
    # Both rules: a run goes only when neither keeps it.
    assert chosen(keep_last=3, older_than="30d") == ["d200", "d100"]
    assert chosen(keep_last=1, older_than="12h") == ["d200", "d100", "d40", "d10"]


def test_apply_retention_deletes_whole_runs_of_that_audit_only(url: str) -> None:
    report = apply_retention(url, "nightly", Retention(keep_last=2), now=NOW)
    assert [r.run_id for r in report.deleted] == ["d200", "d100", "d40"]
    assert all(r.rows["runs"] == 1 and r.rows["items"] == 2 for r in report.deleted)
    assert run_ids(url) == {"d1", "d10", "stuck", "weekly-old"}
    with session_scope(url) as session:
        assert set(session.execute(select(Item.run_id).distinct()).scalars()) == run_ids(url)


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("30x", "is not a duration: expected a number and one unit (s, m, h, d, w), e.g. 12h or 30d"),
        ("d", "is not a duration"),
        ("-5d", "is not a duration"),
        ("99999999999d", "is longer than 100 years"),
        ("1" * 400 + "s", "is longer than 100 years"),
        ("0h", "must be longer than zero"),
    ],
)
def test_bad_durations_are_refused_saying_what_is_right(value: str, words: str) -> None:
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
        parse_duration(value, "--older-than")
    assert parse_duration("12h") == timedelta(hours=12)
    assert parse_duration("1.5d") == timedelta(hours=36)


def test_the_gc_command_checks_everything_before_deleting(url: str) -> None:
    runner = CliRunner()
    before = run_ids(url)
    cases = [
        (
            ["--audit", "nightly", "--older-than", "30x"],
            "--older-than: older_than '30x' is not a",
        ),
        (
            ["--audit", "nightly", "--keep-last", "0"],
            "--keep-last: Input should be greater than or equal to 1",
        ),
        (["--audit", "nightly"], "retention needs keep_last (e.g. 7) or older_than (e.g. 30d)"),
        (
            ["--run", "d1", "--keep-last", "3"],
            "--keep-last, --older-than and --dry-run choose an --audit's runs",
        ),
        (["--run", "d1", "--dry-run"], "with --run, leave them out"),
        ([], "give exactly one of --run RUN"),
        (
            ["--audit", "nightlly", "--keep-last", "1"],
            "no run of audit 'nightlly' is recorded; did you mean nightly",
        ),
    ]
    for args, words in cases:
        result = runner.invoke(app, ["gc", *args, "--database-url", url])
        assert result.exit_code == 2, (args, result.output)
        assert words in " ".join(result.output.split()), (args, result.output)
    assert run_ids(url) == before

    dry = runner.invoke(
        app, ["gc", "--audit", "nightly", "--keep-last", "4", "--dry-run", "--database-url", url]
    )
    assert dry.exit_code == 0, dry.output
    assert "1 runs would be deleted: d200" in dry.output
    assert run_ids(url) == before

    done = runner.invoke(app, ["gc", "--audit", "nightly", "--keep-last", "4", "--database-url", url])
    assert done.exit_code == 0, done.output
    assert "run 1/1: d200" in done.output and "audit nightly: 1 runs deleted" in done.output
    assert run_ids(url) == before - {"d200"}


AUDIT = """\
audits:
  - name: nightly
    schedule: "0 2 * * *"
    source: /data/manifest.jsonl
{extra}
"""


def test_an_audit_file_sets_retention_and_bad_keys_fail_at_load(tmp_path: Path) -> None:
    path = tmp_path / "audits.yaml"
    path.write_text(AUDIT.format(extra="    retention: {keep_last: 7, older_than: 30d}"))
    audit = load_audits(path)["nightly"]
    assert audit.retention == Retention(keep_last=7, older_than="30d")
    assert audit.run_spec().model_dump()["retention"] == {"keep_last": 7, "older_than": "30d"}
    for extra, words in (
        ("    retention: {keep_lats: 7}", "retention.keep_lats: unknown key (did you mean keep_last?)"),
        ("    retention: {older_than: 30x}", "older_than '30x' is not a duration"),
        ("    retention: {keep_last: 0}", "retention.keep_last: Input should be greater than or equal to 1"),
        ("    retention: {}", "retention needs keep_last"),
    ):
        path.write_text(AUDIT.format(extra=extra))
        with pytest.raises(
            AuditError, match=words.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")
        ):
            load_audits(path)


def test_a_finalised_audit_run_applies_its_audits_retention(url: str) -> None:
    with session_scope(url) as session:
        session.execute(update(Run).where(Run.id == "d1").values(config={"retention": {"keep_last": 3}}))
    kept = retain_after(url, "d1")
    assert kept is not None and kept.chosen == ["d200", "d100"]
    assert run_ids(url) == {"d1", "d10", "d40", "stuck", "weekly-old"}
    assert retain_after(url, "d10") is None  # no retention in its spec: nothing happens
    with pytest.raises(GcError, match="no run of audit 'nigthly'"):
        expired_runs(url, "nigthly", Retention(keep_last=1))
