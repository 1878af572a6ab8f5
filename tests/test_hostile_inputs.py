"""Broken and hostile inputs through the command line: one line on stderr starting with ``error:``,
a non-zero exit, no traceback, no output left behind (and no pickled code run).

The checkpoints come from tests/hostile_files.py; recipes and output locations are built here.
Most cases run the CLI's entry point in this process (the ``cli`` fixture: the same argument
parsing and error funnel, without a fresh interpreter per case); a few run it as a subprocess.
"""

import errno
import os
import re
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import PROGRESS_LINE, run_vmq
from tests.hostile_files import PTH
from vmq.errors import VmqError
from vmq.fileio import atomic_path
from vmq.models.checkpoint import read_state_dict
from vmq.recipe import MAX_RECIPE_BYTES

#: a quick compression: the reference model, round-to-nearest, 2 calibration images, no evaluation
QUICK = ("--set", "quantization.method=rtn", "--set", "calibration.num_images=2", "--no-eval")




def one_line_error(r, match=None, code=1):
    """Exit ``code``, no traceback, nothing on stdout, one ``error:`` line on stderr (after progress lines,
    when the failure comes after some work)."""
    lines = [line for line in r.stderr.splitlines() if line.strip() and not PROGRESS_LINE.match(line)]
    assert r.returncode == code, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-2000:]
    assert "internal error" not in lines[0], lines[0]
    assert r.stdout == "", r.stdout[-2000:]
    if match:
        assert re.search(match, lines[0]), lines[0]
    return lines[0]


@pytest.fixture
def cli(capsys, monkeypatch):
    """``cli(*args)``: run ``vmq *args`` through its entry point here; returns a CompletedProcess."""
    from vmq_cli.main import main

    monkeypatch.delenv("VMQ_DEBUG", raising=False)

    def run(*args):
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_:
            main([str(a) for a in args])
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(args, exit_.value.code, out, err)

    return run


def leftovers(folder: Path, keep=()):
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


@pytest.mark.parametrize("name", sorted(PTH))
def test_bad_checkpoint_eval(tmp_path, cli, name):
    build, phrase = PTH[name]
    bad = tmp_path / f"{name}.pth"
    build(bad)
    one_line_error(cli("eval", "--checkpoint", bad), re.escape(phrase))
    assert not (tmp_path / "PWNED").exists()  # the pickled os.system never ran
    assert leftovers(tmp_path) == [bad.name]


@pytest.mark.parametrize("name", ["evil_zip", "zip_bomb", "random_bytes", "junk_list"])
def test_bad_checkpoint_quantize(tmp_path, cli, name):
    build, phrase = PTH[name]
    bad = tmp_path / f"{name}.pth"
    build(bad)
    r = cli("quantize", "--set", f"model.checkpoint={bad}", "--out", tmp_path / "q.safetensors", *QUICK)
    one_line_error(r, re.escape(phrase))
    assert not (tmp_path / "PWNED").exists()
    assert leftovers(tmp_path) == [bad.name]


@pytest.mark.parametrize("name", ["evil_zip", "zip_bomb"])
def test_bad_checkpoint_in_a_fresh_process(tmp_path, name):
    build, phrase = PTH[name]
    bad = tmp_path / f"{name}.pth"
    build(bad)
    one_line_error(run_vmq("eval", bad), re.escape(phrase))
    assert leftovers(tmp_path) == [bad.name]


def test_code_pickle_message_converts_a_trusted_file(tmp_path):
    """The refusal's conversion line, run as printed on a file the user trusts, gives a file vmq reads."""
    import fractions

    import torch

    ref = read_state_dict(Path(__file__).resolve().parents[1] / "vmq/assets/vim_ref_cifar10.safetensors")
    src = tmp_path / "trusted.pth"
    torch.save({"model": ref, "best": fractions.Fraction(1, 3)}, src)
    with pytest.raises(VmqError, match="never unpickles code") as info:
        read_state_dict(src)
    command = re.search(r'convert it once in your own Python: (python -c ".*") and pass (\S+)$', str(info.value))
    subprocess.run(command.group(1).replace("python", sys.executable, 1), shell=True, check=True)
    converted = read_state_dict(command.group(2))
    assert converted.keys() == ref.keys() and all(torch.equal(converted[k], ref[k]) for k in ref)


RECIPES = {
    "list": ("- 1\n- 2\n", "must be a mapping"),
    "scalar": ("42\n", "must be a mapping"),
    "nul_bytes": ("seed: 1\x00\x01\x02\n", "not valid YAML: character #x0000"),
    "latin1": (b"model: {name: caf\xe9}\n", "not UTF-8 text"),
    "billion_laughs": ("a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
                       "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: [*c, *c, *c, *c, *c, *c, *c, *c, *c]\n",
                       "aliases are not allowed"),
    "merge_key_alias": ("base: &b {num_images: 8}\ncalibration:\n  <<: *b\n", "aliases are not allowed"),
    "deep_flow": ("seed: " + "[" * 50000 + "]" * 50000 + "\n", "nested deeper than"),
    "deep_blocks": ("".join("  " * i + f"k{i}:\n" for i in range(200)), "nested deeper than"),
    "huge_file": ("seed: 1\n" + "# padding\n" * (MAX_RECIPE_BYTES // 10 + 1), "larger than 1 MiB"),
    "bad_yaml": ("quantization: [1, 2\n", "not valid YAML at line"),
    "python_tag": ("seed: !!python/object/apply:os.system ['true']\n", "could not determine a constructor"),
    "bad_date": ("seed: 2020-13-45\n", "month must be in"),
    "long_number": ("seed: " + "9" * 5000 + "\n", "not a valid recipe"),
    "wrong_type": ("calibration: {num_images: many}\n", r"calibration\.num_images': Input should be a valid integer"),
    "negative": ("calibration: {batch_size: -4}\n", "greater than or equal to 1"),
    "seed_overflow": ("seed: 0x" + "f" * 20 + "\n", r"'seed': Input should be less than"),
    "infinite": ("quantization: {smoothing: {alpha: .inf}}\n", "finite number"),
    "not_a_number": ("quantization: {jlss: {lr_scale: .nan}}\n", "finite number"),
    "unknown_method": ("quantization: {method: gptq}\n", "unknown method 'gptq'"),
    "unknown_key": ("quantization: {shceme: W4A8}\n", "did you mean 'quantization.scheme'"),
    "missing_block": ("quantization:\n", r"'quantization': Input should be a valid dictionary"),
    "unknown_preset": ("quantization: {scheme: W3A3}\n", "unknown scheme preset"),
    "bad_bits": ("quantization: {scheme: {weights: {num_bits: 1}}}\n", "greater than or equal to 2"),
    "bad_regex": ("quantization: {ignore: ['re:a{99999999999999999999}']}\n", "bad regular expression"),
    "nested_regex": ("quantization: {ignore: ['re:" + "(" * 2000 + ")" * 2000 + "']}\n", "bad regular expression"),
    "huge_device": ("device: '" + "x" * 100000 + "'\n", r"device must be cpu.*\(\d+ characters\)"),
    "version_2": ("version: 2\n", "less than or equal to 1"),
    "endless_grid": ("quantization: {truncation: {grid: 100000000000000}}\n", "less than or equal to 10000"),
}
VQ_RECIPES = {
    "vq_size_not_power": ("vq: {codebook: {size: 12}}\n", "power of two"),
    "vq_candidates": ("vq: {codebook: {size: 4}, search: {candidates: 8}}\n", "exceeds codebook.size"),
    "vq_schedule": ("vq: {confirm: {schedule: [0.5, 0.4]}}\n", "increase strictly"),
    "vq_dynamic": ("vq: {input_activations: {strategy: token_dynamic}}\n", "not token_dynamic"),
}


@pytest.mark.parametrize("name", sorted(RECIPES) + sorted(VQ_RECIPES))
def test_bad_recipe(tmp_path, cli, name):
    text, phrase = {**RECIPES, **VQ_RECIPES}[name]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_bytes(text if isinstance(text, bytes) else text.encode())
    command = "vq" if name.startswith("vq_") else "quantize"
    line = one_line_error(cli(command, "--recipe", recipe, "--out", tmp_path / "out.safetensors"), phrase)
    assert len(line) < 400, line
    assert leftovers(tmp_path) == ["recipe.yaml"]


def test_bad_recipe_in_a_fresh_process(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPES["billion_laughs"][0])
    one_line_error(run_vmq("quantize", "--recipe", recipe, cwd=tmp_path), RECIPES["billion_laughs"][1])
    assert leftovers(tmp_path) == ["recipe.yaml"]


SETS = {
    "no_equals": (["seed"], "expects KEY=VALUE", 2),
    "empty_key": (["=3"], "expects KEY=VALUE", 2),
    "empty_part": (["calibration..num_images=3"], "expects KEY=VALUE", 2),
    "value_not_block": (["seed=3", "seed.x=1"], "is a value", 1),
    "negative": (["calibration.num_images=-1"], "greater than or equal to 1", 1),
    "wrong_type": (["calibration.batch_size=[1, 2]"], "valid integer", 1),
    "unknown_key": (["calibration.num_imgs=8"], "did you mean", 1),
    "unknown_method": (["quantization.method=gptq"], "unknown method", 1),
    "alias": (["seed=*a"], "valid integer", 1),
    "deep": (["seed=" + "[" * 5000 + "]" * 5000], "valid integer", 1),
    "infinite": (["quantization.truncation.p=.inf"], "finite number", 1),
    "bad_device": (["device=gpu"], "device must be cpu", 1),
    "seed_overflow": (["seed=18446744073709551616"], "less than", 1),
    "nul": (["model.name=a\x01b"], "unknown model", 1),
}


@pytest.mark.parametrize("name", sorted(SETS))
def test_bad_set(tmp_path, cli, name):
    items, phrase, code = SETS[name]
    args = [a for item in items for a in ("--set", item)]
    one_line_error(cli("quantize", *args, "--out", tmp_path / "out.safetensors"), phrase, code)
    assert leftovers(tmp_path) == []


def test_bad_output_locations(tmp_path, cli):
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("x")
    cases = [(tmp_path / "folder", "is a directory", 2), (tmp_path / "missing" / "q.safetensors", "does not exist", 1),
             (tmp_path / "file" / "q.safetensors", "is not a folder", 1)]
    if os.geteuid() != 0:  # root writes anywhere
        (tmp_path / "locked").mkdir(mode=0o555)
        cases.append((tmp_path / "locked" / "q.safetensors", "is not writable", 1))
    for out, phrase, code in cases:  # a folder is refused by the option itself (a usage error)
        one_line_error(cli("quantize", "--out", out, *QUICK), phrase, code)
        one_line_error(cli("calibrate", "--num-images", "2", "--out", out), phrase, code)
    assert leftovers(tmp_path) == ["file", "folder"] + (["locked"] if os.geteuid() != 0 else [])
    assert leftovers(tmp_path / "folder") == []


def test_file_size_limit_mid_write(tmp_path):
    """Under ``ulimit -f`` the packed file's write fails (EFBIG; vmq ignores SIGXFSZ): one line, no output."""
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192))

    env = {k: v for k, v in os.environ.items() if k != "VMQ_DEBUG"}
    r = subprocess.run([sys.executable, "-m", "vmq_cli.main", "quantize", "--out", tmp_path / "q.safetensors", *QUICK],
                       capture_output=True, text=True, env=env, preexec_fn=limit, timeout=600)
    one_line_error(r, r"file too large .* writing .*q\.safetensors")
    # nothing but the per-block progress, kept for --resume (complete files only, no temporary one)
    assert leftovers(tmp_path, keep={"q.safetensors.progress"}) == []
    progress = tmp_path / "q.safetensors.progress"
    assert not progress.exists() or not [p for p in progress.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("code, phrase", [(errno.ENOSPC, "no space left on device writing"),
                                          (errno.EDQUOT, "disk quota exceeded writing"),
                                          (errno.EFBIG, "file too large"), (errno.EIO, "cannot write .*: Input/output error")])
def test_disk_full_while_writing(tmp_path, code, phrase):
    dest = tmp_path / "out.safetensors"
    with pytest.raises(VmqError, match=phrase):
        with atomic_path(dest) as tmp:
            tmp.write_bytes(b"half a file")
            raise OSError(code, os.strerror(code))
    assert leftovers(tmp_path) == []


def test_disk_full_in_safetensors_writer(tmp_path):
    """safetensors' writer reports the OS error inside its message ("... (os error 28)")."""
    import safetensors

    with pytest.raises(VmqError, match=r"^no space left on device writing .*packed\.safetensors$"):
        with atomic_path(tmp_path / "packed.safetensors") as tmp:
            tmp.write_bytes(b"\0" * 100)
            raise safetensors.SafetensorError("Error while serializing: I/O error: No space left on device "
                                              "(os error 28)")
    assert leftovers(tmp_path) == []


def test_real_safetensors_writer_over_file_size_limit(tmp_path):
    import signal

    import torch
    from safetensors.torch import save_file

    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    try:
        resource.setrlimit(resource.RLIMIT_FSIZE, (65536, hard))
        with pytest.raises(VmqError, match=r"^file too large .* writing .*w\.safetensors$"):
            with atomic_path(tmp_path / "w.safetensors") as tmp:
                save_file({"w": torch.zeros(1 << 16)}, str(tmp))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)
    assert leftovers(tmp_path) == []


def test_unwritable_temporary_file(tmp_path, monkeypatch):
    import tempfile

    def refuse(**kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(VmqError, match="cannot write .*out.yaml: Permission denied"):
        with atomic_path(tmp_path / "out.yaml"):
            pass


def test_recipe_aliases_refused_but_dumps_reload(tmp_path):
    """The resolved recipe vmq writes has no aliases, so it always reloads."""
    from vmq.quant.recipe import QuantRecipe
    from vmq.recipe import dump_recipe, load_recipe

    r = load_recipe(None, QuantRecipe, ["quantization.ignore=[a, a]", "quantization.targets=[a, a]"])
    p = tmp_path / "r.yaml"
    p.write_text(dump_recipe(r))
    assert "*" not in p.read_text() and load_recipe(p, QuantRecipe) == r
    assert yaml.safe_load(p.read_text())["quantization"]["ignore"] == ["a", "a"]
