"""``python -m bench.demo.toyclip``: train (and optionally evaluate) the toy CLIP."""

from bench.demo.toyclip.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
