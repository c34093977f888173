"""Subcommands of the later stages (scoring, training, evaluation) register here, each importing its heavy
dependencies lazily inside the command function."""
