"""`tunelab serve`: the OpenAI chat and completions API over a base model and its adapters.

The request's `model` picks the base or an adapter; all are loaded once and switched per batch.
Prompts are rendered by training's own `Encoder` with each run's saved template, reasoning rule and
stop ids, so a served prompt is token for token the one the adapter was trained on.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
import uuid
from dataclasses import dataclass

from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from ..data.conversation import Conversation
from ..data.encode import Encoder
from ..data.formats import message_from_dict
from ..data.tools import parse_tools
from ..errors import TunelabError
from ..infer.load import InferenceModel, Variant, prompt_encoder
from ..infer.replies import parse_reply
from .batcher import Batcher, BatcherBusy, GenerationJob
from .guard import DEFAULT_MAX_REQUEST_BYTES, LOCAL_HOSTS, Guard, key_matches
from .protocol import ApiError, ChatRequest, CompletionRequest, validation_error

log = logging.getLogger("tunelab")
DEFAULT_MAX_TOKENS = 1024
SERVER_MAX_TOKENS = 4096  # what one completion may ask for at most unless --max-tokens says otherwise
MAX_JOBS_PER_REQUEST = 64  # prompts x n
RETRY_AFTER_S = 2
DISCONNECT_CHECK_S = 0.25  # how often a non-streamed request looks whether its client is still there


@dataclass
class ServedModel:
    variant: Variant
    encoder: Encoder


class Server:
    """What the routes share: the models by id, their encoders, the batcher and the context length."""

    def __init__(
        self,
        im: InferenceModel,
        names: dict[str, Variant],
        api_key: str | None = None,
        max_batch: int = 32,
        max_tokens: int = SERVER_MAX_TOKENS,
        max_queue: int = 256,
    ):
        self.im = im
        self.models = {}
        for name, variant in names.items():
            self.models[name] = ServedModel(variant, prompt_encoder(variant, im.base_path))
        self.api_key = api_key
        self.max_tokens = max_tokens
        self.batcher = Batcher(im, max_batch=max_batch, max_queue=max_queue)
        self.context = getattr(im.model.config, "max_position_embeddings", None)
        self.created = int(time.time())

    def served(self, name: str) -> ServedModel:
        if name not in self.models:
            raise ApiError(
                404, f"model {name!r} is not served here; served: {', '.join(self.models)}", "model", "model_not_found"
            )
        return self.models[name]

    def budget(self, prompt: list[int], asked: int | None) -> int:
        if not prompt:
            raise ApiError(400, "the prompt is empty: there is nothing to continue", "prompt", "invalid_value")
        room = None if self.context is None else self.context - len(prompt)
        if room is not None and room < (asked or 1):
            raise ApiError(
                400,
                f"the prompt is {len(prompt)} tokens and {asked or 1} more were asked for; this "
                f"model's context is {self.context} tokens",
                "messages",
                "context_length_exceeded",
            )
        if asked is not None and asked > self.max_tokens:
            raise ApiError(
                400,
                f"max_tokens: {asked} is over this server's limit of {self.max_tokens}",
                "max_tokens",
                "invalid_value",
            )
        return asked or min(DEFAULT_MAX_TOKENS, self.max_tokens, room or DEFAULT_MAX_TOKENS)

    def jobs(self, variant: Variant, prompts: list[list[int]], req, out: asyncio.Queue) -> list[GenerationJob]:
        if len(prompts) * req.n > MAX_JOBS_PER_REQUEST:
            raise ApiError(
                400,
                f"{len(prompts)} prompts x n={req.n} is {len(prompts) * req.n} completions; at most "
                f"{MAX_JOBS_PER_REQUEST} per request",
                "n",
                "invalid_value",
            )
        loop = asyncio.get_running_loop()
        jobs = [
            GenerationJob(
                variant,
                prompt,
                self.budget(prompt, req.limit),
                req.temperature,
                req.top_p,
                req.seed,
                loop,
                out,
                req.stops,
                index=k * req.n + i,
                ignore_eos=req.ignore_eos,
            )
            for k, prompt in enumerate(prompts)
            for i in range(req.n)
        ]
        try:
            self.batcher.submit_all(jobs)
        except BatcherBusy:
            raise ApiError(
                429,
                "the server is busy: too many completions are waiting; retry shortly",
                None,
                "server_busy",
                retry_after=RETRY_AFTER_S,
            ) from None
        return jobs


async def api_error_response(request: Request, exc: ApiError) -> JSONResponse:
    """OpenAI's error shape, with Retry-After where the error says when to come back."""
    headers = None if exc.retry_after is None else {"Retry-After": str(exc.retry_after)}
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


def _conversation(req: ChatRequest) -> Conversation:
    messages = []
    for i, m in enumerate(req.messages):
        try:
            messages.append(message_from_dict(m, "request", i))
        except TunelabError as exc:
            raise ApiError(400, str(exc), f"messages.{i}", "invalid_value") from None
    try:
        tools = parse_tools(req.tools, "tools") if req.tools else None
    except TunelabError as exc:
        raise ApiError(400, str(exc), "tools", "invalid_value") from None
    return Conversation(messages, tools=tools, source="request")


async def _collect(jobs: list[GenerationJob], out: asyncio.Queue, request: Request) -> dict[int, dict] | None:
    """Every job's whole text; None when the client left first (its rows are then cancelled by the caller)."""
    results = {j.index: {"text": "", "finish": None, "tokens": 0} for j in jobs}
    checked = time.monotonic()
    while any(r["finish"] is None for r in results.values()):
        if time.monotonic() - checked > DISCONNECT_CHECK_S:
            if await request.is_disconnected():
                return None
            checked = time.monotonic()
        try:
            index, kind, *rest = await asyncio.wait_for(out.get(), timeout=DISCONNECT_CHECK_S)
        except asyncio.TimeoutError:
            continue
        if kind == "text":
            results[index]["text"] += rest[0]
        elif kind == "end":
            results[index].update(finish=rest[0], tokens=rest[1])
        else:
            raise ApiError(500, f"generation failed: {rest[0]}", None, "generation_failed", "server_error")
    return results


def _sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n"


async def _stream(jobs: list[GenerationJob], out: asyncio.Queue, chunk, usage: dict):
    """Server-sent events until every job has ended; a client that leaves cancels its jobs."""
    open_jobs = {j.index for j in jobs}
    try:
        for j in jobs:
            yield _sse(chunk(j.index, {"role": "assistant", "content": ""} if chunk.chat else {"text": ""}, None))
        while open_jobs:
            index, kind, *rest = await out.get()
            if kind == "text":
                yield _sse(chunk(index, {"content": rest[0]} if chunk.chat else {"text": rest[0]}, None))
            elif kind == "end":
                open_jobs.discard(index)
                usage["completion_tokens"] += rest[1]
                yield _sse(chunk(index, {}, rest[0]))
            else:
                open_jobs.discard(index)
                yield _sse({"error": {"message": rest[0], "type": "server_error", "param": None, "code": None}})
        yield _sse(
            dict(
                chunk(None, None, None),
                choices=[],
                usage=dict(usage, total_tokens=usage["prompt_tokens"] + usage["completion_tokens"]),
            )
        )
        yield _sse("[DONE]")
    finally:
        for j in jobs:
            j.cancelled = True


def create_app(
    server: Server,
    ui_runs: str | None = None,
    ui=None,
    hosts: set[str] | None = None,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    docs: bool = False,
):
    """The API behind `Guard`; with `ui_runs` (a folder of run folders) also the web page at `/` (see `ui`),
    with `ui` its `UiOptions`. `hosts`: the Host names answered (default: this machine's loopback names)."""
    from .ui import UiOptions, add_ui

    ui_jobs = None

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        if ui_jobs is not None:
            ui_jobs.close()

    app = FastAPI(
        title="tunelab", docs_url=None, redoc_url=None, openapi_url="/openapi.json" if docs else None, lifespan=lifespan
    )

    app.exception_handler(ApiError)(api_error_response)

    @app.exception_handler(TunelabError)
    async def tunelab_error(request: Request, exc: TunelabError):
        return JSONResponse(ApiError(400, str(exc), None, "invalid_value").body(), status_code=400)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        error = validation_error(exc.errors())
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = f"no route {request.method} {request.url.path}" if code else str(exc.detail)
        return JSONResponse(ApiError(exc.status_code, message, None, code).body(), status_code=exc.status_code)

    async def authorized(request: Request) -> None:
        if server.api_key and not key_matches(request.headers.get("authorization"), server.api_key):
            raise ApiError(401, "a valid API key is needed (Authorization: Bearer KEY)", None, "invalid_api_key")

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models():
        return {
            "object": "list",
            "data": [
                {"id": name, "object": "model", "created": server.created, "owned_by": "tunelab"}
                for name in server.models
            ],
        }

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat(req: ChatRequest, request: Request):
        served = server.served(req.model)
        conversation = _conversation(req)
        try:
            prompt = await run_in_threadpool(served.encoder.prompt_ids, conversation)
        except TunelabError as exc:
            raise ApiError(400, str(exc), "messages", "invalid_value") from None
        return await _answer(server, served, req, [prompt], request, chat=True)

    @app.post("/v1/completions", dependencies=[Depends(authorized)])
    async def completions(req: CompletionRequest, request: Request):
        served = server.served(req.model)
        texts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if not texts:
            raise ApiError(400, "prompt: at least one prompt is needed", "prompt", "invalid_value")
        tok = served.variant.tokenizer
        prompts = await run_in_threadpool(lambda: [tok(t)["input_ids"] for t in texts])
        return await _answer(server, served, req, prompts, request, chat=False)

    if ui_runs is not None:
        ui = ui or UiOptions()
        ui = dataclasses.replace(
            ui, served=ui.served or list(server.models), base_path=ui.base_path or server.im.base_path
        )
        ui_jobs = add_ui(app, authorized, ui_runs, ui)
    return Guard(app, hosts or set(LOCAL_HOSTS), max_request_bytes)


def chat_choice(index: int, text: str, finish: str) -> dict:
    """One chat choice as OpenAI shapes it: reasoning and tool calls parsed out, arguments as a JSON string."""
    reply = parse_reply(text)
    message = reply.message()
    if reply.tool_calls:
        finish = "tool_calls"
        for call in message["tool_calls"]:
            call["function"]["arguments"] = json.dumps(call["function"]["arguments"], ensure_ascii=False)
    return {"index": index, "message": message, "finish_reason": finish, "logprobs": None}


async def _answer(server: Server, served: ServedModel, req, prompts: list[list[int]], request: Request, chat: bool):
    out: asyncio.Queue = asyncio.Queue()
    jobs = server.jobs(served.variant, prompts, req, out)
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    created = int(time.time())
    usage = {"prompt_tokens": sum(len(p) for p in prompts) * req.n, "completion_tokens": 0}
    kind = "chat.completion" if chat else "text_completion"
    if req.stream:

        def chunk(index, delta, finish):
            body = {"id": rid, "object": f"{kind}.chunk" if chat else kind, "created": created, "model": req.model}
            if index is not None:
                body["choices"] = [
                    {
                        "index": index,
                        "finish_reason": finish,
                        **({"delta": delta} if chat else {"text": delta.get("text", ""), "logprobs": None}),
                    }
                ]
            return body

        chunk.chat = chat
        return StreamingResponse(_stream(jobs, out, chunk, usage), media_type="text/event-stream")
    try:
        results = await _collect(jobs, out, request)
    finally:
        for j in jobs:
            j.cancelled = True
    if results is None:
        return JSONResponse({}, status_code=499)  # nobody reads it: the client has gone
    choices = []
    for index in sorted(results):
        r = results[index]
        usage["completion_tokens"] += r["tokens"]
        if chat:
            choices.append(chat_choice(index, r["text"], r["finish"]))
        else:
            choices.append({"index": index, "text": r["text"], "finish_reason": r["finish"], "logprobs": None})
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    body = {"id": rid, "object": kind, "created": created, "model": req.model, "choices": choices, "usage": usage}
    if req.return_token_ids:
        body["prompt_token_ids"] = prompts[0] if len(prompts) == 1 else prompts
    return body
