"""Healing: the linearized layers' maps W and b trained toward the original model (`nbl-dist heal`, docs/method.md
§12), on one machine or a Ray cluster.

- config.py    HealConfig, the frozen options
- blocks.py    which blocks of --data train, which measure the held-out KL, which are left for `nbl-dist eval`
- losses.py    forward KL from the original and next-token cross-entropy, chunked over the vocabulary (plain torch)
- model.py     HealModel: the original held once, its K layers' linear maps beside it (TrainableMap, LoRA)
- trainer.py   Healer: optimizer, schedule, one data-parallel step, held-out KL, checkpoint state (no Ray)
- plan.py      the memory plan of a worker, from the configs alone
- ray_train.py the Ray Train loop (TorchTrainer) around Healer: workers, checkpoints, restarts, progress
- writer.py    the healed folder: the model's files with new maps, the healing in config.json and a report
- pipeline.py  heal(): check the inputs, plan, choose the blocks, train, write

It touches the calibration path only through its public functions (ShardModel, linearize_layer, heldout_blocks,
the safetensors helpers).
"""
