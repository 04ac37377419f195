"""Every mriflow option reaches mriflow under torchrun: torchrun's own parser must not take it as one of its options."""

from __future__ import annotations

import argparse

import pytest
from torch.distributed.run import get_args_parser

from mriflow.cli import build_parser

# spellings torchrun takes as an abbreviation of its own options (--nnodes, --nproc-per-node, ...); each has
# a long spelling that survives, which the README uses
SHORT_ONLY_OUTSIDE_TORCHRUN = {"--n"}


def options(parser: argparse.ArgumentParser, command: tuple[str, ...] = ()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from options(sub, (*command, name))
        elif action.option_strings and command and action.dest != "help":
            yield command, action


def reaches_mriflow(command: tuple[str, ...], option: str) -> bool:
    arguments = [*command, option, "1"]
    try:
        parsed = get_args_parser().parse_args(["--nproc_per_node", "2", "-m", "mriflow", *arguments])
    except SystemExit:
        return False
    return parsed.training_script == "mriflow" and parsed.training_script_args == arguments


@pytest.mark.parametrize("command, action", list(options(build_parser())),
                         ids=lambda value: " ".join(value) if isinstance(value, tuple) else value.dest)
def test_every_option_has_a_spelling_that_passes_through_torchrun(command, action, capsys):
    surviving = [option for option in action.option_strings if reaches_mriflow(command, option)]
    assert surviving, f"mriflow {' '.join(command)} {action.option_strings}: no spelling passes through torchrun"
    assert set(action.option_strings) - set(surviving) <= SHORT_ONLY_OUTSIDE_TORCHRUN
    capsys.readouterr()  # torchrun's usage text on the refused spellings


def test_the_readme_torchrun_commands_pass_through_whole():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    commands = [line.strip() for line in readme.splitlines() if line.strip().startswith("torchrun ")]
    assert len(commands) >= 2
    for line in commands:
        words = line.split()
        parsed = get_args_parser().parse_args(words[1:])
        assert parsed.training_script == "mriflow" and parsed.training_script_args == words[words.index("mriflow") + 1:]


def readme_commands() -> list[list[str]]:
    """Every `mriflow ...` command of the README (continuation lines joined, comments dropped), as argument lists."""
    import shlex
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text().replace("\\\n", " ")
    blocks = text.split("```")[1::2]  # the fenced code blocks
    commands = []
    for line in (line for block in blocks for line in block.splitlines()):
        line = line.split("  #")[0].strip()
        if line.startswith("#") or "mriflow" not in line:
            continue
        for part in line.split("&&"):
            words = shlex.split(part.strip(), comments=True)
            if "mriflow" in words and words[0] in ("mriflow", "torchrun"):
                commands.append(words[words.index("mriflow") + 1:])
    return commands


def test_every_readme_command_parses_with_the_options_it_shows():
    from mriflow.cli import build_parser

    commands = readme_commands()
    assert len(commands) >= 12 and ["generate", "--out", "samples", "--n", "4", "--age", "45", "--sex", "F"] in commands
    for words in commands:
        args, unknown = build_parser().parse_known_args(words)
        assert not unknown, f"mriflow {' '.join(words)}: unknown {unknown}"
        assert callable(args.func)
