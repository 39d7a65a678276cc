#!/usr/bin/env python3
"""The reference side of `cargo xtask bench-train` and `cargo xtask bench-generate`: Hugging Face
transformers' LlavaForConditionalGeneration (CLIP + 2-layer GELU projector + LLaMA) built from
bench/small-llava.json with random weights, on the CPU with the given thread count.

  train STAGE ITERS THREADS   one training step (forward, backward, torch.optim.AdamW step) of
                              stage 1 (projector trainable) or 2 (projector + LLM), batch and
                              lengths from train_step; prints {"step_s", "peak_rss_mb"}
  generate BATCH ITERS THREADS  greedy generation: prefill (max_new_tokens=1) and decode of
                              decode.new_tokens tokens; prints {"prefill_s", "total_s", ...}

Usage: .venv/bin/python scripts/bench/small_llava_ref.py MODE ARG ITERS THREADS
"""
import json
import os
import resource
import sys
import time

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHAPE = json.load(open(os.path.join(ROOT, "bench/small-llava.json")))
IMAGE_TOKEN = 32000


def build():
    v, t = SHAPE["vision"], SHAPE["text"]
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**{k: v[k] for k in ["hidden_size", "intermediate_size", "num_hidden_layers",
                                                            "num_attention_heads", "image_size", "patch_size", "hidden_act",
                                                            "layer_norm_eps"]}, projection_dim=t["hidden_size"]),
        text_config=LlamaConfig(**{k: t[k] for k in ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                                     "num_key_value_heads", "vocab_size", "rms_norm_eps", "rope_theta",
                                                     "max_position_embeddings", "tie_word_embeddings"]}),
        image_token_index=IMAGE_TOKEN,
        projector_hidden_act="gelu",
        vision_feature_layer=SHAPE["vision_feature_layer"],
        vision_feature_select_strategy="default",
        image_seq_length=SHAPE["image_tokens"],
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(config).float()


def inputs(batch, text_tokens):
    """BOS, the image's tokens (transformers expands <image> before the model), text ids."""
    ids = []
    for b in range(batch):
        text = [3 + (i * 7919 + b * 104729) % 31000 for i in range(text_tokens - 1)]
        ids.append([1] + [IMAGE_TOKEN] * SHAPE["image_tokens"] + text)
    ids = torch.tensor(ids)
    s = SHAPE["vision"]["image_size"]
    pixels = torch.randn(batch, 3, s, s)
    return ids, pixels


def train(stage, iters):
    model = build()
    model.train()
    for p in model.parameters():
        p.requires_grad_(False)
    trainable = [model.multi_modal_projector] + ([model.language_model, model.lm_head] if stage == 2 else [])
    # transformers >= 4.52 keeps lm_head outside language_model; older versions inside it.
    params = []
    for m in trainable:
        if m is None:
            continue
        for p in m.parameters():
            p.requires_grad_(True)
            params.append(p)
    opt = torch.optim.AdamW(params, lr=2e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    ts = SHAPE["train_step"]
    ids, pixels = inputs(ts["batch_size"], ts["text_tokens_per_sample"])
    labels = ids.clone()
    labels[:, : 1 + SHAPE["image_tokens"]] = -100

    def step():
        out = model(input_ids=ids, pixel_values=pixels, labels=labels)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    return {"step_s": median_time(step, iters)}


def median_time(f, iters):
    """Median seconds of `iters` calls (the Rust side does the same): robust to the VM's noise."""
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        f()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def generate(batch, iters):
    model = build().eval()
    d = SHAPE["decode"]
    ids, pixels = inputs(batch, d["prompt_text_tokens"])
    kwargs = dict(do_sample=False, eos_token_id=None, pad_token_id=0, use_cache=True)

    def run(n):
        with torch.no_grad():
            out = model.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=n, min_new_tokens=n, **kwargs)
        assert out.shape[1] == ids.shape[1] + n
    times = {}
    for n in [1, d["new_tokens"]]:
        run(n)
        times[n] = median_time(lambda: run(n), iters)
    return {"prefill_s": times[1], "total_s": times[d["new_tokens"]], "new_tokens": d["new_tokens"],
            "prompt_tokens": ids.shape[1]}


def main():
    mode, arg, iters, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    torch.set_num_threads(threads)
    result = train(arg, iters) if mode == "train" else generate(arg, iters)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["torch"] = torch.__version__
    import transformers
    result["transformers"] = transformers.__version__
    print(json.dumps(result))


if __name__ == "__main__":
    main()
