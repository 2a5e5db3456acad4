"""Run under `accelerate launch` by tests/test_trl_adapter.py: each rank feeds its share of a fixed global batch
of completions through AttnPOGRPOTrainer._generate_and_score_completions; rank 0 writes every row's per-token
advantages, prompt ids and the logged AttnPO metrics to a JSON file.

    python trl_rank_check.py MODEL_DIR MANIFEST OUT_JSON PER_DEVICE_BATCH RESPONSES_JSON
"""

import json
import sys

from accelerate.utils import gather_object
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from attnpo_train.trl import AttnPOConfig, AttnPOGRPOTrainer


def main() -> None:
    model_dir, manifest, out, per_device, responses_file = sys.argv[1:6]
    spec = json.loads(open(responses_file, encoding="utf-8").read())
    per_device = int(per_device)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    args = AttnPOConfig(output_dir=f"{out}.run", attnpo_manifest=manifest, num_generations=spec["group_size"],
                        per_device_train_batch_size=per_device, max_completion_length=64, report_to="none",
                        use_cpu=True, save_strategy="no", attnpo_horizon=0)
    dataset = Dataset.from_list([{"prompt": spec["prompt"], "answer": spec["answer"]}])
    trainer = AttnPOGRPOTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir), args=args,
                                train_dataset=dataset, processing_class=tokenizer)
    rank = trainer.accelerator.process_index
    local = spec["completions"][rank * per_device : (rank + 1) * per_device]
    trainer._generate_single_turn = lambda *a, **k: ([list(c) for c in local], None)
    trainer.model.train()
    rows = [{"prompt": spec["prompt"], "answer": spec["answer"]} for _ in local]
    output = trainer._generate_and_score_completions(rows)
    advantages = gather_object([output["advantages"][b, : len(c)].tolist() for b, c in enumerate(local)])
    prompts = zip(output["prompt_ids"], output["prompt_mask"])
    prompt_ids = gather_object([ids[mask.bool()].tolist() for ids, mask in prompts])
    if trainer.accelerator.is_main_process:
        metrics = {k: v for k, v in trainer._metrics["train"].items() if k.startswith("attnpo/")}
        with open(out, "w", encoding="utf-8") as f:
            json.dump({"advantages": advantages, "prompt_ids": prompt_ids, "metrics": metrics}, f)


if __name__ == "__main__":
    main()
