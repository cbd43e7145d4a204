"""The root ``camaudit`` Typer and its sub-command groups; command modules register on them."""

from __future__ import annotations

import typer

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Batch CAM explanations for vision models."
)
db_app = typer.Typer(no_args_is_help=True, help="Database migrations.")
app.add_typer(db_app, name="db")
audit_app = typer.Typer(no_args_is_help=True, help="Named, scheduled audits from a YAML file.")
app.add_typer(audit_app, name="audit")
