"""Subcommands of the later stages register here. Each command module keeps its heavy imports inside the
command function, so registering costs nothing at start-up."""
from kardia_rl.cli import command
from kardia_rl.rewards.score_cli import cmd_score
from kardia_rl.trainer.train_cli import cmd_checkpoints, cmd_train
from kardia_rl.evaluation.cli import cmd_eval, cmd_judge_agreement, cmd_split
from kardia_rl.learner.sft_cli import cmd_sft

command("score", "unified reward (format, emotion, rubric judge) of model outputs on KardiaBench data")(cmd_score)
command("train", "GRPO on the Ray cluster (RAY_ADDRESS, else a local one on 127.0.0.1); exports run_dir/policy")(cmd_train)
command("checkpoints", "list a run's checkpoints with their verified status (size and checksum of every file)")(cmd_checkpoints)
command("eval", "generate and score test answers; JSON, JSONL, Markdown table like the paper's, PNG plots")(cmd_eval)
command("judge-agreement", "per-dimension agreement (Spearman, weighted kappa) between judges or seeds")(cmd_judge_agreement)
command("split", "difficulty-aware split by resolution rate: easy (SFT) and hard (GRPO) samples")(cmd_split)
command("sft", "supervised fine-tuning on four-span targets (prompt masked); save_pretrained output")(cmd_sft)
