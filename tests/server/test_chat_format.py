"""The document/chat combination: what a session holds plus what a request appends must equal the chat
template's own rendering of the conversation it stands for."""

from __future__ import annotations

import pytest

from server.engine.chat import DOCUMENT_INSTRUCTION, QUESTION_SEPARATOR, ChatFormat, Turn
from server.engine.errors import InvalidRequest

DOC = "The Eiffel Tower is in Paris.\nIt was built in 1889."


@pytest.fixture(scope="module")
def fmt(tiny_runtime):
    return ChatFormat(tiny_runtime.chat_text, tiny_runtime.decode([tiny_runtime.tokenizer.eos_token_id]))


def render(rt, messages, gen=True):
    return rt.chat_text(messages, add_generation_prompt=gen)


def test_document_then_question_is_one_user_turn(fmt, tiny_runtime):
    session = fmt.ingest_prefix(Turn.NONE) + DOC
    asked = session + fmt.chat_prompt(Turn.USER, [{"role": "user", "content": "When was it built?"}])
    content = DOCUMENT_INSTRUCTION + DOC + QUESTION_SEPARATOR + "When was it built?"
    assert asked == render(tiny_runtime, [{"role": "user", "content": content}])


def test_document_in_two_ingests(fmt, tiny_runtime):
    session = fmt.ingest_prefix(Turn.NONE) + "Part one. " + fmt.ingest_prefix(Turn.USER) + "Part two."
    asked = session + fmt.chat_prompt(Turn.USER, [{"role": "user", "content": "Q?"}])
    content = DOCUMENT_INSTRUCTION + "Part one. Part two." + QUESTION_SEPARATOR + "Q?"
    assert asked == render(tiny_runtime, [{"role": "user", "content": content}])


def test_multi_message_request_after_document(fmt, tiny_runtime):
    msgs = [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
            {"role": "user", "content": "Q2"}]
    asked = fmt.ingest_prefix(Turn.NONE) + DOC + fmt.chat_prompt(Turn.USER, msgs)
    first = DOCUMENT_INSTRUCTION + DOC + QUESTION_SEPARATOR + "Q1"
    assert asked == render(tiny_runtime, [{"role": "user", "content": first}, *msgs[1:]])


def test_system_message_after_document_gets_its_own_turn(fmt, tiny_runtime):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q"}]
    asked = fmt.ingest_prefix(Turn.NONE) + DOC + fmt.chat_prompt(Turn.USER, msgs)
    assert asked == render(tiny_runtime, [{"role": "user", "content": DOCUMENT_INSTRUCTION + DOC}, *msgs])


def test_committed_answer_then_next_question(fmt, tiny_runtime):
    """ANSWERED: the session already holds the end-of-turn token sampled by the model."""
    eos = tiny_runtime.decode([tiny_runtime.tokenizer.eos_token_id])
    q1 = fmt.ingest_prefix(Turn.NONE) + DOC + fmt.chat_prompt(Turn.USER, [{"role": "user", "content": "Q1"}])
    session = q1 + "A1" + eos
    asked = session + fmt.chat_prompt(Turn.ANSWERED, [{"role": "user", "content": "Q2"}])
    first = DOCUMENT_INSTRUCTION + DOC + QUESTION_SEPARATOR + "Q1"
    expected = render(tiny_runtime, [{"role": "user", "content": first}, {"role": "assistant", "content": "A1"},
                                     {"role": "user", "content": "Q2"}])
    assert asked == expected
    # an answer cut short (no end-of-turn token) gets the template's end of turn
    cut = q1 + "A1" + fmt.chat_prompt(Turn.ANSWERING, [{"role": "user", "content": "Q2"}])
    assert cut == expected


def test_ingest_after_committed_answer_opens_a_new_user_turn(fmt, tiny_runtime):
    eos = tiny_runtime.decode([tiny_runtime.tokenizer.eos_token_id])
    q1 = fmt.ingest_prefix(Turn.NONE) + DOC + fmt.chat_prompt(Turn.USER, [{"role": "user", "content": "Q1"}])
    session = q1 + "A1" + eos + fmt.ingest_prefix(Turn.ANSWERED) + "More text."
    asked = session + fmt.chat_prompt(Turn.USER, [{"role": "user", "content": "Q2"}])
    expected = render(tiny_runtime, [
        {"role": "user", "content": DOCUMENT_INSTRUCTION + DOC + QUESTION_SEPARATOR + "Q1"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": DOCUMENT_INSTRUCTION + "More text." + QUESTION_SEPARATOR + "Q2"}])
    assert asked == expected


def test_plain_chat_without_document(fmt, tiny_runtime):
    msgs = [{"role": "user", "content": "Hi"}]
    assert fmt.chat_prompt(Turn.NONE, msgs) == render(tiny_runtime, msgs)


def test_template_errors_become_invalid_request():
    def strict(messages, gen):
        raise ValueError("Conversation roles must alternate user/assistant")

    with pytest.raises(InvalidRequest, match="alternate"):
        ChatFormat(strict, "</s>").chat_prompt(Turn.NONE, [{"role": "user", "content": "x"}])
