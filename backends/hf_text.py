"""Text-side helpers for token-by-token generation: detokenizing and stop strings.

Streaming clients must receive text that is final: once a piece has been sent it
cannot be taken back. Two things make the naive "decode and send" wrong:

- a token can end in the middle of a UTF-8 character (byte-level BPE splits
  multi-byte characters), so the decoded text ends in U+FFFD until the next
  token completes it — :class:`IncrementalDetokenizer` holds such tails back;
- the end of the text so far may be the beginning of a stop string that the
  next tokens complete — :class:`StopStringHoldback` holds those tails back and
  cuts the text where a stop string appears.

Both are pure (no torch), so they are unit-tested on plain strings and ids.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from contract.errors import InvalidRequest
from contract.generation import ModelInfo

REPLACEMENT_CHAR = "\ufffd"

# How many prompt tokens to decode in front of the first generated token. Some
# tokenizers (SentencePiece) drop a leading space when a sequence is decoded from
# its start; decoding with a little context keeps that space.
_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    """Turns a growing list of token ids into new text, one token at a time.

    It decodes a small window (the last emitted tokens plus the new ones) rather
    than everything generated, so each step costs the same however long the
    output grows. New text is released only when it does not end in an
    incomplete character; :meth:`flush` releases whatever is left at the end.
    """

    def __init__(self, decode: Callable[[Sequence[int]], str], context: Sequence[int] = ()) -> None:
        self._decode = decode
        self._ids: list[int] = list(context[-_CONTEXT_TOKENS:]) if context else []
        # ids[prefix:read] were already emitted and serve as decoding context;
        # ids[read:] are not yet emitted.
        self._prefix = 0
        self._read = len(self._ids)

    def add(self, token_id: int) -> str:
        """Append one token; return the text that became final ("" if none)."""
        self._ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """Return any text still held back (incomplete characters included)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self._read == len(self._ids):
            return ""
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        if not final and (len(after) <= len(before) or after.endswith(REPLACEMENT_CHAR)):
            return ""
        # The context part was already sent; send only what lies past it (if a
        # tokenizer's clean-ups ever make decoding not prefix-stable, this still
        # never repeats or retracts text).
        new = after[len(before) :]
        self._prefix = self._read
        self._read = len(self._ids)
        return new


class StopStringHoldback:
    """Finds stop strings in streamed text and holds back possible beginnings.

    :meth:`push` takes the next piece of text and returns what may be sent now;
    after it reports a stop, the text up to the stop string has been returned (the
    stop string too with ``include``: vLLM's ``include_stop_str_in_output``) and
    everything after is dropped. :meth:`flush` returns the held-back tail when
    generation ends for another reason.

    Possible beginnings are held back with ``include`` as well: the text sent is then
    the same, only sent later, and one rule covers both ways.
    """

    def __init__(self, stops: Sequence[str], include: bool = False) -> None:
        if isinstance(stops, str):  # a lone string is one stop, not one per character
            stops = (stops,)
        self._stops = tuple(s for s in stops if s)
        self._include = include
        self._held = ""
        self.stopped = False

    def push(self, text: str) -> str:
        """Add ``text``; return the part that can no longer become a stop string."""
        if self.stopped:
            return ""
        if not self._stops:
            return text
        buffer = self._held + text
        found = self._first_stop(buffer)
        if found is not None:
            self.stopped = True
            self._held = ""
            cut, stop = found
            return buffer[: cut + len(stop)] if self._include else buffer[:cut]
        keep = self._partial_suffix_len(buffer)
        self._held = buffer[len(buffer) - keep :] if keep else ""
        return buffer[: len(buffer) - keep]

    def flush(self) -> str:
        """Return the held tail; call once, when generation ends without a stop."""
        held, self._held = self._held, ""
        return "" if self.stopped else held

    def _first_stop(self, buffer: str) -> tuple[int, str] | None:
        """Where the first stop string in ``buffer`` starts, and which it is: of those
        starting there, the shortest (the one text arriving a character at a time
        would have completed first)."""
        found = [(i, s) for i, s in ((buffer.find(s), s) for s in self._stops) if i >= 0]
        return min(found, key=lambda pair: (pair[0], len(pair[1]))) if found else None

    def _partial_suffix_len(self, buffer: str) -> int:
        """Length of the longest tail of ``buffer`` that begins some stop string."""
        longest = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(buffer)), longest, -1):
                if buffer.endswith(stop[:n]):
                    longest = n
                    break
        return longest


def encode_chat(
    tokenizer: Any, messages: Sequence[Mapping[str, Any]], *, has_template: bool, name: str
) -> list[int]:
    """Token ids of ``messages`` rendered by a Hugging Face tokenizer's chat template.

    Shared by the backends that tokenize with ``transformers`` (in process, and for
    vLLM). A template's error is the input's fault (400); the template writes every
    special token itself, so none is added when encoding.
    """
    if not has_template:
        raise InvalidRequest(
            f"model {name} has no chat template; use the completions endpoint",
            param="messages",
        )
    try:
        text = tokenizer.apply_chat_template(
            [dict(m) for m in messages], add_generation_prompt=True, tokenize=False
        )
    except Exception as exc:  # any error of a third-party template is the input's fault
        raise InvalidRequest(
            f"messages do not fit the chat template of {name}: {exc}", param="messages"
        ) from exc
    if not isinstance(text, str):
        raise InvalidRequest("the chat template did not render to text", param="messages")
    return [int(i) for i in tokenizer.encode(text, add_special_tokens=False)]


class TokenTexts:
    """Each token's own text, as a logprob names it: the token decoded alone, special
    tokens kept (EOS is not ""), no clean-up of spaces (a lone " ," stays as it is; a
    token holding part of a character decodes to U+FFFD). Cached per id: logprobs name
    the same few ids again and again, and a vocabulary's worth is the most it holds."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._texts: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._texts.get(token_id)
        if text is None:
            decoded = self._tokenizer.decode(
                [token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False
            )
            text = self._texts[token_id] = str(decoded)
        return text


class HfTokenizing:
    """The tokenizing methods of ``backends.base.LoadedModel`` over a Hugging Face
    tokenizer: one copy for the backends that tokenize with ``transformers`` (in
    process, and for vLLM). A subclass sets ``_tokenizer``, ``_info`` and ``_name``."""

    _tokenizer: Any
    _info: ModelInfo
    _name: str

    def encode_prompt(self, text: str) -> list[int]:
        """Tokenize with the tokenizer's own special tokens (e.g. a leading bos)."""
        return [int(i) for i in self._tokenizer.encode(text)]

    def encode_chat(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        return encode_chat(
            self._tokenizer, messages, has_template=self._info.has_chat_template, name=self._name
        )

    def count_tokens(self, text: str) -> int:
        """Tokens of ``text`` itself, without the bos a prompt would get (usage counts)."""
        return len(self._tokenizer.encode(text, add_special_tokens=False))

    def decode_tokens(self, token_ids: Sequence[int]) -> str:
        return str(self._tokenizer.decode(list(token_ids), skip_special_tokens=True))
