"""Configs, tokenizers and modules kept for reloads: reused while the folder is unchanged;
and first loads, which build the modules empty and fill them as reloads do."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from backends.base import LoadSpec
from backends.hf_shelf import Shelf, folder_key


def folder(tmp_path: Path) -> Path:
    path = tmp_path / "m"
    path.mkdir()
    (path / "config.json").write_text("{}")
    (path / "tokenizer.json").write_text("{}")
    (path / "model.safetensors").write_bytes(b"weights")
    return path


def test_the_key_follows_the_small_files_not_the_weights(tmp_path: Path) -> None:
    path = folder(tmp_path)
    before = folder_key(path)
    (path / "model.safetensors").write_bytes(b"other weights, same folder")
    assert folder_key(path) == before
    (path / "tokenizer.json").write_text('{"changed": true}')
    assert folder_key(path) != before


def test_configs_are_built_once_per_folder_state(tmp_path: Path) -> None:
    path, shelf, built = folder(tmp_path), Shelf(), []

    def build() -> object:
        built.append(object())
        return built[-1]

    first = shelf.config(path, build)
    assert shelf.config(path, build) is first and len(built) == 1
    stat = (path / "config.json").stat()
    os.utime(path / "config.json", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert shelf.config(path, build) is not first and len(built) == 2


def test_a_tokenizer_is_lent_to_one_load_at_a_time(tmp_path: Path) -> None:
    path, shelf = folder(tmp_path), Shelf()
    key, kept = shelf.take_tokenizer(path)
    assert kept is None  # nothing kept yet: the load builds one
    tokenizer = object()
    shelf.put_tokenizer(key, tokenizer)
    key, kept = shelf.take_tokenizer(path)
    assert kept is tokenizer
    assert shelf.take_tokenizer(path)[1] is None  # a second replica builds its own


def test_the_shelf_keeps_at_most_its_capacity(tmp_path: Path) -> None:
    shelf = Shelf(capacity=2)
    paths = []
    for name in "abc":
        path = tmp_path / name
        path.mkdir()
        paths.append(path)
        shelf.config(path, object)
    assert shelf.sizes == (2, 0, 0)
    built: list[Any] = []
    shelf.config(paths[0], lambda: built.append(1))  # the oldest left; built again
    assert built == [1]


def test_a_reload_reuses_the_tokenizer_of_the_unloaded_instance(demo_root: Path) -> None:
    from backends.hf_transformers import TransformersBackend

    backend = TransformersBackend()
    spec = LoadSpec("s", "1", str(demo_root / "demo-small"), {}, "cpu")
    first: Any = backend.load(spec)
    tokenizer = first._tokenizer
    second: Any = backend.load(spec)  # loaded beside the first: a tokenizer of its own
    assert second._tokenizer is not tokenizer
    first.unload()
    third: Any = backend.load(spec)
    assert third._tokenizer is tokenizer
    assert third.encode_prompt("hello") == second.encode_prompt("hello")
    second.unload()
    third.unload()


@pytest.mark.parametrize(
    ("name", "options"),
    [("demo-small", {}), ("demo-small", {"task": "embed"}), ("demo-embed", {})],
)
def test_a_reload_fills_the_unloaded_modules_and_answers_the_same(
    demo_root: Path, name: str, options: dict[str, str]
) -> None:
    """The second load reuses the first one's modules, emptied when it unloaded (no
    weight memory kept) and filled again from the checkpoint; it answers the same."""
    import torch

    from backends.hf_transformers import TransformersBackend

    backend = TransformersBackend()
    spec = LoadSpec("s", "1", str(demo_root / name), options, "cpu")
    first: Any = backend.load(spec)
    ids = first.encode_prompt("hello there")
    before = _answer(first, ids)
    modules = first._model
    first.unload()
    assert all(p.device.type == "meta" for p in modules.parameters())  # nothing kept
    again: Any = backend.load(spec)
    assert again._model is modules
    assert all(p.device.type == "cpu" for p in again._model.parameters())
    assert _answer(again, ids) == before
    with torch.inference_mode():
        assert not any(torch.isnan(p).any() for p in again._model.parameters())
    again.unload()


def _answer(model: Any, ids: list[int]) -> Any:
    from contract.generation import Generation, SamplingParams, Task

    if model.info.task is Task.EMBED:
        return model.embed([ids])
    return model.generate(Generation(ids, SamplingParams(max_tokens=8, temperature=0.0))).text


def test_a_skeleton_its_checkpoint_does_not_fill_is_built_afresh(demo_root: Path) -> None:
    from backends.hf_transformers import TransformersBackend

    backend = TransformersBackend()
    small = LoadSpec("s", "1", str(demo_root / "demo-small"), {}, "cpu")
    first: Any = backend.load(small)
    first.unload()
    # The kept modules are demo-small's; hand them to a load of demo-medium's folder
    # under demo-small's key, as if the folder's weights had changed shape.
    shelf = backend._shelf
    skeleton = shelf.take_skeleton(shelf_key_of(demo_root / "demo-small"))
    assert skeleton is not None
    from backends import hf_shelf

    medium_files = sorted((demo_root / "demo-medium").glob("*.safetensors"))
    assert not hf_shelf.fill_skeleton(skeleton, medium_files)


def shelf_key_of(folder: Path) -> Any:
    import torch

    from backends import hf_shelf

    return hf_shelf.skeleton_key(folder, "generate", torch.float32)


# -- first loads: modules built empty and filled, as from_pretrained would load them --


def _reference(folder: Path, task: str, dtype: Any) -> Any:
    """What from_pretrained makes of ``folder``: the load a first load must equal."""
    from backends import hf_plan

    auto_model, auto_causal = hf_plan.auto_classes()[1:3]
    auto: Any = auto_causal if task == "generate" else auto_model
    return auto.from_pretrained(str(folder), local_files_only=True, dtype=dtype)


def _no_from_pretrained(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record, instead of running, every from_pretrained of a model from now on."""
    from transformers import modeling_utils

    calls: list[str] = []

    def refuse(cls: Any, path: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(str(path))
        raise AssertionError("from_pretrained was not expected")

    monkeypatch.setattr(modeling_utils.PreTrainedModel, "from_pretrained", classmethod(refuse))
    return calls


def _assert_same_model(model: Any, reference: Any) -> None:
    """Same tensors (values, dtypes, nothing left on meta), same configs, same outputs."""
    import torch

    params, expected = dict(model.named_parameters()), dict(reference.named_parameters())
    assert params.keys() == expected.keys()
    for name, tensor in params.items():
        assert tensor.device.type == "cpu", name
        assert tensor.dtype == expected[name].dtype, name
        assert torch.equal(tensor, expected[name]), name
    buffers, expected = dict(model.named_buffers()), dict(reference.named_buffers())
    assert buffers.keys() == expected.keys() and buffers  # rotary frequencies, position ids
    for name, tensor in buffers.items():
        assert tensor.device.type == "cpu", name
        assert tensor.dtype == expected[name].dtype, name
        assert torch.equal(tensor, expected[name]), name
    assert not model.training
    assert model.config.to_dict() == reference.config.to_dict()
    generation = getattr(reference, "generation_config", None)
    if generation is not None:
        assert model.generation_config.to_dict() == generation.to_dict()
    ids = torch.tensor([[1, 17, 230, 5, 99, 3]])
    with torch.inference_mode():
        got, want = model(input_ids=ids), reference(input_ids=ids)
    key = "logits" if "logits" in want else "last_hidden_state"
    assert torch.equal(got[key], want[key])


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("demo-small", {}),
        ("demo-small", {"task": "embed"}),
        ("demo-small", {"dtype": "bfloat16"}),
        ("demo-embed", {}),
    ],
)
def test_a_first_load_builds_empty_modules_and_equals_from_pretrained(
    demo_root: Path, name: str, options: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """No skeleton kept yet: the modules are built on meta and filled from the mapped
    checkpoint, without from_pretrained, and the model is the one it would load, buffers
    computed rather than saved included."""
    from backends import hf_plan
    from backends.hf_transformers import TransformersBackend

    spec = LoadSpec("s", "1", str(demo_root / name), options, "cpu")
    plan = hf_plan.plan_load(spec)
    reference = _reference(demo_root / name, plan.task.value, plan.dtype)
    calls = _no_from_pretrained(monkeypatch)
    loaded: Any = TransformersBackend().load(spec)
    assert calls == []
    _assert_same_model(loaded._model, reference)
    loaded.unload()


def test_a_first_load_keeps_tied_weights_tied(
    demo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A checkpoint saved with tied embeddings holds the embedding once; the head shares
    that very parameter after a first load and after a reload."""
    import torch
    import transformers
    from safetensors.torch import load_file

    from backends.hf_transformers import TransformersBackend

    folder = _tokenizer_folder(demo_root, tmp_path)
    hf: Any = transformers  # untyped constructors
    config = hf.LlamaConfig(
        vocab_size=1024,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    hf.LlamaForCausalLM(config).save_pretrained(str(folder))
    assert "lm_head.weight" not in load_file(folder / "model.safetensors")
    reference = _reference(folder, "generate", torch.float32)
    calls = _no_from_pretrained(monkeypatch)
    backend = TransformersBackend()
    spec = LoadSpec("t", "1", str(folder), {}, "cpu")
    first: Any = backend.load(spec)
    model = first._model
    assert model.lm_head.weight is model.model.embed_tokens.weight
    _assert_same_model(model, reference)
    first.unload()
    again: Any = backend.load(spec)
    assert again._model is model  # the kept modules, refilled
    assert model.lm_head.weight is model.model.embed_tokens.weight
    _assert_same_model(model, reference)
    assert calls == []
    again.unload()


def test_a_checkpoint_missing_a_parameter_is_loaded_by_from_pretrained(
    demo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A parameter the checkpoint lacks leaves the built modules unfilled: the load falls
    back to from_pretrained, which initialises what is missing."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import modeling_utils

    from backends.hf_transformers import TransformersBackend

    folder = _tokenizer_folder(demo_root, tmp_path)
    shutil.copy(demo_root / "demo-small" / "config.json", folder / "config.json")
    tensors = load_file(demo_root / "demo-small" / "model.safetensors")
    del tensors["model.norm.weight"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    calls: list[str] = []
    real = modeling_utils.PreTrainedModel.from_pretrained.__func__  # type: ignore[attr-defined]

    def counted(cls: Any, path: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(str(path))
        return real(cls, path, *args, **kwargs)

    monkeypatch.setattr(modeling_utils.PreTrainedModel, "from_pretrained", classmethod(counted))
    loaded: Any = TransformersBackend().load(LoadSpec("m", "1", str(folder), {}, "cpu"))
    assert calls == [str(folder)]
    model = loaded._model
    assert torch.equal(model.model.norm.weight, torch.ones_like(model.model.norm.weight))
    assert not any(t.is_meta for t in (*model.parameters(), *model.buffers()))
    loaded.unload()


def test_mapped_tensors_equal_the_checkpoint_and_odd_files_are_refused(
    demo_root: Path, tmp_path: Path
) -> None:
    import torch
    from safetensors.torch import load_file

    from backends.hf_shelf import map_safetensors

    path = demo_root / "demo-embed" / "model.safetensors"
    mapped, loaded = map_safetensors([path]), load_file(path)
    assert mapped is not None and mapped.keys() == loaded.keys()
    assert all(torch.equal(mapped[k], loaded[k]) for k in loaded)
    odd = tmp_path / "odd.safetensors"
    odd.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    assert map_safetensors([path, odd]) is None
    header = json.dumps({"x": {"dtype": "F4", "shape": [2], "data_offsets": [0, 1]}}).encode()
    odd.write_bytes(len(header).to_bytes(8, "little") + header + b"\x00")
    assert map_safetensors([odd]) is None  # a dtype torch has no name for here


def _tokenizer_folder(demo_root: Path, tmp_path: Path) -> Path:
    """A model folder with demo-small's tokenizer files and nothing else yet."""
    folder = tmp_path / "model"
    folder.mkdir()
    for path in (demo_root / "demo-small").iterdir():
        if path.name.startswith(("tokenizer", "chat_template", "special_tokens")):
            shutil.copy(path, folder / path.name)
    return folder
