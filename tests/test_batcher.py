"""The per-instance batcher: requests queue, batches form by policy, rows finish alone."""

from __future__ import annotations

import asyncio
import threading

import pytest

from backends.base import LoadedModel
from contract.generation import Cancellation, Generation, SamplingParams
from routerd.batcher import PrepareInputs
from routerd.errors import BadRequest
from tests.fakes import FakeBackend
from tests.support import fake_services, fake_spec

pytestmark = pytest.mark.usefixtures("strict_memory_audit")  # use beyond the ledger fails


@pytest.fixture
def backend():
    return FakeBackend()


async def ready_instance(services, name):
    await services.scheduler.load(services.router.resolve(name))
    return services.scheduler.residency.instances[f"{name}@1"]


async def test_concurrent_requests_share_batches(tmp_path, backend):
    models = [fake_spec(tmp_path, "m", max_batch_size=8, max_wait_ms=50, context=4096)]
    services = fake_services(tmp_path, backend, models)
    try:
        instance = await ready_instance(services, "m")
        prompts = [[97 + i, 98 + i] for i in range(8)]
        results = await asyncio.gather(
            *(
                instance.batcher.generate(Generation(p, SamplingParams(max_tokens=3)))
                for p in prompts
            )
        )
        assert [r.text for r in results] == [
            bytes(reversed(p)).decode() + chr(p[1]) for p in prompts
        ]
        assert instance.batcher.batches == 1
        assert instance.batcher.largest_batch == 8
    finally:
        services.store.close()


@pytest.mark.parametrize(("kv_tokens", "largest"), [(100, 2), (130, 3), (0, 6)])
async def test_a_batch_stays_within_the_kv_its_instance_reserved(
    tmp_path, backend, kv_tokens, largest
):
    """Rows of 42 tokens (2 prompt + 40 max_tokens) in a padded cache: 2 fit in 100
    tokens, 3 in 130; with no reservation to keep to (0), the policy alone decides."""
    models = [
        fake_spec(tmp_path, "m", max_batch_size=8, max_wait_ms=50, context=64, kv_tokens=kv_tokens)
    ]
    services = fake_services(tmp_path, backend, models)
    try:
        instance = await ready_instance(services, "m")
        prompts = [[97 + i, 98 + i] for i in range(6)]
        results = await asyncio.gather(
            *(
                instance.batcher.generate(Generation(p, SamplingParams(max_tokens=40)))
                for p in prompts
            )
        )
        assert [r.completion_tokens for r in results] == [40] * 6
        assert instance.batcher.largest_batch == largest
        assert backend.models[-1].spec.batch_rows == 8  # the limits the backend sized for
        assert backend.models[-1].spec.batch_tokens == 16384  # the CPU default
    finally:
        services.store.close()


async def test_a_requests_n_choices_are_rows_held_to_the_same_kv(tmp_path, backend):
    """``n`` choices are ordinary rows: six of 42 tokens each in 100 reserved tokens run
    two at a time, as six requests would."""
    from routerd.serving.choices import expand, generate_rows
    from routerd.serving.prompts import PreparedPrompt

    models = [fake_spec(tmp_path, "m", max_batch_size=8, max_wait_ms=50, context=64, kv_tokens=100)]
    services = fake_services(tmp_path, backend, models)
    try:
        instance = await ready_instance(services, "m")
        async with services.scheduler.lease(services.router.resolve("m")) as lease:
            rows = expand([PreparedPrompt([97, 98], SamplingParams(max_tokens=40, seed=1))], 6)
            results = await generate_rows(lease.handle, rows)
        assert [r.completion_tokens for r in results] == [40] * 6
        assert instance.batcher.largest_batch == 2
    finally:
        services.store.close()


def test_the_kv_rule_counts_a_padded_batch() -> None:
    from routerd.batcher import _fits_cache

    assert _fits_cache([], 500, 100)  # a first row always fits
    assert _fits_cache([10, 10], 10, 30)
    assert not _fits_cache([10, 10], 11, 30)  # three rows padded to 11
    assert not _fits_cache([2, 25], 2, 60)  # short rows pad to the longest: 3 × 25
    assert _fits_cache([2, 25], 2, 75)


async def test_no_batching_runs_each_request_alone(tmp_path, backend):
    services = fake_services(tmp_path, backend, [fake_spec(tmp_path, "m", batching="none")])
    try:
        instance = await ready_instance(services, "m")
        await asyncio.gather(
            *(
                instance.batcher.generate(Generation([97], SamplingParams(max_tokens=2)))
                for _ in range(5)
            )
        )
        assert instance.batcher.largest_batch == 1
    finally:
        services.store.close()


async def test_embedding_requests_merge_into_one_forward_pass(tmp_path, backend):
    models = [fake_spec(tmp_path, "e", task="embed", max_wait_ms=50)]
    services = fake_services(tmp_path, backend, models)
    try:
        instance = await ready_instance(services, "e")
        inputs = [[[1, 2]], [[3], [4, 5, 6]], [[7]]]
        main = threading.current_thread()
        prepared_on: list[threading.Thread] = []

        def prepare(ids: list[list[int]]) -> PrepareInputs:
            def run(model: LoadedModel) -> list[list[int]]:
                prepared_on.append(threading.current_thread())
                return ids

            return run

        results = await asyncio.gather(
            *(instance.batcher.embed(prepare(i), sum(map(len, i))) for i in inputs)
        )
        assert [len(r.vectors) for r in results] == [1, 2, 1]
        assert [r.token_ids for r in results] == inputs
        alone = instance.model.embed([[3], [4, 5, 6]])
        assert results[1].vectors == alone
        assert instance.batcher.batches == 1
        assert len(prepared_on) == 3 and main not in prepared_on, "tokenized in the batch"
    finally:
        services.store.close()


async def test_a_bad_embedding_request_fails_alone_in_its_batch(tmp_path, backend):
    models = [fake_spec(tmp_path, "e", task="embed", max_wait_ms=50)]
    services = fake_services(tmp_path, backend, models)
    try:
        instance = await ready_instance(services, "e")

        def bad(model: LoadedModel) -> list[list[int]]:
            raise BadRequest("input is too long", param="input")

        good, failed = await asyncio.gather(
            instance.batcher.embed(lambda model: [[1, 2]], 2),
            instance.batcher.embed(bad, 1),
            return_exceptions=True,
        )
        assert isinstance(failed, BadRequest) and failed.param == "input"
        assert good.vectors == instance.model.embed([[1, 2]])
        assert instance.batcher.batches == 1
    finally:
        services.store.close()


async def test_row_cancelled_while_queued_finishes_cancelled(tmp_path, backend):
    models = [fake_spec(tmp_path, "m", batching="none", token_delay=0.01, context=4096)]
    services = fake_services(tmp_path, backend, models)
    try:
        instance = await ready_instance(services, "m")
        first = asyncio.create_task(
            instance.batcher.generate(Generation([97], SamplingParams(max_tokens=20)))
        )
        cancellation = Cancellation()
        queued = asyncio.create_task(
            instance.batcher.generate(
                Generation([98], SamplingParams(max_tokens=20), None, cancellation)
            )
        )
        await asyncio.sleep(0.02)
        cancellation.cancel()
        assert (await queued).finish_reason == "cancelled"
        assert (await first).finish_reason == "length"
    finally:
        services.store.close()


async def test_bad_option_values_are_refused_at_registration(tmp_path, backend):
    from contract.errors import InvalidRequest

    services = fake_services(tmp_path, backend)
    try:
        with pytest.raises(InvalidRequest) as caught:
            services.registry.register(fake_spec(tmp_path, "x", max_batch_size=0))
        assert caught.value.param == "options.batching"
        with pytest.raises(InvalidRequest):
            services.registry.register(fake_spec(tmp_path, "y", batching="sometimes"))
    finally:
        services.store.close()
