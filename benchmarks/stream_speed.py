"""Can decoding keep up with training? Images per second of StreamingImageFolder's decoding (JPEG photos
-> uint8 224x224 RGB) against minivgg's training step at 224x224, and a streamed run end to end.

The photos are generated: 500x375 RGB JPEGs (quality 90), the size of a typical cats-vs-dogs image,
written to a temporary folder. Before timing, a decoded batch must equal load_image of every file.

    PYTHONPATH=. python benchmarks/stream_speed.py                    # a few minutes on 2 cores
    PYTHONPATH=. python benchmarks/stream_speed.py --images 256 --json docs/benchmarks/stream_speed_cpu.json
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

try:
    from benchmarks import common, train_speed
except ImportError:  # run as `python benchmarks/stream_speed.py` without PYTHONPATH=.: add the repo root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from benchmarks import common, train_speed

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from minivgg.data import DataLoader, LazyImages, load_image, transforms  # noqa: E402

SIZE = 224


def write_photos(root: Path, n: int, seed: int = 0) -> list[Path]:
    """n photo-like JPEGs (smooth colour fields plus grain), 500x375, in two class folders."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        folder = root / ("cat" if i % 2 else "dog")
        folder.mkdir(parents=True, exist_ok=True)
        small = rng.integers(0, 256, (8, 10, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((500, 375), Image.BICUBIC)            # smooth regions
        a = np.asarray(img, dtype=np.int16) + rng.integers(-12, 13, (375, 500, 3))  # (375, 500, 3)
        path = folder / f"{i:05d}.jpg"
        Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def step_configs(batch: int) -> list[dict]:
    """The two 224x224 RGB networks timed: d2l's VGG-11 (width 1/4) and the laptop VGG-11-BN (width 1/8)."""
    d2l = train_speed.d2l_224_config(batch=batch, in_channels=3)
    d2l["model"]["num_classes"] = 2
    small = {"name": "VGG-11-BN (width 1/8, laptop head) @ 224x224", "key": "vgg11bn-w8-224", "batch": batch,
             "image": SIZE, "model": {"arch": "vgg11_bn", "num_classes": 2, "in_channels": 3, "width_ratio": 8,
                                      "head": "classic", "hidden": [256, 256], "pool_size": 1, "dropout": 0.0,
                                      "init": "xavier"}}
    return [d2l, small]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=96, help="photos generated (decoded per timed repeat; "
                                                              "the streamed run trains on all of them)")
    p.add_argument("--batch", type=int, default=16, help="training batch size")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", default="1,2", help="decoding thread counts to time")
    p.add_argument("--json", metavar="FILE", default=None)
    args = p.parse_args(argv)
    info = common.machine_info("cpu")
    print(common.header(info, f"{args.images} JPEG photos 500x375 -> {SIZE}x{SIZE} RGB; training batch {args.batch}"))
    rows, results = [], {"machine": info, "decode": {}, "step": {}, "streamed": {}}
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_photos(Path(tmp), args.images)
        labels = np.arange(len(paths), dtype=np.int64) % 2                   # (N,)
        idx = np.arange(len(paths))
        # the check before the timing: threads decode exactly what load_image gives
        lazy = LazyImages(paths, SIZE, 3, workers=2)
        want = np.stack([load_image(q, SIZE, 3) for q in paths[:8]])
        assert np.array_equal(lazy[idx[:8]], want), "threaded decoding differs from load_image"
        lazy.close()
        for w in (int(v) for v in args.workers.split(",")):
            src = LazyImages(paths, SIZE, 3, workers=w)
            t = common.measure(lambda: src[idx], repeats=args.repeats, warmup=1)
            src.close()
            results["decode"][f"workers={w}"] = len(paths) / t.median
            rows.append([f"decode JPEG -> uint8, {w} thread(s)", f"{len(paths) / t.median:,.0f}"])
        src = LazyImages(paths, SIZE, 3, workers=2)
        aug = transforms.Compose([transforms.RandomCrop(SIZE, padding=SIZE // 8), transforms.RandomHorizontalFlip()])
        loader = DataLoader(src, labels, batch_size=args.batch, seed=0, transform=aug,
                            normalize=((0.5,) * 3, (0.25,) * 3), prefetch=0)
        t = common.measure(lambda: [None for _ in loader], repeats=args.repeats, warmup=1)
        results["decode"]["batches"] = len(paths) / t.median
        rows.append(["batches: decode + crop/flip + normalise, 2 threads", f"{len(paths) / t.median:,.0f}"])
        for cfg in step_configs(args.batch):
            model = train_speed.build_minivgg(cfg)
            x, y = train_speed.make_batch(cfg)
            step = train_speed.minivgg_step_fn(model, x, y)
            t = common.measure(step, repeats=args.repeats, warmup=1)
            fixed = args.batch / t.median
            # streamed: the same steps fed by the prefetching loader (decoding competes for the 2 cores)
            # (the first batch, whose decoding nothing hides, is left out of the timing)
            loader.prefetch, n_steps = 2, len(loader) - 1
            t0 = None
            for xb, yb in loader:
                x[...], y[...] = xb, yb    # the step function trains on x, y: feed it this batch
                step()
                t0 = t0 or time.perf_counter()
            streamed = n_steps * args.batch / (time.perf_counter() - t0)
            results["step"][cfg["key"]], results["streamed"][cfg["key"]] = fixed, streamed
            rows.append([f"train step, {cfg['name']}", f"{fixed:,.1f}"])
            rows.append(["  the same, streamed from the folder (prefetch 2)", f"{streamed:,.1f}"])
        src.close()
    print(common.table(["what", "images/s"], rows, align="lr"))
    if args.json:
        common.write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
