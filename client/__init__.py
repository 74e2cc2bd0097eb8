"""psctl: the command-line client."""
