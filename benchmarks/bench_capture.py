"""Cost of answer-row capture against a plain forward, and against eager ``output_attentions``.

A Qwen2 model with DeepSeek-R1-Distill-Qwen-1.5B's attention shape (hidden 1536, 12 query heads,
2 KV heads, head dim 128, MLP 8960) and 4 layers, random weights; T tokens with the last 64 as the
answer rows. For each T it measures, each in a fresh process so that peak memory is the forward's own:

  (a) plain:  the sdpa forward the probe runs (``logits_to_keep=1``: no full-vocabulary logits),
  (b) rows:   the same forward with all-head answer-row capture (``reduce="rows"``: every layer,
              every head, all 64 rows kept; no early stop),
  (c) eager:  ``output_attentions=True`` with eager attention (every T x T map),

and prints time (median of --repeats) and peak memory above the loaded model, with the ratios b/a
and c/a. ``--backends hf nnsight lens`` adds columns for those capture backends (``kfh_probe.backends``;
``hf`` is what ``kfh-probe sweep`` runs:
every layer, answer rows summed, built on the model before the measurement), each against (a).
Run:  python benchmarks/bench_capture.py [--device cuda] [--lengths 512 1024 2048 4096] [--backends hf nnsight lens]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

ANSWER_ROWS = 64
METHODS = ("plain", "rows", "eager")
BACKENDS = ("hf", "nnsight", "lens")  # "hf": the sweep's own path (sums over the answer rows)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize()


def _build_model(vocab: int, device: str):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=vocab, hidden_size=1536, intermediate_size=8960, num_hidden_layers=4, num_attention_heads=12,
        num_key_value_heads=2, max_position_embeddings=32768, tie_word_embeddings=True,
    )
    with torch.device("meta"):
        model = Qwen2ForCausalLM(config)
    model = model.to_empty(device=device)  # no initialisation copies: the peak stays the forward's own
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.02, generator=generator)
        for name, buffer in model.named_buffers():
            if "inv_freq" in name:
                dim = buffer.numel() * 2
                buffer.copy_(1.0 / (config.rope_parameters["rope_theta"] ** (torch.arange(0, dim, 2, device=device).float() / dim)))
    return model.eval()


def _stub_tokenizer():
    """A two-word tokenizer: the nnsight and lens wrappers want one, and the benchmark feeds token ids."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({"<unk>": 0, "<eos>": 1}, unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>")


def child(method: str, length: int, repeats: int, vocab: int, device: str) -> dict:
    """One measurement in this process: peak memory of one forward, then the median time of ``repeats``."""
    import torch

    from kfh_probe.capture import capture_answer_attention

    torch.manual_seed(0)
    model = _build_model(vocab, device)
    if method == "eager":
        model.set_attn_implementation("eager")
    ids = torch.randint(0, vocab, (1, length), device=device)
    mask = torch.ones_like(ids)
    answer = torch.zeros_like(ids, dtype=torch.bool)
    answer[:, -ANSWER_ROWS:] = True
    if method in BACKENDS:
        from kfh_probe.backends import get_backend

        backend = get_backend(method)(model, _stub_tokenizer())

    def run():
        with torch.no_grad():
            if method == "plain":
                model(input_ids=ids, attention_mask=mask, logits_to_keep=1)
            elif method == "rows":
                capture_answer_attention(model, ids, mask, answer, reduce="rows", stop_early=False)
            elif method in BACKENDS:
                backend(ids, mask, answer)
            else:
                out = model(input_ids=ids, attention_mask=mask, logits_to_keep=1, output_attentions=True)
                assert out.attentions[0].shape[-1] == length
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        base = _rss_bytes()
        run()
        peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base, 0)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return {"method": method, "T": length, "seconds": statistics.median(times), "peak_bytes": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--vocab", type=int, default=151936, help="vocabulary (DeepSeek-R1-Distill-Qwen's by default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", help="also write the rows as JSON here")
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=[], help="capture backends to add as columns")
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "T"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.repeats, args.vocab, args.device)))
        return
    rows = []
    methods = (*METHODS, *args.backends)
    print(f"device {args.device}; 4 layers, 12 heads (2 KV), head dim 128; {ANSWER_ROWS} answer rows; median of {args.repeats}")
    print(f"{'T':>5} | {'plain s':>8} {'rows s':>8} {'eager s':>8} | {'plain MiB':>9} {'rows MiB':>9} {'eager MiB':>9} | "
          f"{'b/a time':>8} {'b/a mem':>8} | {'c/a time':>8} {'c/a mem':>8}"
          + "".join(f" | {n + ' s':>9} {n + ' MiB':>11} {n + '/a time':>14} {n + '/a mem':>13}" for n in args.backends))
    for length in args.lengths:
        result = {}
        for method in methods:
            command = [sys.executable, __file__, "--child", method, str(length), "--repeats", str(args.repeats),
                       "--vocab", str(args.vocab), "--device", args.device]
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                sys.exit(f"{method} at T={length} failed:\n{done.stderr[-2000:]}")
            result[method] = json.loads(done.stdout.strip().splitlines()[-1])
        rows.extend(result.values())
        t = {m: result[m]["seconds"] for m in methods}
        mem = {m: result[m]["peak_bytes"] / 2**20 for m in methods}
        print(f"{length:>5} | {t['plain']:8.3f} {t['rows']:8.3f} {t['eager']:8.3f} | {mem['plain']:9.1f} {mem['rows']:9.1f} "
              f"{mem['eager']:9.1f} | {t['rows'] / t['plain']:8.3f} {mem['rows'] / mem['plain']:8.3f} | "
              f"{t['eager'] / t['plain']:8.3f} {mem['eager'] / mem['plain']:8.3f}"
              + "".join(f" | {t[n]:9.3f} {mem[n]:11.1f} {t[n] / t['plain']:14.3f} {mem[n] / mem['plain']:13.3f}" for n in args.backends),
              flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=2)


if __name__ == "__main__":
    main()
