"""The context window: a prompt that cannot fit is refused, or trimmed to fit (sliding window).

Fits: prompt + max_tokens <= context_window (a request without max_tokens needs room for at
least one output token). When it does not:
- "reject": 400 context_length_exceeded, in OpenAI's words, before any provider is paid;
- "sliding_window": the oldest turns are dropped until it fits. Kept always: the system prompt
  (every system/developer message, and /v1/messages' `system`) and the newest turn. A turn is a
  message together with the tool results that answer it (OpenAI `tool` messages; Anthropic user
  messages holding `tool_result` blocks), so a tool call never loses its result or the reverse.
  On /v1/messages the kept conversation starts with a user message, as Anthropic requires. If
  even that does not fit, it is a 400 as with "reject".

Trimming works on the client's own messages (Anthropic's on /v1/messages, re-translated to the
canonical body afterwards) and reuses the per-message counts: nothing is encoded twice.
"""

from __future__ import annotations

from typing import Any

import orjson

from proxy.accounting.tokens import PromptCount
from proxy.core.errors import InvalidRequest
from proxy.core.request import ChatRequest
from proxy.formats.messages_api import parse_messages_request

SYSTEM_ROLES = ("system", "developer")
TRIMMED_HEADER = b"x-gateway-context-trimmed"


def exceeded(window: int, prompt: int, completion: int | None) -> InvalidRequest:
    completion = completion or 0
    return InvalidRequest(
        f"This model's maximum context length is {window} tokens. However, you requested "
        f"{prompt + completion} tokens ({prompt} in the messages, {completion} in the completion). "
        "Please reduce the length of the messages or completion.",
        param="messages", code="context_length_exceeded")


def budget(window: int, max_tokens: int | None) -> int:
    """The most prompt tokens that fit beside the requested output."""
    return window - max_tokens if max_tokens else window - 1


def _carries_results(message: Any, anthropic: bool) -> bool:
    if not isinstance(message, dict):
        return False
    if not anthropic:
        return message.get("role") in ("tool", "function")
    content = message.get("content")
    return message.get("role") == "user" and isinstance(content, list) and any(
        isinstance(b, dict) and b.get("type") == "tool_result" for b in content)


def turns(messages: list[Any], anthropic: bool) -> tuple[list[int], list[list[int]]]:
    """(indices of system messages, the other messages' indices grouped into turns, oldest first)."""
    system: list[int] = []
    groups: list[list[int]] = []
    for i, m in enumerate(messages):
        if not anthropic and isinstance(m, dict) and m.get("role") in SYSTEM_ROLES:
            system.append(i)
        elif groups and _carries_results(m, anthropic):
            groups[-1].append(i)
        else:
            groups.append([i])
    return system, groups


def plan(messages: list[Any], count: PromptCount, limit: int, anthropic: bool) -> list[int] | None:
    """The indices of the messages to keep so the prompt is at most `limit` tokens, or None."""
    system, groups = turns(messages, anthropic)
    total = count.total
    first = 0
    while total > limit and first < len(groups) - 1:
        total -= sum(count.messages[i] for i in groups[first])
        first += 1
    if anthropic:  # the conversation must open with a user turn
        while first < len(groups) - 1 and messages[groups[first][0]].get("role") != "user":
            total -= sum(count.messages[i] for i in groups[first])
            first += 1
    if total > limit:
        return None
    return sorted(system + [i for group in groups[first:] for i in group])


def trim(request: ChatRequest, count: PromptCount, limit: int) -> tuple[int, PromptCount] | None:
    """Drop the oldest turns of `request` in place until its prompt is at most `limit` tokens.
    Returns (messages dropped, the new count), or None when even the newest turn is too long."""
    anthropic = request.anthropic_body is not None
    body = request.anthropic_body if anthropic else request.body
    messages = body["messages"]
    keep = plan(messages, count, limit, anthropic)
    if keep is None:
        return None
    body["messages"] = [messages[i] for i in keep]
    if anthropic:  # the canonical body follows (for non-Anthropic deployments)
        request.body["messages"] = parse_messages_request(orjson.dumps(body), request.anthropic_beta).body["messages"]
    return len(messages) - len(keep), PromptCount([count.messages[i] for i in keep], count.fixed)
