"""Copy a checkpoint as it travels: adapter, meta.json, recipe and Adam's moments by weight name, no pickle.

    python tools/portable_checkpoint.py runs/ctc/checkpoints/step-0001200 checkpoints/demo_ctc_stage

A run's folder lives on the machine that trained it; this copy is what a repository (or another machine)
carries, and `steermoe train --init-from DEST` continues from it as from the run itself: the same weights
and optimizer moments, a new schedule. See ``steermoe_core.training.init_from.save_portable``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", type=Path, help="a run's model/ or checkpoints/step-N folder")
    ap.add_argument("dest", type=Path)
    ap.add_argument("--state-from", type=Path, default=None,
                    help="the checkpoint whose train_state.pt holds the moments (default: CHECKPOINT itself)")
    args = ap.parse_args()

    from steermoe_core.training.init_from import save_portable

    dest = save_portable(args.checkpoint, args.dest, args.state_from)
    print(f"{args.checkpoint} -> {dest}: " + ", ".join(sorted(p.name for p in dest.iterdir())))


if __name__ == "__main__":
    from steermoe_core.errors import SteermoeError

    try:
        sys.exit(main())
    except SteermoeError as e:  # bad input: one line, not a traceback
        sys.exit(f"error: {e}")
