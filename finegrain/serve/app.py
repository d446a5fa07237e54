"""The HTTP API and the page of `finegrain serve` (FastAPI), built around one live index.

    GET  /                     the search page (static/, shipped in the package: works offline)
    GET  /healthz              {"status": "ok"} once the index is loaded
    GET  /v1/info              model, index type, size, the recall measured at build, limits, batching
    POST /v1/search            multipart `image` (+ `k`, optional `label`): the k nearest indexed images
    POST /v1/classify          multipart `image`: the top-5 classes (only with --classifier)
    GET  /v1/thumbnail/{id}    a JPEG of indexed image `id`: by id only, never by a path

Every error is JSON: {"status", "error", "message"}. Uploads are checked in
finegrain.serve.uploads, the token and body size in finegrain.serve.guards; inference runs in
the batchers' threads (finegrain.serve.batching), decoding in the thread pool, never on the loop.
"""
from __future__ import annotations

import re
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any, AsyncIterator

import torch
from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from finegrain.runtime import default_device
from finegrain.serve.batching import Batcher, Busy
from finegrain.serve.classify import Classifier
from finegrain.serve.config import ServeConfig
from finegrain.serve.guards import BearerToken, BodyLimit, error_body
from finegrain.serve.live_index import LiveIndex, prepare_query, search_batch
from finegrain.serve.uploads import MULTIPART_OVERHEAD, UploadRefused, read_upload

MAX_K = 1000
MAX_LABEL = 200
_ITEM_ID = re.compile(r"[0-9]{1,12}")
PAGE_HEADERS = {  # the page loads nothing from elsewhere: no CDN, no inline script
    "content-security-policy": "default-src 'self'; img-src 'self' blob:; style-src 'self'; script-src 'self'; "
                               "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "x-content-type-options": "nosniff", "referrer-policy": "no-referrer"}
STATIC = {"/": ("index.html", "text/html; charset=utf-8"), "/app.js": ("app.js", "text/javascript; charset=utf-8"),
          "/app.css": ("app.css", "text/css; charset=utf-8")}


class _Refusal(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, code, message), status_code=status, headers=headers)


def create_app(config: ServeConfig) -> FastAPI:
    """The app, with the index (and classifier) loaded: a bad index fails here, before binding a port."""
    if config.threads is not None:  # on a shared machine one thread per process avoids idle spinning
        torch.set_num_threads(config.threads)
    device = torch.device(config.device) if config.device else default_device()
    live = LiveIndex(config.index, device, config.reload_interval)
    classifier = Classifier.load(config.classifier, device) if config.classifier else None
    searcher = Batcher(search_batch, max_batch=config.max_batch, max_wait_ms=config.max_wait_ms, name="search")
    classify = Batcher(classifier.top_classes, max_batch=config.max_batch, max_wait_ms=config.max_wait_ms,
                       name="classify") if classifier else None
    pages = {route: (resources.files("finegrain.serve").joinpath("static", name).read_bytes(), kind)
             for route, (name, kind) in STATIC.items()}

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        live.start()
        yield
        searcher.close()
        if classify is not None:
            classify.close()
        live.close()

    app = FastAPI(title="finegrain", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodyLimit, max_bytes=config.limits.max_bytes + MULTIPART_OVERHEAD)
    if config.token:
        app.add_middleware(BearerToken, token=config.token)  # added last: runs first

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, error: HTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed"}
        message = {404: "No such route or item.", 405: "This route does not take that method."}.get(
            error.status_code, str(error.detail))
        return _error(error.status_code, codes.get(error.status_code, "http_error"), message,
                      getattr(error, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, error: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(part) for part in e['loc'][1:]) or 'body'}: {e['msg']}"
                             for e in error.errors())
        return _error(422, "invalid_request", f"{problems}. Send a multipart form with `image` (a file) and "
                                              f"`k` in [1, {MAX_K}].")

    @app.exception_handler(UploadRefused)
    async def refused(_: Request, error: UploadRefused) -> JSONResponse:
        return _error(error.status, error.code, str(error))

    @app.exception_handler(_Refusal)
    async def refusal(_: Request, error: _Refusal) -> JSONResponse:
        return _error(error.status, error.code, error.message)

    @app.exception_handler(Busy)
    async def busy(_: Request, error: Busy) -> JSONResponse:
        return _error(503, "busy", f"The server is at capacity ({error}). Retry shortly.", {"retry-after": "1"})

    @app.exception_handler(Exception)
    async def failed(_: Request, error: Exception) -> JSONResponse:  # logged by uvicorn with its traceback
        return _error(500, "internal_error", "The server failed to answer this request; its log says why.")

    def page(route: str):
        async def serve_file() -> Response:
            body, kind = pages[route]
            return Response(body, media_type=kind, headers=PAGE_HEADERS)
        return serve_file

    for route in STATIC:
        app.get(route, include_in_schema=False)(page(route))

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/info")
    async def info() -> dict[str, Any]:
        with live.use() as snapshot:
            facts = snapshot.info()
        return {**facts, "classifier": classifier.info() if classifier else None,
                "limits": {"max_upload_bytes": config.limits.max_bytes, "max_pixels": config.limits.max_pixels,
                           "max_k": MAX_K},
                "batching": {"max_batch": config.max_batch, "max_wait_ms": config.max_wait_ms,
                             "search": searcher.stats.to_dict()}}

    @app.post("/v1/search")
    async def search(image: UploadFile = File(...), k: int = Form(10, ge=1, le=MAX_K),
                     label: str | None = Form(None, max_length=MAX_LABEL)) -> dict[str, Any]:
        data = await image.read()
        with live.use() as snapshot:
            job, indexed_id, indexed_label = await run_in_threadpool(prepare_query, snapshot, data, k, config.limits)
            neighbours = await searcher(job)
            version = snapshot.version
        return {"k": k, "index_version": version, "neighbours": neighbours,
                "query": {"label": label or indexed_label, "indexed_id": indexed_id}}

    @app.post("/v1/classify")
    async def classify_image(image: UploadFile = File(...)) -> dict[str, Any]:
        if classify is None:
            raise _Refusal(404, "no_classifier", "This server has no classifier. Start it with --classifier CKPT.")
        data = await image.read()
        rgb = await run_in_threadpool(read_upload, data, config.limits)
        tensor = await run_in_threadpool(classifier.transform, rgb)
        return {"classes": await classify(tensor)}

    @app.get("/v1/thumbnail/{item_id}")
    async def thumbnail(item_id: str) -> Response:
        data = None
        if _ITEM_ID.fullmatch(item_id):
            with live.use() as snapshot:
                data = await run_in_threadpool(live.thumbnail, snapshot, int(item_id))
        if data is None:
            raise _Refusal(404, "not_found", f"No indexed image has the id {item_id[:40]!r}. Use an id from a "
                                             "search answer.")
        return Response(data, media_type="image/jpeg", headers={"cache-control": "private, max-age=300",
                                                                 "x-content-type-options": "nosniff"})

    return app
