"""The read-only web UI: runs, a run's region gallery, one item's maps, drift between two runs.

Pages are rendered on the server (Jinja2) and hold no script: every filter is a query
parameter, so each view has a URL that can be shared, bookmarked and cached.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from fastapi import FastAPI, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, PlainTextResponse, Response
from fastapi.templating import Jinja2Templates
from sqlalchemy.engine import make_url
from starlette.exceptions import HTTPException as StarletteHTTPException

from scheduler.alerts import run_alerts
from scheduler.query import DELETING, QueryError, get_run, resolve_class
from scheduler.render import RenderError
from scheduler.web import data
from scheduler.web.auth import token_guard
from scheduler.web.compare import DriftUnavailableError, drift_view, stored_drift_view
from scheduler.web.group_view import group_view, shared_scale_overlay
from scheduler.web.images import Crop, ImageService, JpegImage
from scheduler.web.orders import ORDERS, ordered_cards
from schema.db import normalise_url

__all__ = ["create_app"]

TEMPLATES = Path(__file__).with_name("templates")
PAGES = "/ (runs), /runs/RUN_ID, /items/ITEM_ID, /drift?a=RUN_A&b=RUN_B"
IMAGE_CACHE = "private, max-age=86400"
# Bounds on numbers in URLs, so that an absurd one is a 400 with a reason, never an SQL overflow.
MAX_PAGE = 1_000_000
MAX_ID = 2**63 - 1
MAX_CLASS = 2**31 - 1
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; "
    "form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
}


def _qs(**params: Any) -> str:
    """A query string of the non-empty parameters (``class_`` is sent as ``class``)."""
    kept = {k.rstrip("_"): v for k, v in params.items() if v is not None and v != ""}
    return "?" + urlencode(kept) if kept else ""


def _when(value: datetime | None) -> str:
    return "–" if value is None else value.strftime("%Y-%m-%d %H:%M")


def _num(value: Any, digits: int = 4) -> Any:
    if isinstance(value, bool) or not isinstance(value, float):
        return value
    if value == 0 or not math.isfinite(value):
        return str(value)
    return f"{value:.{digits}g}"


def _pct(part: int | None, whole: int | None) -> float:
    return 0.0 if not whole else round(100.0 * (part or 0) / whole, 2)


def _redactor(database_url: str) -> Callable[[str], str]:
    """Messages from the query layer name the database URL; visitors must not see its password."""
    raw = {database_url, normalise_url(database_url)}
    shown = make_url(normalise_url(database_url)).render_as_string(hide_password=True)

    def redact(message: str) -> str:
        for url in raw:
            message = message.replace(url, shown)
        return message

    return redact


def _templates() -> Jinja2Templates:
    templates = Jinja2Templates(directory=str(TEMPLATES))
    env = templates.env
    env.globals.update(qs=_qs, pct=_pct, class_label=data.class_label, prediction_label=data.prediction_label)
    env.filters.update(when=_when, num=_num, basename=lambda uri: str(uri).rstrip("/").rsplit("/", 1)[-1])
    return templates


def create_app(
    database_url: str,
    *,
    token: str | None = None,
    endpoint_url: str | None = None,
    region: str | None = None,
    page_size: int = 24,
    runs_page_size: int = 25,
    scan_window: int = data.SCAN_WINDOW,
) -> FastAPI:
    """The ASGI app over one database; ``token`` set means every request must carry it."""
    app = FastAPI(title="camaudit", docs_url=None, redoc_url=None, openapi_url=None)
    templates = _templates()
    public = _redactor(database_url)
    images = ImageService(database_url, endpoint_url=endpoint_url, region=region)
    app.middleware("http")(token_guard(token))

    def read(path: str, **options: Any) -> Callable[[Any], Any]:
        """GET routes that answer HEAD too, as HTTP says every GET resource should."""
        return app.api_route(path, methods=["GET", "HEAD"], **options)

    @app.middleware("http")
    async def security_headers(request: Request, call_next: Any) -> Response:
        response: Response = await call_next(request)
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        return response

    def page(request: Request, name: str, code: int = 200, **context: Any) -> HTMLResponse:
        context.setdefault("title", "camaudit")
        if context.get("error"):
            context["error"] = public(context["error"])
        return templates.TemplateResponse(request, name, context, status_code=code)

    def problem(request: Request, code: int, message: str) -> HTMLResponse:
        return page(request, "error.html", code, title=f"{code}", status=code, message=public(message))

    def text(message: str, code: int) -> PlainTextResponse:
        return PlainTextResponse(public(message), status_code=code)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 404:
            return problem(request, 404, f"there is no page at {request.url.path}; the pages are {PAGES}")
        return problem(request, exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def bad_parameter(request: Request, exc: RequestValidationError) -> Response:
        reasons = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'][1:]) or e['loc'][0]}: {e['msg']}" for e in exc.errors()
        )
        return problem(request, 400, f"bad parameter for {request.url.path}: {reasons}")

    @read("/favicon.ico")
    def favicon() -> Response:
        return Response(status_code=204, headers={"Cache-Control": "max-age=86400"})

    @read("/healthz", response_class=PlainTextResponse)
    def healthz() -> str:
        return "ok"

    @read("/", response_class=HTMLResponse)
    def runs(request: Request, page_no: int = Query(1, alias="page", ge=1, le=MAX_PAGE)) -> HTMLResponse:
        listing = data.runs_page(database_url, page=page_no, size=runs_page_size)
        return page(request, "runs.html", title="camaudit · runs", listing=listing)

    @read("/runs/{run_id}", response_class=HTMLResponse)
    def run_page(
        request: Request,
        run_id: str,
        class_: str | None = Query(None, alias="class"),
        method: str | None = None,
        layer: str | None = None,
        label: str | None = None,
        correct: str | None = None,
        after: str | None = None,
        page_no: int = Query(1, alias="page", ge=1, le=MAX_PAGE),
        order: str = "",
    ) -> HTMLResponse:
        try:
            run = get_run(database_url, run_id)
        except QueryError as exc:
            return problem(request, 404, str(exc))
        if run.status == DELETING:
            return problem(request, 404, f"run {run_id} is being deleted; its rows are going")
        context: dict[str, Any] = {
            "title": f"camaudit · run {run.id}",
            "run": run,
            "shards": data.run_shards(database_url, run.id),
            "alerts": run_alerts(database_url, run.id),
            "form": {
                "class": class_ or "",
                "method": method or "",
                "layer": layer or "",
                "label": label or "",
            },
            "correct": correct or "",
            "order": order,
            "orders": ORDERS,
            "cards": [],
            "next_cursor": None,
            "scanned": None,
            "page_no": page_no,
            "error": None,
        }
        try:
            query = data.GalleryQuery.from_params(
                run, class_=class_, method=method, layer=layer, label=label, correct=correct
            )
            if order:
                found = data.GalleryPage(
                    list(ordered_cards(database_url, run, query, order, page_size)), None
                )
            else:
                cursor = data.Cursor.parse(after) if after else None
                found = data.gallery(
                    database_url, run, query, after=cursor, size=page_size, window=scan_window
                )
        except QueryError as exc:
            context["error"] = str(exc)
            return page(request, "run.html", 400, **context)
        context.update(
            query=query,
            cards=found.cards,
            scanned=found.scanned,
            next_cursor=found.following.encode() if found.following else None,
        )
        context["form"]["class"] = class_ or data.class_label(run, query.target)
        context["form"]["method"] = query.method
        return page(request, "run.html", **context)

    @read("/runs/{run_id}/groups/{group_id}", response_class=HTMLResponse)
    def group_page(
        request: Request,
        run_id: str,
        group_id: str,
        method: str | None = None,
        class_: str | None = Query(None, alias="class"),
    ) -> HTMLResponse:
        try:
            view = group_view(database_url, run_id, group_id, method, class_)
        except LookupError as exc:
            return problem(request, 404, str(exc))
        except QueryError as exc:
            return problem(request, 400, str(exc))
        return page(request, "group.html", title=f"camaudit · case {group_id}", view=view)

    @read("/heatmaps/{heatmap_id}/shared.jpg")
    def shared_overlay(heatmap_id: int, vmax: float, max_side: int = 512) -> Response:
        try:
            data_ = shared_scale_overlay(
                database_url, heatmap_id, vmax, max_side=max_side, endpoint_url=endpoint_url, region=region
            )
        except LookupError as exc:
            return text(str(exc), 404)
        except RenderError as exc:
            return text(str(exc), 404)
        except QueryError as exc:
            return text(str(exc), 400)
        return Response(data_, media_type="image/jpeg", headers={"Cache-Control": IMAGE_CACHE})

    @read("/items/{item_id}", response_class=HTMLResponse)
    def item_page(request: Request, item_id: int = PathParam(ge=0, le=MAX_ID)) -> HTMLResponse:
        try:
            view = data.item_view(database_url, item_id)
        except QueryError as exc:
            return problem(request, 404, str(exc))
        return page(request, "item.html", title=f"camaudit · item {item_id}", view=view)

    def jpeg(request: Request, etag: str | None, make: Any) -> Response:
        headers = {"Cache-Control": IMAGE_CACHE}
        if etag is not None and etag in request.headers.get("if-none-match", ""):
            return Response(status_code=304, headers={**headers, "ETag": etag})
        try:
            image: JpegImage = make()
        except RenderError as exc:
            return text(str(exc), 404)
        except QueryError as exc:
            return text(str(exc), 400)
        return Response(image.data, media_type="image/jpeg", headers={**headers, "ETag": image.etag})

    @read("/items/{item_id}/overlay.jpg")
    def overlay(
        request: Request,
        method: str,
        item_id: int = PathParam(ge=0, le=MAX_ID),
        class_: str = Query(..., alias="class"),
        layer: str | None = None,
        box: str | None = None,
        pad: float = 0.0,
        max_side: int | None = None,
    ) -> Response:
        try:
            crop = Crop.from_params(box, pad, max_side)
            target = _item_class(database_url, item_id, class_)
        except data.NotFoundError as exc:
            return text(str(exc), 404)
        except QueryError as exc:
            return text(str(exc), 400)
        etag = images.overlay_etag(item_id, method, target, layer or None, crop)
        return jpeg(request, etag, lambda: images.overlay(item_id, method, target, layer or None, crop))

    @read("/items/{item_id}/source.jpg")
    def source(
        request: Request,
        item_id: int = PathParam(ge=0, le=MAX_ID),
        box: str | None = None,
        pad: float = 0.0,
        max_side: int | None = None,
    ) -> Response:
        try:
            crop = Crop.from_params(box, pad, max_side)
            etag = images.source_etag(item_id, crop)
        except QueryError as exc:
            return text(str(exc), 400)
        except RenderError as exc:
            return text(str(exc), 404)
        return jpeg(request, etag, lambda: images.source(item_id, crop))

    @read("/drift", response_class=HTMLResponse)
    def drift(
        request: Request,
        a: str | None = None,
        b: str | None = None,
        threshold: float = Query(0.5, ge=0.0, le=1.0),
        limit: int = Query(50, ge=1, le=500),
        recompute: bool = False,
    ) -> HTMLResponse:
        context: dict[str, Any] = {
            "title": "camaudit · drift",
            "choices": data.recent_run_ids(database_url),
            "a": a or "",
            "b": b or "",
            "threshold": threshold,
            "limit": limit,
            "view": None,
            "stored": False,
            "recomputed": False,
            "error": None,
        }
        if b and not a:
            try:
                context["a"] = get_run(database_url, b).baseline_run_id or ""
            except QueryError as exc:
                context["error"] = str(exc)
                return page(request, "drift.html", 404, **context)
            if not context["a"]:
                context["error"] = f"run {b} has no baseline run; choose run A to compare it with"
                return page(request, "drift.html", **context)
        if not (context["a"] and b):
            return page(request, "drift.html", **context)
        if not recompute:
            # What finalisation stored; reading every map of both runs waits for an explicit ask.
            try:
                get_run(database_url, context["a"])
                get_run(database_url, b)
            except QueryError as exc:
                context["error"] = str(exc)
                return page(request, "drift.html", 400, **context)
            context["view"] = stored_drift_view(database_url, context["a"], b)
            context["stored"] = True
            return page(request, "drift.html", **context)
        context["recomputed"] = True
        try:
            context["view"] = drift_view(
                database_url,
                context["a"],
                b,
                endpoint_url=endpoint_url,
                region=region,
                threshold=threshold,
                limit=limit,
            )
        except DriftUnavailableError as exc:
            context["error"] = str(exc)
            return page(request, "drift.html", 501, **context)
        except ValueError as exc:
            context["error"] = str(exc)
            return page(request, "drift.html", 400, **context)
        return page(request, "drift.html", **context)

    return app


def _item_class(database_url: str, item_id: int, value: str) -> int:
    """A class name needs the item's run for its class names; an index needs nothing."""
    if value.lstrip("-").isdigit():
        if abs(int(value)) > MAX_CLASS:
            raise QueryError(f"class {value[:30]} is not a class index (0..{MAX_CLASS}) nor a class name")
        return int(value)
    return resolve_class(data.item_run(database_url, item_id), value)
