"""The README's Python example runs as written (outputs redirected to a temporary folder)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_python_example(tmp_path, capsys):
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"<!-- PYTHON_EXAMPLE:BEGIN -->\s*```python\n(.*?)```\s*<!-- PYTHON_EXAMPLE:END -->", readme,
                      re.S)
    assert block, "the README lost its Python example"
    code = block.group(1).replace('"runs/', f'"{tmp_path}/').replace('"configs/', f'"{ROOT}/configs/')
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out.splitlines()
    top1, agreement = map(float, out[0].split())
    assert 60 < top1 < 80 and agreement > 90
    assert out[1].startswith("layers.0.mixer.in_proj ") and out[3].startswith("vim {")
    assert (tmp_path / "w4a8-rtn.safetensors").is_file() and (tmp_path / "w4a8-rtn.recipe.yaml").is_file()
