"""Peak GPU memory per GPU for a recipe YAML under another launch, from the model config alone (no weights).

```bash
python tools/memory_estimate.py --config recipes/mistral-7b/sft_full.yaml --num_gpus 8 --zero_stage 3
python tools/memory_estimate.py --config recipes/mistral-7b/sft_qlora.yaml --max_length 4096 \
    --per_device_train_batch_size 2 --model_config MistralConfig   # offline: the config class's defaults
```
Every key of the recipe can be overridden as in sft.py; `--fsdp full_shard` is TrainingArguments' own option. The
formula is in recipes/memory.py and docs/BENCHMARKS.md. `sft.py --dry_run` prints the same estimate for the
configured launch.
"""

import os
import sys
from dataclasses import dataclass, field

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "recipes"))

import checks  # noqa: E402
import entry  # noqa: E402
import memory  # noqa: E402
import sft  # noqa: E402


@dataclass
class EstimateArguments:
    num_gpus: int | None = field(default=None, metadata={"help": "GPUs of the launch (default: this process's)."})
    zero_stage: int | None = field(default=None, metadata={"help": "DeepSpeed ZeRO stage.", "choices": [0, 1, 2, 3]})
    offload_optimizer: bool | None = field(default=None, metadata={"help": "DeepSpeed/FSDP optimizer offload."})
    offload_params: bool | None = field(default=None, metadata={"help": "DeepSpeed/FSDP parameter offload."})
    mixed_precision: bool = field(
        default=True, metadata={"help": "bf16/fp16 autocast on the GPUs (the YAML's bf16 is only valid on a GPU)."}
    )
    model_config: str | None = field(
        default=None, metadata={"help": "A model folder, hub id or config class (MistralConfig) to use instead of "
                                        "model_name_or_path's config, e.g. offline."}
    )


def estimate(script_args, training_args, model_args, data_args, recipe_args, args: EstimateArguments):
    config = memory.load_config(args.model_config) if args.model_config else None
    overrides = {k: v for k, v in vars(args).items() if v is not None and k != "model_config"}
    return memory.print_estimate(training_args, model_args, config, **overrides)


def main(argv=None):
    return entry.run(estimate, sft.make_parser(EstimateArguments), checks.range_problems, argv)


if __name__ == "__main__":
    main()
