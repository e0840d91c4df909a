"""Configs and tokenizers kept for reloads: reused while the folder is unchanged."""

from __future__ import annotations

import os
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
