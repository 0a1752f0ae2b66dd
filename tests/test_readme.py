"""The README's first usage example runs as written."""
import pathlib
import re


def test_readme_usage_example_runs():
    text = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = re.findall(r"```python\n(.*?)```", text, re.S)[0]
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert tuple(scope["out"].shape) == (1, 4096, 8, 64)
    assert tuple(scope["blocks"].shape) == (1, 4096, 8, 3)
