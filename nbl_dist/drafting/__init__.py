"""`nbl-dist draft`: an EAGLE-3 draft for a target (an original or an nbl-dist output), trained on the target's own
continuations as Ray Train workers, written in the speculators format vLLM loads (docs/method.md §14).

config.py (DraftConfig), checks.py (refusals before any weight is read), data.py (prompts, the target's
continuations, the draft vocabulary), model.py (the frozen target's taps, the draft and its TTT unroll),
trainer.py (DraftTrainer, no Ray), loop.py (the loop per Ray Train worker), writer.py (the draft folder),
pipeline.py (draft(); run_draft() runs it where speculators is installed).
"""
