"""Parity on an accelerator: stjax vs transformers on the same GPU, fp32 and bf16, and the attention
backends against each other (logits and time).

    python benchmarks/gpu_parity.py [--scale 2]

For each architecture, prints the relative logit error (max |a - b| / max |reference|) of
  stjax fp32 vs torch fp32 (TF32 off on both sides),
  stjax bf16 vs torch fp32, next to torch bf16 vs torch fp32 (what bf16 costs the reference),
  each stjax attention backend vs `xla` in bf16, with its forward time, and again on the batch
  right-padded (the trainer's layout, where `dot_product` runs causal attention without a mask).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=int, default=2)
    parser.add_argument("--backends", nargs="+", default=["dot_product"])
    args = parser.parse_args()

    import jax
    import torch
    from bench_forward import interleaved_medians, mid_config
    from reference import hf_model, make_batch

    from stjax.models.inputs import prepare_inputs
    from stjax.models.loading import load_pretrained
    from stjax.models.qwen_vl import compiled_forward

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; torch {torch.__version__} on {device}")
    rel = lambda a, b: float(np.abs(a - b).max() / np.abs(b).max())
    for arch in ("qwen2_vl", "qwen2_5_vl"):
        cfg = mid_config(arch, args.scale)
        prompts = [[40, ("video", 4, 24, 24), 24], [16, ("video", 4, 16, 20), 8]]
        batch = make_batch(cfg, prompts)
        length = batch["input_ids"].shape[1]
        real = batch["attention_mask"].astype(bool)
        ref32 = hf_model(cfg).to(device)

        def torch_logits(model):
            kwargs = {
                k: torch.from_numpy(np.asarray(v)).to(device) for k, v in batch.items() if k != "second_per_grid_ts"
            }
            kwargs["pixel_values_videos"] = kwargs["pixel_values_videos"].to(model.dtype)
            with torch.no_grad():
                return model(**kwargs).logits.float().cpu().numpy()[real]

        t32 = torch_logits(ref32)
        t16 = torch_logits(hf_model(cfg).to(device).to(torch.bfloat16))
        with tempfile.TemporaryDirectory() as tmp:
            ref32.save_pretrained(tmp)
            # The references name `xla`: the default (`auto`) is cuDNN's kernel on a GPU.
            models = {
                "fp32": load_pretrained(tmp, attention="xla")[0],
                "bf16": load_pretrained(tmp, dtype="bfloat16", attention="xla")[0],
            }
            for backend in args.backends:
                models[f"bf16 {backend}"] = load_pretrained(tmp, dtype="bfloat16", attention=backend)[0]
        inputs = {name: jax.device_put(prepare_inputs(m.config, **batch)) for name, m in models.items()}
        run = {
            name: (lambda m=m, i=inputs[name]: compiled_forward(m, i).block_until_ready()) for name, m in models.items()
        }
        logits = {name: np.asarray(fn())[:, :length][real] for name, fn in run.items()}
        print(
            f"\n{arch}: {cfg.vision.depth} vision / {cfg.text.num_layers} text layers, hidden {cfg.text.hidden_size}, "
            f"batch {batch['input_ids'].shape}"
        )
        print(f"  stjax fp32 vs torch fp32: {rel(logits['fp32'], t32):.2e}")
        print(
            f"  stjax bf16 vs torch fp32: {rel(logits['bf16'], t32):.2e}   "
            f"(torch bf16 vs torch fp32: {rel(t16, t32):.2e})"
        )
        names = ["bf16"] + [f"bf16 {b}" for b in args.backends]
        times = interleaved_medians([run[n] for n in names], 10)
        for name, t in zip(names, times):
            backend = name.split(" ")[1] if " " in name else "xla"
            print(
                f"  backend {backend:12s} vs xla: {rel(logits[name], logits['bf16']):.2e}, forward {t * 1e3:7.2f} ms"
                "; fused attention kernels in the compiled program: "
                f"{fused_attention_calls(models[name], inputs[name])}"
            )
        # The trainer's layout: padding after the real tokens, so `dot_product` drops the mask.
        right = make_batch(cfg, prompts, padding_side="right")
        for backend in args.backends:
            model = models[f"bf16 {backend}"]
            placed = jax.device_put(prepare_inputs(model.config, **right))
            out = np.asarray(compiled_forward(model, placed))[:, :length][right["attention_mask"].astype(bool)]
            print(
                f"  backend {backend:12s} on the right-padded batch (right_padded={placed.right_padded}) vs xla: "
                f"{rel(out, logits['bf16']):.2e}, vs torch fp32: {rel(out, t32):.2e}; "
                f"fused attention kernels: {fused_attention_calls(model, placed)}"
            )


def fused_attention_calls(model, inputs) -> int:
    """How many cuDNN fused-attention custom calls the compiled forward holds (0: XLA's attention)."""
    from flax import nnx

    from stjax.models.inputs import cast_floats
    from stjax.models.qwen_vl import _forward

    graphdef, state = nnx.split(model)
    text = _forward.lower(graphdef, state, cast_floats(inputs, model.config.compute_dtype)).compile().as_text()
    return text.count("__cudnn$fmha")


if __name__ == "__main__":
    main()
