"""`geco train` against pythae's training pipeline: the same conv VAE (geco's, 1.7 M parameters),
MNIST, batch 64, one epoch (937 steps), one thread; images per second of the training loop.

    GECO_DATA=../shared/data .venv/bin/python benchmarks/vs_pythae.py [--rounds 3]

pythae is not a dependency of geco: the first run makes a virtual environment of its own in
``.bench/pythae`` (torch pinned by constraints.txt, pythae 0.1.2) and runs pythae there. Both sides
time their loop only (pythae: from its first epoch's start to its end, by a pythae callback; geco:
the loop time its summary reports, as ``vs_bare.py`` runs it), alternately, in fresh processes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from vs_bare import BATCH, STEPS, run_geco  # noqa: E402 - the same geco side as the bare-loop benchmark

VENV = REPO / ".bench" / "pythae"


def ensure_venv() -> Path:
    python = VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        pins = ["-c", str(REPO / "constraints.txt")]
        deps = ["torch==2.13.0", "pythae==0.1.2", "attrs", "pluggy"]
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", *pins, *deps], check=True)
    return python


PYTHAE = """
import json, sys, time, torch
torch.set_num_threads(1)
sys.path.insert(0, sys.argv[1])
from geco_core.data.mnist import mnist
from geco_core.models import ConvVAE
from pythae.models import VAE, VAEConfig
from pythae.models.base.base_utils import ModelOutput
from pythae.models.nn import BaseDecoder, BaseEncoder
from pythae.pipelines import TrainingPipeline
from pythae.trainers import BaseTrainerConfig
from pythae.trainers.training_callbacks import TrainingCallback

geco_vae = ConvVAE((1, 28, 28), latent_dim=16)

class Encoder(BaseEncoder):
    def __init__(self):
        super().__init__()
        self.net = geco_vae.encoder
    def forward(self, x):
        mu, log_var = self.net(x).chunk(2, dim=-1)
        return ModelOutput(embedding=mu, log_covariance=log_var)

class Decoder(BaseDecoder):
    def __init__(self):
        super().__init__()
        self.net = geco_vae.decoder
    def forward(self, z):
        return ModelOutput(reconstruction=torch.sigmoid(self.net(z)))

class Clock(TrainingCallback):
    def on_epoch_begin(self, training_config, **kw):
        self.t0 = time.perf_counter()
    def on_epoch_end(self, training_config, **kw):
        self.seconds = time.perf_counter() - self.t0

data = mnist(split="train").images[: %(n)d].float() / 255
vae_config = VAEConfig(input_dim=(1, 28, 28), latent_dim=16, reconstruction_loss="mse")
model = VAE(vae_config, encoder=Encoder(), decoder=Decoder())
config = BaseTrainerConfig(
    output_dir=sys.argv[2], per_device_train_batch_size=%(batch)d, num_epochs=1, learning_rate=1e-3, no_cuda=True
)
clock = Clock()
TrainingPipeline(training_config=config, model=model)(train_data=data, callbacks=[clock])
print(json.dumps({"images_per_s": len(data) / clock.seconds}))
"""


def run_pythae(python: Path, out: str) -> float:
    code = PYTHAE % {"n": STEPS * BATCH, "batch": BATCH}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([str(python), "-c", code, str(REPO), out], capture_output=True, text=True, env=env)
    if done.returncode:
        raise RuntimeError(done.stderr[-2000:])
    return json.loads(done.stdout.strip().splitlines()[-1])["images_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    python = ensure_venv()
    results: dict[str, list[float]] = {"pythae": [], "geco": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name in ("pythae", "geco")[:: 1 if r % 2 == 0 else -1]:
                out = str(Path(tmp) / f"{name}-{r}")
                results[name].append(run_pythae(python, out) if name == "pythae" else run_geco(out, "elbo"))
                print(f"round {r}: {name} {results[name][-1]:.0f} images/s", flush=True)
    p, g = statistics.median(results["pythae"]), statistics.median(results["geco"])
    print(f"1 thread, conv VAE (latent 16), MNIST, batch {BATCH}, {STEPS} steps; median of {args.rounds}:")
    print(f"  pythae 0.1.2 TrainingPipeline  {p:7.0f} images/s")
    print(f"  geco train (ELBO)              {g:7.0f} images/s    ratio geco / pythae {g / p:.3f}")


if __name__ == "__main__":
    main()
