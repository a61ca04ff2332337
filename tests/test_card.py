"""The dataset card's `publish` (`reflectune publish`): what it checks in the folder and what it
says when the hub cannot be reached. The card itself is checked on the recycle flow's outputs
(tests/flows/test_recycle_methods.py)."""

import os
import subprocess
import sys


def test_publish_says_what_to_do_when_the_hub_cannot_be_reached(tmp_path):
    """No network here: the message and the folder check, not the push."""
    secret = "hf_never_print_this_token_0123456789"
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_TOKEN": secret}
    env.pop("HF_HUB_OFFLINE", None)

    def publish(folder):
        return subprocess.run([sys.executable, "-m", "reflectune.cli", "publish", str(folder), "--repo", "me/recycled"],
                              capture_output=True, text=True, env=env, timeout=120)

    run = publish(tmp_path)
    assert run.returncode == 2 and "is not a finished run's output (README.md, selected.parquet, manifest.json" \
        in run.stderr
    for name in ("README.md", "selected.parquet", "manifest.json"):
        (tmp_path / name).write_text("x")
    run = publish(tmp_path)
    assert run.returncode == 2, run.stdout
    assert "could not publish" in run.stderr and "'me/recycled' on http://127.0.0.1:9" in run.stderr
    assert "load_dataset" in run.stderr and secret not in run.stderr + run.stdout
