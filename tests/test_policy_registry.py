"""One registry for all policy kinds, extended by entry points (group routerd.policies)."""

from __future__ import annotations

import textwrap

import pytest

from policies import registry
from routerd.config import ConfigError, load_config


@pytest.fixture(autouse=True)
def fresh_plugins():
    registry.reload_plugins()
    yield
    registry.reload_plugins()


def test_builtins_per_kind():
    assert registry.known("routing") == ["least-outstanding", "power-of-two", "round-robin"]
    assert registry.known("batching") == ["dynamic", "none"]
    assert registry.known("placement") == ["best-fit", "first-fit", "spread"]
    assert registry.known("eviction") == ["lru"]
    assert registry.create("batching", "dynamic", max_batch_size=3).max_batch_size == 3


def test_unknown_names_list_the_known_ones():
    with pytest.raises(ValueError, match="known: least-outstanding, power-of-two, round-robin"):
        registry.check("routing", "random-walk")


def install(tmp_path, monkeypatch, entry_points: str, module: str | None) -> None:
    dist = tmp_path / "acme_policies-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-policies\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(entry_points)
    if module is not None:
        (tmp_path / "acme_policies.py").write_text(module)
    monkeypatch.syspath_prepend(str(tmp_path))
    registry.reload_plugins()


def test_a_third_party_policy_is_selected_from_config(tmp_path, monkeypatch):
    install(
        tmp_path,
        monkeypatch,
        "[routerd.policies]\nrouting.acme-first = acme_policies:AcmeFirst\n",
        textwrap.dedent(
            """
            class AcmeFirst:
                name = "acme-first"

                def rank(self, request, candidates):
                    return sorted(candidates, key=lambda c: c.key, reverse=True)
            """
        ),
    )
    config_file = tmp_path / "routerd.toml"
    config_file.write_text('[scheduler]\nrouting = "acme-first"\n')
    config = load_config(config_file)
    assert config.scheduler.routing == "acme-first"
    policy = registry.create("routing", config.scheduler.routing)
    assert type(policy).__name__ == "AcmeFirst"
    config_file.write_text('[scheduler]\nrouting = "acme-last"\n')
    with pytest.raises(ConfigError, match="acme-first"):
        load_config(config_file)


def test_a_broken_plugin_is_reported_with_its_distribution(tmp_path, monkeypatch):
    install(
        tmp_path, monkeypatch, "[routerd.policies]\nrouting.ghost = no_such_module:Ghost\n", None
    )
    assert "ghost" in registry.known("routing")
    with pytest.raises(ValueError, match="acme-policies"):
        registry.create("routing", "ghost")
    assert registry.create("routing", "round-robin").name == "round-robin"
