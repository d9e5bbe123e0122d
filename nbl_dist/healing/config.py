"""HealConfig: the frozen, typed options of `nbl-dist heal`, built once at the entry point (CLI, YAML file,
jobs/heal.py, Python API) by `HealConfig.from_dict` (nbl_dist/options.py's Options: unknown keys refused naming the
nearest option, values converted to their declared types, choices, minimums and conflicts checked) before any
tokenizer or weight is read. Each field carries its command-line help, from which the `heal` flags are built.
"""

from __future__ import annotations

import dataclasses
import typing

from nbl_dist.errors import ConfigError
from nbl_dist.options import DEVICES, DTYPES, Options, check_memory_sizes, option

LOSSES = ("kl", "ce", "kl+ce")
SCHEDULES = ("cosine", "linear", "constant")
SHARDING = ("auto", "on", "off")
# The default budget, in training tokens: SmolLM2-135M with K = 8 heals in about 22 minutes on the 2-CPU
# development machine at this budget (benchmarks/RESULTS.md, healing).
DEFAULT_TOKENS = 262_144


@dataclasses.dataclass(frozen=True)
class HealConfig(Options):
    REQUIRED: typing.ClassVar[tuple[str, ...]] = ("model", "baseline", "data", "out")

    model: str = option(help="the nbl-dist output folder to heal (nbl-dist calibrate's --out)")
    baseline: str = option(help="the original checkpoint it was linearized from (the teacher)")
    data: str = option(help="training text: any form calibrate reads; blocks the calibration recorded, and those "
                            "eval will score, are never trained on")
    out: str = option(help="the healed output folder (same format as --model)")
    tokens: int | None = option(None, minimum=1, group="budget",
                                help=f"training tokens (default {DEFAULT_TOKENS:,} when --steps is not given)")
    steps: int | None = option(None, minimum=1, group="budget", help="optimizer steps (instead of --tokens)")
    seq_len: int | None = option(None, minimum=2, help="tokens per block (default: the calibration's)")
    batch_size: int = option(4, minimum=1, help="blocks per optimizer step, over all workers (the global batch)")
    lr: float = option(6e-5, minimum=0, help="peak learning rate (AdamW)")
    schedule: str = option("cosine", choices=SCHEDULES, help="learning-rate schedule after the warm-up")
    warmup: float = option(0.05, minimum=0, help="share of the steps that warm the learning rate up linearly")
    weight_decay: float = option(0.0, minimum=0, help="AdamW weight decay (it pulls W towards 0: attention-drop)")
    loss: str = option("kl", choices=LOSSES, help="kl: forward KL divergence from the original's next-token "
                                                  "distribution; ce: next-token cross-entropy on the text; kl+ce: "
                                                  "their sum")
    lora_rank: int | None = option(None, minimum=1, help="train a rank-R update B A of each W instead of W and b "
                                                         "(the research recipe: 32), merged into W on save")
    lora_alpha: float | None = option(None, minimum=0, help="LoRA scale numerator: B A is scaled by alpha / rank "
                                                            "(default 2 x rank)")
    kl_samples: int = option(8, minimum=1, help="held-out blocks on which the KL divergence from the original is "
                                                "measured before, during and after")
    eval_every: int | None = option(None, minimum=1, help="steps between held-out KL measurements (default: 10 "
                                                          "in a run)")
    reserve_eval: int = option(32, minimum=0, help="blocks after the calibration's left for `nbl-dist eval` "
                                                   "(its default --samples): never trained on")
    seed: int = option(0, minimum=0, help="order of the training blocks")
    workers: int = option(1, minimum=1, help="Ray Train workers (data parallel; one GPU each on a GPU cluster)")
    cpus_per_worker: float | None = option(None, minimum=0, help="CPUs per worker (default: the machine's CPUs "
                                                                 "over the workers on CPU, 1 on GPUs)")
    shard_weights: str = option("auto", choices=SHARDING,
                                help="shard the frozen decoder layers over the workers with FSDP2, each holding 1/W "
                                     "of them and gathering a layer while it runs (auto: when one worker cannot "
                                     "hold the whole model and there are several)")
    device: str = option("auto", choices=DEVICES, help="the workers' device (auto: one GPU per worker when the "
                                                      "cluster has GPUs, else CPU)")
    dtype: str = option("auto", choices=DTYPES, help="the frozen weights' dtype (auto: float32 on CPU, the "
                                                     "checkpoint's on GPU); the trained maps and Adam stay float32")
    device_memory: str | None = option(None, help="memory per worker, e.g. 80GiB (default: the GPU's, or RAM over "
                                                  "the workers on CPU); the plan is checked against it first")
    address: str | None = option(None, help="Ray cluster to join (default: the cluster of the Ray job it runs in, "
                                            "else a local Ray started in this process)")
    storage: str | None = option(None, help="Ray Train's storage for checkpoints, shared by every node (default: "
                                            ".OUT.heal beside --out)")
    checkpoint_every: int = option(20, minimum=1, help="steps between checkpoints")
    max_failures: int = option(3, minimum=0, help="worker failures survived (each resumes from the last checkpoint)")
    text_column: str = option("text", help="text column of tabular data")
    data_config: str | None = option(None, help="configuration of a hub dataset --data")
    data_split: str | None = option(None, help="split of a hub dataset or saved DatasetDict --data")
    overwrite: bool = option(False, help="replace a non-empty --out")

    def check(self) -> None:
        check_memory_sizes(self, ("device_memory",))
        if self.tokens is not None and self.steps is not None:
            raise ConfigError("--tokens and --steps both given; keep one: the budget in training tokens, or in "
                              "optimizer steps of --batch-size blocks")
        if self.lora_alpha is not None and self.lora_rank is None:
            raise ConfigError("--lora-alpha scales a LoRA update: give --lora-rank R too, or drop --lora-alpha")
        if self.batch_size % self.workers:
            raise ConfigError(f"--batch-size {self.batch_size} (the global batch) does not split evenly over "
                              f"--workers {self.workers}: make it a multiple of the workers")
        if self.shard_weights == "on" and self.workers < 2:
            raise ConfigError("--shard-weights on splits the frozen weights over the workers: give --workers 2 or "
                              "more, or drop it")
        if self.warmup >= 1:
            raise ConfigError(f"--warmup is a share of the steps, below 1; got {self.warmup}")

    @property
    def alpha(self) -> float | None:
        """The LoRA scale numerator (2 x rank unless given); None without LoRA."""
        if self.lora_rank is None:
            return None
        return self.lora_alpha if self.lora_alpha is not None else 2.0 * self.lora_rank
