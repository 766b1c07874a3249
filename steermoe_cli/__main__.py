"""`python -m steermoe_cli ...` (what launchers such as torchrun start)."""

from .main import main

main()
