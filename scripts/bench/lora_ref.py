#!/usr/bin/env python3
"""The reference side of `cargo xtask bench-lora`: one LoRA training step (forward, backward,
AdamW) of a LlamaForCausalLM with PEFT adapters on every decoder linear layer (r, alpha = 2r,
dropout 0.05), one sequence with every position supervised; f32 and bf16 weights, or with
`--bits 4` the base in bitsandbytes' NF4 (QLoRA, as the reference's finetune_qlora.sh: double
quantization) computing in f32 and bf16. Prints one JSON line per dtype with the median and every
timed step (after one warm-up).
"""
import argparse
import json
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaForCausalLM

ap = argparse.ArgumentParser()
ap.add_argument("--model", required=True)
ap.add_argument("--tokens", type=int, default=256)
ap.add_argument("--r", type=int, default=128)
ap.add_argument("--steps", type=int, default=3)
ap.add_argument("--bits", type=int, default=16, choices=(4, 16))
args = ap.parse_args()
torch.manual_seed(0)
for dtype in (torch.float32, torch.bfloat16):
    if args.bits == 4:
        from transformers import BitsAndBytesConfig

        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=dtype)
        base = LlamaForCausalLM.from_pretrained(args.model, torch_dtype=dtype, quantization_config=quant,
                                                device_map="cpu")
    else:
        base = LlamaForCausalLM.from_pretrained(args.model, torch_dtype=dtype)
    config = LoraConfig(r=args.r, lora_alpha=2 * args.r, lora_dropout=0.05, bias="none", task_type="CAUSAL_LM",
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = get_peft_model(base, config)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4, weight_decay=0.0)
    vocab = base.config.vocab_size
    ids = torch.tensor([[1 + (i * 7919) % (vocab - 1) for i in range(args.tokens)]])
    times = []
    for step in range(args.steps + 1):
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step > 0:
            times.append(time.perf_counter() - start)
    times_sorted = sorted(times)
    name = str(dtype).replace("torch.", "") + (", nf4 base (bitsandbytes)" if args.bits == 4 else "")
    print(json.dumps({"dtype": name, "median_s": times_sorted[len(times) // 2],
                      "steps_s": times, "threads": torch.get_num_threads()}), flush=True)
    del model, base, opt
