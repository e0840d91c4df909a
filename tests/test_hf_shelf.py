"""Configs and tokenizers kept for reloads: reused while the folder is unchanged."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

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
    assert shelf.sizes == (2, 0)
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
