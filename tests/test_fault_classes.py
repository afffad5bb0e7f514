"""Faults of issue #15, one class per test: writers that never leave a mixed or half-written model
directory, floating dtypes only, one-line errors naming the file, validated model configs.

(The training and evaluation faults are in test_train_faults.py and test_eval_mcq.py; the kill
loop over every writer is test_faults.py.)"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from stjax.cli import run_cli
from stjax.convert import hf_to_stjax, stjax_to_hf
from stjax.io import DirectoryLock, OutputError, atomic_dir
from stjax.models import loading
from stjax.models.config import ConfigError
from stjax.models.loading import ModelNotFoundError, hf_params, load_pretrained
from stjax.models.safetensors_io import SafetensorsError, SafetensorsReader

ROOT = Path(__file__).resolve().parents[1]


def tensors(path: Path) -> dict:
    reader = SafetensorsReader(path)
    return {n: reader.read(n) for n in reader.tensors}


def files(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def converter(script: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "convert" / script), *map(str, args)], capture_output=True, text=True, cwd=ROOT
    )


@pytest.fixture(scope="module")
def two_models(hf_dirs, tmp_path_factory):
    """Two different stjax directories (A: qwen2_vl float32, B: qwen2_vl bfloat16)."""
    root = tmp_path_factory.mktemp("two")
    a, b = root / "a", root / "b"
    hf_to_stjax(hf_dirs("qwen2_vl")[0], a)
    hf_to_stjax(hf_dirs("qwen2_vl", "bfloat16")[0], b)
    return a, b


# ------------------------------------------------------------------ 1. whole outputs, never mixed


def test_a_second_conversion_into_an_occupied_directory_is_refused_and_overwrite_replaces_it_whole(
    two_models, tmp_path
):
    a, b = two_models
    out = tmp_path / "out"
    stjax_to_hf(a, out, max_shard_bytes=100_000)  # A sharded
    assert (out / "model.safetensors.index.json").exists()
    before = files(out)
    result = converter("to_hf.py", b, out)  # B, one file
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "already holds files" in result.stderr and str(out) in result.stderr
    assert files(out) == before  # untouched
    stjax_to_hf(b, out, overwrite=True)
    assert not (out / "model.safetensors.index.json").exists()  # no shard of A left beside B
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    stjax_to_hf(b, tmp_path / "fresh")
    expected, got = tensors(tmp_path / "fresh"), tensors(out)
    assert got.keys() == expected.keys() and all(got[k].tobytes() == expected[k].tobytes() for k in got)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no partial left


def test_converting_into_an_unrelated_model_directory_keeps_its_config(two_models, hf_dirs, tmp_path):
    a, _ = two_models
    unrelated = shutil.copytree(hf_dirs("qwen2_5_vl")[0], tmp_path / "unrelated")
    before = files(unrelated)
    with pytest.raises(OutputError, match="already holds files"):
        hf_to_stjax(hf_dirs("qwen2_vl")[0], unrelated)
    with pytest.raises(OutputError, match="already holds files"):
        stjax_to_hf(a, unrelated)
    assert files(unrelated) == before


def test_a_writer_that_fails_midway_leaves_the_previous_output_and_no_partial(two_models, tmp_path, monkeypatch):
    a, b = two_models
    out = tmp_path / "out"
    stjax_to_hf(a, out, max_shard_bytes=100_000)
    before = files(out)
    written = []
    real = loading.write_safetensors.__globals__["_write_file"]

    def fail_on_third_file(file, planned):
        written.append(file)
        if len(written) == 3:
            raise OSError(28, "No space left on device")
        real(file, planned)

    monkeypatch.setitem(loading.write_safetensors.__globals__, "_write_file", fail_on_third_file)
    with pytest.raises(OSError, match="No space left"):
        stjax_to_hf(b, out, max_shard_bytes=100_000, overwrite=True)
    assert written[0].parent != out  # built beside the target, not in it
    assert files(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_partial_directory_left_by_a_dead_writer_is_removed_by_the_next(tmp_path):
    stale = tmp_path / ".out.partial-999999999"  # no such process
    (stale / "params").mkdir(parents=True)
    with atomic_dir(tmp_path / "out") as partial:
        (partial / "x").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (tmp_path / "out" / "x").read_text() == "new"


def test_a_locked_directory_is_refused_in_one_line(tmp_path):
    with DirectoryLock(tmp_path, "evaluation"):
        code = (
            "from stjax.cli import run_cli; from stjax.io import DirectoryLock; "
            f"run_cli(lambda argv: DirectoryLock({str(tmp_path)!r}, 'evaluation').acquire())"
        )
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
        assert result.returncode == 1 and result.stderr.count("\n") == 1
        assert "is in use by another evaluation" in result.stderr
    DirectoryLock(tmp_path).acquire().release()  # free again once the holder let go


# ------------------------------------------------------------------ 7. floating dtypes only


@pytest.mark.parametrize("script,dtype", [("to_stjax.py", "int8"), ("to_hf.py", "int32")])
def test_converters_refuse_non_floating_dtypes(two_models, hf_dirs, tmp_path, script, dtype):
    source = hf_dirs("qwen2_vl")[0] if script == "to_stjax.py" else two_models[0]
    result = converter(script, source, tmp_path / "out", "--dtype", dtype)
    assert result.returncode == 1, result.stderr
    assert result.stderr.count("\n") == 1 and f"dtype {dtype} is not a floating type" in result.stderr
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ 9. errors users can read


def test_load_pretrained_errors_name_the_file(hf_dirs, tmp_path):
    src = hf_dirs("qwen2_vl")[0]
    with pytest.raises(ConfigError, match=r"model.safetensors is not a model directory \(it is a file\)"):
        load_pretrained(src / "model.safetensors")

    listed = shutil.copytree(src, tmp_path / "listed")
    (listed / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match=r"config.json holds a list, not a mapping"):
        load_pretrained(listed)

    zero = shutil.copytree(src, tmp_path / "zero")
    config = json.loads((zero / "config.json").read_text())
    for fields in (config, config.get("text_config", {})):  # transformers 5 nests the text fields
        fields.update(num_attention_heads=0, num_key_value_heads=0)
    (zero / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"zero/config.json: num_attention_heads=0, num_key_value_heads=0: must be"):
        load_pretrained(zero)


@pytest.mark.parametrize("index", ["{not json", '{"weight_map": [1]}', "[]", '{"metadata": {}}'])
def test_a_malformed_shard_index_is_named(two_models, tmp_path, index):
    out = tmp_path / "sharded"
    stjax_to_hf(two_models[0], out, max_shard_bytes=100_000)
    (out / "model.safetensors.index.json").write_text(index)
    with pytest.raises(SafetensorsError, match="model.safetensors.index.json"):
        hf_params(loading.QwenVLConfig.from_file(out), out)


def test_command_line_errors_are_one_line_and_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    sys.path.insert(0, str(ROOT / "convert"))
    import to_stjax

    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit) as stop:
        run_cli(to_stjax.main, [str(tmp_path / "missing"), str(tmp_path / "out")])
    assert stop.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{tmp_path / 'missing'}: no such directory" in err
    with pytest.raises(ModelNotFoundError):
        run_cli(to_stjax.main, [str(tmp_path / "missing"), str(tmp_path / "out"), "--debug"])
    monkeypatch.setenv("STJAX_DEBUG", "1")
    with pytest.raises(ModelNotFoundError):
        run_cli(to_stjax.main, [str(tmp_path / "missing"), str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
