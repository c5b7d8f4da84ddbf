"""The cluster launch scripts under launch/: syntax, dry runs, manifests, bad input.

No cluster tool is needed or ever reached: every script runs with a PATH whose
first directory holds recording fakes of gcloud, kubectl, sbatch, srun, scontrol
and hessian-spectrum. Each fake appends {"tool", "argv", "stdin", "env"} to a
JSON-lines file, so a test can check both what a real run would have called and
that a dry run called nothing.
"""

import json
import os
import pathlib
import shlex
import subprocess
import sys
import textwrap

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
LAUNCH = ROOT / "launch"
TPU_VM = LAUNCH / "tpu_vm.sh"
GKE_SUBMIT = LAUNCH / "gke" / "submit.sh"
GKE_CHECKPOINTS = LAUNCH / "gke" / "submit_checkpoints.sh"
SLURM_SUBMIT = LAUNCH / "slurm" / "submit.sh"
SLURM_CHECKPOINTS = LAUNCH / "slurm" / "submit_checkpoints.sh"
SPECTRUM_SBATCH = LAUNCH / "slurm" / "spectrum.sbatch"
CHECKPOINTS_SBATCH = LAUNCH / "slurm" / "checkpoints.sbatch"
SCRIPTS = sorted(LAUNCH.rglob("*.sh")) + sorted(LAUNCH.rglob("*.sbatch"))
# Scripts users run (not sourced helpers, not launch/local.sh, which others own).
ENTRY_POINTS = [TPU_VM, GKE_SUBMIT, GKE_CHECKPOINTS, SLURM_SUBMIT, SLURM_CHECKPOINTS,
                SPECTRUM_SBATCH, CHECKPOINTS_SBATCH]
# The environment variables the scripts read, removed so the host's cannot leak in.
SCRIPT_ENVIRONMENT = (
    "TPU_NAME", "ZONE", "PROJECT_ID", "HESSIAN_SPECTRUM", "HESSIAN_IMAGE", "NUM_WORKERS",
    "JOB_NAME", "OUTPUT_ROOT", "HESSIAN_TF_CLUSTER", "HESSIAN_TF_PORT", "TF_CONFIG",
    "PYTHON", "CUDA_VISIBLE_DEVICES",
)

_FAKE = """\
#!{python}
import json, os, subprocess, sys
tool = os.path.basename(sys.argv[0])
stdin = "" if sys.stdin is None or sys.stdin.isatty() else sys.stdin.read()
record = {{"tool": tool, "argv": sys.argv[1:], "stdin": stdin,
          "env": {{k: v for k, v in os.environ.items()
                  if k in ("TF_CONFIG", "SLURM_PROCID", "CUDA_VISIBLE_DEVICES")}}}}
with open(os.environ["FAKE_CALLS"], "a") as calls:
    calls.write(json.dumps(record) + "\\n")
if tool == "scontrol":  # scontrol show hostnames LIST
    print("\\n".join(os.environ["FAKE_HOSTS"].split(",")))
elif tool == "srun":  # srun [--options] PROGRAM...: one process per task
    words, num_tasks = sys.argv[1:], 1
    while words and words[0].startswith("-"):
        option = words.pop(0)
        if option.startswith("--ntasks="):
            num_tasks = int(option.split("=", 1)[1])
    codes = [subprocess.run(words, env=dict(os.environ, SLURM_PROCID=str(i))).returncode
             for i in range(num_tasks)]
    sys.exit(max(codes))
"""


class Launcher:
    """Runs launch scripts against the fakes and reads back their calls."""

    def __init__(self, tmp_path):
        self.bin = tmp_path / "bin"
        self.bin.mkdir()
        self.calls_file = tmp_path / "calls.jsonl"
        for tool in ("gcloud", "kubectl", "sbatch", "srun", "scontrol", "hessian-spectrum"):
            path = self.bin / tool
            path.write_text(_FAKE.format(python=sys.executable))
            path.chmod(0o755)
        self.env = {k: v for k, v in os.environ.items()
                    if k not in SCRIPT_ENVIRONMENT and not k.startswith("SLURM_")}
        self.env.update(PATH=f"{self.bin}{os.pathsep}{os.environ['PATH']}",
                        FAKE_CALLS=str(self.calls_file))

    def run(self, script, *args, env=None, check=True):
        result = subprocess.run(
            ["bash", str(script), *map(str, args)], capture_output=True, text=True,
            env={**self.env, **(env or {})}, cwd=ROOT, timeout=60,
        )
        if check:
            assert result.returncode == 0, result.stderr
        return result

    def calls(self, tool=None):
        if not self.calls_file.exists():
            return []
        calls = [json.loads(line) for line in self.calls_file.read_text().splitlines()]
        return [c for c in calls if tool is None or c["tool"] == tool]


@pytest.fixture
def launcher(tmp_path):
    return Launcher(tmp_path)


def write_list(tmp_path, text, name="checkpoints.txt"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


THREE_CHECKPOINTS = """\
    # sweep over epochs
    runs/seed0/epoch_10.keras

    gs://bucket/runs/seed0/epoch_20.keras
      runs/seed0/saved_epoch_30/  \r
"""
THREE_PATHS = [
    "runs/seed0/epoch_10.keras",
    "gs://bucket/runs/seed0/epoch_20.keras",
    "runs/seed0/saved_epoch_30/",
]
TRICKY = "--dataset=npz:data dir/it's.npz"  # a space and a quote survive every layer


def manifests(stdout):
    return [doc for doc in yaml.safe_load_all(stdout) if doc is not None]


# --- every script ---------------------------------------------------------------


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(LAUNCH)))
def test_bash_syntax(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("script", ENTRY_POINTS, ids=lambda p: str(p.relative_to(LAUNCH)))
def test_header_and_help(launcher, script):
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "\nset -euo pipefail\n" in text
    assert os.access(script, os.X_OK)
    result = launcher.run(script, "--help")
    assert "hessian-spectrum" in result.stdout
    assert launcher.calls() == []


# --- Cloud TPU VM -----------------------------------------------------------------


def test_tpu_vm_dry_run_prints_the_gcloud_command(launcher):
    args = ["--name", "my-tpu", "--zone", "us-central2-b", "--project", "my-project",
            "--", "--model=gs://bucket/model.keras", TRICKY]
    result = launcher.run(TPU_VM, "--dry-run", *args)
    assert launcher.calls() == []
    assert result.stdout.count("\n") == 1
    words = shlex.split(result.stdout)
    assert words[:8] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu",
                         "--zone=us-central2-b", "--project=my-project"]
    # TensorFlow drives a pod slice from one client, on worker 0.
    assert words[8] == "--worker=0"
    assert words[9].startswith("--command=")
    remote = shlex.split(words[9][len("--command="):])
    assert "TPU_LOAD_LIBRARY=0" in remote
    program = remote[remote.index("&&") + 1:]
    assert program == ["hessian-spectrum", "--strategy=tpu", "--tpu=my-tpu",
                       "--model=gs://bucket/model.keras", TRICKY]

    launcher.run(TPU_VM, *args)  # the same command, really run (against the fake)
    [call] = launcher.calls()
    assert [call["tool"], *call["argv"]] == words


def test_tpu_vm_single_host_and_environment(launcher):
    result = launcher.run(TPU_VM, "--single-host", "--worker=all", "--env", "A=b c",
                          "--dry-run", "--output_dir=out", env={"TPU_NAME": "t1", "ZONE": "z"})
    words = shlex.split(result.stdout)
    assert words[5:8] == ["t1", "--zone=z", "--worker=all"]
    remote = shlex.split(words[-1][len("--command="):])
    assert "A=b c" in remote and "TPU_LOAD_LIBRARY=0" not in remote
    assert remote[remote.index("&&") + 1:] == [
        "hessian-spectrum", "--strategy=tpu", "--tpu=local", "--output_dir=out"]


# --- GKE: TFJob ---------------------------------------------------------------------


def test_tfjob_dry_run_renders_a_multi_worker_tfjob(launcher):
    args = ["--image", "registry.example/hessian-tf:1", "--workers", "3",
            "--gpus-per-worker", "2", "--accelerator", "nvidia-l4", "--name", "spectrum-a"]
    flags = ["--model=gs://bucket/model.keras", "--output_dir=gs://bucket/out", TRICKY]
    result = launcher.run(GKE_SUBMIT, *args, "--dry-run", "--", *flags)
    assert launcher.calls() == []
    assert result.stdout.startswith(
        "# dry run: this manifest would be piped to: kubectl apply -f -\n")
    [job] = manifests(result.stdout)
    assert job["apiVersion"] == "kubeflow.org/v1" and job["kind"] == "TFJob"
    assert job["metadata"]["name"] == "spectrum-a"
    worker = job["spec"]["tfReplicaSpecs"]["Worker"]
    assert worker["replicas"] == 3
    pod = worker["template"]["spec"]
    [container] = pod["containers"]
    assert container["name"] == "tensorflow"  # where the operator puts TF_CONFIG
    assert container["image"] == "registry.example/hessian-tf:1"
    assert container["command"] == ["hessian-spectrum"]
    assert container["args"] == ["--strategy=multi_worker", *flags]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-l4"}
    assert container["volumeMounts"] == [] and pod["volumes"] == []

    launcher.run(GKE_SUBMIT, *args, *flags)
    [call] = launcher.calls()
    assert call["tool"] == "kubectl" and call["argv"] == ["apply", "-f", "-"]
    assert manifests(call["stdin"]) == [job]


def test_tfjob_on_a_pvc(launcher):
    result = launcher.run(GKE_SUBMIT, "--image=img", "--pvc=results-claim", "--namespace=ml",
                          "--dry-run", "--output_dir=/results/run1")
    assert "kubectl apply --namespace=ml -f -" in result.stdout.splitlines()[0]
    [job] = manifests(result.stdout)
    assert job["spec"]["tfReplicaSpecs"]["Worker"]["replicas"] == 2
    pod = job["spec"]["tfReplicaSpecs"]["Worker"]["template"]["spec"]
    assert pod["volumes"] == [{"name": "results",
                               "persistentVolumeClaim": {"claimName": "results-claim"}}]
    assert pod["containers"][0]["volumeMounts"] == [{"name": "results", "mountPath": "/results"}]


# --- GKE: checkpoints as an Indexed Job ----------------------------------------------


def test_checkpoints_job_dry_run_renders_an_indexed_job(launcher, tmp_path):
    checkpoints = write_list(tmp_path, THREE_CHECKPOINTS)
    result = launcher.run(GKE_CHECKPOINTS, "--list", checkpoints, "--image=img",
                          "--output-root=gs://bucket/spectra/", "--parallelism=2",
                          "--name=sweep", "--dry-run", "--", "--dataset=digits")
    assert launcher.calls() == []
    config_map, job = manifests(result.stdout)
    assert config_map["kind"] == "ConfigMap"
    assert config_map["metadata"]["name"] == "sweep-checkpoints"
    assert config_map["data"]["checkpoints.txt"].splitlines() == THREE_PATHS
    assert job["apiVersion"] == "batch/v1" and job["kind"] == "Job"
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == 3 and spec["parallelism"] == 2
    pod = spec["template"]["spec"]
    [container] = pod["containers"]
    assert container["args"] == ["--dataset=digits"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["OUTPUT_ROOT"] == "gs://bucket/spectra"
    [list_volume] = pod["volumes"]
    assert list_volume["configMap"]["name"] == "sweep-checkpoints"
    assert container["volumeMounts"][0]["mountPath"] == os.path.dirname(env["CHECKPOINT_LIST"])

    # Run each pod's command as Kubernetes would, against the ConfigMap's list.
    mounted = tmp_path / "mounted.txt"
    mounted.write_text(config_map["data"]["checkpoints.txt"])
    for index, path in enumerate(THREE_PATHS):
        subprocess.run(
            container["command"] + container["args"], check=True, cwd=tmp_path,
            env={**launcher.env, "JOB_COMPLETION_INDEX": str(index),
                 "CHECKPOINT_LIST": str(mounted), "OUTPUT_ROOT": env["OUTPUT_ROOT"]},
            capture_output=True,
        )
        call = launcher.calls("hessian-spectrum")[-1]
        name = os.path.basename(path.rstrip("/"))
        assert call["argv"] == [f"--model={path}", f"--output_dir=gs://bucket/spectra/{name}",
                                "--dataset=digits"]
    missing = subprocess.run(container["command"], env={
        **launcher.env, "JOB_COMPLETION_INDEX": "3", "CHECKPOINT_LIST": str(mounted),
        "OUTPUT_ROOT": "x"}, capture_output=True, text=True)
    assert missing.returncode == 2 and "no line 4" in missing.stderr


# --- Slurm: one spectrum over several nodes ------------------------------------------


def test_slurm_dry_run_prints_the_sbatch_command(launcher):
    args = ["--nodes", "3", "--gpus-per-node", "4", "--partition", "gpu", "--time", "02:00:00",
            "--sbatch-arg=--exclusive"]
    flags = ["--model=runs/model.keras", TRICKY]
    result = launcher.run(SLURM_SUBMIT, *args, "--dry-run", "--", *flags)
    assert launcher.calls() == []
    words = shlex.split(result.stdout)
    assert words[0] == "sbatch"
    assert {"--nodes=3", "--ntasks-per-node=1", "--gpus-per-node=4", "--partition=gpu",
            "--time=02:00:00", "--exclusive",
            "--export=ALL,HESSIAN_TF_CLUSTER=tf_config"} <= set(words)
    script = words.index(str(SPECTRUM_SBATCH))
    assert words[script + 1:] == flags

    launcher.run(SLURM_SUBMIT, *args, *flags)
    [call] = launcher.calls()
    assert [call["tool"], *call["argv"]] == words


SLURM_JOB = {"SLURM_JOB_ID": "4321", "SLURM_JOB_NUM_NODES": "3",
             "SLURM_JOB_NODELIST": "node[9-11]", "FAKE_HOSTS": "node9,node10,node11"}


def test_spectrum_sbatch_gives_each_task_its_tf_config(launcher):
    launcher.run(SPECTRUM_SBATCH, "--model=m.keras", TRICKY, env=SLURM_JOB)
    [srun] = launcher.calls("srun")
    assert {"--nodes=3", "--ntasks=3", "--ntasks-per-node=1", "--kill-on-bad-exit=1"} <= set(
        srun["argv"])
    tasks = launcher.calls("hessian-spectrum")
    assert len(tasks) == 3
    port = 12000 + 4321 % 20000
    for procid, task in enumerate(tasks):
        assert task["argv"] == ["--strategy=multi_worker", "--model=m.keras", TRICKY]
        tf_config = json.loads(task["env"]["TF_CONFIG"])
        # Slurm's node order (node9 before node10), which is how it numbers tasks.
        assert tf_config == {"cluster": {"worker": [f"node9:{port}", f"node10:{port}",
                                                    f"node11:{port}"]},
                             "task": {"type": "worker", "index": procid}}


def test_spectrum_sbatch_slurm_mode_leaves_the_cluster_to_the_binary(launcher):
    env = {**SLURM_JOB, "FAKE_HOSTS": "node1,node2,node3", "HESSIAN_TF_CLUSTER": "slurm",
           "TF_CONFIG": '{"stale": 1}'}
    launcher.run(SPECTRUM_SBATCH, "--model=m.keras", env=env)
    tasks = launcher.calls("hessian-spectrum")
    assert [t["argv"] for t in tasks] == [["--strategy=multi_worker", "--model=m.keras"]] * 3
    assert all("TF_CONFIG" not in t["env"] for t in tasks)

    # TF's SlurmClusterResolver sorts hosts by name: node10 would become worker 0.
    result = launcher.run(SPECTRUM_SBATCH, env={**env, "FAKE_HOSTS": "node9,node10,node11"},
                          check=False)
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1
    assert "tf_config" in result.stderr


# --- Slurm: checkpoints as an array ---------------------------------------------------


def test_checkpoints_array_covers_the_list(launcher, tmp_path):
    checkpoints = write_list(tmp_path, THREE_CHECKPOINTS)
    result = launcher.run(SLURM_CHECKPOINTS, "--list", checkpoints, "--output-root",
                          "results/sweep", "--gpus", "1", "--dry-run", "--", "--dataset=digits")
    assert launcher.calls() == []
    words = shlex.split(result.stdout)
    assert words[0] == "sbatch" and "--array=0-2" in words and "--gpus-per-node=1" in words
    script = words.index(str(CHECKPOINTS_SBATCH))
    task_args = words[script + 1:]
    assert f"--list={checkpoints}" in task_args and "--count=3" in task_args

    # Each array task, as Slurm would start it, picks its own line.
    for index, path in enumerate(THREE_PATHS):
        launcher.run(CHECKPOINTS_SBATCH, *task_args, env={"SLURM_ARRAY_TASK_ID": str(index)})
        call = launcher.calls("hessian-spectrum")[-1]
        name = os.path.basename(path.rstrip("/"))
        assert call["argv"] == [f"--model={path}", f"--output_dir=results/sweep/{name}",
                                "--dataset=digits"]
    beyond = launcher.run(CHECKPOINTS_SBATCH, *task_args, env={"SLURM_ARRAY_TASK_ID": "3"},
                          check=False)
    assert beyond.returncode == 2 and len(beyond.stderr.splitlines()) == 1

    checkpoints.write_text("only/one.keras\n")  # the list changed after submission
    changed = launcher.run(CHECKPOINTS_SBATCH, *task_args, env={"SLURM_ARRAY_TASK_ID": "0"},
                           check=False)
    assert changed.returncode == 2 and "resubmit" in changed.stderr

    launcher.run(SLURM_CHECKPOINTS, "--list", checkpoints, "--max-parallel=4")
    [sbatch] = launcher.calls("sbatch")
    assert "--array=0-0%4" in sbatch["argv"]


# --- bad input: one line on stderr, non-zero exit, nothing called ------------------


GKE = ["--image=img", "--output-root=gs://b/o"]
BAD_INPUTS = {  # {empty}, {good}, {twins}, {missing}: list files made in tmp_path
    "tpu-no-name": (TPU_VM, ["--zone=z", "--dry-run"]),
    "tpu-no-zone": (TPU_VM, ["--name=t", "--dry-run"]),
    "tpu-bad-worker": (TPU_VM, ["--name=t", "--zone=z", "--worker=first", "--dry-run"]),
    "tpu-strategy-passed": (TPU_VM, ["--name=t", "--zone=z", "--dry-run", "--strategy=tpu"]),
    "tpu-option-after-flags": (TPU_VM, ["--name=t", "--zone=z", "--model=m", "--dry-run"]),
    "tpu-option-without-value": (TPU_VM, ["--dry-run", "--name"]),
    "tfjob-no-image": (GKE_SUBMIT, ["--dry-run", "--output_dir=gs://b/o"]),
    "tfjob-zero-workers": (GKE_SUBMIT, ["--image=i", "--workers=0", "--dry-run",
                                        "--output_dir=gs://b/o"]),
    "tfjob-workers-not-a-number": (GKE_SUBMIT, ["--image=i", "--workers=two", "--dry-run",
                                                "--output_dir=gs://b/o"]),
    "tfjob-no-output-dir": (GKE_SUBMIT, ["--image=i", "--dry-run"]),
    "tfjob-output-in-pod": (GKE_SUBMIT, ["--image=i", "--dry-run", "--output_dir=/tmp/o"]),
    "tfjob-output-off-pvc": (GKE_SUBMIT, ["--image=i", "--pvc=c", "--dry-run",
                                          "--output_dir=/data/o"]),
    "tfjob-bad-name": (GKE_SUBMIT, ["--image=i", "--name=Bad_Name", "--dry-run",
                                    "--output_dir=gs://b/o"]),
    "tfjob-strategy-passed": (GKE_SUBMIT, ["--image=i", "--dry-run", "--output_dir=gs://b/o",
                                           "--strategy=mirrored"]),
    "k8s-checkpoints-no-list": (GKE_CHECKPOINTS, [*GKE, "--dry-run"]),
    "k8s-checkpoints-missing-list": (GKE_CHECKPOINTS, [*GKE, "--list={missing}", "--dry-run"]),
    "k8s-checkpoints-empty-list": (GKE_CHECKPOINTS, [*GKE, "--list={empty}", "--dry-run"]),
    "k8s-checkpoints-same-basename": (GKE_CHECKPOINTS, [*GKE, "--list={twins}", "--dry-run"]),
    "k8s-checkpoints-no-image": (GKE_CHECKPOINTS, ["--output-root=gs://b/o", "--list={good}",
                                                   "--dry-run"]),
    "k8s-checkpoints-zero-parallelism": (GKE_CHECKPOINTS, [*GKE, "--list={good}",
                                                           "--parallelism=0", "--dry-run"]),
    "k8s-checkpoints-model-passed": (GKE_CHECKPOINTS, [*GKE, "--list={good}", "--dry-run",
                                                       "--model=m.keras"]),
    "slurm-zero-nodes": (SLURM_SUBMIT, ["--nodes=0", "--dry-run"]),
    "slurm-negative-gpus": (SLURM_SUBMIT, ["--gpus-per-node=-1", "--dry-run"]),
    "slurm-bad-cluster": (SLURM_SUBMIT, ["--cluster=mpi", "--dry-run"]),
    "slurm-strategy-passed": (SLURM_SUBMIT, ["--dry-run", "--strategy=mirrored"]),
    "slurm-sbatch-arg-not-an-option": (SLURM_SUBMIT, ["--sbatch-arg=exclusive", "--dry-run"]),
    # A misspelt launcher option (--gpus-per-node) would reach the binary in the job.
    "slurm-misspelt-option": (SLURM_SUBMIT, ["--dry-run", "--nodes=2", "--gpu-per-node", "4",
                                             "--", "--model=m.keras"]),
    "tfjob-misspelt-option": (GKE_SUBMIT, ["--image=i", "--dry-run", "--worker-count=2",
                                           "--output_dir=gs://b/o"]),
    "array-no-list": (SLURM_CHECKPOINTS, ["--dry-run"]),
    "array-missing-list": (SLURM_CHECKPOINTS, ["--list={missing}", "--dry-run"]),
    "array-empty-list": (SLURM_CHECKPOINTS, ["--list={empty}", "--dry-run"]),
    "array-same-basename": (SLURM_CHECKPOINTS, ["--list={twins}", "--dry-run"]),
    "array-zero-parallel": (SLURM_CHECKPOINTS, ["--list={good}", "--max-parallel=0",
                                                "--dry-run"]),
    "sbatch-outside-slurm": (SPECTRUM_SBATCH, ["--model=m.keras"]),
    "array-task-outside-array": (CHECKPOINTS_SBATCH, ["--list={good}", "--output-root=o"]),
    "array-task-empty-list": (CHECKPOINTS_SBATCH, ["--list={empty}", "--output-root=o"]),
}


def test_a_misspelt_option_is_named_and_a_dashed_value_passes(launcher):
    result = launcher.run(SLURM_SUBMIT, "--dry-run", "--nodes=2", "--gpu-per-node", "4", "--",
                          "--model=m.keras", check=False)
    assert result.returncode == 2
    assert result.stderr.startswith("submit.sh: error: --gpu-per-node: no launcher option")
    # The value of a flag given without `=` may start with dashes.
    result = launcher.run(SLURM_SUBMIT, "--dry-run", "--nodes=2", "--", "--model=m.keras",
                          "--variables", "--a-b", check=False)
    assert result.returncode == 0, result.stderr
    assert "--variables --a-b" in result.stdout


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_fails_with_one_line(launcher, tmp_path, case):
    lists = {
        "empty": write_list(tmp_path, "\n# only a comment\n   \n", "empty.txt"),
        "good": write_list(tmp_path, "a/x.keras\nb/y.keras\n", "good.txt"),
        "twins": write_list(tmp_path, "run1/model.keras\nrun2/model.keras\n", "twins.txt"),
        "missing": tmp_path / "missing.txt",
    }
    script, args = BAD_INPUTS[case]
    env = {"SLURM_ARRAY_TASK_ID": "0"} if case == "array-task-empty-list" else None
    result = launcher.run(script, *(a.format(**lists) for a in args), env=env, check=False)
    assert result.returncode != 0
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert "error:" in result.stderr
    assert result.stdout == ""
    assert launcher.calls() == []


# --- the template renderer ---------------------------------------------------------


def test_render_refuses_a_missing_value_and_indents_blocks(tmp_path):
    render = [sys.executable, str(LAUNCH / "lib" / "render.py")]
    template = tmp_path / "t.yaml"
    template.write_text("a: ${A}\nb: |\n  ${B}\nc: ${C|json}\nargs: ${ARGS}\nshell: ${lower}\n")
    result = subprocess.run([*render, template, "A=1", "B=x\ny", 'C=say "hi"', "--", "-v", "w z"],
                            capture_output=True, text=True, check=True)
    assert yaml.safe_load(result.stdout) == {"a": 1, "b": "x\ny\n", "c": 'say "hi"',
                                             "args": ["-v", "w z"], "shell": "${lower}"}
    result = subprocess.run([*render, template, "A=1"], capture_output=True, text=True)
    assert result.returncode == 2 and "no value for B, C" in result.stderr
