"""The ``echo`` backend: a model that answers at once with text taken from the prompt.

It exists to test and measure routerd itself, not to serve anyone: load tests,
benchmarks of the router's own overhead (``bench/router_overhead.py``) and fault
tests (injected latency and failures). It needs no weights and no torch; the
model folder only has to exist (any folder will do).

What it does:

- Tokens are the bytes of the UTF-8 text (vocabulary 256); a chat renders each
  message as a ``"role: content\\n"`` line.
- Generation echoes the prompt, one byte-token per step, repeated from its start
  until ``max_tokens`` — honouring stop strings (cut from the text unless kept, and
  then never streamed, nor the start of one that may still complete), cancellation
  between steps, and streaming one piece per token through ``on_text`` (a byte that
  only starts a multi-byte character waits for the rest). Finish reasons: ``stop``
  (a stop string, a stop token, or an empty prompt), ``length``, ``cancelled``.
  ``generate_batch`` advances all its rows one token per step and takes in admitted
  rows between steps.
- Embeddings are deterministic: 16 numbers from a hash of the token ids,
  L2-normalized.

Sampling (``SamplingParams``), field by field. The echo's next token has probability
one — the prompt's next byte — so:

- ``temperature``, ``top_p``, ``top_k``, ``min_p`` and ``seed`` are honoured by
  changing nothing: rescaling, cutting or sampling a one-point distribution leaves
  that one point.
- ``logprobs``, ``prompt_logprobs``, ``logit_bias``, ``allowed_token_ids`` and the
  presence, frequency and repetition penalties are refused (``ModelInfo.refuses``):
  there is no distribution to report, bias, mask or penalise, and answering as if
  they were not there would be a lie.
- ``stop_token_ids`` are byte values: generating one ends the row with ``stop``, and
  its byte is not part of the text (the bytes before it are, a character it cut
  short decoded as U+FFFD). ``include_stop_str_in_output`` keeps a stop string in the
  text (a stop token's byte stays out either way); the stream then holds nothing
  back, since nothing it sends can be cut.
- ``ignore_eos`` and ``min_tokens`` keep a row from ending by itself, which the echo
  does in one case only: it never generates an end-of-sequence token, but an empty
  prompt, with nothing to echo, stops at once without one. Such a row that may not
  stop so (``ignore_eos``, or ``min_tokens`` > 0, with ``max_tokens`` > 0) fails with
  ``InvalidRequest`` on ``prompt``: the echo has no token to generate instead, and
  finishing with "length" would claim tokens it never generated. For every other
  prompt ``ignore_eos`` holds trivially.
- ``min_tokens`` also means that no stop string or stop token ends a row within its
  first ``min_tokens`` tokens. A stop string those tokens complete is not looked for
  (as in vLLM), and a stop token among them is echoed like any other byte: the echo
  has no other token to put in its place.

Options (all optional):

``task``        ``"generate"`` (default) or ``"embed"``.
``context``     context length in tokens (default 4096).
``latency_ms``  milliseconds slept on the executor thread before answering: once
                per ``generate``/``embed`` call, and once per group of rows joining
                a ``generate_batch`` (rows that join together share it). Default 0.
``fail_rate``   share (0..1) of generate rows and embed calls that fail with
                BackendError("injected failure"); default 0.
``seed``        seed of the random draws deciding those failures (default 0), so
                a run can be reproduced.
``bytes``       the footprint both estimated and measured (default 1 MiB).
``inline``      whether routerd may call the model on its event loop (default true;
                see ``ModelInfo.inline``). Ignored, as if false, when ``latency_ms``
                is set, since sleeping blocks. False puts every call on the instance
                thread, as with a compute backend.
"""

from __future__ import annotations

import codecs
import hashlib
import logging
import math
import random
import struct
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from backends.base import (
    MOVING_TO_DEVICE,
    READING_WEIGHTS,
    Footprint,
    GenerationRow,
    LoadSpec,
    RowSource,
    free_slots,
    generate_alone,
)
from backends.options import invalid, is_int, is_positive_int, reject_unknown
from contract.errors import BackendError, InvalidRequest
from contract.generation import Generation, GenerationResult, ModelInfo, SamplingParams, Task

log = logging.getLogger("routerd.backends")

VOCAB_SIZE = 256
EMBED_DIMS = 16
DEFAULTS: Mapping[str, Any] = {
    "task": "generate",
    "context": 4096,
    "latency_ms": 0.0,
    "fail_rate": 0.0,
    "seed": 0,
    "bytes": 1024 * 1024,
    "inline": True,
}
# What the echo cannot honour: its next token has probability one, so there are no
# log-probabilities to report and no distribution to bias, mask or penalise. Accepting
# these would mean answering as if they had not been asked.
REFUSES = frozenset(
    (
        "logprobs",
        "prompt_logprobs",
        "logit_bias",
        "allowed_token_ids",
        "presence_penalty",
        "frequency_penalty",
        "repetition_penalty",
    )
)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


class EchoBackend:
    """Builds :class:`EchoModel` instances; validates the options listed above."""

    kind = "echo"

    def validate_options(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """Return every option with defaults filled in, or raise InvalidRequest naming the key."""
        reject_unknown(options, DEFAULTS, "echo")
        values = {**DEFAULTS, **options}
        if values["task"] not in (Task.GENERATE.value, Task.EMBED.value):
            raise invalid("task", values["task"], "generate, embed")
        context = values["context"]
        if not is_positive_int(context):
            raise invalid("context", context, "a positive integer")
        latency = values["latency_ms"]
        if not _is_number(latency) or latency < 0:
            raise invalid("latency_ms", latency, "a number of milliseconds >= 0")
        fail_rate = values["fail_rate"]
        if not _is_number(fail_rate) or not 0 <= fail_rate <= 1:
            raise invalid("fail_rate", fail_rate, "a number from 0 to 1")
        if not is_int(values["seed"]):
            raise invalid("seed", values["seed"], "an integer")
        if not isinstance(values["inline"], bool):
            raise invalid("inline", values["inline"], "true or false")
        size = values["bytes"]
        if not is_int(size) or size < 0:
            raise invalid("bytes", size, "an integer >= 0")
        values["task"] = str(values["task"])
        values["latency_ms"] = float(latency)
        values["fail_rate"] = float(fail_rate)
        return values

    def task_of(self, path: str, options: Mapping[str, Any]) -> Task:
        """The ``task`` option: the echo has no config to read."""
        return Task(self.validate_options(options)["task"])

    def estimate_footprint(self, spec: LoadSpec) -> Footprint:
        _require_folder(spec.path)
        return Footprint(weights=int(self.validate_options(spec.options)["bytes"]))

    def load(self, spec: LoadSpec) -> EchoModel:
        """Tells the load phases with the ``bytes`` option as their size (nothing is read)."""
        _require_folder(spec.path)
        options = self.validate_options(spec.options)
        size = int(options["bytes"])
        spec.report(READING_WEIGHTS, 0, size)
        spec.report(READING_WEIGHTS, size, size)
        spec.report(MOVING_TO_DEVICE, size, size)
        return EchoModel(spec, options)


def _require_folder(path: str) -> None:
    if not Path(path).is_dir():
        raise BackendError(f"model path {path} is not a directory")


class EchoModel:
    """One loaded echo model; every method is cheap except the configured latency."""

    def __init__(self, spec: LoadSpec, options: Mapping[str, Any]) -> None:
        self._info = ModelInfo(
            task=Task(options["task"]),
            context_length=int(options["context"]),
            device=spec.device,
            dtype="uint8",
            has_chat_template=True,
            vocab_size=VOCAB_SIZE,
            # With no latency to inject nothing blocks, so no thread is needed.
            inline=bool(options["inline"]) and float(options["latency_ms"]) == 0.0,
            refuses=REFUSES,
        )
        self._latency_s = float(options["latency_ms"]) / 1000.0
        self._fail_rate = float(options["fail_rate"])
        self._bytes = int(options["bytes"])
        self._random = random.Random(int(options["seed"]))
        self._lock = threading.Lock()
        self._unloaded = False

    @property
    def info(self) -> ModelInfo:
        return self._info

    def warm_up(self) -> None:
        """Run one short request through the real paths, without latency or failures."""
        if self._info.task is Task.EMBED:
            self._vectors([self.encode_prompt("hello")])
            return
        seq = _Sequence(Generation(self.encode_prompt("hello"), SamplingParams(max_tokens=4)))
        while not seq.step():
            pass

    def measure_footprint(self) -> Footprint:
        return Footprint(weights=self._bytes)

    def encode_prompt(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_chat(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        lines = []
        for i, message in enumerate(messages):
            role, content = message.get("role"), message.get("content")
            if not isinstance(role, str) or not isinstance(content, str | None):
                raise InvalidRequest(
                    f"messages[{i}] needs a string role and string content", param="messages"
                )
            lines.append(f"{role}: {content or ''}\n")
        return self.encode_prompt("".join(lines))

    def count_tokens(self, text: str) -> int:
        return len(text.encode("utf-8"))

    def decode_tokens(self, token_ids: Sequence[int]) -> str:
        return _prompt_bytes(token_ids).decode("utf-8", "replace")

    # -- generation ------------------------------------------------------------------

    def generate(self, generation: Generation) -> GenerationResult:
        """One row alone: ``generate_batch`` with a batch of one."""
        return generate_alone(self.generate_batch, generation)

    def generate_batch(
        self,
        rows: Sequence[GenerationRow],
        admit: RowSource | None,
        max_rows: int | None = None,
    ) -> None:
        """Advance every live row one token per step; ask ``admit`` for more between steps.

        ``admit`` is offered ``max_rows`` minus the live rows (unbounded when None).
        Each row ends with ``result`` or ``error`` set and ``on_done`` called once, also
        when something outside a row (``admit`` itself) fails.
        """
        # A lone row without stop strings or a stream needs no stepping (stop tokens,
        # min_tokens and ignore_eos it works out in one go: ``_echo_alone``).
        if admit is None and len(rows) == 1 and rows[0].on_text is None and not rows[0].params.stop:
            self._generate_alone(rows[0])
            return
        live: list[tuple[GenerationRow, _Sequence]] = []
        incoming = list(rows)
        try:
            while True:
                if incoming:
                    live.extend(self._join(incoming))
                    incoming = []
                still_live = []
                for entry in live:
                    row, seq = entry
                    try:
                        if not seq.step():
                            still_live.append(entry)
                            continue
                        row.result = seq.result()
                    except Exception as exc:  # e.g. a client's broken on_text
                        row.result, row.error = None, exc
                    _done(row)
                live = still_live
                if admit is not None:
                    free = free_slots(max_rows, len(live))
                    if free > 0:
                        incoming = list(admit(free))
                if not live and not incoming:
                    return
        except BaseException as exc:
            for row in [row for row, _ in live] + incoming:
                if row.result is None and row.error is None:
                    row.error = exc if isinstance(exc, Exception) else BackendError(str(exc))
                    _done(row)
            raise

    def _generate_alone(self, row: GenerationRow) -> None:
        """A lone row nobody watches token by token (no stream, no stop strings, nothing
        can join): the same text in one go, without a decoding state stepped per token.

        The router benchmarks (``bench/router_overhead.py``) run through here, so it
        does only what the row needs: what ``_join`` checks, then the text itself.
        """
        try:
            self._check_usable(Task.GENERATE)
            self._sleep()
            if self._should_fail():
                raise BackendError("injected failure")
            row.result = _echo_alone(row)
        except Exception as exc:
            row.result, row.error = None, exc
        _done(row)

    def _join(self, rows: Sequence[GenerationRow]) -> list[tuple[GenerationRow, _Sequence]]:
        """Start ``rows`` (one shared latency); rows that cannot start are finished here."""
        self._check_usable(Task.GENERATE)
        self._sleep()
        started = []
        for row in rows:
            try:
                if self._should_fail():
                    raise BackendError("injected failure")
                seq = _Sequence(row)
            except Exception as exc:
                row.result, row.error = None, exc
                _done(row)
                continue
            started.append((row, seq))
        return started

    # -- embeddings ------------------------------------------------------------------

    def embed(self, inputs: Sequence[Sequence[int]]) -> list[list[float]]:
        self._check_usable(Task.EMBED)
        self._sleep()
        if self._should_fail():
            raise BackendError("injected failure")
        return self._vectors(inputs)

    def _vectors(self, inputs: Sequence[Sequence[int]]) -> list[list[float]]:
        vectors = []
        for ids in inputs:
            digest = hashlib.blake2b(
                struct.pack(f"<{len(ids)}q", *ids), digest_size=2 * EMBED_DIMS
            ).digest()
            raw = [
                (value - 32767.5) / 32767.5 for value in struct.unpack(f"<{EMBED_DIMS}H", digest)
            ]
            norm = math.sqrt(sum(x * x for x in raw))
            vectors.append([x / norm for x in raw])
        return vectors

    # -- shared ----------------------------------------------------------------------

    def _check_usable(self, task: Task) -> None:
        if self._unloaded:
            raise BackendError("the echo model was unloaded")
        if self._info.task is not task:
            raise InvalidRequest(f"this echo model is a {self._info.task} model, not {task}")

    def _sleep(self) -> None:
        if self._latency_s > 0:
            time.sleep(self._latency_s)

    def _should_fail(self) -> bool:
        if self._fail_rate <= 0:
            return False
        with self._lock:
            return self._random.random() < self._fail_rate

    def unload(self) -> None:
        self._unloaded = True


def _echo_alone(generation: Generation) -> GenerationResult:
    """What stepping a ``_Sequence`` without stop strings or a sink to its end gives."""
    source = _prompt_bytes(generation.prompt_ids)
    params = generation.params
    if generation.cancellation.cancelled:
        return GenerationResult("", len(source), 0, "cancelled")
    if not source:
        _check_may_stop_at_once(params)
        return GenerationResult("", 0, 0, "stop")
    produced, finish = params.max_tokens, "length"
    if params.stop_token_ids:
        ender = _first_stop_token(source, params)
        if ender is not None and ender < produced:
            produced, finish = ender + 1, "stop"
    kept = produced if finish == "length" else produced - 1  # a stop token's byte is not text
    repeats = -(-kept // len(source))
    text = (source * repeats)[:kept].decode("utf-8", "replace")
    return GenerationResult(text, len(source), produced, finish)


def _first_stop_token(source: bytes, params: SamplingParams) -> int | None:
    """Where (0-based) the first stop token that may end the row falls in the endless
    echo of ``source``: the first one past the row's ``min_tokens`` tokens."""
    enders = frozenset(params.stop_token_ids)
    least, size = params.min_tokens, len(source)
    found = None
    for offset, byte in enumerate(source):
        if byte in enders:
            at = offset if offset >= least else offset + size * -(-(least - offset) // size)
            found = at if found is None else min(found, at)
    return found


def _check_may_stop_at_once(params: SamplingParams) -> None:
    """An empty prompt stops at once, without a token; refuse a row that may not."""
    if params.max_tokens > 0 and (params.ignore_eos or params.min_tokens > 0):
        asked = "ignore_eos" if params.ignore_eos else "min_tokens"
        raise InvalidRequest(
            f"an empty prompt gives the echo model nothing to generate, and {asked} "
            "asks it not to stop without generating",
            param="prompt",
        )


def _prompt_bytes(prompt_ids: Sequence[int]) -> bytes:
    """The bytes a prompt's ids stand for (the echo vocabulary is the 256 byte values)."""
    try:
        return bytes(prompt_ids)  # refuses ids outside 0..255 itself
    except (ValueError, TypeError):
        raise InvalidRequest(
            f"token ids must be in 0..{VOCAB_SIZE - 1} for the echo backend", param="prompt"
        ) from None


def _done(row: GenerationRow) -> None:
    """Call ``on_done`` once; a failing callback must not stop the other rows."""
    try:
        row.on_done(row)
    except Exception:
        log.exception("on_done of a generation row failed")


class _Sequence:
    """One row's decoding state: the echoed bytes, the text so far, what was streamed."""

    def __init__(self, generation: Generation) -> None:
        self.source = _prompt_bytes(generation.prompt_ids)
        self.params = params = generation.params
        self.on_text = generation.on_text
        self.cancellation = generation.cancellation
        self.decoder: codecs.IncrementalDecoder | None = None  # made at the first non-ASCII byte
        self.pending = 0  # bytes fed to the decoder that it has not turned into text yet
        if not self.source:
            _check_may_stop_at_once(params)
        self.stops = [s for s in params.stop if s]
        self.longest_stop = max((len(s) for s in self.stops), default=0)
        self.keep_stop = params.include_stop_str_in_output
        self.enders = frozenset(params.stop_token_ids)
        self.least = params.min_tokens  # nothing ends the row within this many tokens
        self.text = ""
        self.sent = 0  # characters of ``text`` already passed to on_text
        self.produced = 0
        self.finish: str | None = None

    def step(self) -> bool:
        """Produce one token; return True once the row has finished."""
        if self.finish is not None:
            return True
        if self.cancellation.cancelled:
            return self._end("cancelled")
        if not self.source:
            return self._end("stop")  # nothing to echo: the model stops at once
        if self.produced >= self.params.max_tokens:
            return self._end("length")
        byte = self.source[self.produced % len(self.source)]
        self.produced += 1
        last = self.produced >= self.params.max_tokens
        may_end = self.produced > self.least
        ender = may_end and byte in self.enders
        if ender:  # its byte is not text; a character it cut short is U+FFFD
            piece = self._decode(b"", final=True) if self.pending else ""
        elif byte < 0x80 and not self.pending:  # ASCII with nothing half-decoded: itself
            piece = chr(byte)
        else:
            piece = self._decode(bytes((byte,)), final=last)
        if piece:
            before = len(self.text)
            self.text += piece
            if self.stops and may_end:
                hit = self._find_stop(before)
                if hit is not None:
                    self.text = self.text[: hit[1] if self.keep_stop else hit[0]]
                    return self._end("stop")
        if ender:
            return self._end("stop")
        if last:
            return self._end("length")
        if self.on_text is not None:  # streaming: pass on what can no longer become a stop
            self._send(len(self.text) - self._held_back())
        return False

    def _decode(self, data: bytes, *, final: bool) -> str:
        if self.decoder is None:
            self.decoder = codecs.getincrementaldecoder("utf-8")("replace")
        piece = self.decoder.decode(data, final=final)
        self.pending = 0 if piece or final else self.pending + len(data)
        return piece

    def _find_stop(self, before: int) -> tuple[int, int] | None:
        """Where the first stop string ending in the new piece (after ``before``) starts
        and ends; of two starting together, the shorter, which completed first."""
        found = []
        for stop in self.stops:
            at = self.text.find(stop, max(0, before - len(stop) + 1))
            if at >= 0:
                found.append((at, at + len(stop)))
        return min(found) if found else None

    def _held_back(self) -> int:
        """Length of the longest tail of the text that may still become a stop string
        and be cut from it (none when stop strings are kept)."""
        if self.keep_stop:
            return 0
        for size in range(min(self.longest_stop - 1, len(self.text)), 0, -1):
            tail = self.text[-size:]
            if any(s.startswith(tail) for s in self.stops):
                return size
        return 0

    def _send(self, upto: int) -> None:
        if upto > self.sent:
            piece = self.text[self.sent : upto]
            self.sent = upto
            if self.on_text is not None:
                self.on_text(piece)

    def _end(self, reason: str) -> bool:
        self.finish = reason
        self._send(len(self.text))
        return True

    def result(self) -> GenerationResult:
        assert self.finish is not None
        return GenerationResult(
            text=self.text,
            prompt_tokens=len(self.source),
            completion_tokens=self.produced,
            finish_reason=self.finish,
        )
