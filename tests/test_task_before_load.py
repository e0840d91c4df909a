"""What a version does, known before it loads: each backend's ``task_of``, the
scheduler's ``task_of`` (the loaded instance first, then what it learned, then the
backend, off the loop), and serving's refusal of an endpoint a version cannot serve
before any load."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path
from typing import Any

import pytest

from backends.base import LoadSpec
from backends.echo import EchoBackend
from backends.vllm import VllmBackend
from contract.errors import BackendError
from contract.generation import ModelInfo, Task
from routerd.errors import BadRequest
from routerd.services import Services
from routerd.serving.prompts import require_task, require_task_before_load
from routerd.simulate.hardware import SimulatedBackend
from tests.fakes import FakeBackend
from tests.support import fake_services, fake_spec

# -- backends --------------------------------------------------------------------------


def test_transformers_tells_the_task_from_config_as_its_load_plan_does(demo_root: Path) -> None:
    from backends import hf_plan
    from backends.hf_transformers import TransformersBackend

    backend = TransformersBackend()
    for name, task in (("demo-small", Task.GENERATE), ("demo-embed", Task.EMBED)):
        path = str(demo_root / name)
        assert backend.task_of(path, {}) is task
        assert backend.task_of(path, {"task": "auto", "dtype": "float32"}) is task
        plan = hf_plan.plan_load(LoadSpec(name, "1", path, {}, "cpu"))
        assert plan.task is task, "the load resolves the same task"
    embed_small = {"task": "embed"}
    assert backend.task_of(str(demo_root / "demo-small"), embed_small) is Task.EMBED
    assert backend.task_of(str(demo_root / "demo-embed"), {"task": "generate"}) is Task.GENERATE


def test_transformers_needs_a_readable_config_only_for_auto(tmp_path: Path) -> None:
    from backends.hf_transformers import TransformersBackend

    backend = TransformersBackend()
    with pytest.raises(BackendError, match=r"config\.json"):
        backend.task_of(str(tmp_path), {})
    with pytest.raises(BackendError):
        backend.task_of(str(tmp_path / "missing"), {})
    assert backend.task_of(str(tmp_path), {"task": "embed"}) is Task.EMBED
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["T5EncoderModel"]}))
    assert backend.task_of(str(tmp_path), {}) is Task.EMBED  # not a causal LM: embeds


def test_vllm_tells_the_demo_models_apart(demo_root: Path) -> None:
    backend = VllmBackend()
    assert backend.task_of(str(demo_root / "demo-small"), {}) is Task.GENERATE
    assert backend.task_of(str(demo_root / "demo-embed"), {}) is Task.EMBED
    assert backend.task_of(str(demo_root / "demo-embed"), {"task": "auto"}) is Task.EMBED
    # The option, where it names a task, is what the engine is started with.
    assert backend.task_of(str(demo_root / "demo-small"), {"task": "embed"}) is Task.EMBED
    assert backend.task_of(str(demo_root / "demo-embed"), {"task": "generate"}) is Task.GENERATE


@pytest.mark.parametrize(
    ("architectures", "task"),
    [
        (["LlamaForCausalLM"], Task.GENERATE),
        (["GPT2LMHeadModel"], Task.GENERATE),
        (["BertModel"], Task.EMBED),
        (["XLMRobertaModel"], Task.EMBED),
        # vLLM's own choice, not one to guess: a wrong guess refuses what it serves.
        (["LlavaForConditionalGeneration"], None),
        (["Qwen2ForSequenceClassification"], None),
        (["Qwen2ForRewardModel"], None),
        (["Qwen2Model"], None),
        (["LlamaForCausalLM", "BertModel"], None),
        ([], None),
        (None, None),
    ],
)
def test_vllm_auto_names_a_task_only_where_the_engine_surely_agrees(
    tmp_path: Path, architectures: list[str] | None, task: Task | None
) -> None:
    config: dict[str, Any] = {"model_type": "x"}
    if architectures is not None:
        config["architectures"] = architectures
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert VllmBackend().task_of(str(tmp_path), {}) is task


def test_vllm_raises_for_a_folder_it_cannot_read(tmp_path: Path) -> None:
    with pytest.raises(BackendError):
        VllmBackend().task_of(str(tmp_path), {})
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(BackendError):
        VllmBackend().task_of(str(tmp_path), {})
    assert VllmBackend().task_of(str(tmp_path), {"task": "generate"}) is Task.GENERATE


def test_echo_and_the_simulator_say_what_their_models_do(tmp_path: Path) -> None:
    echo = EchoBackend()
    for options, task in (({}, Task.GENERATE), ({"task": "embed"}, Task.EMBED)):
        assert echo.task_of(str(tmp_path), options) is task
        spec = LoadSpec("e", "1", str(tmp_path), echo.validate_options(options), "cpu")
        assert echo.load(spec).info.task is task
    simulated = SimulatedBackend(None, None, {}, host_tier=False)  # type: ignore[arg-type]
    assert simulated.task_of(str(tmp_path), {}) is Task.GENERATE


# -- the scheduler ---------------------------------------------------------------------


@pytest.fixture
def backend() -> FakeBackend:
    return FakeBackend()


@pytest.fixture
def services(tmp_path: Path, backend: FakeBackend) -> Services:
    models = [
        fake_spec(tmp_path, "lm"),
        fake_spec(tmp_path, "embedder", task="embed"),
        fake_spec(tmp_path, "hazy", predicted_task="unknown"),
        # config says embed, the load says generate (as vLLM's "auto" might)
        fake_spec(tmp_path, "surprise", task="generate", predicted_task="embed"),
    ]
    built = fake_services(tmp_path, backend, models)
    yield built
    built.store.close()


async def test_task_of_asks_the_backend_once_per_version_and_loads_nothing(
    services: Services, backend: FakeBackend
) -> None:
    scheduler, router = services.scheduler, services.router
    threads: list[int] = []
    ask = backend.task_of

    def task_of(path: str, options: Any) -> Task | None:
        threads.append(threading.get_ident())
        return ask(path, options)

    backend.task_of = task_of  # type: ignore[method-assign]
    lm, embedder, hazy = router.resolve("lm"), router.resolve("embedder"), router.resolve("hazy")
    for _ in range(3):
        assert await scheduler.task_of(lm) is Task.GENERATE
        assert await scheduler.task_of(embedder) is Task.EMBED
        assert await scheduler.task_of(hazy) is None  # "cannot tell" is kept too
    assert len(backend.task_queries) == 3
    assert threading.get_ident() not in threads, "the folder is read off the event loop"
    assert backend.loads == [] and scheduler.instances() == []


async def test_a_loaded_instance_is_the_truth_and_is_remembered(
    services: Services, backend: FakeBackend
) -> None:
    scheduler = services.scheduler
    record = services.router.resolve("surprise")
    assert await scheduler.task_of(record) is Task.EMBED  # what the folder says
    await scheduler.load(record)
    assert await scheduler.task_of(record) is Task.GENERATE  # what the load made of it
    await scheduler.evict(record.model_id)
    assert await scheduler.task_of(record) is Task.GENERATE  # learned, not asked again
    assert backend.task_queries == [record.path]


async def test_a_version_registered_again_is_asked_again(
    services: Services, backend: FakeBackend, tmp_path: Path
) -> None:
    scheduler = services.scheduler
    assert await scheduler.task_of(services.router.resolve("lm@1")) is Task.GENERATE
    services.registry.register(fake_spec(tmp_path, "lm", task="embed"))
    assert await scheduler.task_of(services.router.resolve("lm@1")) is Task.EMBED
    assert len(backend.task_queries) == 2


async def test_an_unreadable_folder_is_unknown_and_asked_again(
    services: Services, backend: FakeBackend
) -> None:
    scheduler = services.scheduler
    record = services.router.resolve("embedder")
    shutil.rmtree(record.path)
    assert await scheduler.task_of(record) is None
    assert await scheduler.task_of(record) is None
    Path(record.path).mkdir()
    assert await scheduler.task_of(record) is Task.EMBED
    assert len(backend.task_queries) == 3
    assert backend.loads == []


# -- serving ---------------------------------------------------------------------------


class Knows:
    def __init__(self, task: Task | None) -> None:
        self.task = task

    async def task_of(self, record: str) -> Task | None:
        return self.task


class Leased:
    def __init__(self, task: Task) -> None:
        self.info = ModelInfo(task, 64, "cpu", "float32")


async def test_require_task_before_load_refuses_as_the_lease_would() -> None:
    endpoint = "/v1/chat/completions"
    with pytest.raises(BadRequest) as early:
        await require_task_before_load(Knows(Task.EMBED), "e@1", Task.GENERATE, "e", endpoint)
    with pytest.raises(BadRequest) as late:
        require_task(Leased(Task.EMBED), Task.GENERATE, "e", endpoint)  # type: ignore[arg-type]
    assert (early.value.message, early.value.param) == (late.value.message, late.value.param)
    assert early.value.status == 400
    await require_task_before_load(Knows(None), "e@1", Task.GENERATE, "e", endpoint)
    await require_task_before_load(Knows(Task.GENERATE), "e@1", Task.GENERATE, "e", endpoint)


async def test_a_chat_to_an_embedding_model_is_refused_without_a_load(
    services: Services, backend: FakeBackend
) -> None:
    record = services.router.resolve("embedder")
    with pytest.raises(BadRequest, match="computes embeddings"):
        await require_task_before_load(
            services.scheduler, record, Task.GENERATE, "embedder", "/v1/chat/completions"
        )
    with pytest.raises(BadRequest, match="generates text"):
        lm = services.router.resolve("lm")
        await require_task_before_load(services.scheduler, lm, Task.EMBED, "lm", "/v1/embeddings")
    await require_task_before_load(
        services.scheduler, record, Task.EMBED, "embedder", "/v1/embeddings"
    )
    assert backend.loads == []
