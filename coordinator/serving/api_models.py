"""The HTTP API's request bodies (validated, errors name the field) and OpenAI-shaped response bodies."""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_PROMPT_CHARS = 200_000


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())  # OpenAI clients send more fields

    model: str = Field(min_length=1, max_length=128)
    deadline_ms: int | None = Field(default=None, ge=1, le=600_000)  # from arrival; a late answer gets 504


class CompletionRequest(_Request):
    prompt: str = Field(max_length=MAX_PROMPT_CHARS)
    max_tokens: int = Field(default=16, ge=1)
    stream: bool = False


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=MAX_PROMPT_CHARS)


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1, max_length=64)
    max_tokens: int = Field(default=16, ge=1)
    stream: bool = False


class ClassifyRequest(_Request):
    input: str = Field(max_length=MAX_PROMPT_CHARS)
    top_k: int = Field(default=5, ge=1, le=100)


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(request_id: str, model: str, text: str, finish_reason: str, prompt_tokens: int,
                    completion_tokens: int) -> dict[str, Any]:
    return {"id": request_id, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}],
            "usage": usage(prompt_tokens, completion_tokens)}


def completion_chunk(request_id: str, model: str, text: str, finish_reason: str | None) -> dict[str, Any]:
    return {"id": request_id, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}]}


def chat_body(request_id: str, model: str, text: str, finish_reason: str, prompt_tokens: int,
              completion_tokens: int) -> dict[str, Any]:
    return {"id": request_id, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": finish_reason}],
            "usage": usage(prompt_tokens, completion_tokens)}


def chat_chunk(request_id: str, model: str, text: str, finish_reason: str | None) -> dict[str, Any]:
    delta = {"content": text} if text else {}
    return {"id": request_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}
