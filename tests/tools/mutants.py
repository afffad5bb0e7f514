"""Mutation testing: plant one-line bugs, one at a time, into a copy of the repository and run the
tests named for each; a mutant the tests fail on is killed, one they pass survived.

    python tests/tools/mutants.py                  # every mutant; prints killed / survived and a score
    python tests/tools/mutants.py bnpo_double_division format_accepts_extra_close

Each mutant is (name, file, the exact line as it is, the line as a developer might get it wrong, the
tests that should catch it: pytest node ids or `file -k expression`). The list grows with the code:
a bug found in review or a fault probe becomes a mutant here beside the test that now catches it.
A mutant whose line is not found exactly once is reported as stale (the code moved; update it).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str
    old: str  # one line (or a distinctive part of one), found exactly once in the file
    new: str
    tests: tuple[str, ...]  # pytest arguments


GRPO, LOSS, REWARDS = "stjax/train/grpo.py", "tests/test_grpo_loss.py", "stjax/train/rewards.py"
STAGE = "tests/test_grpo.py::test_the_stages_step_hands_the_update_what_the_options_ask"
THROUGH_UPDATE = "tests/test_grpo.py::test_every_loss_type_through_the_update_equals_trls_per_micro_batch_loss"
POLICY = (LOSS, "-k", "policy_loss_equals_trl")

MUTANTS = [
    # the 13 that survived the audit of issue #24
    Mutant(
        "epsilon_high_ignored",
        GRPO,
        "g.loss_type, g.beta, g.epsilon, g.epsilon_high or g.epsilon,",
        "g.loss_type, g.beta, g.epsilon, g.epsilon,",
        (f"{LOSS}::test_loss_settings_take_epsilon_high_from_the_config",),
    ),
    Mutant(
        "old_logps_from_the_reference",
        GRPO,
        "batch = batch.replace(old_logp=self.logps_fn(state.params,",
        "batch = batch.replace(old_logp=self.logps_fn(self.reference,",
        (STAGE,),
    ),
    Mutant(
        "format_accepts_extra_close",
        REWARDS,
        '_NO_TAG = r"(?:(?!</?(?:think|answer)>).)*"',
        '_NO_TAG = r".*?"',
        ("tests/test_grpo_rewards.py", "-k", "format"),
    ),
    Mutant(
        "reverse_thinking_past_think",
        REWARDS,
        "completion[start: end if end >= 0 else len(completion)]",
        "completion[start:]",
        ("tests/test_grpo_rewards.py", "-k", "reverse_thinking"),
    ),
    Mutant(
        "decoding_key_not_advanced",
        "stjax/sampling/sampler.py",
        "jax.vmap(jax.random.fold_in, (0, None))(keys, s.step)",
        "jax.vmap(jax.random.fold_in, (0, None))(keys, 0)",
        ("tests/test_sampler.py::test_the_second_token_follows_its_own_distribution_given_the_first",),
    ),
    Mutant(
        "mask_counts_the_token_after_eos",
        GRPO,
        "completion_mask = np.arange(tokens.shape[1]) < lengths[:, None]",
        "completion_mask = np.arange(tokens.shape[1]) <= lengths[:, None]",
        (STAGE,),
    ),
    Mutant(
        "rollout_keys_without_the_step",
        GRPO,
        "jax.random.wrap_key_data(rng), 1), step)",
        "jax.random.wrap_key_data(rng), 1), 0)",
        (f"{LOSS}::test_each_completion_has_its_own_key_folded_with_the_step",),
    ),
    Mutant(
        "rollout_passes_step_zero",
        GRPO,
        "completion_keys(state.rng.addressable_data(0), step, ids,",
        "completion_keys(state.rng.addressable_data(0), 0, ids,",
        (STAGE,),
    ),
    Mutant(
        "write_text_in_place",
        "stjax/io.py",
        '        with open(partial, "w") as f:',
        '        with open(path, "w") as f:',
        ("tests/test_io.py",),
    ),
    Mutant(
        "lock_not_taken_over",
        "stjax/io.py",
        "            DirectoryLock._held[key].release()",
        "            pass",
        ("tests/test_io.py",),
    ),
    Mutant(
        "reference_is_the_current_policy",
        GRPO,
        "batch = batch.replace(ref_logp=self.logps_fn(self.reference,",
        "batch = batch.replace(ref_logp=self.logps_fn(state.params,",
        (STAGE,),
    ),
    Mutant(
        "update_ignores_temperature",
        GRPO,
        "logp, entropy = completion_logps(model, micro, settings.temperature,",
        "logp, entropy = completion_logps(model, micro, 1.0,",
        (THROUGH_UPDATE,),
    ),
    Mutant(
        "evaluator_ignores_quantize",
        "stjax/eval/mcq.py",
        "quantize_base=cfg.quantize,",
        'quantize_base="none",',
        ("tests/test_qlora.py", "-k", "evaluator_runs and nf4"),
    ),
    Mutant(
        "double_quant_offset_dropped",
        "stjax/models/quant.py",
        'return jnp.asarray(DYNAMIC)[absmax] * scale + arrays["absmax_offset"]',
        "return jnp.asarray(DYNAMIC)[absmax] * scale",
        ("tests/test_qlora.py", "-k", "without_bitsandbytes"),
    ),
    # the bug issue #24 found, and the kinds the audit's suite already caught
    Mutant(
        "bnpo_double_division",
        GRPO,
        "num_items_in_batch=tokens if bnpo else jnp.sum(batch.completion_mask),",
        "num_items_in_batch=jnp.sum(batch.completion_mask),",
        (THROUGH_UPDATE,),
    ),
    Mutant(
        "std_without_bessel",
        GRPO,
        "std = jnp.repeat(jnp.nanstd(groups, axis=1, ddof=1), group_size)",
        "std = jnp.repeat(jnp.nanstd(groups, axis=1), group_size)",
        (LOSS, "-k", "group_advantages"),
    ),
    Mutant(
        "advantage_epsilon",
        GRPO,
        "advantages = advantages / (std + 1e-4)",
        "advantages = advantages / (std + 1e-8)",
        (LOSS, "-k", "group_advantages"),
    ),
    Mutant(
        "clip_high_with_epsilon_low",
        GRPO,
        "jnp.clip(ratio, 1 - epsilon_low, 1 + epsilon_high)",
        "jnp.clip(ratio, 1 - epsilon_low, 1 + epsilon_low)",
        POLICY,
    ),
    Mutant(
        "clip_max_not_min",
        GRPO,
        "per_token = -jnp.minimum(ratio * advantages, clipped * advantages)",
        "per_token = -jnp.maximum(ratio * advantages, clipped * advantages)",
        POLICY,
    ),
    Mutant("kl_sign", GRPO, "delta = ref_logp - logp", "delta = logp - ref_logp", POLICY),
    Mutant(
        "grpo_micro_batch_sequences",
        GRPO,
        "sequences = mask.shape[0] if num_sequences is None else num_sequences",
        "sequences = mask.shape[0]",
        (THROUGH_UPDATE,),
    ),
    Mutant(
        "dr_grpo_without_length",
        GRPO,
        "loss = jnp.sum(weighted) / (sequences * max_completion_length)",
        "loss = jnp.sum(weighted) / sequences",
        POLICY,
    ),
    Mutant(
        "cispo_weight_not_detached",
        GRPO,
        "per_token = -jax.lax.stop_gradient(jnp.minimum(ratio, epsilon_high))",
        "per_token = -(jnp.minimum(ratio, epsilon_high))",
        POLICY,
    ),
    Mutant(
        "sequence_ratio_unmasked",
        GRPO,
        "log_weights = (jnp.sum(log_ratio * mask, axis=-1) / per_row)[:, None]",
        "log_weights = jnp.mean(log_ratio, axis=-1)[:, None]",
        POLICY,
    ),
    Mutant(
        "logps_without_temperature",
        GRPO,
        "return token_logps(hidden / jnp.asarray(temperature, hidden.dtype),",
        "return token_logps(hidden,",
        ("tests/test_grpo.py", "-k", "old_logps_equal and qwen2_vl and not 2_5"),
    ),
    Mutant(
        "reward_weights_ignored",
        GRPO,
        "total = np.nansum(per_func * self.reward_weights, axis=1)",
        "total = np.nansum(per_func, axis=1)",
        (STAGE,),
    ),
    Mutant(
        "accuracy_rule_ignored",
        GRPO,
        "rewards.resolve(name, g.accuracy_rule) for name",
        "rewards.resolve(name) for name",
        (STAGE,),
    ),
    Mutant(
        "rollout_without_top_k",
        GRPO,
        "temperature=g.temperature, top_k=g.top_k, top_p=g.top_p,",
        "temperature=g.temperature, top_k=0, top_p=1.0,",
        (STAGE,),
    ),
    Mutant(
        "nf4_ties_upward",
        "stjax/models/quant.py",
        'side="left", method="compare_all"',
        'side="right", method="compare_all"',
        ("tests/test_qlora.py", "-k", "ties"),
    ),
    # double quantization as bitsandbytes' CPU backend makes it (its torch mean, its kernel's table)
    Mutant(
        "double_quant_numpy_mean",
        "stjax/models/quant.py",
        'offset = np.float32(_torch_sum(out["absmax"]) / np.float32(out["absmax"].size))',
        'offset = np.float32(np.mean(out["absmax"]))',
        ("tests/test_qlora.py", "-k", "bit_for_bit"),
    ),
    Mutant(
        "double_quant_nearest_code",
        "stjax/models/quant.py",
        "codes = np.where(absmax[:, None] > 0, DYNAMIC_CODES[points], 0).astype(np.uint8)",
        "codes = np.where(absmax[:, None] > 0, np.abs(scaled[..., None] - DYNAMIC).argmin(-1), 0).astype(np.uint8)",
        ("tests/test_qlora.py", "-k", "bit_for_bit"),
    ),
    Mutant(
        "double_quant_zero_block_code",
        "stjax/models/quant.py",
        "codes = np.where(absmax[:, None] > 0, DYNAMIC_CODES[points], 0).astype(np.uint8)",
        "codes = DYNAMIC_CODES[points].astype(np.uint8)",
        ("tests/test_qlora.py", "-k", "bit_for_bit"),
    ),
    Mutant(
        "double_quant_points_rounded_down",
        "stjax/models/quant.py",
        "* np.float32(DYNAMIC_POINTS - 1) + half).astype(np.int64)",
        "* np.float32(DYNAMIC_POINTS - 1)).astype(np.int64)",
        ("tests/test_qlora.py", "-k", "bit_for_bit"),
    ),
    Mutant(
        "torch_sum_16_lanes",
        "stjax/models/quant.py",
        "lanes, rows = 8, x.size // 32",
        "lanes, rows = 16, x.size // 64",
        ("tests/test_qlora.py", "-k", "torchs_float32"),
    ),
    Mutant(
        "torch_sum_cascade_one_level",
        "stjax/models/quant.py",
        "            if i & ((step - 1) << (j * power)):",
        "            if True:",
        ("tests/test_qlora.py", "-k", "torchs_float32"),
    ),
    Mutant(
        "int8_scale_off",
        "stjax/models/quant.py",
        "scale = 127 * jnp.where(absmax > 0, 1 / absmax, 0)",
        "scale = 126 * jnp.where(absmax > 0, 1 / absmax, 0)",
        ("tests/test_qlora.py", "-k", "int8_values"),
    ),
]


def copy_repo(target: Path) -> None:
    ignore = shutil.ignore_patterns(".git", "__pycache__", "*.egg-info", ".venv*", "venv", ".pytest_cache", "runs")
    shutil.copytree(ROOT, target, ignore=ignore, symlinks=True)


def run_mutant(mutant: Mutant, copy: Path, timeout: float) -> str:
    """'killed', 'survived', 'stale' (the line is not there exactly once) or 'timeout'."""
    path = copy / mutant.file
    original = path.read_text()
    if original.count(mutant.old) != 1:
        return "stale"
    path.write_text(original.replace(mutant.old, mutant.new))
    env = {**os.environ, "PYTHONPATH": str(copy), "PYTHONDONTWRITEBYTECODE": "1"}
    try:
        result = subprocess.run(
            [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *mutant.tests],
            cwd=copy,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return "timeout"
    finally:
        path.write_text(original)
    if result.returncode == 1:
        return "killed"
    if result.returncode == 0:
        return "survived"
    return f"error (pytest exit {result.returncode}: {result.stdout.strip().splitlines()[-1:]})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="mutants to run (default: all)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per mutant's tests")
    args = parser.parse_args(argv)
    known = {m.name: m for m in MUTANTS}
    unknown = [n for n in args.names if n not in known]
    if unknown:
        parser.error(f"unknown mutants {unknown}; known: {', '.join(known)}")
    chosen = [known[n] for n in args.names] if args.names else MUTANTS
    results = {}
    with tempfile.TemporaryDirectory(prefix="stjax-mutants-") as tmp:
        copy = Path(tmp) / "repo"
        copy_repo(copy)
        for mutant in chosen:
            began = time.perf_counter()
            results[mutant.name] = run_mutant(mutant, copy, args.timeout)
            print(f"{results[mutant.name]:9s} {mutant.name} ({time.perf_counter() - began:.0f} s)", flush=True)
    killed = sum(r == "killed" for r in results.values())
    print(
        f"score: {killed}/{len(results)} killed; survived: {[n for n, r in results.items() if r != 'killed'] or 'none'}"
    )
    return 0 if killed == len(results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
