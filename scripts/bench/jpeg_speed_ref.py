#!/usr/bin/env python3
"""PIL's JPEG decode time per image, as the reference opens images (`Image.open(p).convert("RGB")`),
on the files `cargo run -p llava-data --example jpeg_speed -- DIR PASSES` decodes.

Usage: python scripts/bench/jpeg_speed_ref.py DIR [PASSES]
"""
import io
import os
import sys
import time

from PIL import Image


def main():
    folder = sys.argv[1]
    passes = int(sys.argv[2]) if len(sys.argv) > 2 else 20
    files = []
    for root, _, names in os.walk(folder):
        for name in names:
            if name.lower().endswith((".jpg", ".jpeg")):
                with open(os.path.join(root, name), "rb") as f:
                    files.append(f.read())
    start = time.perf_counter()
    for _ in range(passes):
        for data in files:
            Image.open(io.BytesIO(data)).convert("RGB")
    ms = (time.perf_counter() - start) * 1e3 / (len(files) * passes)
    print(f"{len(files)} JPEGs x {passes}: PIL {ms:.3f} ms/image")


if __name__ == "__main__":
    main()
