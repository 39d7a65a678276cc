#!/usr/bin/env python3
"""Check that a checkpoint directory written by this project loads in Hugging Face transformers and
gives the same logits as our `cargo xtask forward` output.

Usage: python scripts/check_hf_load.py MODEL_DIR FORWARD.safetensors PROMPT_IDS_JSON
(PROMPT_IDS_JSON: the ids with -200 for the image, as `tokenizer_image_token` makes them.)
"""
import json
import sys

import torch
from safetensors.torch import load_file
from transformers import LlavaForConditionalGeneration

model_dir, forward_file, ids_json = sys.argv[1:4]
model = LlavaForConditionalGeneration.from_pretrained(model_dir, attn_implementation="eager").eval()
ours = load_file(forward_file)
ids = json.loads(ids_json)
n = ours["image_features"].shape[0]
at = ids.index(-200)
tok = model.config.image_token_index
hf_ids = ids[:at] + [tok] * n + ids[at + 1:]
with torch.no_grad():
    logits = model(input_ids=torch.tensor([hf_ids]), pixel_values=ours["pixel_values"][None]).logits[0]
diff = (logits - ours["logits"]).abs().max().item()
print(f"max |logits difference| = {diff:.2e}")
sys.exit(0 if diff < 1e-4 else 1)
