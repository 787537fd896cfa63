"""SFTTrainer whose training loss scores only the trained positions through the LM head: used on CPU.

Why (docs/BENCHMARKS.md "Where a CPU step goes"): TRL's fused LM head projects only the trained positions on Triton
devices, but elsewhere it scores every position, prompt tokens included, folding each [tokens x 8192] logit tile with
plain torch ops that autocast does not reach. On the demo that was about half of every CPU training step, and the reason
bf16 autocast barely sped the step up. Here the model's own forward gets `logits_to_keep` = the positions whose next
token is trained, and the loss is cross-entropy over those logits only: the same loss, computed on 6 in 10 positions.
Under bf16 autocast these logits come from a bf16 matmul (TRL's CPU head multiplies in fp32); the loss is in fp32.

Everything else goes through SFTTrainer's own `compute_loss` unchanged: evaluation, `return_outputs`, `loss_type` other
than nll, label smoothing, `compute_loss_func`, MoE aux losses, and models whose forward takes no `logits_to_keep`.
The training logs keep SFTTrainer's metrics (mean_token_accuracy, entropy: the mean of each micro-batch's ratio, as
SFTTrainer logs them; num_tokens), computed from the same logits. `eval_num_tokens` stays 0: SFTTrainer counts it
in a private attribute that only its own training loss advances.
"""

import inspect

import torch
import torch.nn.functional as F
from trl import SFTTrainer


class TrainedPositionsSFTTrainer(SFTTrainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        base = self.accelerator.unwrap_model(self.model)
        base = base.get_base_model() if hasattr(base, "get_base_model") else base  # the LoRA-wrapped model
        self.keeps_logits = "logits_to_keep" in inspect.signature(base.forward).parameters
        self.train_tokens_seen = 0  # every token of every training batch, as SFTTrainer's num_tokens counts them
        self.window = []  # (trained tokens, correct, entropy sum) of each micro-batch since the last log

    def own_loss(self, model) -> bool:
        return (model.training and self.keeps_logits and self.args.loss_type == "nll" and self.label_smoother is None
                and self.compute_loss_func is None and not self.aux_loss_enabled)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs or not self.own_loss(model):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        labels = inputs["labels"]
        targets = labels[:, 1:]
        keep = (targets != -100).any(dim=0).nonzero().squeeze(-1)  # position t is kept when token t+1 is trained
        forward = {k: v for k, v in inputs.items() if k != "labels"}
        logits = model(**forward, use_cache=False, logits_to_keep=keep).logits
        targets = targets[:, keep]
        if logits.shape[:2] != targets.shape:
            raise ValueError(f"{type(model).__name__} ignored logits_to_keep (logits {tuple(logits.shape)}, expected "
                             f"{tuple(targets.shape)} + vocab); train it on a GPU or file an issue with the model")
        log_p = logits.float().log_softmax(-1)  # once: the loss and the metrics both read it
        mask = targets != -100
        loss = F.nll_loss(log_p.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")
        count = mask.sum() if num_items_in_batch is None else num_items_in_batch
        loss = loss / torch.as_tensor(count).clamp(min=1)  # a batch with nothing trained: a finite zero
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # as SFTTrainer: DDP averages, the count is global
        with torch.no_grad():
            trained = log_p[mask]
            entropy = -(trained.exp() * trained).sum().item()
            correct = (trained.argmax(-1) == targets[mask]).sum().item()
            self.window.append((int(mask.sum()), correct, entropy))
        self.train_tokens_seen += int(inputs["attention_mask"].sum()) if "attention_mask" in inputs else labels.numel()
        return loss

    def log(self, logs, start_time=None):
        if "loss" in logs and not any(k.startswith("eval_") for k in logs) and self.own_loss(self.model):
            # one collective, reached by every process at the same logging step (Trainer logs on all of them)
            sums = torch.tensor(self.window or [(0, 0, 0.0)], dtype=torch.float64, device=self.accelerator.device)
            n, correct, entropy = self.accelerator.reduce(sums, reduction="sum").unbind(-1)
            seen = self.accelerator.reduce(torch.tensor(float(self.train_tokens_seen), dtype=torch.float64,
                                                        device=self.accelerator.device), reduction="sum")
            n = n.clamp(min=1)  # a micro-batch with nothing trained counts 0, as in SFTTrainer
            logs.update(mean_token_accuracy=(correct / n).mean().item(), entropy=(entropy / n).mean().item(),
                        num_tokens=seen.item())
            self.window = []
        super().log(logs, start_time)
