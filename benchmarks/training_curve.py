"""Prints a trained shapes model's record: wall time, and the held-out check per task over training.

python -m benchmarks.training_curve [MODEL_DIR]   # default: the shipped epd-shapes
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from serving.config import default_model


def main() -> None:
    model = Path(sys.argv[1]) if len(sys.argv) > 1 else default_model()
    record = json.loads((model / "training.json").read_text())
    recipe = record["recipe"]
    print(
        f"{model.name}: {record['steps']} steps of {recipe['batch_size']} in {record['wall_minutes']} min "
        f"(seed {recipe['seed']}, data seed {recipe['data_seed']}, torch {record['torch']})"
    )
    tasks = list(record["history"][-1]["check"])
    print(f"{'step':>6}{'min':>7}{'loss':>8}" + "".join(f"{t[:12]:>13}" for t in tasks))
    for row in record["history"]:
        if "note" in row:  # what happened to the run at that step (a resume with another recipe)
            print(f"{row['step']:>6}  -- {row['note']}")
            continue
        cells = "".join(f"{row['check'][t] * 100:>12.0f}%" for t in tasks)
        seen = row.get("probes")  # not logged in the readout stage, where the probes stop learning
        probes = "  probes " + " ".join(f"{h} {a:.2f}" for h, a in seen.items()) if seen else ""
        print(f"{row['step']:>6}{row['minutes']:>7.1f}{row['loss']:>8.3f}{cells}{probes}")
    print("(the check: teacher-forced exact match on 8 held-out items per task, seed 99991; the probes:")
    print(" each head's accuracy on the same items' visual tokens that cover something)")


if __name__ == "__main__":
    main()
