"""Helpers shared by the tests: references computed independently of nbl-dist (numpy/scipy float64, attention
written out by hand), known-answer models, small corpora and task files."""

import math
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
from torch import nn

from nbl_dist.model import synthetic

HERE = Path(__file__).resolve().parent

CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer.",
    "All the world's a stage, and all the men and women merely players; they have their exits.",
    "Now is the winter of our discontent made glorious summer by this sun of York.",
    "Friends, Romans, countrymen, lend me your ears; I come to bury Caesar, not to praise him.",
] * 4


def correlated_data(n, d, seed=0, mean_scale=0.0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)) @ rng.standard_normal((d, d))
    a = x @ rng.standard_normal((d, d)) * 0.3 + rng.standard_normal((n, d))
    if mean_scale:
        # Channel means 1e4 times the spread: the outlier channels of real residual streams.
        x += mean_scale * x.std(0) * rng.choice([-1, 1], d)
        a += mean_scale * a.std(0) * rng.choice([-1, 1], d)
    return x, a


def reference_moments(x, a):
    n = x.shape[0]
    mx, ma = x.mean(0), a.mean(0)
    xc, ac = x - mx, a - ma
    return n, mx, ma, xc.T @ xc, ac.T @ xc, ac.T @ ac


def assert_matches(stats, x, a, rtol):
    n, mx, ma, mxx, max_, maa = reference_moments(x, a)
    assert stats.n == n
    for got, want in [(stats.mu_x, mx), (stats.mu_a, ma), (stats.m_xx, mxx), (stats.m_ax, max_), (stats.m_aa, maa)]:
        got = got.numpy()
        assert np.abs(got - want).max() <= rtol * np.abs(want).max(), np.abs(got - want).max() / np.abs(want).max()


def research_bound(x, a):
    """The research code's formula: canonical correlations from two eigendecompositions and an SVD."""
    y = x + a
    cxx, cyy = np.cov(x.T), np.cov(y.T)
    cyx = np.cov(y.T, x.T)[: x.shape[1], x.shape[1]:]

    def inv_sqrt(c):
        w, v = scipy.linalg.eigh(c)
        return v @ np.diag(w ** -0.5) @ v.T

    rho = scipy.linalg.svd(inv_sqrt(cyy) @ cyx @ inv_sqrt(cxx), compute_uv=False)
    return float(np.sum(1 - rho ** 2))


class AffineAttention(nn.Module):
    """Stands in for self_attn: returns W h + b of its input (the layer's input norm is removed beside it)."""

    def __init__(self, w, b):
        super().__init__()
        self.w, self.b = nn.Parameter(w), nn.Parameter(b)

    def forward(self, hidden_states, **kwargs):
        return hidden_states @ self.w.T + self.b, None


def rotate_half(t):
    t1, t2 = t.chunk(2, dim=-1)
    return torch.cat((-t2, t1), dim=-1)


def manual_attention(layer, x, cos, sin, config):
    """Causal multi-head attention written out from the projections (eager, float64), independent of
    transformers' attention functions."""
    attn = layer.self_attn
    h = layer.input_layernorm(x)
    bsz, t, _ = h.shape
    hd = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    q = attn.q_proj(h).view(bsz, t, -1, hd)
    k = attn.k_proj(h).view(bsz, t, -1, hd)
    v = attn.v_proj(h).view(bsz, t, -1, hd).transpose(1, 2)
    if hasattr(attn, "q_norm"):  # Qwen3 normalises queries and keys per head
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    q, k = q * c + rotate_half(q) * s, k * c + rotate_half(k) * s
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    mask = torch.triu(torch.ones(t, t, dtype=torch.bool), 1)
    probs = scores.masked_fill(mask, float("-inf")).softmax(-1)
    out = (probs @ v).transpose(1, 2).reshape(bsz, t, -1)
    return attn.o_proj(out)


def affine_swapped_model(family, layer, dtype=torch.float64, seed=2):
    cfg = synthetic.tiny_config(family)
    model = synthetic.random_model(cfg, dtype, seed=seed)
    g = torch.Generator().manual_seed(3)
    d = cfg.hidden_size
    w0 = (torch.randn(d, d, generator=g, dtype=torch.float64) * 0.2).to(dtype)
    b0 = (torch.randn(d, generator=g, dtype=torch.float64) * 0.1).to(dtype)
    target = model.model.layers[layer]
    target.input_layernorm = nn.Identity()
    target.self_attn = AffineAttention(w0, b0)
    return model, w0, b0


TASK_YAML = """
task: nbl_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def write_task(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "nbl_tiny_mc.yaml").write_text(TASK_YAML.format(data=HERE / "harness" / "nbl_tiny_mc.jsonl"))
    return folder


def write_nbl_folder(src, out, layers, blocks, batch_size=4):
    """An nbl-dist output folder of `src` with exactly `layers` linearized: their LMMSE maps fitted in-process on
    `blocks` ((N, T) token ids) and written by the same writer as `nbl-dist calibrate` (tests that need layer 0 or
    the last layer among the linearized ones, whatever a ranking rule would pick)."""
    from nbl_dist.artifact.write import write_linearized
    from nbl_dist.calibration.local import InProcessBackend

    backend = InProcessBackend(src, torch.float32)
    backend.stream(blocks, batch_size)
    backend.fit(sorted(layers))
    write_linearized(src, out, sorted(layers), backend.get_fit)
    backend.close()
    return Path(out)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RayHead:
    """A head node started with `ray start --head` (its own process group, temp dir and ports, the dashboard on for
    `ray job submit`), as users start one; shared by the tests that submit jobs to it (tests/conftest.py ray_head).

    Attributes:
        address: the dashboard's address, for `ray job submit --address`.
        gcs: the cluster's address, for ray.init.
        env: the environment the `ray` commands run in (token authentication off, this venv's `ray` first).
        bin: the venv's bin folder.
    """

    def __init__(self):
        import os
        import subprocess
        import sys
        import tempfile

        self.bin = Path(sys.executable).parent
        self.env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
                    "PATH": f"{self.bin}:{os.environ['PATH']}"}
        self.temp_dir = temp_dir = tempfile.mkdtemp(prefix="nblray", dir="/tmp")  # short: Ray's sockets are length-limited
        gcs_port, dash_port = free_port(), free_port()
        self.gcs, self.address = f"127.0.0.1:{gcs_port}", f"http://127.0.0.1:{dash_port}"
        self.process = subprocess.Popen(
            [str(self.bin / "ray"), "start", "--head", "--block", f"--port={gcs_port}", "--num-cpus=2",
             f"--dashboard-port={dash_port}", "--dashboard-host=127.0.0.1", "--include-dashboard=true",
             f"--temp-dir={temp_dir}", "--disable-usage-stats"],
            env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    def submit(self, entry: list[str], working_dir: Path, wait: bool = True) -> tuple[int, str]:
        """`ray job submit --address ... --working-dir ... [--no-wait] -- <entry>`, retried while the head's job API
        comes up. Returns (exit status, its output)."""
        import subprocess
        import time

        command = [str(self.bin / "ray"), "job", "submit", f"--address={self.address}", f"--working-dir={working_dir}",
                   *([] if wait else ["--no-wait"]), "--", *entry]
        deadline = time.time() + 120
        while True:
            proc = subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=600)
            text = proc.stdout + proc.stderr
            if proc.returncode == 0 or time.time() > deadline or "Connection" not in text:
                return proc.returncode, text
            time.sleep(2)

    def job_id(self, output: str) -> str:
        """The job id a `ray job submit --no-wait` printed."""
        return next(w.strip("'") for line in output.splitlines() if "submitted successfully" in line
                    for w in line.split() if w.strip("'").startswith("raysubmit_"))

    def status(self, job: str, timeout: float) -> str:
        """The job's final status (SUCCEEDED, FAILED, STOPPED), or TIMEOUT."""
        import time

        from ray.job_submission import JobSubmissionClient

        client = JobSubmissionClient(self.address)
        deadline = time.time() + timeout
        while time.time() < deadline:
            status = str(client.get_job_status(job)).split(".")[-1]
            if status in ("SUCCEEDED", "FAILED", "STOPPED"):
                return status
            time.sleep(1)
        return "TIMEOUT"

    def logs(self, job: str) -> str:
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.address).get_job_logs(job)

    def stop(self, job: str) -> None:
        import subprocess

        subprocess.run([str(self.bin / "ray"), "job", "stop", f"--address={self.address}", job], env=self.env,
                       capture_output=True, timeout=120)

    def close(self) -> None:
        import os
        import shutil
        import signal

        # Every process of the cluster (GCS, raylet, dashboard, agents, workers) is in the head's process group. A
        # SIGTERM makes `ray start --block` stop them one by one with grace periods, about 30 s here; nothing of a
        # test cluster needs a graceful stop, so the whole group is killed at once and its temp dir removed.
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        shutil.rmtree(self.temp_dir, ignore_errors=True)
