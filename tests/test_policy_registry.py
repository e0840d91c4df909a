"""One registry for all policy kinds, extended by entry points (group routerd.policies)."""

from __future__ import annotations

import logging
import sys
import textwrap

import pytest

from policies import registry
from policies.eviction import LeastRecentlyUsed
from policies.placement import PlacementPolicy
from policies.routing import Candidate, RouteRequest
from routerd.config import ConfigError, load_config

ACME_MODULE = textwrap.dedent(
    """
    class AcmeFirst:
        name = "acme-first"

        def __init__(self, reverse=True):
            self.reverse = reverse

        def rank(self, request, candidates):
            return sorted(candidates, key=lambda c: c.key, reverse=self.reverse)
    """
)


@pytest.fixture(autouse=True)
def fresh_plugins():
    registry.reload_plugins()
    yield
    registry.reload_plugins()


def install(tmp_path, monkeypatch, entry_points: str, module: str | None = ACME_MODULE) -> None:
    """Install a distribution ``acme-policies`` 0.1 the way an installer leaves it:
    a module beside its ``.dist-info`` folder, on ``sys.path``."""
    dist = tmp_path / "acme_policies-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-policies\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(entry_points)
    if module is not None:
        (tmp_path / "acme_policies.py").write_text(module)
    monkeypatch.delitem(sys.modules, "acme_policies", raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    registry.reload_plugins()


def write_config(tmp_path, text: str):
    path = tmp_path / "routerd.toml"
    path.write_text(text)
    return path


def test_builtins_per_kind():
    assert registry.known("routing") == ["least-outstanding", "power-of-two", "round-robin"]
    assert registry.known("batching") == ["dynamic", "none"]
    assert registry.known("placement") == ["best-fit", "first-fit", "spread"]
    assert registry.known("eviction") == ["cost", "gdsf", "lfu", "lru"]
    for kind in registry.KINDS:
        for name in registry.known(kind):
            registry.check(kind, name)


def test_builtins_are_created_with_their_parameters():
    assert registry.create("batching", "dynamic", max_batch_size=3).max_batch_size == 3
    assert registry.create("routing", "round-robin").name == "round-robin"
    lru = registry.create("eviction", "lru")
    assert isinstance(lru, LeastRecentlyUsed)
    placement = registry.create("placement", "spread", eviction=lru)
    assert isinstance(placement, PlacementPolicy)
    assert (placement.name, placement.eviction) == ("spread", lru)
    assert registry.create("placement", "best-fit").eviction.name == "cost"  # the default


def test_each_create_is_a_new_object():
    # Round-robin keeps turns: two schedulers must not share one.
    assert registry.create("routing", "round-robin") is not registry.create(
        "routing", "round-robin"
    )


def test_unknown_names_list_the_known_ones():
    with pytest.raises(ValueError, match="known: least-outstanding, power-of-two, round-robin"):
        registry.check("routing", "random-walk")
    with pytest.raises(ValueError, match=r"unknown placement policy 'worst-fit' \(known: best"):
        registry.create("placement", "worst-fit")
    with pytest.raises(ValueError, match="known: routing, batching, placement, eviction"):
        registry.known("teleport")


def test_parameters_a_policy_does_not_take_are_refused_by_name():
    with pytest.raises(ValueError, match="max_wait_ms"):
        registry.create("batching", "dynamic", max_batch=3)
    with pytest.raises(ValueError, match=r"round-robin.*parameters: none"):
        registry.create("routing", "round-robin", seed=1)


def test_config_checks_the_scheduler_policies(tmp_path):
    assert load_config(None).scheduler.routing == "least-outstanding"
    config = load_config(write_config(tmp_path, '[scheduler]\nrouting = "power-of-two"\n'))
    assert config.scheduler.routing == "power-of-two"
    bad = write_config(tmp_path, '[scheduler]\nrouting = "random-walk"\n')
    with pytest.raises(ConfigError, match=r"scheduler\.routing: .*known: least-outstanding"):
        load_config(bad)
    with pytest.raises(ConfigError, match=r"scheduler\.routing"):
        load_config(write_config(tmp_path, "[scheduler]\nrouting = 3\n"))


def test_without_the_batching_module_the_kind_has_no_builtins(monkeypatch):
    monkeypatch.setitem(sys.modules, "policies.batching", None)  # import now fails
    monkeypatch.setattr(registry, "_builtin_tables", {})
    assert registry.known("batching") == []
    with pytest.raises(ValueError, match=r"unknown batching policy 'dynamic' \(known: none\)"):
        registry.check("batching", "dynamic")
    assert registry.known("routing")[0] == "least-outstanding"  # other kinds unaffected
    monkeypatch.undo()
    assert registry.known("batching") == ["dynamic", "none"]  # found once it exists


def test_a_third_party_policy_is_selected_from_config(tmp_path, monkeypatch):
    install(
        tmp_path, monkeypatch, "[routerd.policies]\nrouting.acme-first = acme_policies:AcmeFirst\n"
    )
    assert "acme-first" in registry.known("routing")
    config = load_config(write_config(tmp_path, '[scheduler]\nrouting = "acme-first"\n'))
    assert config.scheduler.routing == "acme-first"
    policy = registry.create("routing", config.scheduler.routing)
    assert type(policy).__name__ == "AcmeFirst"
    candidates = [Candidate(k, "cpu", True, 0, 0) for k in ("a", "c", "b")]
    assert [c.key for c in policy.rank(RouteRequest("m@1"), candidates)] == ["c", "b", "a"]
    assert registry.create("routing", "acme-first", reverse=False).reverse is False
    with pytest.raises(ConfigError, match="acme-first"):
        load_config(write_config(tmp_path, '[scheduler]\nrouting = "acme-last"\n'))


def test_plugins_are_read_once_until_reloaded(tmp_path, monkeypatch):
    assert "acme-first" not in registry.known("routing")
    entry = "[routerd.policies]\nrouting.acme-first = acme_policies:AcmeFirst\n"
    dist = tmp_path / "acme_policies-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-policies\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(entry)
    (tmp_path / "acme_policies.py").write_text(ACME_MODULE)
    monkeypatch.delitem(sys.modules, "acme_policies", raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "acme-first" not in registry.known("routing")  # cached
    registry.reload_plugins()
    assert "acme-first" in registry.known("routing")


def test_a_broken_plugin_is_reported_with_its_distribution(tmp_path, monkeypatch):
    install(
        tmp_path, monkeypatch, "[routerd.policies]\nrouting.ghost = no_such_module:Ghost\n", None
    )
    assert "ghost" in registry.known("routing")
    with pytest.raises(ValueError, match=r"acme-policies 0\.1.*no_such_module"):
        registry.create("routing", "ghost")
    with pytest.raises(ConfigError, match=r"scheduler\.routing: .*acme-policies"):
        load_config(write_config(tmp_path, '[scheduler]\nrouting = "ghost"\n'))
    # Unrelated lookups go on working.
    assert registry.create("routing", "round-robin").name == "round-robin"
    assert load_config(write_config(tmp_path, '[scheduler]\nrouting = "round-robin"\n'))
    registry.check("eviction", "lru")


def test_a_plugin_cannot_replace_a_builtin_or_use_a_bad_name(tmp_path, monkeypatch, caplog):
    install(
        tmp_path,
        monkeypatch,
        "[routerd.policies]\n"
        "routing.round-robin = acme_policies:AcmeFirst\n"
        "acme-first = acme_policies:AcmeFirst\n"
        "teleport.acme = acme_policies:AcmeFirst\n",
    )
    with caplog.at_level(logging.WARNING, logger="routerd.policies"):
        assert registry.known("routing") == ["least-outstanding", "power-of-two", "round-robin"]
    assert type(registry.create("routing", "round-robin")).__name__ == "RoundRobin"
    assert "acme-policies" in caplog.text
    assert "entry point teleport.acme" in caplog.text
    assert "entry point acme-first" in caplog.text
    assert "entry point routing.round-robin" in caplog.text
