"""safetensors headers are checked as the safetensors library checks them (issue #24): the tensors'
byte ranges, in order of offset, follow one another with no overlap and no gap, each as long as its
shape x dtype, and together fill the file's data. Each bad header is refused by the library (the
reference) and by stjax, in one line naming the file and the problem; the converter refuses it too."""

import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors import SafetensorError
from safetensors.numpy import load_file

from stjax.models.safetensors_io import SafetensorsError, SafetensorsReader

ROOT = Path(__file__).resolve().parents[1]


def write(path: Path, header: dict, data: bytes) -> Path:
    """A safetensors file of a given header and data, as a broken writer could leave it."""
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


def tensor(dtype: str, shape: list[int], begin: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


DATA = np.arange(10, dtype=np.float32).tobytes()  # 40 bytes: a (2, 3) and a (4,) float32 tensor
GOOD = {"a": tensor("F32", [2, 3], 0, 24), "b": tensor("F32", [4], 24, 40)}
BAD = {  # name: (header, data, what stjax says)
    "overlap": (
        {"a": tensor("F32", [2, 3], 0, 24), "b": tensor("F32", [4], 16, 32)},
        DATA[:32],
        r"tensor b's bytes \[16, 32\) overlap the previous tensor's \(which end at 24\)",
    ),
    "gap": (
        {"a": tensor("F32", [2, 3], 0, 24), "b": tensor("F32", [3], 28, 40)},
        DATA,
        r"tensor b's bytes \[28, 40\) leave a gap of 4 bytes after the previous tensor's",
    ),
    "first not at 0": (
        {"a": tensor("F32", [2, 3], 4, 28), "b": tensor("F32", [3], 28, 40)},
        DATA,
        r"tensor a's bytes \[4, 28\) leave a gap of 4 bytes",
    ),
    "size": (
        {"a": tensor("F32", [2, 3], 0, 24), "b": tensor("F32", [5], 24, 40)},
        DATA,
        r"tensor b spans 16 bytes \[24, 40\), but its shape \[5\] of F32 needs 20",
    ),
    "past the end": (
        {"a": tensor("F32", [2, 3], 0, 24), "b": tensor("F32", [4], 24, 40)},
        DATA[:36],
        r"the tensors' bytes run to 40, past the file's 36 bytes of data",
    ),
    "trailing bytes": (
        {"a": tensor("F32", [2, 3], 0, 24), "b": tensor("F32", [4], 24, 40)},
        DATA + b"\0" * 8,
        r"8 bytes after the last tensor belong to none",
    ),
    "end before begin": (
        {"a": tensor("F32", [2, 3], 0, 24), "b": tensor("F32", [4], 24, 8)},
        DATA,
        r"tensor b spans -16 bytes",
    ),
}


def test_a_sound_file_in_any_header_order_is_read(tmp_path):
    file = write(tmp_path / "model.safetensors", {"b": GOOD["b"], "a": GOOD["a"]}, DATA)
    reference = load_file(file)
    reader = SafetensorsReader(tmp_path)
    for name in ("a", "b"):
        np.testing.assert_array_equal(reader.read(name), reference[name])


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_header_is_refused_naming_the_file_and_the_problem(tmp_path, case):
    header, data, message = BAD[case]
    file = write(tmp_path / "model.safetensors", header, data)
    with pytest.raises(SafetensorError):  # the reference refuses it
        load_file(file)
    with pytest.raises(SafetensorsError, match=f"^{file}: {message}") as error:
        SafetensorsReader(tmp_path)
    assert "\n" not in str(error.value)


def test_the_converter_refuses_overlapping_tensors_in_one_line(hf_dirs, tmp_path):
    """A real checkpoint whose second tensor (in offset order) is made to overlap the first."""
    src = hf_dirs("qwen2_vl")[0]
    raw = (src / "model.safetensors").read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + size])
    names = sorted((n for n in header if n != "__metadata__"), key=lambda n: header[n]["data_offsets"])
    begin, end = header[names[1]]["data_offsets"]
    header[names[1]]["data_offsets"] = [begin - 4, end - 4]  # 4 bytes into the previous tensor
    bad = tmp_path / "bad"
    bad.mkdir()
    for side in src.iterdir():
        if side.name != "model.safetensors":
            (bad / side.name).write_bytes(side.read_bytes())
    write(bad / "model.safetensors", header, raw[8 + size :])
    result = subprocess.run(
        [sys.executable, ROOT / "convert" / "to_stjax.py", bad, tmp_path / "out"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 1, result.stderr[-2000:]
    (line,) = [line for line in result.stderr.splitlines() if line.strip() and "convert:" not in line]  # tqdm's bar
    assert line.startswith(f"error: {bad / 'model.safetensors'}: tensor {names[1]}'s bytes"), line
    assert "overlap the previous tensor's" in line and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()
