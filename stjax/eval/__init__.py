"""Evaluation: the Ego-ST multiple-choice evaluator (`python -m stjax.eval.mcq`) and answer extraction."""
