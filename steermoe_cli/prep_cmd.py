"""`steermoe prep ...`: turn a corpus on disk into the prepared Parquet layout."""

from __future__ import annotations

import typer

prep_app = typer.Typer(help="Prepare a dataset (Parquet shards of FLAC + manifest.json).", no_args_is_help=True)
