"""The status of a ModelStreamInfer error answer, read from its message.

A V2 stream answers a failed request in-band, with ``error_message`` and no status code, and
tritonclient has none to offer either (the InferenceServerException it makes of such an answer
has ``status()`` None). So the load test reads the status from the words of the servers it knows
best: batchgate's refusals and Triton's, each given the code the server answers the same error
with on a unary call. A message none of them matches stays UNKNOWN.
"""

from __future__ import annotations

import re

# (code, pattern) in order; each pattern is searched in the message without its request-id prefix
_RULES: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (code, re.compile(pattern))
    for code, pattern in (
        # batchgate's overload refusals name the limit that refused (security/limits.py, the
        # schedulers), and an API key's rate (security/auth.py)
        (
            "RESOURCE_EXHAUSTED",
            r"\((?:max_inflight_requests|max_queue_size|max_queue_wait_ms|queue_target_ms)\)$"
            r"|^API key '.*' is over its rate of ",
        ),
        (
            "DEADLINE_EXCEEDED",
            r"^deadline (?:exceeded|cannot be met)\b|^queue timeout of model '.*' expired",
        ),
        (
            "UNAVAILABLE",
            r"^(?:model|route) '.*' is not ready|^model '.*' is shutting down|^batchgate is shutting down"
            r"|^no upstream serves model '"
            # Triton: a full queue and an expired queue timeout are both UNAVAILABLE there
            r"|^Exceeds maximum queue size|^Request timeout expired",
        ),
        ("NOT_FOUND", r"^unknown model '|^model '.*' has no version \S+ loaded|^Request for unknown model"),
        ("PERMISSION_DENIED", r"^API key '.*' (?:does not have scope|may not use model) '"),
    )
)

_PREFIX = "[request id: "


def stream_status(message: str) -> str:
    """The status code name a stream error answer stands for (UNKNOWN when its words say none)."""
    text = message
    if text.startswith(_PREFIX):  # batchgate and Triton name the request first: "[request id: x] ..."
        end = text.find("] ", len(_PREFIX))
        if end >= 0:
            text = text[end + 2 :]
    for code, pattern in _RULES:
        if pattern.search(text):
            return code
    return "UNKNOWN"
