"""GRPO by role: the rollout (decoding), the learner (the update and its batch), the objective (advantages
and loss types by TRL's names) and the step's scores; `stjax.train.grpo` puts them together as a stage."""
