"""SFTTrainer whose training loss scores only the trained positions through the LM head: used on CPU.

Why (docs/BENCHMARKS.md "Where a CPU step goes"): TRL's fused LM head projects only the trained positions on Triton
devices, but elsewhere it scores every position, prompt tokens included, folding each [tokens x 8192] logit tile with
plain torch ops that autocast does not reach. On the demo that was about half of every CPU training step, and the reason
bf16 autocast barely sped the step up. Here the model's own forward gets `logits_to_keep` = the positions whose next
token is trained, and the loss is cross-entropy over those logits only: the same loss, computed on 6 in 10 positions.

Evaluation, `return_outputs`, GPUs and every other case go through SFTTrainer's own `compute_loss` unchanged. The
training logs keep SFTTrainer's extra metrics (mean_token_accuracy, entropy, num_tokens), computed from the same logits.
"""

import torch
import torch.nn.functional as F
from trl import SFTTrainer


class TrainedPositionsSFTTrainer(SFTTrainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.train_tokens_seen = 0  # every token of every training batch, as SFTTrainer's num_tokens counts them
        self.pending = {"tokens": 0, "correct": 0, "entropy": 0.0}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs or not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        labels = inputs["labels"]
        targets = labels[:, 1:]
        keep = (targets != -100).any(dim=0).nonzero().squeeze(-1)  # position t is kept when token t+1 is trained
        forward = {k: v for k, v in inputs.items() if k != "labels"}
        logits = model(**forward, use_cache=False, logits_to_keep=keep).logits.float()  # [batch, kept, vocab]
        targets = targets[:, keep]
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")
        mask = targets != -100
        loss = loss / (mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # as SFTTrainer: DDP averages, the count is global
        with torch.no_grad():
            trained = logits[mask]
            log_p = trained.log_softmax(-1)
            self.pending["entropy"] += -(log_p.exp() * log_p).sum().item()
            self.pending["correct"] += (trained.argmax(-1) == targets[mask]).sum().item()
            self.pending["tokens"] += mask.sum().item()
        ids = inputs.get("input_ids")
        self.train_tokens_seen += int(inputs["attention_mask"].sum()) if "attention_mask" in inputs else ids.numel()
        return loss

    def log(self, logs, start_time=None):
        if "loss" in logs and not any(k.startswith("eval_") for k in logs):  # on every process alike
            sums = torch.tensor([self.pending["tokens"], self.pending["correct"], self.pending["entropy"],
                                 self.train_tokens_seen], dtype=torch.float64, device=self.accelerator.device)
            n, correct, entropy, seen = self.accelerator.reduce(sums, reduction="sum").tolist()  # every process
            logs.update(mean_token_accuracy=correct / max(n, 1), entropy=entropy / max(n, 1), num_tokens=seen)
            self.pending = {"tokens": 0, "correct": 0, "entropy": 0.0}
        super().log(logs, start_time)
