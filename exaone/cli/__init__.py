"""Command-line interface: one thin typer module per subcommand."""
