"""A built wheel carries conf/ and the tokenizer asset, and works outside the source tree."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_wheel_has_configs_and_assets_and_runs(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(REPO),
         "-w", str(tmp_path / "dist")],
        check=True, capture_output=True, timeout=300,
    )
    (wheel,) = (tmp_path / "dist").glob("k2train-*.whl")
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
        check=True, capture_output=True, timeout=300,
    )
    code = (
        "import k2train, k2train.optim, k2train.kernels, k2train.data_pipeline as d; "
        "from k2train.config import load_config; from k2train.data_pipeline.loader import load_tokenizer; "
        "c = load_config(['model=k2_1t', 'experiment=long_context_32k']); "
        "t = load_tokenizer(load_config().data); "
        "assert c.model.hidden_size == 7168 and t.n_vocab == 4352; "
        "assert k2train.__file__.startswith(%r), k2train.__file__; print('ok')" % str(target)
    )
    # Run from an empty folder with only the installed wheel on the path: no source tree to fall back on.
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("ok")
