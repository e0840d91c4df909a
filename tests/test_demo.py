"""The demo models: layout, sizes, idempotence, determinism, crash safety, tokenizer."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from routerd import demo
from routerd.demo import DEMO_NAMES, MARKER_FILE, build_tokenizer, ensure_demo_models

MB = 1_000_000
SIZES = {
    "demo-small": (0.8 * MB, 1.5 * MB),
    "demo-medium": (15 * MB, 25 * MB),
    "demo-large": (80 * MB, 120 * MB),
    "demo-embed": (1 * MB, 5 * MB),
}


def test_folders_have_the_expected_files(demo_root: Path) -> None:
    for name in DEMO_NAMES:
        folder = demo_root / name
        for file in (
            "config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json",
            MARKER_FILE,
        ):
            assert (folder / file).is_file(), f"{name} lacks {file}"
    assert not [p for p in demo_root.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_language_models_stop_on_eos_and_im_end(demo_root: Path) -> None:
    vocab = json.loads((demo_root / "demo-small" / "tokenizer.json").read_text())["added_tokens"]
    ids = {t["content"]: t["id"] for t in vocab}
    for name in ("demo-small", "demo-medium", "demo-large"):
        folder = demo_root / name
        generation = json.loads((folder / "generation_config.json").read_text())
        assert generation["eos_token_id"] == [ids["</s>"], ids["<|im_end|>"]]
        config = json.loads((folder / "config.json").read_text())
        assert config["architectures"] == ["LlamaForCausalLM"]
        assert config["max_position_embeddings"] == 2048
        assert config["vocab_size"] == 1024
    bert = json.loads((demo_root / "demo-embed" / "config.json").read_text())
    assert bert["architectures"] == ["BertModel"]
    assert bert["max_position_embeddings"] == 512
    assert not (demo_root / "demo-embed" / "generation_config.json").exists()


@pytest.mark.parametrize("name", DEMO_NAMES)
def test_weights_have_the_advertised_size(demo_root: Path, name: str) -> None:
    low, high = SIZES[name]
    size = (demo_root / name / "model.safetensors").stat().st_size
    assert low <= size <= high, f"{name}: {size} bytes"


def test_second_call_does_nothing(demo_root: Path) -> None:
    files = [demo_root / n / f for n in DEMO_NAMES for f in ("model.safetensors", MARKER_FILE)]
    before = [p.stat().st_mtime_ns for p in files]
    started = time.monotonic()
    models = ensure_demo_models(demo_root)
    assert time.monotonic() - started < 0.5
    assert [p.stat().st_mtime_ns for p in files] == before
    assert [m.name for m in models] == list(DEMO_NAMES)
    for m in models:
        assert m.version == "1" and m.backend == "transformers"
        assert Path(m.path).is_absolute() and Path(m.path) == demo_root.resolve() / m.name
        assert m.description and "\n" not in m.description


def test_subset_build_is_deterministic_and_ordered(demo_root: Path, tmp_path: Path) -> None:
    models = ensure_demo_models(tmp_path, ["demo-embed", "demo-small"])
    assert [m.name for m in models] == ["demo-small", "demo-embed"]
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == [
        "demo-embed",
        "demo-small",
    ]
    for name in ("demo-small", "demo-embed"):
        for file in ("model.safetensors", "tokenizer.json"):
            assert (tmp_path / name / file).read_bytes() == (demo_root / name / file).read_bytes()


def test_unknown_name_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="demo-small"):
        ensure_demo_models(tmp_path, ["demo-huge"])


def test_stale_folder_and_leftovers_are_replaced(tmp_path: Path) -> None:
    (tmp_path / "demo-small").mkdir()
    (tmp_path / "demo-small" / "junk").write_text("half a build")
    (tmp_path / ".demo-small.tmp-crashed").mkdir()
    ensure_demo_models(tmp_path, ["demo-small"])
    folder = tmp_path / "demo-small"
    assert not (folder / "junk").exists()
    assert (folder / "model.safetensors").is_file()
    assert json.loads((folder / MARKER_FILE).read_text())["format"] == demo.BUILD_FORMAT
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_a_crash_mid_build_leaves_no_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash(spec: Any, tokenizer: Any, dest: Path) -> None:
        (dest / "model.safetensors").write_bytes(b"partial")
        raise RuntimeError("power cut")

    monkeypatch.setattr(demo, "_make_tokenizer", lambda: object())
    monkeypatch.setattr(demo, "_save_model", crash)
    with pytest.raises(RuntimeError, match="power cut"):
        ensure_demo_models(tmp_path, ["demo-small"])
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock"]


def test_tokenizer_reloads_with_chat_template(demo_root: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(demo_root / "demo-small"), local_files_only=True)
    assert len(tok) == 1024
    assert tok.padding_side == "left"
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == (
        "<s>",
        "</s>",
        "<pad>",
        "<unk>",
    )
    text = "def f(x):\n    return 'héllo 中文'"
    ids = tok.encode(text)
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == text
    rendered = tok.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    assert rendered == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    im_start = tok.convert_tokens_to_ids("<|im_start|>")
    assert tok.encode(rendered, add_special_tokens=False)[0] == im_start


def test_build_tokenizer_alone(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    build_tokenizer(tmp_path / "tok")
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "tok"), local_files_only=True)
    assert tok.chat_template is not None
    assert tok.convert_tokens_to_ids("<|im_end|>") != tok.unk_token_id
