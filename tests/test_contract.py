"""The README's two set-up commands: .ci/run must run exactly the test command the README gives."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    return [line for b in blocks for line in b.splitlines() if line.startswith("python3 -m venv")]


def test_ci_runs_the_readme_test_command():
    commands = _readme_commands()
    test_cmd = [c for c in commands if c.rstrip().endswith("pytest -q")]
    assert len(test_cmd) == 1, commands
    ci_lines = [line for line in (ROOT / ".ci/run").read_text().splitlines() if line and not line.startswith("#")]
    assert test_cmd[0] in ci_lines


def test_readme_demo_command_installs_and_runs_the_demo():
    demo = [c for c in _readme_commands() if c.rstrip().endswith("sentcode demo")]
    assert len(demo) == 1
    assert "pip install torch==2.13.0 &&" in demo[0]
