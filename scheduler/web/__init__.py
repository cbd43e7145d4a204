"""``camaudit serve``: a read-only web UI over the runs of one database."""

from scheduler.web.app import create_app
from scheduler.web.auth import WebConfigError, check_exposure
from scheduler.web.server import check_database, serve

__all__ = ["WebConfigError", "check_database", "check_exposure", "create_app", "serve"]
