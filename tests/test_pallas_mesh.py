"""`pallas_tpu` on a multi-chip TPU topology (compiled here by libtpu; nothing runs): under `shard_map` over
the batch and head axes it compiles with no collective around the kernel, and it reaches the decoder in
the GRPO update and the sampler (their prefills pass a static cache offset). Numerics: the interpret-mode
agreement tests in test_backends_sharding.py; on a real TPU they are unchecked."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from stjax import compile_only as co
from stjax.models.attention import attend
from stjax.train import config
from stjax.train.compile_only import programs


def _mesh(topology: str, tensor: int) -> Mesh:
    pytest.importorskip("libtpu")
    devices = np.asarray(co.target(topology).devices)
    return Mesh(devices.reshape(1, -1, tensor), ("data", "fsdp", "tensor"))


def test_kernel_compiles_split_over_batch_and_heads():
    """8 chips as fsdp=4 x tensor=2; a prefill's 256 queries against 384 cache slots."""
    mesh = _mesh("v5p:2x2x2", tensor=2)
    rows = lambda *shape, dtype=jnp.bfloat16, spec=("fsdp", None, "tensor"): jax.ShapeDtypeStruct(
        shape, dtype, sharding=NamedSharding(mesh, PartitionSpec(*spec[: len(shape)]))
    )
    q, k = rows(8, 256, 4, 128), rows(8, 384, 2, 128)
    sq, sk = rows(8, 256, dtype=jnp.int32, spec=("fsdp",)), rows(8, 384, dtype=jnp.int32, spec=("fsdp",))
    with jax.set_mesh(mesh):
        text = (
            jax.jit(lambda q, k, sq, sk: attend(q, k, k, sq, sk, True, "pallas_tpu"))
            .lower(q, k, sq, sk)
            .compile()
            .as_text()
        )
    assert "tpu_custom_call" in text
    assert not re.search(r"all-gather|all-reduce|all-to-all|collective-permute", text)


def _decoder_kernels(text: str) -> int:
    """Kernel calls on the tiny decoder's heads, (B, 4 heads, L, head_dim 16) (the vision tower has 2 heads)."""
    return sum(
        bool(re.search(r"= bf16\[\d+,4,\d+,16\]", line))
        for line in text.splitlines()
        if 'custom_call_target="tpu_custom_call"' in line
    )


@pytest.mark.slow  # about a minute and a half on 2 cores: the TPU compiler
def test_kernel_reaches_the_decoder_in_the_grpo_update_and_sampler():
    mesh = _mesh("v5p:2x2x1", tensor=1)
    cfg = config.load(
        "configs/grpo/tiny-cpu.yaml",
        [
            "data.token_buckets=[256]",
            "grpo.max_completion_length=8",
            "grpo.beta=0",
            "model.attention=pallas_tpu",
            "model.compute_dtype=bfloat16",
        ],
    )
    found = {p.name: p for p in programs(cfg, mesh)}
    for name in ("grpo update", "grpo rollout (prefill + decoding)"):
        with jax.set_mesh(mesh):
            text = found[name].fn.lower(*found[name].args).compile().as_text()
        assert _decoder_kernels(text) > 0, name
