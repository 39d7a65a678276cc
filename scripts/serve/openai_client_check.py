"""The official `openai` client against `cargo xtask serve`: one greedy question about an image,
non-streamed and streamed; prints {"text", "streamed", "usage", "models"} as JSON for the Rust test
(xtask/tests/serve.rs) to compare with `cargo xtask generate`."""

import argparse
import base64
import json

from openai import OpenAI


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--image", required=True)
    ap.add_argument("--question", required=True)
    ap.add_argument("--max-tokens", type=int, required=True)
    args = ap.parse_args()

    client = OpenAI(base_url=args.base_url, api_key="unused", max_retries=0, timeout=120)
    with open(args.image, "rb") as f:
        url = "data:image/jpeg;base64," + base64.b64encode(f.read()).decode()
    messages = [{
        "role": "user",
        "content": [
            {"type": "image_url", "image_url": {"url": url}},
            {"type": "text", "text": args.question},
        ],
    }]
    reply = client.chat.completions.create(
        model="demo", messages=messages, temperature=0, max_tokens=args.max_tokens)
    streamed = ""
    finish = None
    for chunk in client.chat.completions.create(
            model="demo", messages=messages, temperature=0, max_tokens=args.max_tokens, stream=True):
        if chunk.choices:
            streamed += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
    print(json.dumps({
        "text": reply.choices[0].message.content,
        "finish_reason": reply.choices[0].finish_reason,
        "streamed": streamed,
        "streamed_finish_reason": finish,
        "usage": reply.usage.model_dump(),
        "models": [m.id for m in client.models.list()],
    }))


if __name__ == "__main__":
    main()
