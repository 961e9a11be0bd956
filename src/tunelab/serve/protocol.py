"""The OpenAI request bodies tunelab serves, checked once at the edge, and the error shape clients expect.

A bad request is an `ApiError` (4xx, OpenAI's `{"error": {"message", "type", "param", "code"}}`),
never a 500: the official clients raise the matching exception and the server goes on serving.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

MAX_N = 16


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
        retry_after: int | None = None,  # seconds, sent as Retry-After (a 429)
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.retry_after = retry_after

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=MAX_N)
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = Field(None, ge=-(2**63), le=2**64 - 1)  # what a torch.Generator accepts
    stream: bool = False
    ignore_eos: bool = False  # vLLM's extension
    return_token_ids: bool = False  # vLLM's extension: the prompt's ids in the response (see `serve --check`)

    @property
    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        return [s for s in stops if s]  # "" would end every answer before its first token


class ChatRequest(_Sampling):
    messages: list[dict[str, Any]] = Field(min_length=1)
    tools: Optional[list[dict[str, Any]]] = None
    max_completion_tokens: Optional[int] = Field(None, ge=1)

    @property
    def limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str]]
    max_tokens: Optional[int] = Field(16, ge=1)
    echo: Literal[False] = False

    @property
    def limit(self) -> int | None:
        return self.max_tokens


def validation_error(errors: list[dict]) -> ApiError:
    """FastAPI's validation errors as one OpenAI error naming the first bad parameter."""
    first = errors[0] if errors else {}
    where = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(where) or None
    if first.get("type") == "json_invalid":
        return ApiError(400, "the request body is not valid JSON", None, "invalid_json")
    return ApiError(400, f"{param or 'body'}: {first.get('msg', 'invalid value')}", param, "invalid_value")
