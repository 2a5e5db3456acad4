"""Train a policy with AttnPO on TRL's GRPO engine.

    accelerate launch --config_file docs/trl/accelerate_zero3.yaml examples/train_attnpo_trl.py \
        --model path/to/policy --data prompts.jsonl --attnpo_manifest manifest.json --output_dir runs/attnpo-trl

``--data`` is a JSONL file of ``{"prompt": str, "answer": str or number, "id": optional}`` rows (the format
of ``attnpo-train run --data``; the prompt is the exact model input text). Every ``AttnPOConfig`` field
(TRL's ``GRPOConfig`` plus the ``attnpo_*`` settings) is a command-line flag. At the end the final model
and tokenizer are saved to ``OUTPUT_DIR/final`` and the logged metrics to ``OUTPUT_DIR/trainer_state.json``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser

from attnpo_train.data import load_prompts
from attnpo_train.trl import AttnPOConfig, AttnPOGRPOTrainer
from kfh_probe import model_folder


@dataclass
class ScriptArguments:
    model: str = field(metadata={"help": "Local Hugging Face model folder or .gguf file of the policy."})
    data: str = field(metadata={"help": "JSONL file of {prompt, answer} rows."})
    dtype: str = field(default="auto", metadata={"help": "Weights dtype: auto, float32, bfloat16 or float16."})


def main() -> None:
    script, args = HfArgumentParser((ScriptArguments, AttnPOConfig)).parse_args_into_dataclasses()
    folder = model_folder(script.model)  # a GGUF file is dequantized once into a cached folder
    dataset = Dataset.from_list([{"prompt": p.text, "answer": p.answer} for p in load_prompts(script.data)])
    tokenizer = AutoTokenizer.from_pretrained(folder, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=script.dtype)
    trainer = AttnPOGRPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
    trainer.save_state()
    trainer.save_model(f"{args.output_dir}/final")
    if trainer.accelerator.is_main_process:
        tokenizer.save_pretrained(f"{args.output_dir}/final")


if __name__ == "__main__":
    main()
