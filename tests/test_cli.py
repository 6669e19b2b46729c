"""The command line's help: what a new user reads first."""
import click
import pytest
from click.testing import CliRunner

from cli import main


def test_overview_names_every_command():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0, result.output
    overview = result.output.split("Options:")[0]
    for name in main.commands:
        assert f"\n    {name} " in overview, f"`cli.py --help` does not describe `{name}`"


@pytest.mark.parametrize("name", sorted(main.commands))
def test_every_command_has_help(name):
    result = CliRunner().invoke(main, [name, "--help"])
    assert result.exit_code == 0, result.output
    assert f"Usage: main {name} [OPTIONS]" in result.output
    undocumented = [p.name for p in main.commands[name].params
                    if isinstance(p, click.Option) and not (p.help or "").strip()]
    assert not undocumented, f"options of `{name}` without help: {undocumented}"
