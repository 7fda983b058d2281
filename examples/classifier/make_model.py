"""Train the example classifier and write its model archive.

python -m examples.classifier.make_model OUT.tar.gz [--seed N] [--version V]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from examples.classifier.model import write_model_archive


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--version", type=int, default=1)
    args = parser.parse_args(argv)
    meta = write_model_archive(args.out, seed=args.seed, version=args.version)
    print(json.dumps({"archive": str(args.out), **meta}))


if __name__ == "__main__":
    main()
