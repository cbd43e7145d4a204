"""Getting planned shards done: enqueued on Celery, or executed in this process.

Both ways call the same Celery task; embedded mode runs it through ``Task.apply`` so retries
and failure handling are the very code a worker runs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from schema.settings import Settings
from workers.celery_app import SHARD_QUEUE, configure


def enqueue(run_id: str, shard_ids: Sequence[int], settings: Settings) -> list[str]:
    configure(settings)
    from workers.tasks import explain_shard_task

    return [explain_shard_task.apply_async((run_id, sid), queue=SHARD_QUEUE).id for sid in shard_ids]


def run_embedded(
    run_id: str,
    shard_ids: Sequence[int],
    settings: Settings,
    on_shard_done: Callable[[dict[str, object]], None] | None = None,
) -> None:
    app = configure(settings)
    app.loader.import_default_modules()  # every task a worker would have, finalisation included
    from workers.tasks import explain_shard_task

    for sid in shard_ids:
        # throw=False lets Celery's eager mode run the task's retries; a final error is re-raised.
        result = explain_shard_task.apply((run_id, sid), throw=False)
        if result.failed():
            raise result.result
        outcome = result.result
        if on_shard_done is not None:
            on_shard_done(outcome)
