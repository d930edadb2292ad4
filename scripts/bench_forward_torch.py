"""transformers reference for benches/forward.rs: same model, prompts and batch size, f32 on CPU."""
import json, os, sys, time
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

model_dir, prompts_file = os.environ["BAKE_SMOLLM2"], os.environ["BAKE_BENCH_PROMPTS"]
batch = int(os.environ.get("BAKE_BENCH_BATCH", "16"))
tok = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
prompts = [l for l in open(prompts_file).read().split("\n") if l]
encoded = [tok(p)["input_ids"] for p in prompts]
tokens = sum(len(e) for e in encoded)

def run(chunk):
    width = max(len(e) for e in chunk)
    ids = torch.tensor([e + [0] * (width - len(e)) for e in chunk])
    mask = torch.tensor([[1] * len(e) + [0] * (width - len(e)) for e in chunk])
    model(input_ids=ids, attention_mask=mask).logits

with torch.inference_mode():
    run(encoded[:batch])
    start = time.perf_counter()
    for i in range(0, len(encoded), batch):
        run(encoded[i : i + batch])
    seconds = time.perf_counter() - start
print(json.dumps({"impl": "transformers", "prompts": len(encoded), "tokens": tokens, "seconds": round(seconds, 3),
                  "tokens_per_s": round(tokens / seconds, 1), "torch_threads": torch.get_num_threads()}))
