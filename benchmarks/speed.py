"""Speed benchmark script: the same as `superdiffusion bench-speed` (see superdiffusion/bench/speed.py).

    python benchmarks/speed.py --profile quick --json speed.json
"""

import sys

from superdiffusion.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main(["bench-speed", *sys.argv[1:]]))
