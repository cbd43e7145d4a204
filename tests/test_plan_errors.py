"""A bad request fails before anything is written or enqueued, and says what would be right."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect, text

from scheduler.plan import PlanError, plan_run
from scheduler.sources import SourceError
from schema.payloads import RunSpec
from schema.settings import Settings
from workers.models import ModelLoadError
from workers.synth import make_dataset


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("d"), 4, seed=1)


def _nothing_written(db: Path) -> bool:
    if not db.exists():
        return True
    engine = create_engine(f"sqlite:///{db}")
    try:
        if "runs" not in inspect(engine).get_table_names():
            return True
        with engine.connect() as conn:
            return conn.execute(text("select count(*) from runs")).scalar_one() == 0
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    ("changes", "error", "words"),
    [
        ({"model": "torchvision:resnet1800"}, ModelLoadError, "resnet18"),
        ({"methods": ["gradcam", "gradcamm"]}, PlanError, "gradcam"),
        ({"layers": ["featurez"]}, ValueError, "features"),
        ({"source": "/nonexistent/folder"}, SourceError, "does not exist"),
    ],
)
def test_bad_request_fails_before_planning(
    manifest: Path, tmp_path: Path, changes: dict[str, object], error: type[Exception], words: str
) -> None:
    db = tmp_path / "runs.db"
    settings = Settings(database_url=f"sqlite:///{db}", storage_url=str(tmp_path / "out"))
    spec = RunSpec(**{"source": str(manifest), **changes})  # type: ignore[arg-type]
    with pytest.raises(error) as info:
        plan_run(spec, settings)
    assert words in str(info.value)
    assert _nothing_written(db)
    assert not (tmp_path / "out").exists()


def test_bad_target_spec_is_refused() -> None:
    with pytest.raises(ValueError, match="topk:N"):
        RunSpec(source="x", targets="top-3")
