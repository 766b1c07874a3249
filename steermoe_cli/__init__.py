"""Command-line front end of steermoe (Typer): argument parsing and printing only."""
