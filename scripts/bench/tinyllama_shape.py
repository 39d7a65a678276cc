#!/usr/bin/env python3
"""A LLaMA folder of TinyLlama-1.1B's (default) or LLaMA-7B's shape with random f16 weights, written
with numpy only (no torch): the server benchmark's second model (`cargo xtask bench-serve --model
OUT`) and a quick 7B decode measurement.

    python scripts/bench/tinyllama_shape.py OUT [--shape tinyllama|llama-7b]
        [--tokenizer datasets/tokenizers/llama/tokenizer.model]

TinyLlama/TinyLlama-1.1B-Chat-v1.0's config (GQA 32/4 heads, 22 layers, width 2048) or
lmsys/vicuna-7b-v1.5's (32 heads, 32 layers, width 4096); weights normal with std 0.02 (norms 1),
drawn tensor by tensor, written into one model.safetensors (the 7B file is 13.5 GB and needs as
much memory while it is written).
"""
import argparse
import json
import os
import shutil

import numpy as np
from safetensors.numpy import save_file

CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32000, "hidden_size": 2048,
    "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32, "num_key_value_heads": 4,
    "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu",
    "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float16",
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--tokenizer", default="datasets/tokenizers/llama/tokenizer.model")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shape", choices=["tinyllama", "llama-7b"], default="tinyllama")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    c = dict(CONFIG)
    if args.shape == "llama-7b":
        c.update({"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                  "num_attention_heads": 32, "num_key_value_heads": 32, "max_position_embeddings": 4096})
    d, inter, hd = c["hidden_size"], c["intermediate_size"], c["hidden_size"] // c["num_attention_heads"]
    kv = c["num_key_value_heads"] * hd
    shapes = {"model.embed_tokens.weight": (c["vocab_size"], d), "model.norm.weight": (d,),
              "lm_head.weight": (c["vocab_size"], d)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (d, d), p + "self_attn.k_proj.weight": (kv, d),
            p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, d),
            p + "mlp.gate_proj.weight": (inter, d), p + "mlp.up_proj.weight": (inter, d),
            p + "mlp.down_proj.weight": (d, inter),
            p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
        })
    tensors = {}
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            tensors[name] = np.ones(shape, dtype=np.float16)
        else:
            tensors[name] = (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16)
    save_file(tensors, os.path.join(args.out, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(c, f, indent=2)
    shutil.copy(args.tokenizer, os.path.join(args.out, "tokenizer.model"))
    with open(os.path.join(args.out, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "legacy": True,
                   "add_bos_token": True, "tokenizer_class": "LlamaTokenizer"}, f, indent=2)


if __name__ == "__main__":
    main()
