"""The README's example runs as written, and its set-up commands are the ones CI uses."""
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme():
    with open(os.path.join(ROOT, "README.md")) as f:
        return f.read()


@pytest.mark.slow
def test_readme_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", _readme(), re.S)
    assert blocks, "README.md has no python example"
    exec(compile(blocks[0], "README.md example", "exec"), {"__name__": "__readme__"})


def test_readme_commands_match_ci():
    setup = re.findall(r"```bash\n(.*?)```", _readme(), re.S)[0].strip().splitlines()
    assert len(setup) == 2
    assert setup[0].endswith("sas-compile report")
    test_command = setup[1].split("&&")[-1].strip()
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        assert test_command in f.read().splitlines()
