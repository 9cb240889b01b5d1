"""`python -m serving.observability [ROOT]`: regenerate the dashboards and rules under ROOT (default:
the repository this package lives in)."""

from __future__ import annotations

import sys
from pathlib import Path

from serving.observability.render import write_all

root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[2]
for path in write_all(root):
    print(path.relative_to(root))
