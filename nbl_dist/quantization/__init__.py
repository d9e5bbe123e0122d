"""Quantization: an nbl-dist output (calibrated or healed) or an original, quantized by llm-compressor's `oneshot`
(W4A16 by default) into a compressed-tensors folder that keeps the nbl section (`nbl-dist quantize`,
docs/method.md §13).

- config.py    QuantizeConfig, the frozen options
- checks.py    every refusal before any weight is read: not a model, already quantized, unsupported family, a
               scheme vLLM cannot run on the device, a group size that does not divide a layer's width
- blocks.py    which blocks of --data calibrate (never a recorded run's), which are left for `nbl-dist eval`
- recipe.py    the llm-compressor recipe (imports llmcompressor: engine side only)
- engine.py    what runs in the llm-compressor environment: load the folder, oneshot, save compressed
- writer.py    the quantization recorded in config.json and nbl_quantize_report.json, then one publish
- pipeline.py  quantize(): check, choose the blocks, run the engine step here or as a Ray task, write

It is built on the shared pieces only (artifact, data, model, runtime), never on calibration or healing.
"""
