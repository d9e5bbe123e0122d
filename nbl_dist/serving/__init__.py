"""Serving nbl-dist output folders: the vLLM plugin (vllm_plugin.py) and its model classes (vllm_models.py).

Nothing here is imported by calibration or by `import nbl_dist`; vLLM imports vllm_plugin through the entry point
pyproject.toml declares, and vllm_models only when it builds a model whose config.json names an NBL architecture.
"""
