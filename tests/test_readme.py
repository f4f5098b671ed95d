"""The README's set-up section is what CI and users run: check it by machine."""

import re
from pathlib import Path

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
    torch_installs = [line for line in script.splitlines() if "pip install" in line and "torch" in line]
    assert torch_installs and all('"torch==2.13.0"' in line for line in torch_installs)
    assert 'python -c "import torch"' in script  # an installed torch (GPU builds) is kept


def test_readme_training_config_is_valid():
    from fourbit.train.config import load_config

    readme = (ROOT / "README.md").read_text()
    block = next(b for b in re.findall(r"```yaml\n(.*?)```", readme, flags=re.S) if "lora_rank" in b)
    import yaml

    config = load_config(None, yaml.safe_load(block))
    assert config.optim == "paged_adamw_8bit" and config.resume_from_checkpoint == "latest"
