"""The Ray runtime every stage uses: cluster start-up (ray_cluster), the rollout group of generation engines
(rollout_group), the judge pool (judge_pool), the DeepSpeed learner group (learner_group), the learner-to-engine
weight sync (weight_sync), generation and scoring of a batch on the rollout group and judge pool
(rollout.generate_and_score), checkpoints (checkpoint) and preemption (preemption). Stages (trainer/ for GRPO,
curriculum/, evaluation/, synth/, pipeline) place every model that holds a GPU through here."""
