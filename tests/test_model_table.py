"""The README's model table is what scripts/model_table.py prints (names, aliases, parameter counts)."""

import importlib.util

from conftest import ROOT


def test_readme_model_table_is_current():
    spec = importlib.util.spec_from_file_location("model_table", ROOT / "scripts" / "model_table.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    readme = (ROOT / "README.md").read_text()
    block = readme.split(mod.BEGIN, 1)[1].split(mod.END, 1)[0].strip()
    assert block == mod.table(), "README model table is stale: run python scripts/model_table.py --write"
    # the parameter counts the papers give: VMamba-T/S/B about 30/50/89 M, LocalVim-T 8 M, LocalVMamba-T 26 M
    for name, millions in (("vmambav2v_tiny_224", 30), ("vmambav2_small_224", 50), ("vmambav2_base_224", 89),
                           ("local_vim_tiny", 8), ("local_vssm_tiny", 26)):
        assert abs(mod.parameters(name) / 1e6 - millions) < 0.6, name
