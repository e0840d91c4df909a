"""Footprints: safetensors headers, the formulas by hand, and estimate vs measurement.

The demo-model tests hold the transformers backend to DESIGN.md rule 5: the
estimate made from headers before a load must be close to what warm-up measures
(weights within 1%, total within 10%), term by term where the formula is exact.
"""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from backends import footprint
from backends.base import Footprint, LoadedModel, LoadSpec
from backends.footprint import TensorInfo
from contract.errors import BackendError, InvalidRequest
from routerd.demo import DEMO_NAMES

BYTES = {"BF16": 2, "F16": 2, "F32": 4, "I64": 8, "BOOL": 1, "F8_E4M3": 1}


def write_safetensors(
    path: Path,
    tensors: Mapping[str, tuple[str, Sequence[int]]],
    metadata: Mapping[str, str] | None = None,
) -> bytes:
    """Write a valid safetensors file (zeroed data) by hand; return its bytes."""
    header: dict[str, Any] = {}
    if metadata is not None:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name, (dtype, shape) in tensors.items():
        size = BYTES[dtype]
        for dim in shape:
            size *= dim
        header[name] = {
            "dtype": dtype,
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header with spaces
    data = struct.pack("<Q", len(raw)) + raw + bytes(offset)
    path.write_bytes(data)
    return data


MIXED = {
    "embed.weight": ("BF16", (4, 8)),
    "norm.weight": ("F32", (3,)),
    "positions": ("I64", (2, 2)),
}


def spec(path: Path | str, device: str = "cpu", **options: Any) -> LoadSpec:
    return LoadSpec(name="m", version="1", path=str(path), options=options, device=device)


# -- headers -------------------------------------------------------------------------


def test_header_gives_every_tensor(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    write_safetensors(path, MIXED, metadata={"format": "pt"})
    tensors = footprint.read_safetensors_header(path)
    assert tensors == {
        "embed.weight": TensorInfo("BF16", (4, 8), 64),
        "norm.weight": TensorInfo("F32", (3,), 12),
        "positions": TensorInfo("I64", (2, 2), 32),
    }
    assert [t.is_float for t in tensors.values()] == [True, True, False]
    assert footprint.read_checkpoint(tmp_path) == tensors


def test_header_of_a_huge_file_reads_no_data(tmp_path: Path) -> None:
    path = tmp_path / "big.safetensors"
    entry = {"dtype": "F32", "shape": [2**28], "data_offsets": [0, 2**30]}
    header = json.dumps({"w": entry}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    with path.open("r+b") as handle:  # 1 GiB of data, sparse on disk, never read
        handle.truncate(8 + len(header) + 2**30)
    assert footprint.read_safetensors_header(path) == {"w": TensorInfo("F32", (2**28,), 2**30)}


def corrupt(data: bytes, how: str) -> bytes:
    length: int = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + length])
    if how == "empty":
        return b""
    if how == "short":
        return data[:5]
    if how == "header_cut":
        return data[: 8 + length // 2]
    if how == "data_cut":
        return data[:-10]
    if how == "huge_length":
        return struct.pack("<Q", 2**60) + data[8:]
    if how == "not_json":
        return data[:8] + b"{" * length + data[8 + length :]
    header["__metadata__"]["pad"] = ""  # room for the changes below
    if how == "not_object":
        raw = b"[1, 2]".ljust(length)
    else:
        entry = header["norm.weight"]
        if how == "dtype":
            entry["dtype"] = "F128"
        elif how == "shape":
            entry["shape"] = [3, -1]
        elif how == "offsets":
            entry["data_offsets"] = [12, 4]
        elif how == "size":
            entry["shape"] = [5]
        raw = json.dumps(header).encode().ljust(length)
        assert len(raw) == length
    return data[:8] + raw + data[8 + length :]


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("empty", "truncated"),
        ("short", "truncated"),
        ("header_cut", "truncated"),
        ("data_cut", "truncated: tensor"),
        ("huge_length", "implausible"),
        ("not_json", "garbled"),
        ("not_object", "not a JSON object"),
        ("dtype", "unknown dtype 'F128'"),
        ("shape", "invalid shape"),
        ("offsets", "invalid data_offsets"),
        ("size", "holds 12 bytes; F32 \\[5\\] needs 20"),
    ],
)
def test_bad_files_are_clear_errors(tmp_path: Path, how: str, message: str) -> None:
    path = tmp_path / "model.safetensors"
    # Pad the header so a rewritten one fits in the same length.
    data = write_safetensors(path, MIXED, metadata={"pad": " " * 80})
    path.write_bytes(corrupt(data, how))
    with pytest.raises(BackendError, match=message) as caught:
        footprint.read_checkpoint(tmp_path)
    assert str(path) in str(caught.value)


def test_sharded_checkpoint_follows_its_index(tmp_path: Path) -> None:
    write_safetensors(tmp_path / "model-00001-of-00002.safetensors", {"a": ("BF16", (8, 8))})
    write_safetensors(tmp_path / "model-00002-of-00002.safetensors", {"b": ("I64", (3,))})
    write_safetensors(tmp_path / "stray.safetensors", {"c": ("F32", (100,))})  # not in the index
    index = {
        "metadata": {"total_size": 152},
        "weight_map": {
            "a": "model-00001-of-00002.safetensors",
            "b": "model-00002-of-00002.safetensors",
        },
    }
    (tmp_path / footprint.INDEX_FILE).write_text(json.dumps(index))
    tensors = footprint.read_checkpoint(tmp_path)
    assert tensors == {"a": TensorInfo("BF16", (8, 8), 128), "b": TensorInfo("I64", (3,), 24)}
    assert footprint.weights_bytes(tensors.values(), 4) == 64 * 4 + 24

    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(BackendError, match="missing"):
        footprint.read_checkpoint(tmp_path)
    (tmp_path / footprint.INDEX_FILE).write_text('{"weight_map": 3}')
    with pytest.raises(BackendError, match="not a valid safetensors index"):
        footprint.read_checkpoint(tmp_path)


def test_which_files_make_the_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(BackendError, match="no safetensors weights"):
        footprint.checkpoint_files(tmp_path)
    write_safetensors(tmp_path / "b.safetensors", {"b": ("F32", (1,))})
    write_safetensors(tmp_path / "a.safetensors", {"a": ("F32", (1,))})
    assert footprint.checkpoint_files(tmp_path) == [
        tmp_path / "a.safetensors",
        tmp_path / "b.safetensors",
    ]
    write_safetensors(tmp_path / "model.safetensors", {"m": ("F32", (1,))})
    assert footprint.checkpoint_files(tmp_path) == [tmp_path / "model.safetensors"]


# -- the formulas --------------------------------------------------------------------


def test_weights_convert_floats_and_keep_integers() -> None:
    tensors = [
        TensorInfo("BF16", (4, 8), 64),
        TensorInfo("F32", (3,), 12),
        TensorInfo("F8_E4M3", (16,), 16),
        TensorInfo("I64", (2, 2), 32),
        TensorInfo("BOOL", (5,), 5),
    ]
    assert footprint.weights_bytes(tensors, 4) == (32 + 3 + 16) * 4 + 32 + 5
    assert footprint.weights_bytes(tensors, 2) == (32 + 3 + 16) * 2 + 32 + 5


def test_kv_cache_per_token_by_hand() -> None:
    from transformers import GPT2Config, LlamaConfig

    gqa = LlamaConfig(
        hidden_size=512, num_attention_heads=8, num_key_value_heads=2, num_hidden_layers=4
    )
    # 2 (k and v) × 4 layers × 2 kv heads × head_dim 512/8 × 2 bytes
    assert footprint.kv_cache_bytes_per_token(gqa, 2) == 2 * 4 * 2 * 64 * 2 == 2048
    explicit = LlamaConfig(
        hidden_size=512, num_attention_heads=8, num_key_value_heads=2, num_hidden_layers=4,
        head_dim=128,
    )  # fmt: skip
    assert footprint.kv_cache_bytes_per_token(explicit, 4) == 2 * 4 * 2 * 128 * 4
    plain = {"hidden_size": 64, "num_attention_heads": 2, "num_hidden_layers": 3}
    assert footprint.kv_cache_bytes_per_token(plain, 4) == 2 * 3 * 2 * 32 * 4  # kv heads = heads
    gpt2 = GPT2Config(n_embd=96, n_head=3, n_layer=5)  # attribute map: n_layer → layers
    assert footprint.kv_cache_bytes_per_token(gpt2, 2) == 2 * 5 * 3 * 32 * 2
    nested = {"text_config": plain}
    assert footprint.kv_cache_bytes_per_token(nested, 4) == 2 * 3 * 2 * 32 * 4
    with pytest.raises(BackendError, match="num_hidden_layers"):
        footprint.kv_cache_bytes_per_token({"hidden_size": 64}, 4)


def test_working_memory_by_hand() -> None:
    config = {
        "hidden_size": 64,
        "intermediate_size": 256,
        "num_attention_heads": 2,
        "vocab_size": 1000,
    }
    tokens = 10
    decoder = footprint.working_bytes(config, tokens, 4, decoder=True, gated_mlp=True)
    per_token = (3 * 256 + 4 * 64 + 2 * 32) * 4 + 16
    assert decoder == tokens * per_token + 1000 * (4 + 4)
    encoder = footprint.working_bytes(config, tokens, 4, decoder=False, gated_mlp=False)
    assert encoder == tokens * ((2 * 256 + 3 * 64) * 4 + 16)
    half = footprint.working_bytes(config, 2 * tokens, 4, decoder=False, gated_mlp=False)
    assert half == 2 * encoder  # linear in the prompt: attention is assumed fused


def test_peak_live_bytes() -> None:
    assert footprint.peak_live_bytes([]) == 0
    # a: steps 1-4, b: steps 2-2, c: steps 3-5 → a+c = 30 at step 3 (b died at 3).
    spans = [(10, 1, 5), (5, 2, 3), (20, 3, 6), (99, 4, 4)]  # the last never lived
    assert footprint.peak_live_bytes(spans) == 30


def test_context_length_takes_the_smallest_limit() -> None:
    positions = {"max_position_embeddings": 4096}
    assert footprint.context_length(positions, None, None) == 4096
    assert footprint.context_length(positions, 1000, None) == 1000
    assert footprint.context_length(positions, 1000, 64) == 64
    assert footprint.context_length(positions, 10**30, None) == 4096  # "no limit" sentinel
    assert footprint.context_length({"n_positions": 1024}, None, None) == 1024
    assert footprint.context_length({}, None, None) == 2048


def test_tokenizer_limit_is_read_from_its_config(tmp_path: Path) -> None:
    assert footprint.tokenizer_max_length(tmp_path) is None
    (tmp_path / "tokenizer_config.json").write_text('{"model_max_length": 300}')
    assert footprint.tokenizer_max_length(tmp_path) == 300
    (tmp_path / "tokenizer_config.json").write_text('["odd"]')
    assert footprint.tokenizer_max_length(tmp_path) is None


# -- the transformers backend on the demo models --------------------------------------


@pytest.fixture(scope="module")
def footprints(
    demo_root: Path, small_model: LoadedModel, embed_model: LoadedModel
) -> Iterator[dict[str, tuple[Footprint, Footprint]]]:
    """``{name: (estimate, measurement)}`` for every demo model, each loaded once."""
    from backends.hf_transformers import TransformersBackend

    backend = TransformersBackend()
    shared = {"demo-small": small_model, "demo-embed": embed_model}
    result: dict[str, tuple[Footprint, Footprint]] = {}
    for name in DEMO_NAMES:
        demo = spec(demo_root / name)
        estimate = backend.estimate_footprint(demo)
        model = shared.get(name) or backend.load(demo)
        model.warm_up()
        result[name] = (estimate, model.measure_footprint())
        if name not in shared:
            model.unload()
    yield result


@pytest.mark.parametrize("name", DEMO_NAMES)
def test_estimate_is_close_to_the_measurement(
    footprints: dict[str, tuple[Footprint, Footprint]], name: str
) -> None:
    estimate, measured = footprints[name]
    assert measured.weights > 0 and measured.working > 0
    assert estimate.weights == pytest.approx(measured.weights, rel=0.01)
    assert estimate.total == pytest.approx(measured.total, rel=0.10)
    if name == "demo-embed":
        assert estimate.runtime == measured.runtime == 0
    else:  # the real cache held exactly what the formula says, for 2048 tokens
        assert estimate.runtime == measured.runtime > 0


def test_demo_runtime_is_the_kv_cache_of_the_whole_context(
    footprints: dict[str, tuple[Footprint, Footprint]],
) -> None:
    # fp32 on cpu: 2 × layers × heads × head_dim × 4 bytes × 2048 tokens
    expected = {
        "demo-small": 2 * 2 * 2 * 32 * 4 * 2048,
        "demo-medium": 2 * 6 * 4 * 64 * 4 * 2048,
        "demo-large": 2 * 8 * 8 * 64 * 4 * 2048,
    }
    for name, runtime in expected.items():
        assert footprints[name][1].runtime == runtime


def test_bfloat16_halves_weights_and_cache(
    demo_root: Path, footprints: dict[str, tuple[Footprint, Footprint]]
) -> None:
    from backends.hf_transformers import TransformersBackend

    backend = TransformersBackend()
    half = spec(demo_root / "demo-small", dtype="bfloat16")
    model = backend.load(half)
    with pytest.raises(BackendError, match="warmed up"):
        model.measure_footprint()
    model.warm_up()
    measured = model.measure_footprint()
    model.unload()
    assert model.measure_footprint() == Footprint(weights=0)
    full_estimate, full = footprints["demo-small"]
    assert measured.weights == pytest.approx(full.weights / 2, rel=0.01)
    assert measured.runtime == full.runtime // 2
    estimate = backend.estimate_footprint(half)
    assert estimate.weights == pytest.approx(measured.weights, rel=0.01)
    assert estimate.total == pytest.approx(measured.total, rel=0.10)
    assert estimate.weights == full_estimate.weights // 2


def test_context_and_concurrency_scale_the_runtime(tmp_path: Path, demo_root: Path) -> None:
    from backends.hf_transformers import TransformersBackend

    backend = TransformersBackend()
    per_token = 2 * 2 * 2 * 32 * 4  # demo-small, fp32
    small = demo_root / "demo-small"
    assert backend.estimate_footprint(spec(small)).runtime == per_token * 2048
    assert backend.estimate_footprint(spec(small, max_context=512)).runtime == per_token * 512
    three = backend.estimate_footprint(spec(small, max_context=512, max_concurrency=3))
    assert three.runtime == per_token * 512 * 3
    # Working memory is for one pass: concurrency does not change it.
    assert three.working == backend.estimate_footprint(spec(small, max_context=512)).working

    # A tokenizer limit below the positions caps load and estimate alike.
    folder = tmp_path / "short"
    shutil.copytree(small, folder)
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    tokenizer_config["model_max_length"] = 100
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    two = spec(folder, max_concurrency=2)
    estimate = backend.estimate_footprint(two)
    model = backend.load(two)
    assert model.info.context_length == 100
    model.warm_up()
    measured = model.measure_footprint()
    model.unload()
    assert estimate.runtime == measured.runtime == per_token * 100 * 2
    assert estimate.total == pytest.approx(measured.total, rel=0.10)


def test_the_batch_limits_size_the_kv_reservation(demo_root: Path) -> None:
    """One number bounds the cache and the batches: the estimate, the measurement and
    ``info.kv_tokens`` (what the batcher keeps batches within) all come from it."""
    from backends.hf_transformers import TransformersBackend

    backend = TransformersBackend()
    per_token = 2 * 2 * 2 * 32 * 4  # demo-small, fp32
    small = str(demo_root / "demo-small")

    def batched(rows: int, tokens: int, **options: Any) -> LoadSpec:
        return LoadSpec("m", "1", small, options, "cpu", batch_rows=rows, batch_tokens=tokens)

    # The batch token budget, when rows × context could hold more.
    assert backend.estimate_footprint(batched(8, 3000, max_context=512)).runtime == (
        per_token * 3000
    )
    # Rows × context, when the token budget could never fill.
    assert backend.estimate_footprint(batched(2, 0, max_context=512)).runtime == per_token * 1024
    assert backend.estimate_footprint(batched(2, 5000, max_context=512)).runtime == (
        per_token * 1024
    )
    # Never less than one full context; max_concurrency overrides the batch limits.
    assert backend.estimate_footprint(batched(8, 100, max_context=512)).runtime == per_token * 512
    pinned = batched(8, 3000, max_context=512, max_concurrency=3)
    assert backend.estimate_footprint(pinned).runtime == per_token * 512 * 3

    chosen = batched(4, 1500, max_context=512)
    estimate = backend.estimate_footprint(chosen)
    model = backend.load(chosen)
    try:
        assert model.info.kv_tokens == 1500
        model.warm_up()
        measured = model.measure_footprint()
    finally:
        model.unload()
    assert estimate.runtime == measured.runtime == per_token * 1500


def test_estimate_reads_only_what_it_needs(tmp_path: Path, demo_root: Path) -> None:
    from backends.hf_transformers import TransformersBackend

    backend = TransformersBackend()
    small = demo_root / "demo-small"
    cpu = backend.estimate_footprint(spec(small))
    # Placement may ask about a GPU this host does not have: half precision there.
    gpu = backend.estimate_footprint(spec(small, device="cuda:0"))
    assert gpu.weights == cpu.weights // 2 and gpu.runtime == cpu.runtime // 2
    # A causal checkpoint loaded for embeddings leaves its lm_head (1024 × 64) behind.
    embed = backend.estimate_footprint(spec(small, task="embed"))
    assert (embed.weights, embed.runtime) == (cpu.weights - 1024 * 64 * 4, 0)

    with pytest.raises(BackendError, match="does not exist"):
        backend.estimate_footprint(spec(tmp_path / "nowhere"))
    with pytest.raises(BackendError, match="unknown device"):
        backend.estimate_footprint(spec(small, device="tpu:0"))
    with pytest.raises(InvalidRequest, match="max_concurrency"):
        backend.estimate_footprint(spec(small, max_concurrency=0))
    folder = tmp_path / "cut"
    shutil.copytree(small, folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(BackendError, match="truncated"):
        backend.estimate_footprint(spec(folder))
