"""Does vLLM apply a bake's shift? vLLM's prompt log-probabilities of a base and of its bake against
transformers' (run by scripts/check-runtimes.sh in its vLLM venv; not part of CI).

Usage: vllm_runtime.py NAME BASE_DIR BAKED_DIR
Prints one JSON line: vLLM's and transformers' versions, the largest difference between vLLM and transformers on
the base and on the bake (over the top-20 tokens vLLM returns at every prompt position), how far the bake
moves those log-probabilities in each, whether vLLM's log said it ignored an o_proj or down_proj bias, and the verdict:
`applies` (vLLM moves as transformers does), `drops` (vLLM's bake equals its base) or `differs`.
"""
import json
import os
import subprocess
import sys
import tempfile

PROMPTS = [
    "Q: What happens to you if you eat watermelon seeds? A: The watermelon seeds pass through your digestive system.",
    "Q: Where did fortune cookies originate? A: Fortune cookies originated in Japan.",
    "Q: Why do veins appear blue? A: Veins appear blue because blue light does not penetrate deeply into human tissue.",
]
TOP = 20


def token_ids(folder):
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
    return [tokenizer.encode(p, add_special_tokens=False).ids for p in PROMPTS]


def vllm_logprobs(folder, ids):
    """In a process of its own: {position: {token: logprob}} per prompt, as vLLM computes them."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=folder, dtype="float32", enforce_eager=True, max_model_len=256, seed=0)
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=TOP)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in ids], params)
    return [
        [{int(t): float(lp.logprob) for t, lp in (position or {}).items()} for position in out.prompt_logprobs]
        for out in outputs
    ]


def run_vllm(folder, ids):
    """vLLM in a child process (one engine per process), its answer in a file: vLLM prints to stdout too."""
    env = {**os.environ, "VLLM_LOGGING_LEVEL": "DEBUG", "VLLM_CPU_KVCACHE_SPACE": "1"}
    with tempfile.NamedTemporaryFile(suffix=".json") as answer:
        command = [sys.executable, __file__, "--vllm", folder, json.dumps(ids), answer.name]
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"vLLM failed on {folder}:\n{done.stderr[-4000:]}")
        log = done.stdout + done.stderr
        ignored = [line for line in log.splitlines() if "Ignoring" in line and ("o_proj.bias" in line or "down_proj.bias" in line)]
        # JSON keys are strings: token ids back to ints.
        logprobs = [[{int(t): lp for t, lp in pos.items()} for pos in prompt] for prompt in json.load(open(answer.name))]
        return logprobs, ignored


def transformers_logprobs(folder, ids):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return [torch.log_softmax(model(torch.tensor([p])).logits[0], dim=-1).numpy() for p in ids]


def main():
    if sys.argv[1] == "--vllm":
        json.dump(vllm_logprobs(sys.argv[2], json.loads(sys.argv[3])), open(sys.argv[4], "w"))
        return
    import transformers
    import vllm

    name, base, baked = sys.argv[1:4]
    ids = token_ids(base)
    (v_base, _), (v_baked, ignored) = run_vllm(base, ids), run_vllm(baked, ids)
    h_base, h_baked = transformers_logprobs(base, ids), transformers_logprobs(baked, ids)
    worst = {"base": 0.0, "baked": 0.0, "move_vllm": 0.0, "move_transformers": 0.0, "move_difference": 0.0}
    for p in range(len(ids)):
        for t in range(1, len(ids[p])):
            # vLLM's position t scores token t given tokens before it: transformers' row t - 1.
            for token in set(v_base[p][t]) & set(v_baked[p][t]):
                vb, vk = v_base[p][t][token], v_baked[p][t][token]
                hb, hk = float(h_base[p][t - 1][token]), float(h_baked[p][t - 1][token])
                for key, value in [("base", vb - hb), ("baked", vk - hk), ("move_vllm", vk - vb),
                                   ("move_transformers", hk - hb), ("move_difference", (vk - vb) - (hk - hb))]:
                    worst[key] = max(worst[key], abs(value))
    noise = max(worst["base"], 1e-6)
    if worst["move_vllm"] <= noise and worst["move_transformers"] > 10 * noise:
        verdict = "drops"
    elif worst["move_difference"] <= 10 * noise + 1e-4:
        verdict = "applies"
    else:
        verdict = "differs"
    print(json.dumps({"model": name, "vllm": vllm.__version__, "transformers": transformers.__version__,
                      **{k: round(v, 6) for k, v in worst.items()}, "log_ignored_bias": len(ignored),
                      "verdict": verdict}))


if __name__ == "__main__":
    main()
