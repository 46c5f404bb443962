"""Which replica should serve a request: conversations stick, everything else spreads.

The key of a chat request is the caller's session when it names one (an `X-Session-Id`
header or the OpenAI `user` field), else the opening of the conversation: the messages up to
and including the first user message (images and videos included). Every later turn of a
conversation starts with the same opening, so it lands on the replica that already holds its
prefix state (vision encodings, cached prompt state); different conversations hash to
different replicas. Replicas are ranked by rendezvous hashing, so when one dies or a new one
joins only the conversations of that replica move."""
from __future__ import annotations

import hashlib
import json

SESSION_HEADER = "x-session-id"


def affinity_key(headers: dict[str, str], body: bytes) -> str | None:
    """A stable key for a /v1/chat/completions body, or None when there is nothing to stick to."""
    session = headers.get(SESSION_HEADER)
    if session:
        return "session:" + session
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(payload, dict):
        return None
    if isinstance(payload.get("user"), str) and payload["user"]:
        return "user:" + payload["user"]
    messages = payload.get("messages")
    if not isinstance(messages, list) or not messages:
        return None
    opening = []
    for message in messages:
        opening.append(message)
        if isinstance(message, dict) and message.get("role") == "user":
            break
    digest = hashlib.sha256(json.dumps([payload.get("model"), opening], sort_keys=True).encode()).hexdigest()
    return "prefix:" + digest


def rank(key: str, replica_ids: list[str]) -> list[str]:
    """Replicas from most to least preferred for `key` (highest rendezvous hash first)."""
    return sorted(replica_ids, key=lambda r: hashlib.sha256(f"{key}|{r}".encode()).digest(), reverse=True)
