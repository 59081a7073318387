"""The serving HTTP API (FastAPI): OpenAI-style completions and chat (streaming as server-sent events), models,
classification, Prometheus metrics, health, and admin calls to load, unload and pin adapters while running."""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from coordinator.errors import NotFoundError
from coordinator.serving.api_models import (
    ChatRequest,
    ClassifyRequest,
    CompletionRequest,
    chat_body,
    chat_chunk,
    completion_body,
    completion_chunk,
    error_body,
    new_id,
)
from coordinator.serving.batching import Event, Job
from coordinator.serving.body_limit import BodyLimit
from coordinator.serving.cache import CacheFullError
from coordinator.serving.engine import AdapterRefusedError, TorchEngine
from coordinator.serving.gate import Admission, GateError, QueryGate, QueryRequest, Settlement

MAX_BODY_BYTES = 1 << 20
WAIT_CAP_S = 600.0  # the longest any request waits for its answer


def _error(status: int, message: str, kind: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, kind, param), status_code=status)


class _OpenGate:
    """No marketplace: the model name is the adapter id (the model owner's own, private port)."""

    def __init__(self, engine: TorchEngine) -> None:
        self.engine = engine

    def admit(self, request: QueryRequest) -> Admission:
        return Admission(adapter_id=request.model, max_top_k=100, round_probabilities=6)

    def settle(self, admission: Admission, settlement: Settlement) -> None:
        return None

    def visible_models(self, authorization: str | None) -> list[str]:
        return self.engine.state.adapter_ids()


class _Call:
    """One admitted request: its events from the engine thread, and its settlement, made exactly once."""

    def __init__(self, gate: QueryGate, admission: Admission, prompt_tokens: int) -> None:
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.gate, self.admission, self.prompt_tokens = gate, admission, prompt_tokens
        self.started, self.settled, self.tokens_out = time.monotonic(), False, 0

    def emit(self, event: Event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop is gone (server shutting down)
            pass

    async def settle(self, status: str) -> None:
        if self.settled:
            return
        self.settled = True
        settlement = Settlement(self.prompt_tokens, self.tokens_out, time.monotonic() - self.started, status)
        await run_in_threadpool(self.gate.settle, self.admission, settlement)

    async def next_event(self, deadline: float) -> Event:
        try:
            return await asyncio.wait_for(self.events.get(), timeout=max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            return {"type": "error", "status": 504, "code": "deadline_exceeded", "message": "no answer in time"}


def _sse(payload: dict[str, Any] | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def build_app(engine: TorchEngine, gate: QueryGate | None = None, *, admin_token: str | None = None,
              routers: Sequence[APIRouter] = ()) -> FastAPI:
    app = FastAPI(title="offsite serving", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodyLimit, limit=MAX_BODY_BYTES)
    the_gate: QueryGate = gate or _OpenGate(engine)
    limits = engine.config

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {"loc": ("body",), "msg": "invalid"}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or "body"
        message = "body: not valid JSON" if first.get("type") == "json_invalid" else f"{param}: {first['msg']}"
        return _error(400, message, "invalid_request_error", param)

    async def admit(request: Request, model: str, endpoint: str, prompt_tokens: int,
                    max_tokens: int) -> Admission | JSONResponse:
        if prompt_tokens > limits.max_prompt_tokens:
            param = "input" if endpoint == "classify" else "prompt"
            return _error(400, f"{param}: {prompt_tokens} tokens, more than the {limits.max_prompt_tokens} allowed",
                          "invalid_request_error", param)
        if max_tokens > limits.max_new_tokens:
            return _error(400, f"max_tokens: at most {limits.max_new_tokens}", "invalid_request_error", "max_tokens")
        query = QueryRequest(request.headers.get("authorization"), model, endpoint, prompt_tokens, max_tokens)
        try:
            return await run_in_threadpool(the_gate.admit, query)
        except GateError as refused:
            return _error(refused.status, refused.message, refused.code)

    async def start(call: _Call, job: Job, model: str, want: str) -> JSONResponse | None:
        """Check the adapter serves ``want`` and queue the job; an error response (the call settled) if not."""
        try:
            labels = await run_in_threadpool(engine.adapter_labels, job.adapter_id)
            if (want == "classify") != (labels is not None):
                await call.settle("error")
                other = "/v1/classify" if labels is not None else "/v1/completions"
                return _error(400, f"model: {model!r} does not serve this endpoint; use {other}",
                              "invalid_request_error", "model")
            await run_in_threadpool(engine.submit, job)
        except NotFoundError:
            await call.settle("error")
            return _error(404, f"model: unknown model {model!r}", "invalid_request_error", "model")
        except AdapterRefusedError as refused:
            await call.settle("error")
            return _error(400, f"model: {refused}", "invalid_request_error", "model")
        except CacheFullError:
            await call.settle("error")
            return _error(503, "the server is busy; retry later", "overloaded")
        return None

    async def generate(request: Request, body: CompletionRequest | ChatRequest, prompt: str, chat: bool) -> Response:
        arrived = time.monotonic()
        ids = engine.tokenizer(prompt, add_special_tokens=not chat)["input_ids"]
        admission = await admit(request, body.model, "chat" if chat else "completions", len(ids), body.max_tokens)
        if isinstance(admission, JSONResponse):
            return admission
        call = _Call(the_gate, admission, len(ids))
        deadline = arrived + body.deadline_ms / 1000 if body.deadline_ms else None
        job = Job("generate", admission.adapter_id, ids, max_new_tokens=body.max_tokens, deadline=deadline,
                  emit=call.emit)
        if (refused := await start(call, job, body.model, "generate")) is not None:
            return refused
        wait_until = (deadline + 1.0) if deadline else arrived + WAIT_CAP_S
        request_id = new_id("chatcmpl" if chat else "cmpl")
        chunk, whole = (chat_chunk, chat_body) if chat else (completion_chunk, completion_body)

        if not body.stream:
            while (event := await call.next_event(wait_until))["type"] == "token":
                call.tokens_out += 1
            if event["type"] == "error":
                await call.settle("deadline" if event["code"] == "deadline_exceeded" else "error")
                return _error(event["status"], event["message"], event["code"])
            call.tokens_out = event["completion_tokens"]
            await call.settle("ok")
            return JSONResponse(whole(request_id, body.model, event["text"], event["finish_reason"], len(ids),
                                      event["completion_tokens"]))

        async def stream() -> AsyncIterator[str]:
            try:
                while True:
                    event = await call.next_event(wait_until)
                    if event["type"] == "token":
                        call.tokens_out += 1
                        if event["text"]:
                            yield _sse(chunk(request_id, body.model, event["text"], None))
                        continue
                    if event["type"] == "done":
                        call.tokens_out = event["completion_tokens"]
                        await call.settle("ok")
                        yield _sse(chunk(request_id, body.model, "", event["finish_reason"]))
                    else:
                        await call.settle("deadline" if event["code"] == "deadline_exceeded" else "error")
                        yield _sse(error_body(event["message"], event["code"]))
                    yield _sse("[DONE]")
                    return
            finally:
                await call.settle("cancelled")  # a no-op once settled

        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request, body: CompletionRequest) -> Response:
        return await generate(request, body, body.prompt, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request, body: ChatRequest) -> Response:
        messages = [m.model_dump() for m in body.messages]
        if getattr(engine.tokenizer, "chat_template", None):
            prompt = str(engine.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
        else:
            prompt = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
        return await generate(request, body, prompt, chat=True)

    @app.post("/v1/classify")
    async def classify(request: Request, body: ClassifyRequest) -> Response:
        arrived = time.monotonic()
        ids = engine.tokenizer(body.input, truncation=False)["input_ids"]
        admission = await admit(request, body.model, "classify", len(ids), 0)
        if isinstance(admission, JSONResponse):
            return admission
        call = _Call(the_gate, admission, len(ids))
        deadline = arrived + body.deadline_ms / 1000 if body.deadline_ms else None
        job = Job("classify", admission.adapter_id, ids, deadline=deadline, emit=call.emit)
        if (refused := await start(call, job, body.model, "classify")) is not None:
            return refused
        event = await call.next_event((deadline + 1.0) if deadline else arrived + WAIT_CAP_S)
        if event["type"] == "error":
            await call.settle("deadline" if event["code"] == "deadline_exceeded" else "error")
            return _error(event["status"], event["message"], event["code"])
        await call.settle("ok")
        labels = await run_in_threadpool(engine.adapter_labels, admission.adapter_id) or []
        ranked = sorted(zip(labels, event["probabilities"], strict=False), key=lambda p: -p[1])
        top = ranked[:min(body.top_k, admission.max_top_k)]
        return JSONResponse({"id": new_id("cls"), "object": "classification", "model": body.model,
                             "labels": [{"label": label, "probability": round(p, admission.round_probabilities)}
                                        for label, p in top],
                             "usage": {"prompt_tokens": len(ids), "total_tokens": len(ids)}})

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        names = await run_in_threadpool(the_gate.visible_models, request.headers.get("authorization"))
        return JSONResponse({"object": "list", "data": [
            {"id": name, "object": "model", "owned_by": "offsite", "parent": engine.base_id} for name in names]})

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(engine.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        return JSONResponse({"status": "ok", "queued": len(engine.queue), "adapters": engine.cache.loaded()})

    if admin_token:
        app.include_router(admin_router(engine, admin_token))
    for router in routers:
        app.include_router(router)
    return app


def admin_router(engine: TorchEngine, token: str) -> APIRouter:
    router = APIRouter(prefix="/admin")

    def authorized(request: Request) -> bool:
        given = request.headers.get("authorization", "").removeprefix("Bearer ").encode()
        return hmac.compare_digest(given, token.encode())

    @router.get("/adapters")
    async def adapters(request: Request) -> JSONResponse:
        if not authorized(request):
            return _error(401, "admin token required", "unauthorized")
        info = engine.cache.info()
        return JSONResponse({"served": engine.state.adapter_ids(), "budget_mb": engine.config.cache_mb,
                             "loaded": {k: {"bytes": e.size, "pinned": e.pinned, "in_use": e.in_use}
                                        for k, e in info.items()}})

    @router.post("/adapters/{adapter_id}/{action}")
    async def act(request: Request, adapter_id: str, action: str) -> JSONResponse:
        if not authorized(request):
            return _error(401, "admin token required", "unauthorized")
        if action not in ("load", "unload", "pin", "unpin"):
            return _error(404, f"unknown action {action!r}", "invalid_request_error", "action")
        try:
            record = await run_in_threadpool(engine.state.record, adapter_id)
            if action == "unload":
                await run_in_threadpool(engine.cache.evict, adapter_id)
            else:
                was_pinned = adapter_id in {k for k, e in engine.cache.info().items() if e.pinned}
                pinned = {"load": was_pinned, "pin": True, "unpin": False}[action]
                await run_in_threadpool(engine.cache.pin, adapter_id, pinned, record.size_bytes())
        except NotFoundError:
            return _error(404, f"unknown adapter {adapter_id!r}", "invalid_request_error", "adapter_id")
        except (CacheFullError, AdapterRefusedError) as error:
            return _error(409, str(error), "conflict")
        return JSONResponse({"adapter": adapter_id, "action": action, "loaded": engine.cache.loaded()})

    return router
