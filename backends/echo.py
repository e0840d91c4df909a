"""The ``echo`` backend: a model that answers at once with text taken from the prompt.

It exists to test and measure routerd itself, not to serve anyone: load tests,
benchmarks of the router's own overhead (``bench/router_overhead.py``) and fault
tests (injected latency and failures). It needs no weights and no torch; the
model folder only has to exist (any folder will do).

What it does:

- Tokens are the bytes of the UTF-8 text (vocabulary 256); a chat renders each
  message as a ``"role: content\\n"`` line.
- Generation echoes the prompt, one byte-token per step, repeated from its start
  until ``max_tokens`` — honouring stop strings (never streamed, nor the start of
  one that may still complete), cancellation between steps, and streaming one
  piece per token through ``on_text`` (a byte that only starts a multi-byte
  character waits for the rest). Finish reasons: ``stop`` (a stop string,
  or an empty prompt), ``length``, ``cancelled``. ``generate_batch`` advances all
  its rows one token per step and takes in admitted rows between steps.
- Embeddings are deterministic: 16 numbers from a hash of the token ids,
  L2-normalized.

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
    max_tokens = generation.params.max_tokens
    if generation.cancellation.cancelled:
        return GenerationResult("", len(source), 0, "cancelled")
    if not source:
        return GenerationResult("", 0, 0, "stop")
    repeats = -(-max_tokens // len(source))
    text = (source * repeats)[:max_tokens].decode("utf-8", "replace")
    return GenerationResult(text, len(source), max_tokens, "length")


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
        self.stops = [s for s in params.stop if s]
        self.longest_stop = max((len(s) for s in self.stops), default=0)
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
        if byte < 0x80 and not self.pending:  # ASCII with nothing half-decoded: itself
            piece = chr(byte)
        else:
            if self.decoder is None:
                self.decoder = codecs.getincrementaldecoder("utf-8")("replace")
            piece = self.decoder.decode(bytes((byte,)), final=last)
            self.pending = 0 if piece else self.pending + 1
        if piece:
            before = len(self.text)
            self.text += piece
            if self.stops:
                hit = self._find_stop(before)
                if hit is not None:
                    self.text = self.text[:hit]
                    return self._end("stop")
        if last:
            return self._end("length")
        if self.on_text is not None:  # streaming: pass on what can no longer become a stop
            self._send(len(self.text) - self._held_back())
        return False

    def _find_stop(self, before: int) -> int | None:
        """Earliest stop string in the text; only ones ending in the new piece are new."""
        start = max(0, before - self.longest_stop + 1)
        found = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        return min(found) if found else None

    def _held_back(self) -> int:
        """Length of the longest tail of the text that may still become a stop string."""
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
