"""What reading a v1 JSON image batch costs the service, per body, in this process (no HTTP).

    python bench/json_reader_bench.py [--images 64] [--repeat 7]

Builds the body ``bench/serve_bench.py`` sends (``--images`` synthetic 28x28 images as 0-255
integers, ``json.dumps``' default separators) and times, best of ``--repeat`` rounds of 50
calls each:

- the route's whole read, ``_parse_and_decode_json`` (the byte reader, then the rest of the
  body parsed): what a request pays;
- the byte reader alone, ``service.inputs.integer_json_batch``;
- the general path it stands in for: the whole body parsed (orjson) and validated, and its two
  steps apart, orjson's nested lists and ``np.asarray`` of them.
"""

from __future__ import annotations

import argparse
import sys
import timeit
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()
    if args.images < 1 or args.repeat < 1:
        ap.error(f"Expected --images and --repeat >= 1. Received: {args.images}, {args.repeat}")
    import orjson
    from serve_bench import synthetic_images, v1_body

    from service import inputs
    from service.routers import models
    from service.settings import Settings

    settings = Settings(max_batch_images=max(256, args.images))
    shape = (28, 28, 1)
    body = v1_body(synthetic_images(args.images, seed=3))
    fast = inputs.integer_json_batch(body, shape, max_images=settings.max_batch_images,
                                     max_depth=settings.max_json_depth)
    if fast is None:
        raise SystemExit("the byte reader did not take the benchmark's body")
    lists = orjson.loads(body)["images"]
    steps = {
        "the route's read (_parse_and_decode_json)":
            lambda: models._parse_and_decode_json(body, settings, {}, shape),
        "byte reader (integer_json_batch)":
            lambda: inputs.integer_json_batch(body, shape, max_images=settings.max_batch_images,
                                              max_depth=settings.max_json_depth),
        "general path: whole body parsed and validated":
            lambda: models._decode_json(models._parse_json(body, settings, {})[0], settings,
                                        shape),
        "  orjson.loads": lambda: orjson.loads(body),
        "  np.asarray of the nested lists": lambda: np.asarray(lists),
    }
    print(f"{args.images} images, {len(body):,} bytes; best of {args.repeat} x 50 calls\n")
    print("| step | ms a body |\n|---|---|")
    for name, fn in steps.items():
        best = min(timeit.repeat(fn, number=50, repeat=args.repeat)) / 50
        print(f"| {name} | {best * 1e3:.3f} |")


if __name__ == "__main__":
    main()
