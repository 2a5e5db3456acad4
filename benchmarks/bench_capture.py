"""Cost of answer-row capture against a plain forward, and against eager ``output_attentions``.

A Qwen2 model with DeepSeek-R1-Distill-Qwen-1.5B's attention shape (hidden 1536, 12 query heads,
2 KV heads, head dim 128, MLP 8960) and --layers layers (4 by default; the 1.5B model has 28), random
weights in --dtype; --batch sequences of T tokens with the last 64 as the answer rows. For each T it
measures, each in a fresh process so that peak memory is the forward's own:

  (a) plain:  the sdpa forward the probe runs (``logits_to_keep=1``: no full-vocabulary logits),
  (b) rows:   the same forward with all-head answer-row capture (``reduce="rows"``: every layer,
              every head, all 64 rows kept; no early stop),
  (c) eager:  ``output_attentions=True`` with eager attention (every T x T map),

and prints time (median of --repeats) and peak memory above the loaded model, with the ratios b/a
and c/a. On a GPU the time is taken after ``torch.cuda.synchronize`` and the memory is the allocator's peak
(``torch.cuda.max_memory_allocated``); on a CPU it is the process's peak RSS. Eager runs only where its
kept T x T maps (layers x batch x heads x T x T, plus one layer's float32 softmax) fit in the free memory;
a row that does not fit, or any method that runs out of memory, is printed as "n/f" (JSON: "skipped" with
the reason) instead of stopping the run. ``--backends hf nnsight lens`` adds columns for those capture backends (``kfh_probe.backends``;
``hf`` is what ``kfh-probe sweep`` runs:
every layer, answer rows summed, built on the model before the measurement), each against (a).
Run:  python benchmarks/bench_capture.py [--device cuda] [--dtype bfloat16] [--layers 28] [--batch 1]
          [--lengths 512 1024 2048 4096 ... 32768] [--methods plain rows eager] [--backends hf nnsight lens] [--json F]
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
HEADS = 12


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize()


def _free_bytes(device: str) -> int:
    """Memory free for a forward: the CUDA allocator's free memory, or the machine's MemAvailable."""
    import torch

    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0]
    with open("/proc/meminfo") as handle:
        fields = dict(line.split(":", 1) for line in handle)
    return int(fields["MemAvailable"].split()[0]) * 1024


def eager_bytes(length: int, layers: int, batch: int, itemsize: int) -> int:
    """What eager ``output_attentions`` holds at its peak: every layer's [batch, head, T, T] map in the model's
    dtype, plus one layer's float32 softmax."""
    return batch * HEADS * length * length * (layers * itemsize + 4)


def build_model(vocab: int, device: str, layers: int = 4, dtype: str = "float32"):
    """The R1-shaped Qwen2 (``layers`` layers, random weights in ``dtype``) in eval mode, built without
    initialisation copies so that a later peak is the forward's own."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=vocab, hidden_size=1536, intermediate_size=8960, num_hidden_layers=layers,
        num_attention_heads=HEADS, num_key_value_heads=2, max_position_embeddings=32768, tie_word_embeddings=True,
    )
    with torch.device("meta"):
        model = Qwen2ForCausalLM(config).to(getattr(torch, dtype))
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


def child(method: str, length: int, repeats: int, vocab: int, device: str, layers: int = 4, dtype: str = "float32",
          batch: int = 1) -> dict:
    """One measurement in this process: peak memory of one forward, then the median time of ``repeats``; for
    eager attention whose maps cannot fit, or any forward that runs out of memory, ``{"skipped": reason}``."""
    import torch

    from kfh_probe.capture import capture_answer_attention

    row = {"method": method, "T": length, "batch": batch, "layers": layers, "dtype": dtype}
    if method == "eager":
        need, free = eager_bytes(length, layers, batch, getattr(torch, dtype).itemsize), _free_bytes(device)
        if need > 0.9 * free:
            return {**row, "skipped": f"its T x T maps need {need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free"}
    torch.manual_seed(0)
    model = build_model(vocab, device, layers, dtype)
    if method == "eager":
        model.set_attn_implementation("eager")
    ids = torch.randint(0, vocab, (batch, length), device=device)
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

    try:
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
    except torch.OutOfMemoryError:
        return {**row, "skipped": "out of memory"}
    return {**row, "seconds": statistics.median(times), "peak_bytes": peak}


def measure(method: str, length: int, args: argparse.Namespace) -> dict:
    """``child`` in a fresh process (its peak memory is then the forward's own); a child killed for memory is
    marked, any other failure stops the run."""
    command = [sys.executable, __file__, "--child", method, str(length), "--repeats", str(args.repeats),
               "--vocab", str(args.vocab), "--device", args.device, "--layers", str(args.layers),
               "--dtype", args.dtype, "--batch", str(args.batch)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode in (-9, 137):  # the kernel's out-of-memory killer
        return {"method": method, "T": length, "batch": args.batch, "layers": args.layers, "dtype": args.dtype,
                "skipped": "killed (out of memory)"}
    if done.returncode != 0:
        sys.exit(f"{method} at T={length} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _cell(row: dict, key: str, width: int, scale: float = 1.0, digits: int = 3) -> str:
    return f"{'n/f':>{width}}" if "skipped" in row else f"{row[key] / scale:{width}.{digits}f}"


def _ratio(row: dict, base: dict, key: str, width: int) -> str:
    if "skipped" in row or "skipped" in base:
        return f"{'n/f':>{width}}"
    return f"{row[key] / base[key]:{width}.3f}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096],
                        help="sequence lengths T (up to 32768, the model's context)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--vocab", type=int, default=151936, help="vocabulary (DeepSeek-R1-Distill-Qwen's by default)")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers (DeepSeek-R1-Distill-Qwen-1.5B: 28)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                        help="dtype of the weights and the forward (the answer rows are float32 regardless)")
    parser.add_argument("--batch", type=int, default=1, help="sequences per forward")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", help="also write the rows as JSON here")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                        help="which of plain, rows, eager to run (plain always runs: the ratios' base)")
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=[], help="capture backends to add as columns")
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "T"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if max(args.lengths) > 32768:
        parser.error("--lengths: at most 32768 (the model's max_position_embeddings)")
    return args


def main() -> None:
    args = parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.repeats, args.vocab, args.device, args.layers,
                               args.dtype, args.batch)))
        return
    rows = []
    methods = ["plain", *(m for m in args.methods if m != "plain"), *args.backends]
    print(f"device {args.device}; {args.layers} layers, 12 heads (2 KV), head dim 128; {args.dtype}; batch {args.batch}; "
          f"{ANSWER_ROWS} answer rows; median of {args.repeats}; n/f: does not fit")
    print(f"{'T':>5} | " + " ".join(f"{m + ' s':>9}" for m in methods) + " | "
          + " ".join(f"{m + ' MiB':>10}" for m in methods) + " | "
          + " ".join(f"{m + '/a time':>12} {m + '/a mem':>11}" for m in methods[1:]))
    for length in args.lengths:
        result = {method: measure(method, length, args) for method in methods}
        rows.extend(result.values())
        base = result["plain"]
        print(f"{length:>5} | " + " ".join(_cell(result[m], "seconds", 9) for m in methods) + " | "
              + " ".join(_cell(result[m], "peak_bytes", 10, 2**20, 1) for m in methods) + " | "
              + " ".join(f"{_ratio(result[m], base, 'seconds', 12)} {_ratio(result[m], base, 'peak_bytes', 11)}"
                         for m in methods[1:]), flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=2)


if __name__ == "__main__":
    main()
