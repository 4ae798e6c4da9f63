"""python -m fastlin info | demo"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastlin")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="versions, threads and which backends are available (and why not)")
    from fastlin import demo

    demo.add_arguments(sub.add_parser("demo", help="the seed's linear regression: fastlin vs stock PyTorch"))
    args = parser.parse_args(argv)
    if args.cmd == "info":
        import fastlin

        fastlin.info()
    elif args.cmd == "demo":
        return demo.run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
