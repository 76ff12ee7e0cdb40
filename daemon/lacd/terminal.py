"""Text from lessons made safe for a terminal.

A prompt is whatever the agent's user (or a web page the agent read) wrote: an ESC sequence in it
could move the cursor, retitle the window, rewrite what `lacd lessons` printed before it, or hide a
line; a bidi override could show text in another order than it is stored. Each such character is
shown as its escape (``\\x1b``, ``\\u202e``) instead.
"""

from __future__ import annotations

import re

UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def printable(text: str) -> str:
    """`text` with control characters (C0, DEL, C1) and bidi controls written as escapes."""
    return UNSAFE.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)
