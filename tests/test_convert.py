"""HF -> stjax -> HF conversion: bit-exact, loadable by transformers, with clear errors."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from reference import hf_logits, make_batch, tiny_config

from stjax.convert import hf_to_stjax, parse_size, stjax_to_hf
from stjax.models.config import ConfigError
from stjax.models.loading import CheckpointError, load_pretrained
from stjax.models.safetensors_io import PlannedTensor, SafetensorsReader, write_safetensors
from stjax.models.weights import canonical_name

ROOT = Path(__file__).resolve().parents[1]


def in_memory_name(name: str) -> str:
    """transformers >= 4.52 in-memory layout."""
    if name.startswith("model."):
        return "model.language_model." + name[len("model.") :]
    if name.startswith("visual."):
        return "model." + name
    return name


def rewrite(src: Path, dst: Path, rename=lambda n: n, drop=(), change=None, max_shard_bytes=1 << 40) -> Path:
    """Copy a HF directory, renaming, dropping or changing tensors (to make bad checkpoints)."""
    reader = SafetensorsReader(src)
    plan = []
    for name in reader.tensors:
        if name in drop:
            continue
        array = reader.read(name)
        if change and name in change:
            array = change[name](array)
        plan.append(PlannedTensor(rename(name), array.shape, array.dtype, lambda a=array: a))
    write_safetensors(dst, plan, max_shard_bytes)
    shutil.copy(src / "config.json", dst / "config.json")
    return dst


def tensors(path: Path) -> dict:
    reader = SafetensorsReader(path)
    return {canonical_name(n): reader.read(n) for n in reader.tensors}


@pytest.mark.parametrize("layout", ["on_disk", "in_memory"])
@pytest.mark.parametrize("sharded", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl"])
def test_round_trip_is_bit_exact(hf_dirs, tmp_path, arch, dtype, sharded, layout):
    src = hf_dirs(arch, dtype)[0]
    rename = in_memory_name if layout == "in_memory" else (lambda n: n)
    source = rewrite(src, tmp_path / "src", rename=rename, max_shard_bytes=150_000 if sharded else 1 << 40)
    assert (source / "model.safetensors.index.json").exists() == sharded
    hf_to_stjax(source, tmp_path / "stjax")
    stjax_to_hf(tmp_path / "stjax", tmp_path / "back", max_shard_bytes=200_000)
    before, after = tensors(source), tensors(tmp_path / "back")
    # Names are compared in the hub's on-disk layout, which the exporter always writes.
    assert sorted(before) == sorted(after)
    for name, a in before.items():
        b = after[name]
        assert (a.dtype, a.shape) == (b.dtype, b.shape), name
        assert a.tobytes() == b.tobytes(), name
    assert (tmp_path / "back" / "model.safetensors.index.json").exists()


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl"])
def test_exported_directory_loads_in_transformers_with_the_same_logits(hf_dirs, tmp_path, arch):
    src, ref_model = hf_dirs(arch)
    hf_to_stjax(src, tmp_path / "stjax")
    stjax_to_hf(tmp_path / "stjax", tmp_path / "back")
    reloaded = type(ref_model).from_pretrained(tmp_path / "back", attn_implementation="eager").eval()
    batch = make_batch(tiny_config(arch), [[3, ("video", 2, 4, 8), 4]])
    np.testing.assert_array_equal(hf_logits(reloaded, batch), hf_logits(ref_model, batch))
    # and the stjax directory itself loads
    model, cfg = load_pretrained(tmp_path / "stjax")
    assert cfg.model_type == arch


def test_command_line(hf_dirs, tmp_path):
    src = hf_dirs("qwen2_vl")[0]
    for script in ("to_stjax.py", "to_hf.py"):
        out = subprocess.run([sys.executable, ROOT / "convert" / script, "--help"], capture_output=True, text=True)
        assert out.returncode == 0 and "--dtype" in out.stdout
    run = lambda *a: subprocess.run([sys.executable, *map(str, a)], capture_output=True, text=True, check=True)
    run(ROOT / "convert" / "to_stjax.py", src, tmp_path / "s", "--dtype", "bfloat16")
    run(ROOT / "convert" / "to_hf.py", tmp_path / "s", tmp_path / "h")
    converted = tensors(tmp_path / "h")
    assert all(a.dtype == np.dtype("bfloat16") for a in converted.values())
    original = tensors(src)["model.norm.weight"]
    np.testing.assert_array_equal(
        converted["model.norm.weight"].astype(np.float32), torch.tensor(original).bfloat16().float().numpy()
    )


def test_sizes_parse():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("500MiB") == 500 * 2**20 and parse_size("123") == 123


class TestErrors:
    def test_missing_tensor(self, hf_dirs, tmp_path):
        bad = rewrite(hf_dirs("qwen2_vl")[0], tmp_path / "bad", drop={"model.layers.1.mlp.up_proj.weight"})
        with pytest.raises(CheckpointError, match=r"1 missing tensors: model\.layers\.1\.mlp\.up_proj\.weight"):
            hf_to_stjax(bad, tmp_path / "out")

    def test_unexpected_tensor(self, hf_dirs, tmp_path):
        src = hf_dirs("qwen2_vl")[0]
        rename = lambda n: "model.layers.7.extra.weight" if n == "model.norm.weight" else n
        bad = rewrite(src, tmp_path / "bad", rename=rename)
        with pytest.raises(CheckpointError, match=r"unexpected tensors: model\.layers\.7\.extra\.weight"):
            hf_to_stjax(bad, tmp_path / "out")

    def test_shape_disagreement(self, hf_dirs, tmp_path):
        name = "model.layers.0.self_attn.k_proj.weight"
        bad = rewrite(hf_dirs("qwen2_5_vl")[0], tmp_path / "bad", change={name: lambda a: a[:-1]})
        with pytest.raises(CheckpointError, match=rf"{name}: expected shape \(32, 64\), got \(31, 64\)"):
            hf_to_stjax(bad, tmp_path / "out")

    def test_dtype_disagreement(self, hf_dirs, tmp_path):
        name = "visual.blocks.0.attn.qkv.bias"
        bad = rewrite(hf_dirs("qwen2_5_vl")[0], tmp_path / "bad", change={name: lambda a: a.astype(np.float16)})
        with pytest.raises(CheckpointError, match=rf"{name}: expected dtype float32, got float16"):
            hf_to_stjax(bad, tmp_path / "out")

    def test_unknown_model_type(self, hf_dirs, tmp_path):
        bad = rewrite(hf_dirs("qwen2_vl")[0], tmp_path / "bad")
        config = json.loads((bad / "config.json").read_text())
        (bad / "config.json").write_text(json.dumps(dict(config, model_type="llava")))
        with pytest.raises(ConfigError, match="unknown model_type 'llava'"):
            hf_to_stjax(bad, tmp_path / "out")

    def test_truncated_file(self, hf_dirs, tmp_path):
        bad = rewrite(hf_dirs("qwen2_vl")[0], tmp_path / "bad")
        data = (bad / "model.safetensors").read_bytes()
        (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
        with pytest.raises(ValueError, match="truncated"):
            hf_to_stjax(bad, tmp_path / "out")

    def test_stjax_checkpoint_that_does_not_match_its_config(self, hf_dirs, tmp_path):
        hf_to_stjax(hf_dirs("qwen2_vl")[0], tmp_path / "s")
        config = json.loads((tmp_path / "s" / "config.json").read_text())
        (tmp_path / "s" / "config.json").write_text(json.dumps(dict(config, intermediate_size=96)))
        with pytest.raises(
            CheckpointError, match=r"model/layers/gate_proj/kernel: expected shape \(2, 64, 96\), got \(2, 64, 128\)"
        ):
            stjax_to_hf(tmp_path / "s", tmp_path / "h")


def safetensors_dir(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a HF directory read by the `safetensors` package, shards through the index."""
    from safetensors import safe_open

    index = directory / "model.safetensors.index.json"
    if index.exists():
        meta = json.loads(index.read_text())
        files = sorted(set(meta["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    out = {}
    for file in files:
        with safe_open(directory / file, framework="pt") as f:
            for name in f.keys():
                assert name not in out, f"{name} is in two shards"
                out[name] = f.get_tensor(name)
    if index.exists():
        assert meta["weight_map"] == {name: file for file in files for name in safe_open(directory / file, "pt").keys()}
        assert meta["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in out.values())
    return out


def export(how: str, stjax_dir: Path, out: Path, dtype: str) -> Path:
    """A HF directory written from the stjax directory by one of the three exporters."""
    shard = 100_000  # bytes: the tiny models (~1 MB) come out in several shards
    if how == "library":  # stjax.convert.stjax_to_hf
        stjax_to_hf(stjax_dir, out, dtype=dtype, max_shard_bytes=shard)
    elif how == "command_line":  # convert/to_hf.py
        subprocess.run(
            [
                sys.executable,
                ROOT / "convert" / "to_hf.py",
                stjax_dir,
                out,
                "--dtype",
                dtype,
                "--max-shard-size",
                f"{shard}B",
            ],
            capture_output=True,
            text=True,
            check=True,
        )
    else:  # save_hf on a loaded model's parameters, as the training run exports
        from flax import nnx, traverse_util

        from stjax.models.loading import save_hf

        model, cfg = load_pretrained(stjax_dir, dtype=dtype)
        params = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
        save_hf(out, cfg, {k: np.asarray(v) for k, v in params.items()}, max_shard_bytes=shard)
    return out


@pytest.mark.parametrize("how", ["library", "command_line", "save_hf"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl"])
def test_sharded_exports_open_in_safetensors_and_transformers(hf_dirs, tmp_path, arch, dtype, how):
    """Every tensor, read by `safetensors.safe_open` and by transformers' `from_pretrained`, equals the
    source's (fp32 transformers weights, cast by torch where the export is bf16) bit for bit."""
    src, ref_model = hf_dirs(arch)
    hf_to_stjax(src, tmp_path / "stjax")
    out = export(how, tmp_path / "stjax", tmp_path / "hf", dtype)
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1
    want = getattr(torch, dtype)

    source = safetensors_dir(src)
    written = safetensors_dir(out)
    assert sorted(written) == sorted(source)
    for name, tensor in source.items():
        assert written[name].dtype == want, name
        assert torch.equal(written[name], tensor.to(want)), name

    loaded = type(ref_model).from_pretrained(out, attn_implementation="eager")  # dtype from config.json
    assert loaded.dtype == want
    theirs = loaded.state_dict()
    expected = ref_model.state_dict()
    assert sorted(theirs) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(theirs[name], tensor.to(want)), name


def test_each_planned_tensor_is_made_in_its_own_dtype():
    """An export without a dtype keeps each parameter's own (a merged LoRA model holds float32 trained
    weights beside a bfloat16 base): every tensor's bytes are made in the dtype its header declares, not in
    the dtype of the last parameter planned."""
    from stjax.models.loading import param_shapes, plan_hf_tensors

    cfg = tiny_config("qwen2_vl")
    dtypes = (np.float32, np.float16)
    params = {path: np.zeros(shape, dtypes[i % 2]) for i, (path, shape) in enumerate(param_shapes(cfg).items())}
    plan = plan_hf_tensors(cfg, params)
    assert {t.dtype for t in plan} == {np.dtype(np.float32), np.dtype(np.float16)}
    assert all(t.make().dtype == t.dtype for t in plan)
