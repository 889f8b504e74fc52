"""Text a user hands over (arguments, standard input, files, request bodies) checked to be UTF-8.

Python never refuses such text where it arrives: arguments and, under a C locale, standard input decode
undecodable bytes to lone surrogates ("surrogateescape"), and JSON may spell lone surrogates ("\\udcff"). The
tokenizer cannot encode them. Each entry point names what it read (`--prompt`, `--file x.txt`, ...), so the
user gets one line saying which input and which byte; `Tokenizer.encode` checks again for whatever else reaches it.
"""

from __future__ import annotations

import sys

from .errors import QwenError


def check_text(text: str, what: str) -> str:
    """`text` if it is valid Unicode; else QwenError naming `what` and the first bad byte or code point."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = ord(text[e.start])
        shown = f"byte 0x{bad - 0xDC00:02x}" if 0xDC80 <= bad <= 0xDCFF else f"a lone surrogate U+{bad:04X}"
        raise QwenError(f"{what} is not valid UTF-8 text ({shown} at character {e.start})") from None
    return text


def read_stdin(what: str) -> str:
    """All of standard input as text, checked (`what` names it: "--prompt -")."""
    try:
        text = sys.stdin.read()
    except UnicodeDecodeError as e:
        raise QwenError(f"{what}: standard input is not valid UTF-8 text (byte 0x{e.object[e.start]:02x} at byte "
                        f"{e.start})") from None
    return check_text(text, f"{what}: standard input")


def read_text_file(path: str, what: str) -> str:
    """A text file the user named (`what`: "--file x.txt"), checked; unreadable is one line too."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise QwenError(f"cannot read {what}: {e.strerror}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise QwenError(f"{what} is not valid UTF-8 text (byte 0x{data[e.start]:02x} at byte {e.start})") from None
