"""Wire schemas: the request bodies the API accepts, validated by pydantic, and their conversion to engine
types. Responses are plain dicts built in the routes (they follow OpenAI's shapes exactly).

OpenAI fields this server cannot honour are refused when set to anything but their neutral value (n != 1,
best_of > 1, suffix, penalties, logit_bias, tools): a silent fallback would give answers the
client did not ask for. Unknown fields are ignored, as OpenAI-compatible servers usually do.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from model import SamplingParams
from model.config import MODES

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
DEFAULT_CHAT_MAX_TOKENS = 512
MAX_LOGPROBS = 20  # alternatives per token (OpenAI: up to 5 for completions, 20 for chat)


def _refuse_unless_neutral(value: Any, info: ValidationInfo) -> Any:
    if value:
        raise ValueError(f"{info.field_name} is not supported by this server")
    return value


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class CreateSession(_Body):
    mode: Literal[MODES] | None = None  # type: ignore[valid-type]
    metadata: dict[str, Any] = Field(default_factory=dict)


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
    seed: int | None = None
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
