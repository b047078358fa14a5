"""The command line, ``lowrank-vit``: every command's arguments and one-line errors, where the user's model and
data come from, and what is written."""
