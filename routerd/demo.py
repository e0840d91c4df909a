"""Deterministic demo models, built locally in seconds, for tests, demos and benches.

routerd must be exercised end to end (load, warm up, measure, evict, batch,
stream) on machines with no network and no GPU. These four models are ordinary
Hugging Face folders (config.json, model.safetensors, tokenizer files) that any
``transformers`` backend loads like a real checkpoint, in three clearly different
sizes so that packing and eviction have something to decide about:

- ``demo-small``  — Llama, ≈ 1 MB of fp32 weights;
- ``demo-medium`` — Llama, ≈ 20 MB;
- ``demo-large``  — Llama, ≈ 100 MB;
- ``demo-embed``  — a small BERT encoder, for the embeddings endpoint.

Their weights are random (seeded, so every build is byte-identical): the text
they generate is nonsense. They exist to test the machinery, not the answers.

All four share one byte-level BPE tokenizer (vocabulary 1024) trained here on a
fixed slice of the Python standard library's sources, with a ChatML chat
template, so chat requests work too.

Each folder is built in a temporary sibling and renamed into place with a marker
file naming the build format, under a file lock: a crash never leaves a half
folder, concurrent builders do the work once, and later calls return at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import shutil
import sysconfig
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Bump when anything that changes the files changes; older folders are rebuilt.
BUILD_FORMAT = 1
MARKER_FILE = ".routerd-demo.json"

VOCAB_SIZE = 1024
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>")
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Enough text for a useful 1024-token vocabulary, little enough to train in < 1 s.
_CORPUS_BYTES = 2_000_000
_SEED = 20240601


@dataclass(frozen=True)
class DemoModel:
    """A built demo model, in the shape the registry needs to register a version."""

    name: str
    version: str
    path: str
    backend: str
    options: dict[str, Any] = field(default_factory=dict)
    description: str = ""


@dataclass(frozen=True)
class _Spec:
    name: str
    description: str
    architecture: str  # "llama" or "bert"
    hidden: int
    layers: int
    heads: int
    intermediate: int
    max_positions: int

    def sizes(self) -> dict[str, int]:
        """The sizes as both architectures' Hugging Face configs name them."""
        return {
            "vocab_size": VOCAB_SIZE,
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "max_position_embeddings": self.max_positions,
        }


_SPECS = (
    _Spec(
        "demo-small",
        "Llama, ~1 MB fp32, random weights (nonsense text)",
        "llama",
        64,
        2,
        2,
        256,
        2048,
    ),
    _Spec(
        "demo-medium",
        "Llama, ~20 MB fp32, random weights (nonsense text)",
        "llama",
        256,
        6,
        4,
        640,
        2048,
    ),
    _Spec(
        "demo-large",
        "Llama, ~100 MB fp32, random weights (nonsense text)",
        "llama",
        512,
        8,
        8,
        1280,
        2048,
    ),
    _Spec(
        "demo-embed",
        "BERT encoder, ~2.5 MB fp32, random weights (embeddings)",
        "bert",
        128,
        2,
        2,
        512,
        512,
    ),
)
DEMO_NAMES = tuple(spec.name for spec in _SPECS)


def _corpus() -> list[str]:
    """A fixed, sorted slice of the standard library's top-level ``.py`` files."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts: list[str] = []
    total = 0
    for path in sorted(stdlib.glob("*.py")):
        data = path.read_bytes()
        if total + len(data) > _CORPUS_BYTES:
            continue
        texts.append(data.decode("utf-8", errors="replace"))
        total += len(data)
    if not texts:
        raise RuntimeError(f"no Python sources found under {stdlib} to train a tokenizer")
    return texts


def _make_tokenizer() -> Any:
    """Train the shared tokenizer; returns a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    wrapper: Any = PreTrainedTokenizerFast  # untyped constructor

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    bos_id = tok.token_to_id("<s>")
    # Prompts start with <s>, as Llama-style models expect.
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
    )
    return wrapper(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        padding_side="left",
        model_max_length=2048,
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )


def build_tokenizer(dest: Path) -> None:
    """Train the demo tokenizer and save it to ``dest`` (``AutoTokenizer`` reloads it)."""
    _make_tokenizer().save_pretrained(str(dest))


@contextlib.contextmanager
def _quiet_progress() -> Iterator[None]:
    """Hide transformers' "Writing model shards" bars without changing them for good."""
    from transformers.utils import logging

    hf_logging: Any = logging  # untyped module
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _token_id(tokenizer: Any, token: str) -> int:
    value = tokenizer.convert_tokens_to_ids(token)
    assert isinstance(value, int)
    return value


def _save_model(spec: _Spec, tokenizer: Any, dest: Path) -> None:
    """Create the seeded random model for ``spec`` and save weights and configs."""
    import torch
    import transformers

    hf: Any = transformers  # untyped constructors

    bos, eos, pad = (_token_id(tokenizer, t) for t in ("<s>", "</s>", "<pad>"))
    im_end = _token_id(tokenizer, "<|im_end|>")
    model: Any
    config: Any
    # fork_rng: seeding must not disturb the caller's random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEED)
        if spec.architecture == "llama":
            config = hf.LlamaConfig(
                **spec.sizes(),
                num_key_value_heads=spec.heads,
                bos_token_id=bos,
                eos_token_id=eos,
                pad_token_id=pad,
                tie_word_embeddings=False,
            )
            model = hf.LlamaForCausalLM(config)
            model.generation_config = hf.GenerationConfig(
                bos_token_id=bos, eos_token_id=[eos, im_end], pad_token_id=pad
            )
        else:
            config = hf.BertConfig(**spec.sizes(), pad_token_id=pad)
            model = hf.BertModel(config)
    with _quiet_progress():
        model.save_pretrained(str(dest))
    tokenizer.model_max_length = spec.max_positions
    tokenizer.save_pretrained(str(dest))


def _is_built(folder: Path) -> bool:
    try:
        marker = json.loads((folder / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("format") == BUILD_FORMAT


def _build_folder(root: Path, spec: _Spec, tokenizer: Any) -> None:
    """Build ``root/<name>`` in a temporary sibling, then rename it into place.

    Runs with the root lock held, so leftovers of crashed builds can be removed.
    """
    for stale in (*root.glob(f".{spec.name}.tmp-*"), *root.glob(f".{spec.name}.old-*")):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{spec.name}.tmp-", dir=root))
    try:
        _save_model(spec, tokenizer, tmp)
        marker = {"format": BUILD_FORMAT, "name": spec.name, "version": "1"}
        (tmp / MARKER_FILE).write_text(json.dumps(marker) + "\n")
        # mkdtemp makes the folder private; the daemon may run as another user.
        for path in tmp.iterdir():
            path.chmod(0o644)
        tmp.chmod(0o755)
        target = root / spec.name
        if target.exists():  # an older format, or a folder someone else made
            old = Path(tempfile.mkdtemp(prefix=f".{spec.name}.old-", dir=root))
            target.rename(old / "x")
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    """Serialize builders across processes (tests in parallel, daemon and CLI)."""
    with open(root / ".lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_demo_models(root: Path, names: Iterable[str] | None = None) -> list[DemoModel]:
    """Build the demo models under ``root/<name>/`` unless already built; list them.

    ``names=None`` means all of them. The result follows the order small,
    medium, large, embed whatever the order of ``names``.
    """
    wanted = set(DEMO_NAMES if names is None else names)
    unknown = wanted - set(DEMO_NAMES)
    if unknown:
        raise ValueError(f"unknown demo model(s) {sorted(unknown)}; known: {', '.join(DEMO_NAMES)}")
    root = Path(root).resolve()
    specs = [spec for spec in _SPECS if spec.name in wanted]
    missing = [spec for spec in specs if not _is_built(root / spec.name)]
    if missing:
        root.mkdir(parents=True, exist_ok=True)
        with _locked(root):
            tokenizer = None
            for spec in missing:
                if _is_built(root / spec.name):  # another process built it meanwhile
                    continue
                if tokenizer is None:
                    tokenizer = _make_tokenizer()
                _build_folder(root, spec, tokenizer)
    return [
        DemoModel(
            name=spec.name,
            version="1",
            path=str(root / spec.name),
            backend="transformers",
            options={},
            description=spec.description,
        )
        for spec in specs
    ]
