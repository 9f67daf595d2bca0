"""Run every benchmark in this folder (`make bench`): each bench_*.py is a script with main() -> bool.

Benchmarks hold the speed and memory targets; tests never time anything. A benchmark prints its
measurements and whether each target was met; this runner exits 1 if any target was missed.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


def main() -> int:
    from peftlab.cli import quiet_libraries

    quiet_libraries()  # the same quiet terminal as `peftlab run` (no load bars, advisory warnings)
    selected = sys.argv[1:]
    ok = True
    for path in sorted(Path(__file__).parent.glob("bench_*.py")):
        if selected and path.stem not in selected:
            continue
        print(f"== {path.stem}", flush=True)
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        ok = module.main() and ok
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
