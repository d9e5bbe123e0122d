"""lm-evaluation-harness tasks on an already-loaded model (a linearized one needs no trust_remote_code)."""

from __future__ import annotations

from nbl_dist.errors import MissingExtraError


def require_harness() -> None:
    """Refuse, naming the extra to install, when lm-evaluation-harness is missing (before any model is loaded)."""
    try:
        import lm_eval  # noqa: F401
    except ImportError as e:
        raise MissingExtraError(f"--tasks needs lm-evaluation-harness, which is not installed ({e}); install the "
                                "eval extra: pip install 'nbl-dist[eval]'") from None


def harness_eval(model, tokenizer, tasks: list[str], include_path: str | None = None, limit: float | None = None,
                 num_fewshot: int | None = None, batch_size: int = 4, output_path: str | None = None,
                 model_name: str | None = None) -> dict:
    """Run lm-evaluation-harness tasks on an already-loaded model (the model object is passed in, so a
    linearized model needs no trust_remote_code).

    Args:
        model, tokenizer: the loaded model (on its device) and its tokenizer.
        tasks: harness task names.
        include_path: a folder of extra task YAMLs (local data).
        limit, num_fewshot, batch_size: the harness's options of those names.
        output_path: where the harness writes its results file, as `lm_eval --output_path` does
            (OUTPUT/<model name>/results_<time>.json, or OUTPUT_<time>.json for a .json OUTPUT).
        model_name: the model's name in that file and folder (default: a random id).
    Returns:
        task -> {metric: value}.
    Raises:
        MissingExtraError: lm-evaluation-harness is not installed (the `eval` extra).
    """
    require_harness()
    import lm_eval
    from lm_eval.loggers import EvaluationTracker
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    device = str(next(model.parameters()).device)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, device=device, batch_size=batch_size)
    manager = TaskManager(include_path=include_path) if include_path else TaskManager()
    tracker = EvaluationTracker(output_path=output_path) if output_path else None
    out = lm_eval.simple_evaluate(model=lm, model_args={"pretrained": model_name} if model_name else None,
                                  tasks=tasks, task_manager=manager, limit=limit, num_fewshot=num_fewshot,
                                  log_samples=False, bootstrap_iters=0, evaluation_tracker=tracker)
    if tracker is not None:
        tracker.save_results_aggregated(results=out, samples=None)
    return {task: {k: v for k, v in res.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            for task, res in out["results"].items()}
