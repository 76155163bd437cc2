"""How documents and chat messages share one session: the document is the opening of a user turn.

A session's tokens form one conversation rendered with the model's own chat template:

    [system prompt] [user: "Read the following document.\\n\\n" + document ... | + question] [assistant: answer]

- The first ingest opens a user turn: the template's text up to a user message's content, then
  DOCUMENT_INSTRUCTION. Later ingests append raw text to the same open turn.
- A chat request against the session continues that turn: its first user message is appended to the open
  turn (after "\\n\\n"), then the template closes the turn, renders any further messages, and opens the
  assistant's answer. Document and question form one user message, the shape instruct models are trained
  on, and every alternation-enforcing template can render it.
- Without `commit` the answer is generated on a copy, so the open turn stays open for the next question.
  With `commit` the question and answer become part of the session; a later ingest opens a new user turn.
- `/v1/completions` with a session appends raw text and leaves the turn as it is.

Texts are cut from the template's own renderings of stand-in conversations (markers in place of content), so
no template-specific strings are written here. The turn a session is in is kept (and persisted) as a `Turn`.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum
from typing import Any

from server.engine.errors import InvalidRequest

DOCUMENT_INSTRUCTION = "Read the following document.\n\n"
QUESTION_SEPARATOR = "\n\n"
# Stand-in contents: plain words, so that templates that trim or escape content leave them alone.
_USER, _ANSWER, _MARK = "FamStandInUserTurn", "FamStandInAssistantTurn", "FamStandInMarker"

Render = Callable[[list[dict[str, str]], bool], str]  # (messages, add_generation_prompt) -> text


class Turn(StrEnum):
    NONE = "none"  # nothing chat-shaped yet: an empty session, or raw text from /v1/completions
    USER = "user"  # a user turn holding the document is open
    ANSWERED = "answered"  # a committed answer ended with the end-of-turn token
    ANSWERING = "answering"  # a committed answer stopped early (max_tokens, a stop string): its turn is open


class ChatFormat:
    def __init__(self, render: Render, eos_text: str):
        self._render, self._eos = render, eos_text

    def ingest_prefix(self, turn: Turn) -> str:
        """Text to append before a document so that it lands inside an open user turn."""
        if turn is Turn.USER:
            return ""
        if turn is Turn.NONE:
            text = self._render_checked([{"role": "user", "content": _MARK}], False)
            return text[:text.index(_MARK)] + DOCUMENT_INSTRUCTION
        text = self._render_checked(self._answered([{"role": "user", "content": _MARK}]), False)
        return self._after_answer(text[:text.index(_MARK)], turn) + DOCUMENT_INSTRUCTION

    def chat_prompt(self, turn: Turn, messages: list[dict[str, str]]) -> str:
        """Text to append to a session in `turn` for `messages`, ending with the assistant's turn opened."""
        if turn is Turn.NONE:
            return self._render_checked(messages, True)
        if turn is Turn.USER:
            if messages[0]["role"] == "user":  # the question joins the document's user turn
                first = {"role": "user", "content": _MARK + QUESTION_SEPARATOR + messages[0]["content"]}
                text = self._render_checked([first, *messages[1:]], True)
            else:
                text = self._render_checked([{"role": "user", "content": _MARK}, *messages], True)
            return text[text.index(_MARK) + len(_MARK):]
        return self._after_answer(self._render_checked(self._answered(messages), True), turn)

    @staticmethod
    def _answered(messages: list[dict[str, str]]) -> list[dict[str, str]]:
        return [{"role": "user", "content": _USER}, {"role": "assistant", "content": _ANSWER}, *messages]

    def _after_answer(self, text: str, turn: Turn) -> str:
        """What follows the stand-in answer; the session already holds the end-of-turn token if it ANSWERED."""
        tail = text[text.index(_ANSWER) + len(_ANSWER):]
        if turn is Turn.ANSWERED and tail.startswith(self._eos):
            tail = tail[len(self._eos):]
        return tail

    def _render_checked(self, messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
        try:
            return self._render(messages, add_generation_prompt)
        except Exception as e:  # jinja2 and the template's own raise_exception: the messages do not fit it
            raise InvalidRequest(f"the model's chat template cannot render these messages here: {e}",
                                 param="messages") from e
