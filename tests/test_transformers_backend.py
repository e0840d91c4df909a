"""The transformers backend on the demo models, and its text helpers on plain strings."""

from __future__ import annotations

import dataclasses
import json
import math
import random
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from backends import hf_batch
from backends.base import Footprint, LoadedModel, LoadSpec
from backends.hf_model import TransformersModel
from backends.hf_text import IncrementalDetokenizer, StopStringHoldback
from backends.hf_transformers import TransformersBackend
from contract.errors import BackendError, InvalidRequest
from contract.generation import Cancellation, Generation, GenerationResult, SamplingParams, Task

PROMPT = "def main(argv):\n    "
# Random weights hit an eos after a few dozen tokens, at a point that depends on
# the tokenizer (trained on this Python's stdlib); tests needing long outputs
# take the longest of several prompts.
PROMPTS = (PROMPT, "Hello", "x", "import os", "class A:", "return None")


def spec(path: Path | str, device: str = "cpu", **options: Any) -> LoadSpec:
    return LoadSpec(name="m", version="1", path=str(path), options=options, device=device)


def run(
    model: LoadedModel, params: SamplingParams, prompt: str = PROMPT
) -> tuple[GenerationResult, list[str]]:
    pieces: list[str] = []
    result = model.generate(
        Generation(model.encode_prompt(prompt), params, pieces.append, Cancellation())
    )
    assert "".join(pieces) == result.text
    assert all(pieces)
    return result, pieces


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0)


def longest_greedy(model: LoadedModel, max_tokens: int) -> tuple[str, GenerationResult]:
    runs = [(prompt, run(model, greedy(max_tokens), prompt)[0]) for prompt in PROMPTS]
    return max(runs, key=lambda pair: len(pair[1].text))


# -- options ----------------------------------------------------------------------


def test_options_are_normalized() -> None:
    backend = TransformersBackend()
    assert backend.kind == "transformers"
    assert backend.validate_options({}) == {"dtype": "auto", "task": "auto"}
    assert backend.validate_options(
        {"dtype": "bfloat16", "task": "embed", "max_context": 64, "max_concurrency": 4}
    ) == {"dtype": "bfloat16", "task": "embed", "max_context": 64, "max_concurrency": 4}


@pytest.mark.parametrize(
    ("options", "key", "allowed"),
    [
        ({"quantize": "int8"}, "quantize", "dtype, task, max_context, max_concurrency"),
        ({"dtype": "float64"}, "dtype", "auto, float32, bfloat16, float16"),
        ({"task": "rerank"}, "task", "auto, generate, embed"),
        ({"max_context": 0}, "max_context", "positive integer"),
        ({"max_context": -5}, "max_context", "positive integer"),
        ({"max_context": "512"}, "max_context", "positive integer"),
        ({"max_context": True}, "max_context", "positive integer"),
        ({"max_concurrency": 0}, "max_concurrency", "positive integer"),
        ({"max_concurrency": 1.5}, "max_concurrency", "positive integer"),
        ({"max_concurrency": False}, "max_concurrency", "positive integer"),
    ],
)
def test_bad_options_name_the_key(options: dict[str, Any], key: str, allowed: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        TransformersBackend().validate_options(options)
    assert caught.value.param == key
    assert key in str(caught.value) and allowed in str(caught.value)


# -- loading ----------------------------------------------------------------------


def test_load_errors_say_what_is_wrong(tmp_path: Path, demo_root: Path) -> None:
    backend = TransformersBackend()
    with pytest.raises(BackendError, match="does not exist"):
        backend.load(spec(tmp_path / "nowhere"))
    with pytest.raises(BackendError, match=r"no config\.json"):
        backend.load(spec(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(BackendError, match="not valid JSON"):
        backend.load(spec(tmp_path))
    shutil.copy(demo_root / "demo-small" / "config.json", tmp_path / "config.json")
    with pytest.raises(BackendError, match="no safetensors weights"):
        backend.load(spec(tmp_path))
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(BackendError, match=r"pytorch_model\.bin: pickled weights can run code"):
        backend.load(spec(tmp_path))
    for file in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(demo_root / "demo-small" / file, tmp_path / file)
    (tmp_path / "model.safetensors").write_bytes(b"\x08\x00garbage")
    with pytest.raises(BackendError, match="could not load m@1"):
        backend.load(spec(tmp_path))
    with pytest.raises(InvalidRequest, match="dtype"):
        backend.load(spec(demo_root / "demo-small", dtype="int4"))
    with pytest.raises(BackendError, match="unknown device"):
        backend.load(spec(demo_root / "demo-small", device="tpu:0"))


def test_pickled_weights_load_only_when_the_model_allows_them(
    tmp_path: Path, demo_root: Path, small_model: LoadedModel
) -> None:
    from safetensors.torch import load_file

    folder = tmp_path / "pickled"
    shutil.copytree(demo_root / "demo-small", folder)
    weights = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(weights, folder / "pytorch_model.bin")
    backend = TransformersBackend()
    with pytest.raises(BackendError, match="allow_pickle"):
        backend.estimate_footprint(spec(folder))
    with pytest.raises(BackendError, match="allow_pickle"):
        backend.load(spec(folder))
    with pytest.raises(InvalidRequest, match="allow_pickle"):
        backend.validate_options({"allow_pickle": "yes"})
    allowed = spec(folder, allow_pickle=True)
    estimate = backend.estimate_footprint(allowed)
    assert estimate.weights == (folder / "pytorch_model.bin").stat().st_size
    model = backend.load(allowed)
    try:
        assert run(model, greedy(4))[0].text == run(small_model, greedy(4))[0].text
    finally:
        model.unload()
    # safetensors win when both are present: estimated from their headers, not the pickle
    (folder / "pytorch_model.bin").write_bytes(b"not a pickle")
    shutil.copy(demo_root / "demo-small" / "model.safetensors", folder / "model.safetensors")
    both = backend.estimate_footprint(spec(folder, allow_pickle=True))
    assert both == backend.estimate_footprint(spec(demo_root / "demo-small"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error where CUDA is missing")
def test_cuda_without_cuda_is_a_clear_error(demo_root: Path) -> None:
    with pytest.raises(BackendError, match="CUDA is not available"):
        TransformersBackend().load(spec(demo_root / "demo-small", device="cuda:0"))


def test_loaded_models_describe_themselves(
    small_model: LoadedModel, embed_model: LoadedModel
) -> None:
    info = small_model.info
    assert (info.task, info.context_length, info.device, info.dtype) == (
        Task.GENERATE,
        2048,
        "cpu",
        "float32",
    )
    assert info.has_chat_template and info.vocab_size == 1024
    small_model.warm_up()
    assert 1_000_000 < small_model.measure_footprint().weights < 1_100_000
    assert embed_model.info.task is Task.EMBED
    assert embed_model.info.context_length == 512


def test_max_context_caps_the_context_and_unload_releases(demo_root: Path) -> None:
    model = TransformersBackend().load(spec(demo_root / "demo-small", max_context=16))
    assert model.info.context_length == 16
    ids = model.encode_prompt("x " * 30)
    with pytest.raises(InvalidRequest) as caught:
        model.generate(Generation(ids, greedy(2)))
    assert caught.value.param == "prompt"
    # A prompt that leaves room for 3 tokens gets 3, then "length".
    result = model.generate(Generation(list(range(100, 113)), greedy(50)))
    assert result.finish_reason in ("length", "stop") and result.completion_tokens <= 3
    model.unload()
    assert model.measure_footprint() == Footprint(weights=0)
    with pytest.raises(BackendError, match="unloaded"):
        model.generate(Generation([1, 2], greedy(2)))


def test_task_option_overrides_detection(demo_root: Path) -> None:
    backend = TransformersBackend()
    as_embed = spec(demo_root / "demo-small", task="embed")
    model = backend.load(as_embed)
    assert model.info.task is Task.EMBED
    model.warm_up()
    [vector] = model.embed([model.encode_prompt("hello")])
    assert math.isclose(sum(x * x for x in vector), 1.0, rel_tol=1e-5)
    # Loaded without its lm_head and without a KV cache; the estimate knows both.
    measured, estimate = model.measure_footprint(), backend.estimate_footprint(as_embed)
    assert measured.runtime == estimate.runtime == 0
    assert estimate.weights == pytest.approx(measured.weights, rel=0.01)
    assert estimate.total == pytest.approx(measured.total, rel=0.10)


# -- generation -------------------------------------------------------------------


def test_warm_up_and_greedy_is_deterministic(small_model: LoadedModel) -> None:
    small_model.warm_up()
    first, _ = run(small_model, greedy(24))
    second, _ = run(small_model, greedy(24))
    assert first == second
    assert first.prompt_tokens == len(small_model.encode_prompt(PROMPT))
    assert 1 <= first.completion_tokens <= 24


def test_same_seed_same_text_and_seeds_differ(small_model: LoadedModel) -> None:
    def sampled(seed: int) -> str:
        params = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.95, seed=seed)
        return run(small_model, params)[0].text

    assert sampled(7) == sampled(7)
    assert len({sampled(seed) for seed in (1, 2, 3, 4)}) > 1


def test_max_tokens_ends_with_length(small_model: LoadedModel) -> None:
    # Greedy output of random weights may hit an eos early; stay below that point.
    prompt, natural = longest_greedy(small_model, 64)
    limit = min(8, natural.completion_tokens - 1) if natural.finish_reason == "stop" else 8
    assert limit >= 1, "every greedy output ends at once; add PROMPTS"
    result, _ = run(small_model, greedy(limit), prompt)
    assert (result.finish_reason, result.completion_tokens) == ("length", limit)
    assert natural.text.startswith(result.text)


def test_stop_string_cuts_the_text(small_model: LoadedModel) -> None:
    prompt, full = longest_greedy(small_model, 40)
    assert len(full.text) >= 8, f"greedy output too short to pick a stop from: {full.text!r}"
    stop = full.text[4:7]
    expected = full.text[: full.text.find(stop)]
    result, pieces = run(
        small_model,
        SamplingParams(max_tokens=40, temperature=0.0, stop=("never-there", stop)),
        prompt,
    )
    assert result.finish_reason == "stop"
    assert result.text == expected
    assert stop not in "".join(pieces)
    assert result.completion_tokens <= full.completion_tokens


def test_streamed_pieces_add_up_when_sampling(small_model: LoadedModel) -> None:
    for seed in range(3):
        params = SamplingParams(max_tokens=48, temperature=1.5, seed=seed, stop=("\n\n",))
        result, pieces = run(small_model, params)
        assert "\n\n" not in result.text
        assert len(pieces) >= 1 or result.text == ""


def test_eos_from_generation_config_stops(tmp_path: Path, demo_root: Path) -> None:
    folder = tmp_path / "all-eos"
    shutil.copytree(demo_root / "demo-small", folder)
    config = json.loads((folder / "generation_config.json").read_text())
    config["eos_token_id"] = list(range(1024))  # whatever comes first is an eos
    (folder / "generation_config.json").write_text(json.dumps(config))
    model = TransformersBackend().load(spec(folder))
    result, pieces = run(model, greedy(10))
    assert (result.text, result.completion_tokens, result.finish_reason) == ("", 1, "stop")
    assert pieces == []


def test_cancellation_stops_early(small_model: LoadedModel) -> None:
    cancellation = Cancellation()
    pieces: list[str] = []

    def on_text(piece: str) -> None:
        pieces.append(piece)
        cancellation.cancel()

    ids = small_model.encode_prompt(PROMPT)
    params = SamplingParams(max_tokens=200, temperature=1.0, seed=1)
    result = small_model.generate(Generation(ids, params, on_text, cancellation))
    assert result.finish_reason == "cancelled"
    assert result.completion_tokens < 200
    assert "".join(pieces) == result.text

    already = Cancellation()
    already.cancel()
    result = small_model.generate(Generation(ids, params, None, already))
    assert (result.finish_reason, result.completion_tokens, result.text) == ("cancelled", 0, "")


# -- prompts and chat ------------------------------------------------------------------


def test_prompt_and_chat_encoding(small_model: LoadedModel, demo_root: Path) -> None:
    from transformers import AutoTokenizer

    assert small_model.encode_prompt("hello")[0] == 1  # <s>
    assert small_model.count_tokens("hello") == len(small_model.encode_prompt("hello")) - 1
    ids = small_model.encode_chat([{"role": "user", "content": "Hi there"}])
    tok = AutoTokenizer.from_pretrained(str(demo_root / "demo-small"), local_files_only=True)
    assert tok.decode(ids) == "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    result = small_model.generate(Generation(ids, greedy(4)))
    assert result.prompt_tokens == len(ids)
    with pytest.raises(InvalidRequest) as caught:
        small_model.encode_chat([{"role": "user", "content": [{"type": "image"}]}])
    assert caught.value.param == "messages"


def test_no_chat_template_is_invalid_request(tmp_path: Path, demo_root: Path) -> None:
    folder = tmp_path / "plain"
    shutil.copytree(demo_root / "demo-small", folder)
    (folder / "chat_template.jinja").unlink()
    model = TransformersBackend().load(spec(folder))
    assert not model.info.has_chat_template
    with pytest.raises(InvalidRequest) as caught:
        model.encode_chat([{"role": "user", "content": "Hi"}])
    assert caught.value.param == "messages"
    assert "chat template" in str(caught.value)


# -- embeddings -------------------------------------------------------------------


def test_embeddings(embed_model: LoadedModel) -> None:
    texts = ["the cat sat", "a much longer sentence about stock markets and rates", "x"]
    inputs = [embed_model.encode_prompt(t) for t in texts]
    embed_model.warm_up()
    batch = embed_model.embed(inputs)
    assert len(batch) == 3 and all(len(v) == 128 for v in batch)
    for vector in batch:
        assert math.isclose(math.sqrt(sum(x * x for x in vector)), 1.0, rel_tol=1e-5)
    for ids, vector in zip(inputs, batch, strict=True):
        [alone] = embed_model.embed([ids])
        assert max(abs(a - b) for a, b in zip(alone, vector, strict=True)) < 1e-5
    assert embed_model.embed([inputs[0]]) == embed_model.embed([inputs[0]])
    assert batch[0] != batch[1]
    assert embed_model.embed([]) == []


@pytest.mark.parametrize("bad", [[], [5] * 600, [1, 5000], [-1]])
def test_bad_embedding_inputs(embed_model: LoadedModel, bad: list[int]) -> None:
    with pytest.raises(InvalidRequest) as caught:
        embed_model.embed([[1, 2, 3], bad])
    assert caught.value.param == "input"


def test_tasks_are_not_mixed(small_model: LoadedModel, embed_model: LoadedModel) -> None:
    with pytest.raises(InvalidRequest):
        small_model.embed([[1, 2]])
    with pytest.raises(InvalidRequest):
        embed_model.generate(Generation([1, 2], greedy(2)))


# -- text helpers on plain strings -----------------------------------------------------


def byte_decoder(vocab: list[bytes]) -> Any:
    return lambda ids: b"".join(vocab[i] for i in ids).decode("utf-8", errors="replace")


def test_detokenizer_holds_back_split_characters() -> None:
    text = "héllo 中文 😀!"
    data = text.encode()
    vocab = [bytes([b]) for b in data]  # one byte per token: every character is split
    detok = IncrementalDetokenizer(byte_decoder(vocab))
    pieces = [detok.add(i) for i in range(len(vocab))]
    assert "".join(pieces) + detok.flush() == text
    assert not any("\ufffd" in p for p in pieces)
    assert pieces[-5:] == ["", "", "", "😀", "!"]


def test_detokenizer_flushes_an_unfinished_character() -> None:
    vocab = [b"ab", "中".encode()[:2]]
    detok = IncrementalDetokenizer(byte_decoder(vocab))
    assert detok.add(0) == "ab"
    assert detok.add(1) == ""
    assert detok.flush() == "\ufffd"
    assert detok.flush() == ""


def test_detokenizer_uses_prompt_context() -> None:
    # Like SentencePiece: a sequence decoded from its start loses its leading space.
    vocab = ["▁a", "▁b", "▁c"]

    def decode(ids: Any) -> str:
        return "".join(vocab[i] for i in ids).replace("▁", " ").removeprefix(" ")

    detok = IncrementalDetokenizer(decode, context=[0])
    assert detok.add(1) + detok.add(2) == " b c"


def test_detokenizer_matches_full_decode_on_random_ids(demo_root: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(demo_root / "demo-small"), local_files_only=True)

    def decode(ids: Any) -> str:
        return str(tok.decode(list(ids), skip_special_tokens=True))

    rng = random.Random(0)
    for _ in range(20):
        ids = [rng.randrange(1024) for _ in range(rng.randrange(1, 60))]
        detok = IncrementalDetokenizer(decode, context=tok.encode("x = 1"))
        text = "".join(detok.add(i) for i in ids) + detok.flush()
        assert text == decode(ids)


def push_all(holdback: StopStringHoldback, pieces: list[str]) -> list[str]:
    return [holdback.push(p) for p in pieces]


def test_holdback_without_stops_passes_text_through() -> None:
    holdback = StopStringHoldback(["", ""])
    assert push_all(holdback, ["a", "b"]) == ["a", "b"]
    assert holdback.flush() == "" and not holdback.stopped


def test_holdback_cuts_at_a_stop_across_pieces() -> None:
    holdback = StopStringHoldback(["world"])
    assert push_all(holdback, ["Hello wor", "ld! more"]) == ["Hello ", ""]
    assert holdback.stopped
    assert holdback.push("later") == "" and holdback.flush() == ""


def test_holdback_releases_a_beginning_that_does_not_complete() -> None:
    holdback = StopStringHoldback(["abc"])
    assert push_all(holdback, ["x", "a", "b", "d"]) == ["x", "", "", "abd"]
    assert holdback.push("ab") == ""
    assert holdback.flush() == "ab"
    assert not holdback.stopped


def test_holdback_picks_the_earliest_stop() -> None:
    holdback = StopStringHoldback(["c", "ab"])
    assert holdback.push("xabc") == "x"
    assert holdback.stopped


def test_holdback_character_by_character() -> None:
    text = "one two <END> three"
    holdback = StopStringHoldback(["<END>", "zzz"])
    out = "".join(holdback.push(ch) for ch in text)
    assert out == "one two "
    assert holdback.stopped


def test_holdback_takes_a_lone_string_as_one_stop() -> None:
    holdback = StopStringHoldback("ab")
    assert holdback.push("xa") == "x"
    assert holdback.push("c") == "ac"


def test_holdback_keeps_the_longest_possible_beginning() -> None:
    holdback = StopStringHoldback(["aab"])
    assert holdback.push("aaa") == "a"  # "aa" might still become "aab"
    assert holdback.push("b") == ""
    assert holdback.stopped


def test_holdback_can_keep_the_stop_string() -> None:
    holdback = StopStringHoldback(["<END>", "zzz"], include=True)
    assert push_all(holdback, ["abc<E", "ND>tail"]) == ["abc", "<END>"]
    assert holdback.stopped and holdback.push("more") == "" and holdback.flush() == ""
    assert StopStringHoldback(["c", "ab"], include=True).push("xabc") == "xab"  # the earliest
    # Of stops that start at one place, the one a character at a time completes first.
    text = "one abcd"
    whole = StopStringHoldback(["abc", "a"], include=True).push(text)
    by_char = StopStringHoldback(["abc", "a"], include=True)
    assert whole == "".join(by_char.push(ch) for ch in text) == "one a"
    released = StopStringHoldback(["<END>"], include=True)
    assert released.push("x <EN") == "x " and released.flush() == "<EN"  # no stop: all of it


# -- on a GPU ---------------------------------------------------------------------


@pytest.mark.gpu
def test_generate_and_embed_on_cuda(demo_root: Path) -> None:
    if not torch.cuda.is_available():
        pytest.skip("this torch build has no CUDA")
    backend = TransformersBackend()
    model = backend.load(spec(demo_root / "demo-small", device="cuda:0"))
    assert model.info.dtype in ("bfloat16", "float16")
    model.warm_up()
    measured = model.measure_footprint()
    assert 500_000 < measured.weights < 600_000  # half-precision weights
    estimate = backend.estimate_footprint(spec(demo_root / "demo-small", device="cuda:0"))
    assert estimate.weights == pytest.approx(measured.weights, rel=0.01)
    assert measured.runtime == estimate.runtime == 2 * 2 * 2 * 32 * 2 * 2048
    assert measured.working > 0
    assert run(model, greedy(16))[0] == run(model, greedy(16))[0]
    seeded = SamplingParams(max_tokens=16, temperature=1.0, seed=3)
    assert run(model, seeded)[0] == run(model, seeded)[0]
    model.unload()
    encoder = backend.load(spec(demo_root / "demo-embed", device="cuda:0", dtype="float32"))
    [vector] = encoder.embed([encoder.encode_prompt("hello")])
    assert math.isclose(sum(x * x for x in vector), 1.0, rel_tol=1e-5)
    encoder.unload()


@pytest.mark.gpu
def test_offload_to_pinned_host_memory_and_back_on_cuda(demo_root: Path) -> None:
    """The host tier on a GPU: the weights leave the device for pinned host memory,
    the device's memory goes back, and the restored model answers as before."""
    if not torch.cuda.is_available():
        pytest.skip("this torch build has no CUDA")
    model = TransformersBackend().load(spec(demo_root / "demo-small", device="cuda:0"))
    assert isinstance(model, TransformersModel) and model.can_offload
    model.warm_up()
    before = run(model, greedy(16))[0]
    model.offload()
    assert torch.cuda.memory_allocated(0) == 0
    assert all(p.device.type == "cpu" and p.is_pinned() for p in model._model.parameters())
    model.restore()
    assert all(p.device.type == "cuda" for p in model._model.parameters())
    assert run(model, greedy(16))[0] == before
    model.unload()


def test_offload_and_restore_on_the_cpu_keep_the_weights(small_model: LoadedModel) -> None:
    """On the CPU the weights stay where they are: the model answers the same after."""
    assert isinstance(small_model, TransformersModel) and small_model.can_offload
    before = run(small_model, greedy(8))[0]
    weights = [p.data_ptr() for p in small_model._model.parameters()]
    small_model.offload()
    small_model.restore()
    assert [p.data_ptr() for p in small_model._model.parameters()] == weights
    assert run(small_model, greedy(8))[0] == before


def test_embedding_inputs_go_through_a_context_at_a_time(embed_model: LoadedModel) -> None:
    """Working memory was measured on one full-context input, so many long inputs are
    embedded in several passes of at most that — with the vectors of each alone."""
    context = embed_model.info.context_length
    lengths = [context // 2 + 10, 10, 12, context // 2 + 20, 100]
    inputs = [[5 + (i + j) % 90 for j in range(n)] for i, n in enumerate(lengths)]
    assert hf_batch.first_pass(lengths, context) == 1  # two would pad past one context
    assert hf_batch.first_pass(lengths[1:], context) == 2
    together = embed_model.embed(inputs)
    alone = [embed_model.embed([ids])[0] for ids in inputs]
    assert len(together) == 5
    for got, want in zip(together, alone, strict=True):
        assert got == pytest.approx(want, abs=1e-5)


# -- reloads ----------------------------------------------------------------------


@pytest.mark.parametrize("task", ["generate", "embed"])
def test_a_known_footprint_spares_the_profile_and_changes_nothing_else(
    demo_root: Path, task: str
) -> None:
    """Loaded with the footprint a first load measured, warm-up runs no profile pass,
    the footprint comes out the same, and the model answers as the profiled one did."""
    backend = TransformersBackend()
    first_spec = spec(demo_root / "demo-small", task=task)
    first: Any = backend.load(first_spec)
    first.warm_up()
    measured = first.measure_footprint()
    again: Any = backend.load(dataclasses.replace(first_spec, known=measured))
    again.warm_up()
    assert first.profiled and not again.profiled
    assert again.measure_footprint() == measured
    if task == "generate":
        assert run(again, greedy(12))[0] == run(first, greedy(12))[0]
    else:
        ids = first.encode_prompt(PROMPT)
        assert again.embed([ids]) == first.embed([ids])
    first.unload()
    again.unload()
