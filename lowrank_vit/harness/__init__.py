"""The experiment harness: the registry of the paper's rows, the runner, the stand-in models, the demo and the command
line."""
