"""Subcommands of the later stages register here. Each command module keeps its heavy imports inside the
command function, so registering costs nothing at start-up."""
from kardia_rl.cli import command
from kardia_rl.rewards.score_cli import cmd_score

command("score", "unified reward (format, emotion, rubric judge) of model outputs on KardiaBench data")(cmd_score)
