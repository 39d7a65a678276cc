#!/usr/bin/env python3
"""The reference side of `cargo xtask bench-real`: PyTorch + transformers loading a checkpoint folder of real
shape (llava-hf LlavaForConditionalGeneration or a plain LlamaForCausalLM) with the given torch_dtype, then
greedy generation of text-only prompts as ours: per batch size, prefill (generate with max_new_tokens=1) and the
whole run (max_new_tokens=NEW, EOS ignored), medians of ITERS after a warm-up. Prints one JSON line:
{"load_s", "peak_rss_mb", "weight_bytes", "rows": [[batch, prefill tok/s, decode tok/s], ...]}.

Usage: .venv/bin/python scripts/bench/real_ref.py MODEL_DIR DTYPE BATCHES PROMPT_TOKENS NEW_TOKENS ITERS THREADS
"""
import json
import os
import resource
import statistics
import sys
import time

import torch
from transformers import AutoModelForCausalLM, LlavaForConditionalGeneration


def prompt_ids(batch, tokens):
    """As bench_real.rs: BOS then (3 + i * 7919 % 31000) for i in 1..tokens."""
    row = [1] + [3 + (i * 7919) % 31000 for i in range(1, tokens)]
    return torch.tensor([row] * batch)


def main():
    model_dir, dtype, batches, prompt, new, iters, threads = sys.argv[1:8]
    prompt, new, iters = int(prompt), int(new), int(iters)
    torch.set_num_threads(int(threads))
    dtype = getattr(torch, dtype)
    config = json.load(open(os.path.join(model_dir, "config.json")))
    start = time.perf_counter()
    if config.get("model_type") == "llava":
        model = LlavaForConditionalGeneration.from_pretrained(model_dir, torch_dtype=dtype)
        decoder = model.model.language_model
    elif config.get("model_type") == "llama":
        model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=dtype)
        decoder = model.model
    else:
        raise SystemExit(f"{config.get('model_type')}: transformers has no class for this layout")
    model.eval()
    load_s = time.perf_counter() - start
    weight_bytes = sum(p.numel() * p.element_size() for p in decoder.parameters())
    weight_bytes += model.lm_head.weight.numel() * model.lm_head.weight.element_size()
    weight_bytes -= decoder.embed_tokens.weight.numel() * decoder.embed_tokens.weight.element_size()
    rows = []
    with torch.inference_mode():
        for batch in [int(b) for b in batches.split(",")]:
            ids = prompt_ids(batch, prompt)
            mask = torch.ones_like(ids)

            def run(n):
                begin = time.perf_counter()
                out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                     do_sample=False, pad_token_id=0)
                assert out.shape[1] == prompt + n
                return time.perf_counter() - begin

            run(2)  # warm-up
            prefill = statistics.median(run(1) for _ in range(iters))
            total = statistics.median(run(new) for _ in range(iters))
            rows.append([batch, batch * prompt / prefill, batch * (new - 1) / max(total - prefill, 1e-9)])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"load_s": load_s, "peak_rss_mb": peak, "weight_bytes": weight_bytes, "rows": rows}))


if __name__ == "__main__":
    main()
