"""routerctl for operators: ps, one-line usage errors, shell completion from the parser."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from routerd import ctl
from routerd.app import build_app
from routerd.completion import commands_of, completion_script
from tests.fakes import FakeBackend
from tests.support import ADMIN_AUTH, ADMIN_TOKEN, fake_services, fake_spec


@pytest.fixture(autouse=True)
def admin_token(monkeypatch: pytest.MonkeyPatch) -> None:
    """routerctl --url sends $ROUTERD_ADMIN_TOKEN; the test apps accept ADMIN_TOKEN."""
    monkeypatch.setenv("ROUTERD_ADMIN_TOKEN", ADMIN_TOKEN)


async def test_ps_lists_loaded_models(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    app = build_app(
        fake_services(tmp_path, FakeBackend(), [fake_spec(tmp_path, "a", bytes=3 << 20)])
    )
    async with TestClient(TestServer(app), headers=ADMIN_AUTH) as client:
        url = str(client.make_url("")).rstrip("/")
        assert await asyncio.to_thread(ctl.main, ["--url", url, "ps"]) == 0
        assert capsys.readouterr().out.strip() == "no models loaded"
        assert (await client.post("/v1/completions", json={"model": "a", "prompt": "x"})).ok
        assert await asyncio.to_thread(ctl.main, ["ps", "--url", url]) == 0
        header, row = capsys.readouterr().out.strip().splitlines()
        assert header.split() == ["NAME", "DEVICE", "SIZE", "STATE", "IN", "FLIGHT", "UNTIL"]
        assert row.split()[:6] == ["a@1", "cpu", "3.0", "MiB", "ready", "0"]
        assert row.endswith("minutes from now")
        assert await asyncio.to_thread(ctl.main, ["ps", "--json", "--url", url]) == 0
        (instance,) = json.loads(capsys.readouterr().out)
        assert instance["model"] == "a" and instance["queued"] == 0


def test_usage_errors_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        ctl.main(["lod", "a"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "invalid choice: 'lod'" in err


def test_completion_knows_every_command_and_flag() -> None:
    parser = ctl.build_parser()
    commands = {c.name: c for c in commands_of(parser)}
    assert {"status", "ps", "load", "evict", "completion", "events"} <= set(commands)
    load_options = {name: takes_value for name, _, takes_value in commands["load"].options}
    assert load_options["--device"] is True and load_options["--reprofile"] is False
    assert commands["completion"].choices == ["bash", "zsh"]
    zsh = completion_script("zsh", parser)
    assert zsh.startswith("#compdef routerctl") and "'ps:" in zsh and "--force[" in zsh


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
@pytest.mark.parametrize(
    ("words", "expected"),
    [
        (["routerctl", "e"], ["events", "evict"]),
        (["routerctl", "load", "--d"], ["--device"]),
        (["routerctl", "completion", ""], ["--url", "--state-dir", "--json", "bash", "zsh"]),
    ],
)
def test_bash_completion_completes(words: list[str], expected: list[str]) -> None:
    script = completion_script("bash", ctl.build_parser())
    words_array = " ".join(f"'{w}'" for w in words)
    driver = (
        f"{script}\nCOMP_WORDS=({words_array}); COMP_CWORD={len(words) - 1}; "
        '_routerctl; printf "%s\\n" "${COMPREPLY[@]}"'
    )
    done = subprocess.run(["bash", "-c", driver], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert sorted(done.stdout.split()) == sorted(expected)


@pytest.mark.skipif(shutil.which("zsh") is None, reason="no zsh")
def test_zsh_script_parses() -> None:
    script = completion_script("zsh", ctl.build_parser())
    done = subprocess.run(["zsh", "-n", "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
