"""The README's set-up section is what CI and users run: check it by machine."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def setup_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Set-up", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S)]


def test_setup_has_exactly_two_commands_main_job_and_tests():
    commands = setup_commands()
    assert len(commands) == 2 and all("\n" not in c for c in commands)
    main_job, tests = commands
    assert main_job == "bash scripts/install.sh && fourbit train"  # the built-in QLoRA demo
    assert tests.startswith("bash scripts/install.sh test &&") and "pytest" in tests


def test_ci_runs_the_readme_test_command_verbatim():
    ci = (ROOT / ".ci" / "run").read_text()
    assert setup_commands()[1] in ci.splitlines()


def test_install_script_never_asks_for_an_unpinned_torch():
    script = (ROOT / "scripts" / "install.sh").read_text()
    installs = [line.strip() for line in script.splitlines() if "pip install" in line]
    named = [line for line in installs if re.search(r"[\s\"']torch\b", line)]
    assert named == ['python -m pip install --quiet "torch==2.13.0"']  # only where none is installed
    assert 'if ! python -c "import torch"' in script  # an installed torch (GPU builds) is kept
    # The eager upgrade of `install.sh newest` would replace torch as a dependency of the others:
    # it runs under a constraint that holds the installed version.
    (eager,) = [line for line in installs if "--upgrade-strategy eager" in line]
    assert '-c "$keep_torch"' in eager
    assert "print('torch==' + torch.__version__)\" > \"$keep_torch\"" in script


def test_installs_use_the_tested_versions():
    script = (ROOT / "scripts" / "install.sh").read_text()
    assert 'python -m pip install --quiet -c constraints.txt -e ".[test]"' in script
    pins = [line for line in (ROOT / "constraints.txt").read_text().splitlines() if line and not line.startswith("#")]
    assert all(re.fullmatch(r"[a-z0-9-]+==[^\s]+", line) for line in pins)
    names = {line.split("==")[0] for line in pins}
    assert {"transformers", "bitsandbytes", "peft", "safetensors", "pytest"} <= names
    assert not names & {"torch", "triton"}  # chosen by the machine, never by this file


def test_readme_training_config_is_valid():
    from fourbit.train.config import load_config

    readme = (ROOT / "README.md").read_text()
    block = next(b for b in re.findall(r"```yaml\n(.*?)```", readme, flags=re.S) if "lora_rank" in b)
    import yaml

    config = load_config(None, yaml.safe_load(block))
    assert config.optim == "paged_adamw_8bit" and config.resume_from_checkpoint == "latest"


def readme_command_lines() -> list[tuple[str, str]]:
    """(subcommand, its options) for each ``fourbit SUB ...`` line of the README's command list
    (continuation lines joined, trailing comments dropped)."""
    readme = (ROOT / "README.md").read_text()
    block = next(b for b in re.findall(r"```bash\n(.*?)```", readme, flags=re.S) if b.startswith("fourbit train"))
    commands: list[str] = []
    for line in block.splitlines():
        line = line.split("  #", 1)[0]
        if line.startswith("fourbit "):
            commands.append(line)
        elif line.startswith(" ") and commands:
            commands[-1] += " " + line.strip()
    return [(c.split()[1], c) for c in commands]


def help_text(capsys, *argv) -> str:
    from fourbit.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_the_readme_lists_every_subcommand_with_options_the_parser_has(capsys):
    import fourbit.cli

    listed = readme_command_lines()
    choices = re.search(r"\{([a-z,]+)\}", help_text(capsys)).group(1).split(",")
    assert sorted({sub for sub, _ in listed}) == sorted(choices)  # every subcommand, and only those
    for sub in choices:
        assert f"fourbit {sub}" in fourbit.cli.__doc__, sub
    for sub, line in listed:
        options = set(re.findall(r"--[a-z][a-z0-9-]*", help_text(capsys, sub)))
        for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", line):
            assert flag in options, f"README: `{line}` has {flag}, which `fourbit {sub}` does not take"
