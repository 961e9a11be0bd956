"""`tunelab serve`: the OpenAI chat and completions API over a base model and its adapters.

The request's `model` picks the base or an adapter; all are loaded once and switched per batch.
Prompts are rendered by training's own `Encoder` with each run's saved template, reasoning rule and
stop ids, so a served prompt is token for token the one the adapter was trained on.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse

from ..data.conversation import Conversation
from ..data.encode import Encoder
from ..data.formats import message_from_dict
from ..data.tools import parse_tools
from ..errors import TunelabError
from ..infer.load import InferenceModel, Variant, prompt_encoder
from ..infer.replies import parse_reply
from .batcher import Batcher, GenerationJob
from .protocol import ApiError, ChatRequest, CompletionRequest, validation_error

log = logging.getLogger("tunelab")
DEFAULT_MAX_TOKENS = 1024


@dataclass
class ServedModel:
    variant: Variant
    encoder: Encoder


class Server:
    """What the routes share: the models by id, their encoders, the batcher and the context length."""

    def __init__(self, im: InferenceModel, names: dict[str, Variant], api_key: str | None = None, max_batch: int = 32):
        self.im = im
        self.models = {}
        for name, variant in names.items():
            self.models[name] = ServedModel(variant, prompt_encoder(variant, im.base_path))
        self.api_key = api_key
        self.batcher = Batcher(im, max_batch=max_batch)
        self.context = getattr(im.model.config, "max_position_embeddings", None)
        self.created = int(time.time())

    def served(self, name: str) -> ServedModel:
        if name not in self.models:
            raise ApiError(
                404, f"model {name!r} is not served here; served: {', '.join(self.models)}", "model", "model_not_found"
            )
        return self.models[name]

    def budget(self, prompt: list[int], asked: int | None) -> int:
        room = None if self.context is None else self.context - len(prompt)
        if room is not None and room < (asked or 1):
            raise ApiError(
                400,
                f"the prompt is {len(prompt)} tokens and {asked or 1} more were asked for; this "
                f"model's context is {self.context} tokens",
                "messages",
                "context_length_exceeded",
            )
        return asked or min(DEFAULT_MAX_TOKENS, room or DEFAULT_MAX_TOKENS)

    def jobs(self, variant: Variant, prompts: list[list[int]], req, out: asyncio.Queue) -> list[GenerationJob]:
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
        for job in jobs:
            self.batcher.submit(job)
        return jobs


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


async def _collect(jobs: list[GenerationJob], out: asyncio.Queue) -> dict[int, dict]:
    results = {j.index: {"text": "", "finish": None, "tokens": 0} for j in jobs}
    while any(r["finish"] is None for r in results.values()):
        index, kind, *rest = await out.get()
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


def create_app(server: Server, ui_runs: str | None = None) -> FastAPI:
    """The API; with `ui_runs` (a folder of run folders) also the web page at `/` (see `ui`)."""
    app = FastAPI(title="tunelab", docs_url=None, redoc_url=None)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        error = validation_error(exc.errors())
        return JSONResponse(error.body(), status_code=error.status)

    async def authorized(request: Request) -> None:
        if server.api_key and request.headers.get("authorization") != f"Bearer {server.api_key}":
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
        return {"status": "ok", "models": list(server.models)}

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat(req: ChatRequest):
        served = server.served(req.model)
        try:
            prompt = served.encoder.prompt_ids(_conversation(req))
        except TunelabError as exc:
            raise ApiError(400, str(exc), "messages", "invalid_value") from None
        return await _answer(server, served, req, [prompt], chat=True)

    @app.post("/v1/completions", dependencies=[Depends(authorized)])
    async def completions(req: CompletionRequest):
        served = server.served(req.model)
        texts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if not texts:
            raise ApiError(400, "prompt: at least one prompt is needed", "prompt", "invalid_value")
        tok = served.variant.tokenizer
        return await _answer(server, served, req, [tok(t)["input_ids"] for t in texts], chat=False)

    if ui_runs is not None:
        from .ui import add_ui

        add_ui(app, authorized, ui_runs, bool(server.api_key))
    return app


async def _answer(server: Server, served: ServedModel, req, prompts: list[list[int]], chat: bool):
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
        results = await _collect(jobs, out)
    finally:
        for j in jobs:
            j.cancelled = True
    choices = []
    for index in sorted(results):
        r = results[index]
        usage["completion_tokens"] += r["tokens"]
        if chat:
            reply = parse_reply(r["text"])
            message = reply.message()
            finish = "tool_calls" if reply.tool_calls else r["finish"]
            if reply.tool_calls:
                for call in message["tool_calls"]:
                    call["function"]["arguments"] = json.dumps(call["function"]["arguments"], ensure_ascii=False)
            choices.append({"index": index, "message": message, "finish_reason": finish, "logprobs": None})
        else:
            choices.append({"index": index, "text": r["text"], "finish_reason": r["finish"], "logprobs": None})
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    body = {"id": rid, "object": kind, "created": created, "model": req.model, "choices": choices, "usage": usage}
    if req.return_token_ids:
        body["prompt_token_ids"] = prompts[0] if len(prompts) == 1 else prompts
    return body
