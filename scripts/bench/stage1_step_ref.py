#!/usr/bin/env python3
"""The reference side of a stage-1 training step at a real shape (issue 13): PyTorch + transformers,
frozen bf16 towers (CLIP vision tower, LLaMA), the mlp2x_gelu projector trained with AdamW, bf16
autocast and gradient checkpointing as LLaVA-1.5's pretrain.sh runs it (there under DeepSpeed).

    python scripts/bench/stage1_step_ref.py CLIP_DIR LLM_DIR [--text-tokens 64] [--steps 3] [--threads 2]

One sample: a random 336×336 image (576 patch tokens, CLS dropped, hidden_states[-2]) followed by
`--text-tokens` text tokens, every text token a label (the plain template's caption). Prints one
JSON line: per-step seconds, their median, the peak RSS (MiB) and the load time.
"""
import argparse
import json
import resource
import statistics
import time

import torch
from torch import nn
from transformers import CLIPVisionModel, LlamaForCausalLM


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("clip")
    ap.add_argument("llm")
    ap.add_argument("--text-tokens", type=int, default=64)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    begin = time.perf_counter()
    vision = CLIPVisionModel.from_pretrained(args.clip, torch_dtype=torch.bfloat16).eval()
    llm = LlamaForCausalLM.from_pretrained(args.llm, torch_dtype=torch.bfloat16)
    load_s = time.perf_counter() - begin
    for p in list(vision.parameters()) + list(llm.parameters()):
        p.requires_grad_(False)
    llm.gradient_checkpointing_enable()
    llm.enable_input_require_grads()
    llm.config.use_cache = False
    llm.train()
    width, hidden = vision.config.hidden_size, llm.config.hidden_size
    projector = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, hidden))
    optimizer = torch.optim.AdamW(projector.parameters(), lr=1e-3, weight_decay=0.0)

    size = vision.config.image_size
    pixels = torch.randn(1, 3, size, size, dtype=torch.bfloat16)
    ids = torch.randint(3, llm.config.vocab_size, (1, args.text_tokens))
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            with torch.no_grad():
                features = vision(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
            image = projector(features)
            text = llm.get_input_embeddings()(ids)
            embeds = torch.cat([image.to(text.dtype), text], dim=1)
            labels = torch.cat([torch.full(image.shape[:2], -100), ids], dim=1)
            loss = llm(inputs_embeds=embeds, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(projector.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"load_s": load_s, "step_s": times, "median_step_s": statistics.median(times),
                      "peak_rss_mib": peak_mib, "tokens": int(embeds.shape[1])}))


if __name__ == "__main__":
    main()
