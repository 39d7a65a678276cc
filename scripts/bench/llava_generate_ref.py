#!/usr/bin/env python3
"""The reference side of issue 13's scenario: PyTorch + transformers generating from an image with a
llava-hf folder (LlavaForConditionalGeneration), as a new user would.

    python scripts/bench/llava_generate_ref.py MODEL_DIR IMAGE [--new-tokens 3] [--dtype bfloat16] [--threads 2]

The prompt is "USER: <image>\\nWhat is unusual about this image? ASSISTANT:" (LLaVA-1.5's), the image
preprocessed by the folder's CLIPImageProcessor and its `<image>` expanded to one token per patch as
the llava-hf processor does; greedy decoding. Prints one JSON line: load seconds, seconds to the
first new token (image encode + prefill), total generate seconds, peak RSS (MiB).
"""
import argparse
import json
import resource
import time

import torch
from PIL import Image
from transformers import CLIPImageProcessor, LlamaTokenizer, LlavaForConditionalGeneration


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("image")
    ap.add_argument("--new-tokens", type=int, default=3)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)

    begin = time.perf_counter()
    model = LlavaForConditionalGeneration.from_pretrained(args.model, torch_dtype=dtype).eval()
    load_s = time.perf_counter() - begin
    tokenizer = LlamaTokenizer.from_pretrained(args.model)
    processor = CLIPImageProcessor.from_pretrained(args.model)
    pixels = processor(Image.open(args.image).convert("RGB"), return_tensors="pt")["pixel_values"].to(dtype)
    patches = (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2
    before, after = "USER: <image>\nWhat is unusual about this image? ASSISTANT:".split("<image>")
    ids = (tokenizer(before).input_ids + [model.config.image_token_index] * patches
           + tokenizer(after, add_special_tokens=False).input_ids)
    input_ids = torch.tensor([ids])

    first = []

    class FirstToken:
        def put(self, value):
            if len(first) < 2:  # the prompt, then the first new token
                first.append(time.perf_counter())

        def end(self):
            pass

    start = time.perf_counter()
    with torch.no_grad():
        model.generate(input_ids=input_ids, pixel_values=pixels, max_new_tokens=args.new_tokens,
                       do_sample=False, streamer=FirstToken())
    total = time.perf_counter() - start
    to_first = (first[-1] - start) if first else total
    print(json.dumps({"load_s": load_s, "prompt_tokens": len(ids), "first_token_s": to_first,
                      "generate_s": total, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


if __name__ == "__main__":
    main()
