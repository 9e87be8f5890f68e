"""The command lines a user types: `--help` and a mistyped flag answer without importing the heavy libraries, and
every command the README shows parses as written."""

import importlib.util
import re
import shlex
import subprocess
import sys

import pytest
from helpers import REPO, subprocess_env

ENTRY_POINTS = [["train_text_to_image.py"], ["metrics.py"], ["gradio_app.py"], ["-m", "sdtune.batch"]]
HEAVY = ["torch", "diffusers", "transformers", "gradio", "accelerate"]

# Runs an entry point as `python ...` would, once per argument (each a string of words), and reports after each
# run which heavy libraries the process has imported so far and how it exited. One process per entry point: its
# `--help` and its bad flag, each imported-so-far list covering everything before it (a heavy import by `--help`
# shows in both reports, so it cannot hide).
PROBE = """
import runpy, sys
entry, runs = sys.argv[1:3], sys.argv[3:]
for args in runs:
    sys.argv = [entry[-1]] + args.split()
    try:
        if entry[0] == "-m":
            runpy.run_module(entry[1], run_name="__main__", alter_sys=True)
        else:
            runpy.run_path(entry[1], run_name="__main__")
    except SystemExit as exit:
        code = exit.code
    else:
        code = 0
    print("IMPORTED", sorted(name for name in {heavy} if name in sys.modules), "EXIT", code)
""".format(heavy=HEAVY)


def probe(entry: list[str], *runs: str) -> list[tuple[list[str], str]]:
    """(heavy libraries imported, exit code) after each of `runs` (one argument string each), in one process."""
    padded = entry if entry[0] == "-m" else ["", entry[0]]  # always two words: -m module, or "" script
    result = subprocess.run([sys.executable, "-c", PROBE, *padded, *runs], cwd=REPO,
                            env=subprocess_env(), capture_output=True, text=True, timeout=120)
    reports = re.findall(r"IMPORTED (\[.*\]) EXIT (\S+)", result.stdout)
    assert len(reports) == len(runs), result.stderr[-3000:]
    return [(eval(imported), exit_code) for imported, exit_code in reports]  # noqa: S307 -- our own probe's output


@pytest.mark.parametrize("entry", ENTRY_POINTS, ids=lambda entry: entry[-1])
def test_help_and_a_bad_flag_answer_before_the_heavy_imports(entry):
    after_help, after_bad_flag = probe(entry, "--help", "--no_such_flag")
    assert after_help == ([], "0")
    assert after_bad_flag == ([], "2")


@pytest.mark.parametrize("seed", ["-1", str(2**32), "99999999999999999999"])
def test_every_command_refuses_a_seed_outside_the_documented_range(seed, tmp_path):
    from sdtune.batch import cli as batch
    from sdtune.errors import SdtuneError
    from sdtune.evaluation import flags as metrics_flags
    from sdtune.training import config

    parsers = [
        lambda: config.parse_args(["--pretrained_model_name_or_path", "m", "--train_data_dir", str(tmp_path),
                                   "--seed", seed]),
        lambda: metrics_flags.parse_metrics_args(["--seed", seed]),
        lambda: batch.parse_args(["--input", str(tmp_path), "--output", str(tmp_path / "out"), "--seed", seed]),
    ]
    for parse in parsers:
        with pytest.raises(SdtuneError, match="seed must be a whole number from 0 to 4294967295"):
            parse()


def readme_commands() -> list[str]:
    """Every command line of the README's bash blocks, continuation lines joined and comments dropped."""
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    lines = "\n".join(blocks).replace("\\\n", " ").splitlines()
    return [line.split(" #")[0].strip() for line in lines if line.strip() and not line.startswith("#")]


def split(command: str) -> tuple[list[str], dict]:
    """A README command's words after its leading VARIABLE=value assignments, and its environment."""
    words, env = shlex.split(command), subprocess_env()
    while words and "=" in words[0]:
        name, _, value = words.pop(0).partition("=")
        env[name] = value
    return words, env


def script_and_flags(command: str) -> tuple[str, list[str]] | None:
    """The project script a README command runs and the flags it gets, or None for a command that another test or
    CI runs. train.sh runs train_text_to_image.py with the 24 GB recipe first; accelerate launch's own flags are
    the launcher's (test_distributed runs it)."""
    words, _ = split(command)
    if words[:2] == ["bash", "train.sh"]:
        return "train_text_to_image.py", ["--config", "configs/pokemon.yaml", *words[2:]]
    if words[:2] == ["accelerate", "launch"]:
        words = ["python", *words[next(i for i, word in enumerate(words) if word.endswith(".py") or word == "-m"):]]
    if words[0] != "python":
        return None
    script, flags = (words[2], words[3:]) if words[1] == "-m" else (words[1], words[2:])
    return (script, flags) if script in PARSED else None


# the commands whose flags the README test parses; the README's other python commands are run elsewhere: the tiny
# world's data by make demo and test_tinyworld.py, benchmarks and docs' screenshots by hand
PARSED = ("train_text_to_image.py", "metrics.py", "gradio_app.py", "sdtune.batch", "sdtune.caption")


def parse(script: str, flags: list[str]):
    """Parse `flags` as the script's own entry point does, with every check that needs no model or file."""
    from sdtune.app import flags as cli
    from sdtune.batch import cli as batch
    from sdtune.caption import cli as caption
    from sdtune.evaluation import flags as metrics_flags
    from sdtune.training import config

    parsers = {"train_text_to_image.py": config.parse_args, "metrics.py": metrics_flags.parse_metrics_args,
               "gradio_app.py": cli.parse_app_args, "sdtune.batch": batch.build_parser().parse_args,
               "sdtune.caption": caption.build_parser().parse_args}
    return parsers[script](flags)


def test_every_readme_command_is_run_somewhere():
    commands = readme_commands()
    others = [c for c in commands if script_and_flags(c) is None]
    # make test is CI's command; make demo's steps (data, configs/tiny.yaml, metrics.py) run in test_tinyworld.py;
    # huggingface-cli and curl talk to the hub or a running app, which no test can reach offline; sudo installs;
    # ray start makes a cluster of several machines
    run_elsewhere = {"make", "huggingface-cli", "curl", "sudo", "ray"}
    # a command after environment settings (HF_HUB_OFFLINE=1 PYTHONPATH=. python bench/...) is that command
    commands_alone = [re.sub(r"^(\w+=\S*\s+)+", "", c) for c in others]
    assert all(c.split()[0] in run_elsewhere or c.startswith(("python -m tinyworld.", "python bench/", "python docs/"))
               for c in commands_alone), others
    assert len(commands) - len(others) >= 10


@pytest.mark.parametrize("command", [c for c in readme_commands() if script_and_flags(c)])
def test_readme_command_parses_as_written(command, monkeypatch):
    monkeypatch.chdir(REPO)  # recipes and model lists are named relative to the repository, as the README runs them
    # the subject folders a recipe names (dog/) are the user's: their checks read files, which this test leaves out
    monkeypatch.setattr("sdtune.data.subject.instance_images", lambda folder: [])
    monkeypatch.setattr("sdtune.data.subject.class_images", lambda folder, count: [])
    args = parse(*script_and_flags(command))
    assert args is not None


def train_sh_launches() -> dict[str, str]:
    """The README's train.sh commands, one per environment they set (nothing, or an ACCELERATE_CONFIG): {the
    environment's words: the first command with it}. With --help, what a command adds to train.sh is its environment
    (the accelerate config launched): its own flags reach the script's parser, which answers --help before reading
    them, and test_readme_command_parses_as_written parses each command's flags. So one accelerate launch (4 s) per
    environment rather than per command."""
    launches = {}
    for command in readme_commands():
        words, _ = split(command)
        if words[:2] == ["bash", "train.sh"]:
            environment = command[:command.index("bash train.sh")].strip() or "no variables"
            launches.setdefault(environment, command)
    return launches


@pytest.mark.parametrize("command", list(train_sh_launches().values()), ids=list(train_sh_launches()))
def test_readme_train_sh_command_reaches_the_script(command):
    # the shell script and accelerate's config files themselves: the launched script answers --help
    if "deepspeed" in command and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("the README says to pip install deepspeed for this recipe")
    words, env = split(command)
    result = subprocess.run([*words, "--help"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "usage: train_text_to_image.py" in result.stdout
