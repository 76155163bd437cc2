"""Wire schemas: the request bodies the API accepts, validated by pydantic, and their conversion to engine
types; and the response bodies, built from engine results here (they follow OpenAI's shapes exactly), so that
the OpenAPI document describes every answer and the routes only pass data through.

OpenAI fields this server cannot honour are refused when set to anything but their neutral value (n != 1,
best_of > 1, suffix, penalties, logit_bias, tools): a silent fallback would give answers the
client did not ask for. Unknown fields are ignored, as OpenAI-compatible servers usually do.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from model import SamplingParams
from model.config import MODES
from server.engine import GenerationResult, SessionInfo, TokenLogprob

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
DEFAULT_CHAT_MAX_TOKENS = 512
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes
MAX_LOGPROBS = 20  # alternatives per token (OpenAI: up to 5 for completions, 20 for chat)


def _refuse_unless_neutral(value: Any, info: ValidationInfo) -> Any:
    if value:
        raise ValueError(f"{info.field_name} is not supported by this server")
    return value


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")

    @field_validator("*")
    @classmethod
    def _valid_unicode(cls, v: Any) -> Any:
        """JSON may escape a lone surrogate ("\\ud800"); no tokenizer or file can take one (it was a 500)."""
        if _has_lone_surrogate(v):
            raise ValueError("is not valid Unicode text (it holds a lone UTF-16 surrogate)")
        return v


def _has_lone_surrogate(v: Any) -> bool:
    if isinstance(v, str):
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(v, dict):
        return any(_has_lone_surrogate(k) or _has_lone_surrogate(x) for k, x in v.items())
    if isinstance(v, list | tuple):
        return any(_has_lone_surrogate(x) for x in v)
    return False  # numbers, and nested bodies (which validated themselves)


MAX_METADATA_DEPTH = 32  # nesting of a session's metadata (deeper failed to serialize in the answer: a 500)


class CreateSession(_Body):
    mode: Literal[MODES] | None = None  # type: ignore[valid-type]
    metadata: dict[str, Any] = Field(default_factory=dict, description="any JSON object, kept with the session")

    @field_validator("metadata")
    @classmethod
    def _shallow(cls, v: dict[str, Any]) -> dict[str, Any]:
        if _depth(v) > MAX_METADATA_DEPTH:
            raise ValueError(f"nests deeper than {MAX_METADATA_DEPTH} levels")
        return v


def _depth(v: Any) -> int:
    """Nesting depth of a JSON value, iteratively (a recursive walk could exhaust the stack)."""
    deepest, todo = 0, [(v, 1)]
    while todo:
        node, depth = todo.pop()
        if isinstance(node, dict | list):
            deepest = max(deepest, depth)
            todo += [(x, depth + 1) for x in (node.values() if isinstance(node, dict) else node)]
    return deepest


class IngestText(_Body):
    text: str
    stream: bool = False


class Tokenize(_Body):
    text: str


class Detokenize(_Body):
    tokens: list[int]


class StreamOptions(_Body):
    include_usage: bool = False


class _Generation(_Body):
    """Fields shared by completions and chat completions (`session_id`, `commit`, `top_k`, `ignore_eos` are
    this server's extensions; the openai client sends them through `extra_body`)."""

    model: str | None = None  # one model per server: any value is accepted and the loaded model answers
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    stop: str | list[str] | None = None
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    session_id: str | None = None
    commit: bool = False
    ignore_eos: bool = False

    @field_validator("n")
    @classmethod
    def _one_choice(cls, v: int | None) -> int | None:
        if v not in (None, 1):
            raise ValueError("only n=1 is supported")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return v

    @field_validator("presence_penalty", "frequency_penalty", "logit_bias")
    @classmethod
    def _neutral(cls, v: Any, info: ValidationInfo) -> Any:
        return _refuse_unless_neutral(v, info)

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> _Generation:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options needs stream=true")
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def sampling(self, max_tokens: int | None) -> SamplingParams:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
            seed=self.seed,
            stop=stop,
            ignore_eos=self.ignore_eos,
        )


class CompletionRequest(_Generation):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(None, ge=0)  # 0 with echo: score the prompt only
    echo: bool | None = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: Any) -> Any:
        if isinstance(v, list) and v and isinstance(v[0], str | list):
            if len(v) != 1:
                raise ValueError("only one prompt per request is supported")
        return v

    @field_validator("suffix")
    @classmethod
    def _neutral_completion(cls, v: Any, info: ValidationInfo) -> Any:
        return _refuse_unless_neutral(v, info)

    @field_validator("best_of")
    @classmethod
    def _one_best(cls, v: int | None) -> int | None:
        if v not in (None, 1):
            raise ValueError("best_of is not supported")
        return v

    def prompt_text_or_ids(self) -> str | list[int]:
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], str | list):
            p = p[0]
        return p if isinstance(p, str) else list(p)

    def sampling_params(self) -> SamplingParams:
        return self.sampling(DEFAULT_COMPLETION_MAX_TOKENS if self.max_tokens is None else self.max_tokens)


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""

    def as_template_message(self) -> dict[str, str]:
        return {"role": "system" if self.role == "developer" else self.role, "content": self.text()}


class ChatRequest(_Generation):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None

    @field_validator("tools")
    @classmethod
    def _neutral_chat(cls, v: Any, info: ValidationInfo) -> Any:
        return _refuse_unless_neutral(v, info)

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self) -> ChatRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=true")
        return self

    def logprobs_count(self) -> int | None:
        """None: no logprobs; else how many alternatives per token."""
        return (self.top_logprobs or 0) if self.logprobs else None

    @field_validator("response_format")
    @classmethod
    def _text_format(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v and v.get("type") not in (None, "text"):
            raise ValueError("only response_format type 'text' is supported")
        return v

    def template_messages(self) -> list[dict[str, str]]:
        return [m.as_template_message() for m in self.messages]

    def sampling_params(self) -> SamplingParams:
        return self.sampling(self.max_completion_tokens or self.max_tokens or DEFAULT_CHAT_MAX_TOKENS)


# ==================================================================================================== responses
#
# Field order is the order on the wire. Stream chunks are dumped with `exclude_unset`: a field appears only when
# the builder sets it (`usage: null` only with include_usage; a chat delta's `role`/`content` only when present).


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SessionObject(_Out):
    id: str
    object: Literal["session"] = "session"
    mode: Literal[MODES]  # type: ignore[valid-type]
    model: str
    tokens: int = Field(description="every token the session has taken in")
    state_bytes: int = Field(description="memory of the session's state; fixed except in full mode")
    created: int
    metadata: dict[str, Any]


def session_object(info: SessionInfo) -> SessionObject:
    """The wire form of a session, from the engine's session info (the one place that builds it)."""
    return SessionObject(id=info.id, mode=info.mode, model=info.model, tokens=info.tokens,
                         state_bytes=info.state_bytes, created=info.created, metadata=info.metadata)


class SessionList(_Out):
    object: Literal["list"] = "list"
    data: list[SessionObject]


class SessionDeleted(_Out):
    id: str
    object: Literal["session.deleted"] = "session.deleted"
    deleted: Literal[True] = True


class IngestProgressEvent(_Out):
    """One SSE event of a streamed ingest; the page counts are null for text documents."""

    object: Literal["ingest.progress"] = "ingest.progress"
    tokens_done: int
    tokens_total: int
    pages_done: int | None
    pages_total: int | None


class PromptTokensDetails(_Out):
    cached_tokens: int = Field(description="the session's tokens: ingested before, not recomputed")


class Usage(_Out):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


FinishReason = Literal["stop", "length"]


class CompletionLogprobs(_Out):
    """OpenAI's legacy completion logprobs: per token, its text, its logprob (null for a prompt's first token
    under echo), the alternatives (the token itself among them) and its offset into the returned text."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class TopLogprob(_Out):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(_Out):
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[TopLogprob]


class ChatLogprobs(_Out):
    content: list[ChatTokenLogprob]
    refusal: None = None


class CompletionChoice(_Out):
    index: int
    finish_reason: FinishReason
    logprobs: CompletionLogprobs | None
    text: str


class Completion(_Out):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class AssistantMessage(_Out):
    role: Literal["assistant"]
    content: str


class ChatChoice(_Out):
    index: int
    finish_reason: FinishReason
    logprobs: ChatLogprobs | None
    message: AssistantMessage


class ChatCompletion(_Out):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionChunkChoice(_Out):
    index: int
    logprobs: CompletionLogprobs | None
    finish_reason: FinishReason | None
    text: str


class CompletionChunk(_Out):
    """A streamed completion chunk (OpenAI names these `text_completion` too). With include_usage every chunk
    has `usage: null` and a last chunk with no choices carries the usage."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChunkChoice]
    usage: Usage | None = None


class ChatDelta(_Out):
    role: Literal["assistant"] | None = None  # in the first chunk only
    content: str | None = None


class ChatChunkChoice(_Out):
    index: int
    logprobs: ChatLogprobs | None
    finish_reason: FinishReason | None
    delta: ChatDelta


class ChatCompletionChunk(_Out):
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class Reply:
    """Builds the response objects of one completion or chat request (all chunks share id and created). With
    `logprobs` (alternatives per token; None: not asked) a choice carries OpenAI's logprobs: for a completion the
    legacy `{tokens, token_logprobs, top_logprobs, text_offset}` (offsets into the returned text, which starts with
    the prompt under echo), for a chat `{content: [{token, logprob, bytes, top_logprobs}], refusal}`."""

    def __init__(self, model: str, *, chat: bool, include_usage: bool = False, logprobs: int | None = None):
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.model, self.chat, self.include_usage, self.logprobs = model, chat, include_usage, logprobs
        self.created = int(time.time())
        self._offset = 0  # characters of the returned text so far (text_offset)

    def _head(self) -> dict[str, Any]:
        return {"id": self.id, "created": self.created, "model": self.model}

    @staticmethod
    def usage(r: GenerationResult) -> Usage:
        return Usage(prompt_tokens=r.prompt_tokens, completion_tokens=r.completion_tokens,
                     total_tokens=r.prompt_tokens + r.completion_tokens,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=r.cached_tokens))

    def _logprobs(self, tokens: Sequence[TokenLogprob]) -> CompletionLogprobs | ChatLogprobs | None:
        if self.logprobs is None:
            return None
        if self.chat:
            return ChatLogprobs(content=[ChatTokenLogprob(**_entry(t.text, t.logprob),
                                                          top_logprobs=[TopLogprob(**_entry(a, lp)) for a, lp in t.top])
                                         for t in tokens], refusal=None)
        offsets = []
        for t in tokens:
            offsets.append(self._offset)
            self._offset += len(t.text)
        # the sampled token's own logprob is always among the alternatives (OpenAI: up to logprobs + 1 of them)
        top = [None if t.logprob is None else {**dict(t.top), t.text: t.logprob} for t in tokens]
        return CompletionLogprobs(tokens=[t.text for t in tokens], token_logprobs=[t.logprob for t in tokens],
                                  top_logprobs=top, text_offset=offsets)

    def complete(self, r: GenerationResult) -> Completion | ChatCompletion:
        finish = r.finish_reason
        logprobs = self._logprobs([*(r.prompt_logprobs or ()), *(r.logprobs or ())])
        if self.chat:
            message = AssistantMessage(role="assistant", content=r.text)
            return ChatCompletion(**self._head(), object="chat.completion", usage=self.usage(r),
                                  choices=[ChatChoice(index=0, finish_reason=finish, logprobs=logprobs,
                                                      message=message)])
        return Completion(**self._head(), object="text_completion", usage=self.usage(r),
                          choices=[CompletionChoice(index=0, finish_reason=finish, logprobs=logprobs,
                                                    text=(r.prompt_text or "") + r.text)])

    def chunk(self, text: str | None, finish_reason: str | None = None, first: bool = False,
              tokens: Sequence[TokenLogprob] = ()) -> CompletionChunk | ChatCompletionChunk:
        extra: dict[str, Any] = {"usage": None} if self.include_usage else {}
        logprobs = self._logprobs(tokens) if tokens else None
        if self.chat:
            if first:
                delta = ChatDelta(role="assistant", content=text or "")
            else:
                delta = ChatDelta(content=text) if text else ChatDelta()
            choice = ChatChunkChoice(index=0, logprobs=logprobs, finish_reason=finish_reason, delta=delta)
            return ChatCompletionChunk(**self._head(), object="chat.completion.chunk", choices=[choice], **extra)
        choice = CompletionChunkChoice(index=0, logprobs=logprobs, finish_reason=finish_reason, text=text or "")
        return CompletionChunk(**self._head(), object="text_completion", choices=[choice], **extra)

    def usage_chunk(self, r: GenerationResult) -> CompletionChunk | ChatCompletionChunk:
        if self.chat:
            return ChatCompletionChunk(**self._head(), object="chat.completion.chunk", choices=[],
                                       usage=self.usage(r))
        return CompletionChunk(**self._head(), object="text_completion", choices=[], usage=self.usage(r))


def _entry(text: str, logprob: float | None) -> dict[str, Any]:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode())}


def stream_item(item: BaseModel) -> dict[str, Any]:
    """A response object as one SSE event's JSON (only the fields its builder set)."""
    return item.model_dump(mode="json", exclude_unset=True)


class ModelCard(_Out):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(_Out):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(_Out):
    tokens: list[int]
    count: int


class DetokenizeResponse(_Out):
    text: str


class Health(_Out):
    """200 `{"status": "ok", "model"}`; 503 `{"status": "loading"}` or `{"status": "error", "error"}`."""

    status: Literal["ok", "loading", "error"]
    model: str | None = None
    error: str | None = None


class ErrorInfo(_Out):
    message: str
    type: str
    param: str | None
    code: str


class ErrorResponse(_Out):
    """Every error, as an HTTP answer or as an event inside a stream."""

    error: ErrorInfo
