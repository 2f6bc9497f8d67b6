"""What operators run: the CLI, the dev stack, the ETRM simulator, the demo."""
