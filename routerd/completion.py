"""Shell completion for ``routerctl``, generated from its argparse parser.

Generated rather than written by hand so a new command or flag is completed the
moment it exists. ``routerctl completion bash`` / ``zsh`` prints the script; load it
with ``source <(routerctl completion bash)`` or save it where the shell looks.
"""

from __future__ import annotations

import argparse
import shlex
from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    options: list[tuple[str, str, bool]]  # (flag, help, takes a value)
    choices: list[str]  # of its first positional argument, if it has a fixed set


def commands_of(parser: argparse.ArgumentParser) -> list[Command]:
    """Each sub-command with its flags, read from the parser itself."""
    found = []
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        helps = {a.dest: a.help or "" for a in action._choices_actions}
        for name, sub in action.choices.items():
            options = []
            choices: list[str] = []
            for a in sub._actions:
                if isinstance(a, argparse._HelpAction):
                    continue
                if a.option_strings:
                    takes_value = a.nargs != 0
                    options += [(flag, a.help or "", takes_value) for flag in a.option_strings]
                elif a.choices and not choices:
                    choices = [str(c) for c in a.choices]
            found.append(Command(name, helps.get(name, ""), options, choices))
    return found


def completion_script(shell: str, parser: argparse.ArgumentParser) -> str:
    if shell == "bash":
        return _bash(parser.prog, commands_of(parser))
    if shell == "zsh":
        return _zsh(parser.prog, commands_of(parser))
    raise ValueError(f"unknown shell {shell!r}; expected bash or zsh")


def _bash(prog: str, commands: list[Command]) -> str:
    func = "_" + prog.replace("-", "_")
    cases = []
    for c in commands:
        words = " ".join([*(flag for flag, _, _ in c.options), *c.choices])
        cases.append(f"        {c.name}) words={shlex.quote(words)} ;;")
    names = " ".join(c.name for c in commands)
    return "\n".join(
        [
            f"# bash completion for {prog}; load with: source <({prog} completion bash)",
            f"{func}() {{",
            '    local cur="${COMP_WORDS[COMP_CWORD]}" words=""',
            '    if [ "$COMP_CWORD" -eq 1 ]; then',
            f'        COMPREPLY=($(compgen -W "{names} --url --json --help" -- "$cur"))',
            "        return",
            "    fi",
            '    case "${COMP_WORDS[1]}" in',
            *cases,
            "    esac",
            '    COMPREPLY=($(compgen -W "$words" -- "$cur"))',
            "}",
            f"complete -F {func} {prog}",
            "",
        ]
    )


def _zsh_text(text: str) -> str:
    """Help text safe inside a single-quoted ``[...]`` of ``_arguments``."""
    return text.replace("'", "'\\''").replace("[", "(").replace("]", ")")


def _zsh(prog: str, commands: list[Command]) -> str:
    func = "_" + prog.replace("-", "_")
    described = [f"        '{c.name}:{_zsh_text(c.help)}'" for c in commands]
    cases = []
    for c in commands:
        specs = []
        for flag, text, takes_value in c.options:
            value = f":{flag.lstrip('-')}:" if takes_value else ""
            specs.append(f"'{flag}[{_zsh_text(text)}]{value}'")
        if c.choices:
            specs.append(f"'1:{c.name}:({' '.join(c.choices)})'")
        cases.append(f"        {c.name}) _arguments {' '.join(specs)} ;;")
    return "\n".join(
        [
            f"#compdef {prog}",
            f"# zsh completion for {prog}; load with: source <({prog} completion zsh)",
            f"{func}() {{",
            "    local -a commands",
            "    commands=(",
            *described,
            "    )",
            "    if (( CURRENT == 2 )); then",
            "        _describe 'command' commands",
            "        return",
            "    fi",
            "    shift words",
            "    (( CURRENT-- ))",
            "    case $words[1] in",
            *cases,
            "    esac",
            "}",
            f"compdef {func} {prog}",
            "",
        ]
    )
