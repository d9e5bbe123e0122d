"""Healing: the linearized layers' maps W and b trained toward the original model (`nbl-dist heal`, docs/method.md
§12), on one machine or a Ray cluster.

- config.py    HealConfig, the frozen options
- blocks.py    which blocks of --data train, which measure the held-out KL, which are left for `nbl-dist eval`
- model.py     HealModel: the original held once, its K layers' linear maps beside it (TrainableMap, LoRA)
- trainer.py   Healer: optimizer, schedule, one data-parallel step, held-out KL, checkpoint state (no Ray)
- plan.py      the memory plan of a worker, from the configs alone
- loop.py      heal_loop, Ray Train's loop per worker around Healer: its blocks, progress, checkpoints
- writer.py    the healed folder: the model's files with new maps, the healing in config.json and a report
- pipeline.py  heal(): check the inputs, plan, choose the blocks, train, write

It is built on the shared pieces only (artifact, core.losses, data, model, runtime, training), never on calibration.
"""
