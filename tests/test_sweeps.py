"""Every W&B sweep in experiments/sweeps/ gives its runs a command line the CLI accepts, and optimises a metric
the modules log. The command is built the way `wandb agent` builds it (wandb's own create_sweep_command*)."""
import re
from pathlib import Path

import pytest
import yaml
from wandb.sdk.launch.sweeps.utils import create_sweep_command, create_sweep_command_args

from lightning_clipes.cli import cli_main
from lightning_clipes.components.student_factory import available_architectures

REPO = Path(__file__).resolve().parents[1]
SWEEPS = sorted((REPO / "experiments" / "sweeps").glob("*.yaml"))
PATH_VARIABLES = {"VOC_ROOT": "/nowhere/VOC2012", "CLIP_WEIGHTS": "/nowhere/ViT-B-16.pt", "STORE_DIR": "/nowhere/store"}


def load(sweep: Path) -> dict:
    return yaml.safe_load(sweep.read_text())


def sample(spec: dict, which: int) -> object:
    """A value W&B could give a run: values[which] (first or last), or the range's min (which=0) or max."""
    if "values" in spec:
        return spec["values"][which]
    if "value" in spec:
        return spec["value"]
    return spec["min"] if which == 0 else spec["max"]


def agent_command(config: dict, params: dict) -> list[str]:
    """The argv `wandb agent` runs for one run with these parameter values (wandb_agent.py, Agent._command_run)."""
    command = create_sweep_command(list(config["command"]))  # fills ${envvar:NAME} from os.environ
    macros = {**create_sweep_command_args({"args": {k: {"value": v} for k, v in params.items()}}),
              "env": ["/usr/bin/env"], "interpreter": ["python"], "program": [config.get("program", "")]}
    argv = []
    for word in map(str, command):
        argv += macros[word[2:-1]] if word.startswith("${") and word.endswith("}") else [word]
    return argv


def printed_value(config: dict, dotted: str):
    """config value at a CLI key; ``model.arch`` is stored under ``model.init_args.arch`` (subclass mode)."""
    node = config
    for key in dotted.split("."):
        if key not in node and key not in ("init_args", "class_path") and key in node.get("init_args", {}):
            node = node["init_args"]
        node = node[key]
    return node


def logged_metric_patterns() -> list[str]:
    """Regexes of every name the package passes to self.log: f-string fields become a wildcard."""
    patterns = []
    for source in (REPO / "lightning_clipes").rglob("*.py"):
        for name in re.findall(r"self\.log\(\s*f?[\"']([^\"']+)[\"']", source.read_text()):
            parts = re.split(r"\{[^}]*\}", name)
            patterns.append(r"[A-Za-z0-9_]*".join(map(re.escape, parts)))
    return patterns


@pytest.mark.parametrize("sweep", SWEEPS, ids=[s.stem for s in SWEEPS])
def test_sweep_is_well_formed_and_optimises_a_logged_metric(sweep):
    config = load(sweep)
    assert config["method"] in ("grid", "random", "bayes")
    assert config["metric"]["goal"] == "maximize"
    metric = config["metric"]["name"]
    assert metric in ("val/mIoU", "pseudo/mIoU")
    assert any(re.fullmatch(p, metric) for p in logged_metric_patterns()), f"nothing in the package logs {metric}"
    for name, spec in config["parameters"].items():
        assert ("values" in spec) + ("value" in spec) + ("min" in spec and "max" in spec) == 1, name
    assert config["command"][:2] == ["${env}", "clipes"] and config["command"][-1] == "${args}"


def test_student_sweep_metric_is_the_checkpoint_monitor():
    trainer = yaml.safe_load((REPO / "experiments" / "trainer_default.yaml").read_text())
    monitors = {cb["init_args"].get("monitor") for cb in trainer["callbacks"]}
    assert load(REPO / "experiments" / "sweeps" / "student.yaml")["metric"]["name"] in monitors
    archs = load(REPO / "experiments" / "sweeps" / "student.yaml")["parameters"]["model.arch"]["values"]
    assert {a.lower() for a in archs} <= set(available_architectures())


@pytest.mark.parametrize("which", [0, -1], ids=["first", "last"])
@pytest.mark.parametrize("sweep", SWEEPS, ids=[s.stem for s in SWEEPS])
def test_a_sweep_run_command_parses_with_the_cli(sweep, which, monkeypatch, capsys):
    for name, value in PATH_VARIABLES.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(REPO)  # agents run from the repository root: the configs are relative to it
    config = load(sweep)
    params = {name: sample(spec, which) for name, spec in config["parameters"].items()}
    argv = agent_command(config, params)
    assert argv[:2] == ["/usr/bin/env", "clipes"] and not any("${" in word for word in argv), argv
    with pytest.raises(SystemExit) as done:
        cli_main([*argv[2:], "--print_config"])
    out = capsys.readouterr()
    assert done.value.code == 0, out.err[-3000:]
    printed = yaml.safe_load(out.out)
    for name, value in params.items():
        assert printed_value(printed, name) == value, name
    # the agent reads the metric from the run's W&B summary: a run that logs elsewhere is never scored
    loggers = printed["trainer"]["logger"]
    loggers = loggers if isinstance(loggers, list) else [loggers]
    assert any(str(logger.get("class_path", "")).endswith("WandbLogger") for logger in loggers)
    assert all(path in out.out for name, path in PATH_VARIABLES.items() if f"envvar:{name}" in str(config["command"]))
