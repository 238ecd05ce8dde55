"""The command-line interface (typer): thin wrappers that parse, call the pipeline and print."""
