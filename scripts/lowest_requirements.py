"""Print ``NAME==LOWEST`` for each named dependency, read from pyproject.toml's lower bounds."""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

declared = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["dependencies"]
for name in sys.argv[1:]:
    spec = next((d for d in declared if re.match(rf"{re.escape(name)}\b", d)), None)
    low = re.search(r">=\s*([\w.]+)", spec or "")
    if low is None:
        sys.exit(f"pyproject.toml declares no lower bound for {name!r}")
    print(f"{name}=={low.group(1)}")
