"""The ``transformers`` backend: any local Hugging Face folder, run in-process by torch.

It serves two tasks: text generation (``*ForCausalLM`` checkpoints) and
embeddings (encoders such as BERT). It reads local folders only — never the
network — and only safetensors weights, so loading cannot run pickled code, unless a
model's options say ``allow_pickle = true`` and its folder has no safetensors.

Generation is a hand-written decode loop over the model's forward pass with its
KV cache rather than ``model.generate``: routerd needs to check cancellation,
stop strings and stream text between every two tokens. The loop decodes many
rows at once, which join and leave between steps (:mod:`backends.hf_batch`);
``generate`` is a batch of one. Its text-side parts (incremental detokenizing,
stop-string holdback) live in :mod:`backends.hf_text`.

Footprints (DESIGN.md rule 5): ``estimate_footprint`` reads config and
safetensors headers (arithmetic in :mod:`backends.footprint`); ``warm_up``
profiles a prompt of the whole context (measured by :mod:`backends.hf_measure`)
and ``measure_footprint`` reports what that really took.

Options and the load plan (task, dtype, context, which weights) live in
:mod:`backends.hf_plan`; the loaded model, with its request path, warm-up and
measuring, in :mod:`backends.hf_model`; this module estimates and loads.
"""

from __future__ import annotations

import contextlib
import copy
import os
import threading
import traceback
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from backends import footprint, hf_measure, hf_plan, hf_shelf
from backends.base import MOVING_TO_DEVICE, READING_WEIGHTS, Footprint, LoadSpec
from backends.hf_model import TransformersModel, release_memory
from backends.hf_shelf import Shelf
from contract.errors import BackendError, OutOfMemory
from contract.generation import ModelInfo, Task


class _ProgressBars:
    """Hides transformers' "Loading weights" bars, which would litter daemon logs.

    Loads run in several executor threads at once, so hiding is reference-counted
    and the global switch is restored only when the last load finishes.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0
        self._was_enabled = True

    @contextlib.contextmanager
    def hidden(self) -> Iterator[None]:
        from transformers.utils import logging

        hf_logging: Any = logging  # untyped module
        with self._lock:
            if self._users == 0:
                self._was_enabled = hf_logging.is_progress_bar_enabled()
                hf_logging.disable_progress_bar()
            self._users += 1
        try:
            yield
        finally:
            with self._lock:
                self._users -= 1
                if self._users == 0 and self._was_enabled:
                    hf_logging.enable_progress_bar()


_PROGRESS_BARS = _ProgressBars()


class TransformersBackend:
    """Loads local Hugging Face folders with ``transformers`` on cpu or one cuda device."""

    kind = "transformers"

    def __init__(self) -> None:
        self._shelf = Shelf()  # configs and tokenizers kept for reloads (backends.hf_shelf)

    def validate_options(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """See :func:`backends.hf_plan.validate_options`."""
        return hf_plan.validate_options(options)

    def task_of(self, path: str, options: Mapping[str, Any]) -> Task | None:
        """The task ``plan_load`` resolves: the ``task`` option, or for "auto" the
        architecture in config.json (a ``*ForCausalLM`` generates, any other embeds)."""
        option = hf_plan.validate_options(options)["task"]
        config = hf_plan._read_config(Path(path)) if option == "auto" else {}
        return hf_plan._resolve_task(option, config)

    def estimate_footprint(self, spec: LoadSpec) -> Footprint:
        """Bytes ``spec`` will need, from config and safetensors headers (no weights read).

        ``weights``: header tensor sizes in the load dtype (a causal checkpoint
        loaded for embeddings drops its ``lm_head``). ``runtime``: KV bytes per
        token × the tokens the cache is reserved for (:func:`backends.hf_plan.kv_tokens`)
        for generation, 0 for embeddings. ``working``:
        :func:`backends.footprint.working_bytes` for one prompt of the whole context —
        the same pass ``warm_up`` measures; no forward pass is larger, as batches are
        prefilled in groups of at most a context's tokens — or, where larger, one layer
        of the reserved cache (:func:`backends.footprint.reshape_bytes`).
        """
        plan = hf_plan.plan_load(spec, self._shelf)
        if plan.pickled:
            # No headers to read: the files' size stands in until warm-up measures.
            files = hf_plan.pickle_files(plan.folder)
            return Footprint(weights=sum(p.stat().st_size for p in files))
        tensors = footprint.read_checkpoint(plan.folder)
        if plan.task is Task.EMBED and plan.causal:
            # AutoModel loads the base model of a *ForCausalLM checkpoint, without its head.
            tensors = {n: t for n, t in tensors.items() if not n.startswith("lm_head.")}
        dtype_bytes = plan.dtype.itemsize
        runtime = 0
        if plan.task is Task.GENERATE:
            per_token = footprint.kv_cache_bytes_per_token(plan.config, dtype_bytes)
            runtime = per_token * plan.kv_tokens
        gated = any("gate_proj" in name or "gate_up_proj" in name for name in tensors)
        working = footprint.working_bytes(
            plan.config, plan.context_length, dtype_bytes, decoder=plan.causal, gated_mlp=gated
        )
        working = max(working, footprint.reshape_bytes(plan.config, runtime))
        return Footprint(
            weights=footprint.weights_bytes(tensors.values(), dtype_bytes),
            runtime=runtime,
            working=working,
        )

    def load(self, spec: LoadSpec) -> TransformersModel:
        """Load tokenizer and model from ``spec.path`` onto ``spec.device``.

        The weight files are read into the page cache by a thread of their own
        (:class:`_WeightReader`) from the start, while the config is parsed, the
        tokenizer and the modules are built; the load returns once they are read.
        """
        reader = _WeightReader(sorted(Path(spec.path).glob("*.safetensors")))
        try:
            return self._load(spec, reader)
        finally:
            reader.stop()

    def _load(self, spec: LoadSpec, reader: _WeightReader) -> TransformersModel:
        plan = hf_plan.plan_load(spec, self._shelf)
        device = hf_plan.resolve_device(spec.device)
        task, dtype, folder = plan.task, plan.dtype, plan.folder

        AutoModel, AutoModelForCausalLM, AutoTokenizer = hf_plan.auto_classes()[1:]

        auto_class: Any = AutoModelForCausalLM if task is Task.GENERATE else AutoModel
        model: Any = None
        files = reader.files
        weights = sum(p.stat().st_size for p in files)
        try:
            spec.report(READING_WEIGHTS, 0, weights)
            shelf_key, tokenizer = self._shelf.take_tokenizer(folder)
            skeleton_key = hf_shelf.skeleton_key(folder, task.value, dtype)
            reusable = device.type == "cpu" and not plan.pickled
            with _PROGRESS_BARS.hidden():
                if tokenizer is None:
                    tokenizer = AutoTokenizer.from_pretrained(
                        str(folder),
                        config=plan.config,  # parsed already; read, not written
                        local_files_only=True,
                    )
                if reusable:
                    model = self._shelf.take_skeleton(skeleton_key)
                    if model is None:
                        model = _fresh_skeleton(auto_class, plan)
                if model is not None and not hf_shelf.fill_skeleton(model, files):
                    model = None  # its checkpoint does not fill it: built afresh below
                if model is None:
                    model = auto_class.from_pretrained(
                        str(folder),
                        config=copy.deepcopy(plan.config),  # from_pretrained writes into it
                        local_files_only=True,
                        use_safetensors=not plan.pickled,
                        dtype=dtype,
                    )
            reader.wait()
            spec.report(READING_WEIGHTS, weights, weights)
            _move_to(model, device, spec)
        except Exception as exc:  # whatever failed, the caller needs one clear BackendError
            # A failed load must give back what it took (e.g. half-copied weights
            # after a CUDA OOM): the traceback's frames still hold the model.
            model = None
            traceback.clear_frames(exc.__traceback__)
            release_memory(device)
            error = OutOfMemory if isinstance(exc, torch.OutOfMemoryError) else BackendError
            raise error(
                f"could not load {spec.name}@{spec.version} from {folder} "
                f"as a {task.value} model: {exc}"
            ) from exc
        model.eval()
        info = ModelInfo(
            task=task,
            context_length=plan.context_length,
            device=spec.device,
            dtype=str(dtype).removeprefix("torch."),
            has_chat_template=getattr(tokenizer, "chat_template", None) is not None,
            vocab_size=int(model.get_input_embeddings().num_embeddings),
            kv_tokens=plan.kv_tokens if task is Task.GENERATE else 0,
        )
        shelf = self._shelf
        return TransformersModel(
            model,
            tokenizer,
            info,
            device,
            spec.name,
            known=spec.known,
            on_unload=lambda kept, module: _shelve(
                shelf, shelf_key, kept, skeleton_key if reusable else None, module
            ),
        )


def _shelve(
    shelf: hf_shelf.Shelf,
    tokenizer_key: hf_shelf.Key,
    tokenizer: Any,
    skeleton_key: hf_shelf.Key | None,
    model: Any,
) -> None:
    """Keep an unloaded instance's tokenizer, and its modules emptied where reusable."""
    shelf.put_tokenizer(tokenizer_key, tokenizer)
    if skeleton_key is not None and model is not None:
        shelf.put_skeleton(skeleton_key, model)


def _fresh_skeleton(auto_class: Any, plan: hf_plan.Plan) -> Any | None:
    """Modules for ``plan`` with no weight in them yet (:func:`backends.hf_shelf.build_skeleton`),
    set up as ``from_pretrained`` sets up what it returns; None where they cannot be."""
    model = hf_shelf.build_skeleton(auto_class, copy.deepcopy(plan.config), plan.dtype)
    if model is None:
        return None
    model.config.name_or_path = str(plan.folder)
    if model.can_generate():
        # What from_pretrained reads for a model that generates: its folder's
        # generation_config.json, else the generation settings in config.json.
        from transformers import GenerationConfig

        hf_generation: Any = GenerationConfig  # untyped
        try:
            model.generation_config = hf_generation.from_pretrained(
                str(plan.folder), local_files_only=True
            )
        except OSError:
            model.generation_config = hf_generation.from_pretrained(
                str(plan.folder),
                config_file_name="config.json",
                _from_model_config=True,
                local_files_only=True,
            )
    return model


class _WeightReader:
    """Reads weight files into the page cache on a thread of its own.

    On the CPU the weights stay memory-mapped and would otherwise be read by page
    faults as the first passes touch them, a few pages at a time, after the modules
    are built. Read here from the start of the load, they come in large sequential
    requests while the main thread builds. ``sendfile`` to ``/dev/null`` reads them
    without copying them anywhere; ``posix_fadvise(WILLNEED)``, which asks the kernel
    to, read only the first 8 MiB of each file on the kernel measured (Linux 6.18).
    Best effort: a file that cannot be read is left to the load to complain about.
    """

    _CHUNK = 64 << 20  # bytes per call, between which a stop is noticed

    def __init__(self, files: list[Path]) -> None:
        self.files = files
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="weights-reader", daemon=True)
        self._thread.start()

    def wait(self) -> None:
        """Until every file has been read."""
        self._thread.join()

    def stop(self) -> None:
        """Stop at the next chunk: the load is over, whichever way it went."""
        self._stopped.set()

    def _run(self) -> None:
        try:
            sink = os.open(os.devnull, os.O_WRONLY)
        except OSError:
            return
        try:
            for path in self.files:
                try:
                    self._read(path, sink)
                except OSError:
                    continue
        finally:
            os.close(sink)

    def _read(self, path: Path, sink: int) -> None:
        with path.open("rb", buffering=0) as handle:
            fd = handle.fileno()
            offset, size = 0, os.fstat(fd).st_size
            try:
                while offset < size and not self._stopped.is_set():
                    sent = os.sendfile(sink, fd, offset, min(self._CHUNK, size - offset))
                    if sent <= 0:
                        return
                    offset += sent
            except OSError:  # no sendfile from this file here: read it instead
                buffer = memoryview(bytearray(1 << 20))
                handle.seek(offset)
                while not self._stopped.is_set() and handle.readinto(buffer):
                    pass


def _move_to(model: Any, device: torch.device, spec: LoadSpec) -> None:
    """``model.to(device)``, one top-level module at a time so progress can be told in bytes.

    A model already all on ``device`` (a CPU load) is left as it is: walking its modules
    to move nothing costs milliseconds.
    """

    def size(module: Any) -> int:
        tensors = [*module.parameters(), *module.buffers()]
        return sum(hf_measure.tensor_storages(tensors).values())

    tensors = [*model.parameters(), *model.buffers()]
    total = sum(hf_measure.tensor_storages(tensors).values())
    done = 0
    spec.report(MOVING_TO_DEVICE, 0, total)
    if any(tensor.device != device for tensor in tensors):
        for child in model.children():
            child.to(device)
            done = min(done + size(child), total)
            spec.report(MOVING_TO_DEVICE, done, total)
        model.to(device)  # whatever the root module holds itself
    spec.report(MOVING_TO_DEVICE, total, total)
