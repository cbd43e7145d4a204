"""What a benchmark's PostgreSQL backends wait on, sampled from ``pg_stat_activity``.

Also their CPU time and the S3 server's (from /proc) and the WAL written meanwhile, so a
curve that flattens says why: a lock, WAL, or a server's CPU.
"""

from __future__ import annotations

import os
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
from sqlalchemy.engine import make_url

SAMPLE_S = 0.01


@dataclass
class Sampled:
    """What the bench's PostgreSQL backends were doing, every ``SAMPLE_S``."""

    samples: int = 0
    active: int = 0  # backend-samples running a statement
    waits: Counter[str] = field(default_factory=Counter)  # backend-samples waiting, by what
    pg_cpu_s: float = 0.0
    s3_cpu_s: float = 0.0
    wal_bytes: int = 0


def _classify(query: str) -> str:
    """Which statement of the commit path a waiting backend is in."""
    q = " ".join(query.split()).lower()
    if q.startswith("select runs.") and (
        "for update" in q or "for no key update" in q or "for key share" in q
    ):
        return "run row lock"
    if "insert into heatmaps" in q or "insert into patch_scores" in q:
        return "insert into heatmaps or patch_scores"
    if q.startswith("update items") or "update items" in q:
        return "items update"
    if q.startswith("select shards.") and "for update" in q:
        return "shard row lock"
    if q.startswith("commit"):
        return "commit"
    return "other"


def _cpu_s(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Sampler:
    """Samples the bench database's backends from a thread: waits, CPU, and the S3 server's CPU."""

    def __init__(self, database_url: str, s3_pid: int | None) -> None:
        url = make_url(database_url)
        self._dsn = url.set(drivername="postgresql").render_as_string(hide_password=False)
        self._s3_pid = s3_pid
        self.result = Sampled()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pg-sampler", daemon=True)
        self._first_cpu: dict[int, float] = {}
        self._last_cpu: dict[int, float] = {}

    def __enter__(self) -> Sampler:
        self._conn = psycopg.connect(self._dsn, autocommit=True)
        self._lsn = self._conn.execute("select pg_current_wal_lsn()").fetchone()[0]  # type: ignore[index]
        self._s3_start = _cpu_s(self._s3_pid) if self._s3_pid else None
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        got = self._conn.execute(
            "select pg_wal_lsn_diff(pg_current_wal_lsn(), %s::pg_lsn)", (self._lsn,)
        ).fetchone()
        self.result.wal_bytes = int(got[0]) if got else 0
        self._conn.close()
        self.result.pg_cpu_s = sum(self._last_cpu[p] - self._first_cpu[p] for p in self._last_cpu)
        if self._s3_pid and self._s3_start is not None:
            self.result.s3_cpu_s = (_cpu_s(self._s3_pid) or self._s3_start) - self._s3_start

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            rows = self._conn.execute(
                "select pid, state, wait_event_type, wait_event, query from pg_stat_activity "
                "where datname = current_database() and pid <> pg_backend_pid() "
                "and backend_type = 'client backend'"
            ).fetchall()
            self.result.samples += 1
            for pid, state, wait_type, wait_event, query in rows:
                cpu = _cpu_s(pid)
                if cpu is not None:
                    self._first_cpu.setdefault(pid, cpu)
                    self._last_cpu[pid] = cpu
                if state != "active":
                    continue
                self.result.active += 1
                if wait_type == "Lock":
                    self.result.waits[f"lock: {_classify(query or '')}"] += 1
                elif wait_type in ("IO", "LWLock") and wait_event and "WAL" in wait_event.upper():
                    self.result.waits[f"WAL: {wait_event}"] += 1
                elif wait_type:
                    self.result.waits[f"{wait_type}: {wait_event}"] += 1
