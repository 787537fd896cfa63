"""Keep library messages that are not the user's to act on out of the recipes' output.

Called once, first thing, by sft.py, evaluate.py, tools/convert_gguf.py and tools/merge.py. Each filter is narrow
(one message of one library) and says why; causes that a config can fix are fixed in the YAML instead (e.g.
`dataloader_pin_memory: false`).
"""

import logging
import os
import warnings


def setup() -> None:
    import datasets
    import torch

    if not torch.cuda.is_available():
        # DeepSpeed (imported by accelerate) otherwise warns that it "fell back" to CPU, which is what a CPU run is.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # bitsandbytes looks for an optional 4-bit CPU kernel on the hub at import; no recipe runs 4-bit on a CPU.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    # peft and TRL read the deprecated `is_gradient_checkpointing` property; no user setting causes or fixes it.
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    # Data preparation takes about a second but shows 4 bars per split; the recipes print their own data summary.
    datasets.disable_progress_bars()
