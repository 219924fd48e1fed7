"""configurator.configure, rule by rule, on a small script of settings (in process: no model, no subprocess)."""

import subprocess
import sys
import textwrap

import pytest

from configurator import configure

SCRIPT = '''\
"""A script with one setting of each kind."""
name: str = 'gpt2'  # which model
temperature: float = 0.8  # randomness
top_k: int | None = 200  # keep the k likeliest
top_p: float | None = None  # nucleus
count: int = 10  # how many
flag: bool = False  # a switch
helper = 3  # not annotated: not a setting
'''


@pytest.fixture
def settings(tmp_path) -> dict:
    """The script's globals after running it, as configure sees them when the script calls it."""
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    config = {"__file__": str(script), "__doc__": "A script with one setting of each kind."}
    exec(SCRIPT, config)
    return config


def fails(config: dict, argv: list, capsys) -> str:
    """configure must exit with status 2 and a one-line message, no traceback; the message."""
    with pytest.raises(SystemExit) as exit_info:
        configure(config, argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1
    return err


def test_overrides_read_literals_else_strings(settings):
    configure(settings, ["--count=3", "--temperature=0.5", "--name=gpt2-xl", "--flag=True"])
    assert (settings["count"], settings["temperature"], settings["name"], settings["flag"]) == (3, 0.5, "gpt2-xl", True)


def test_value_with_equals_sign(settings):
    configure(settings, ["--name=a=b=c"])
    assert settings["name"] == "a=b=c"


def test_string_setting_keeps_text_that_looks_like_a_literal(settings):
    configure(settings, ["--name=42"])
    assert settings["name"] == "42"
    configure(settings, ["--name=None"])  # not optional: the text itself
    assert settings["name"] == "None"
    configure(settings, ["--name='quoted'"])
    assert settings["name"] == "quoted"


def test_int_accepted_for_float(settings):
    configure(settings, ["--temperature=1"])
    assert settings["temperature"] == 1.0 and isinstance(settings["temperature"], float)


def test_none_for_optional_settings(settings):
    configure(settings, ["--top_k=None", "--top_p=0.9"])
    assert settings["top_k"] is None and settings["top_p"] == 0.9
    configure(settings, ["--top_p=None"])
    assert settings["top_p"] is None


@pytest.mark.parametrize("text,value", [("True", True), ("False", False), ("true", True), ("false", False),
                                        ("1", True), ("0", False)])
def test_bool_spellings(settings, text, value):
    settings["flag"] = not value
    configure(settings, [f"--flag={text}"])
    assert settings["flag"] is value


def test_bare_flag_sets_a_bool(settings):
    configure(settings, ["--flag"])
    assert settings["flag"] is True


def test_later_arguments_win(settings):
    configure(settings, ["--count=1", "--count=2"])
    assert settings["count"] == 2


def test_unknown_key_lists_close_matches(settings, capsys):
    err = fails(settings, ["--temprature=1"], capsys)
    assert "unknown setting 'temprature'" in err and "--temperature" in err


def test_unknown_key_without_close_match_lists_all(settings, capsys):
    err = fails(settings, ["--zzz=1"], capsys)
    assert "name, temperature, top_k, top_p, count, flag" in err


def test_unannotated_global_is_not_a_setting(settings, capsys):
    assert "unknown setting 'helper'" in fails(settings, ["--helper=4"], capsys)


@pytest.mark.parametrize("arg,expected", [
    ("--count=1.5", "count expects an int, got '1.5'"),
    ("--count=None", "count expects an int, got 'None'"),
    ("--count=True", "count expects an int, got 'True'"),
    ("--temperature=hot", "temperature expects a float, got 'hot'"),
    ("--temperature=None", "temperature expects a float, got 'None'"),
    ("--top_k=many", "top_k expects an int or None, got 'many'"),
    ("--flag=yes", "flag expects a bool (True/False/true/false/1/0), got 'yes'"),
    ("--flag=2", "flag expects a bool (True/False/true/false/1/0), got '2'"),
])
def test_wrong_type_names_key_type_and_value(settings, capsys, arg, expected):
    assert expected in fails(settings, [arg], capsys)


def test_value_missing(settings, capsys):
    assert "--count needs a value" in fails(settings, ["--count"], capsys)


def test_setting_without_dashes(settings, capsys):
    assert "write it as --count=3" in fails(settings, ["count=3"], capsys)


def test_config_file_runs_as_python(settings, tmp_path):
    config_file = tmp_path / "conf.py"
    config_file.write_text("import math\n_base = 2\ncount = _base * 3\ntemperature = 1\ntop_k = None\n"
                           "name = 'from-file'\n")
    configure(settings, [str(config_file), "--count=7"])  # in order: the override comes after the file
    assert (settings["count"], settings["temperature"], settings["top_k"], settings["name"]) == \
        (7, 1.0, None, "from-file")
    assert "math" not in settings and "_base" not in settings


def test_config_file_sees_current_values(settings, tmp_path):
    config_file = tmp_path / "conf.py"
    config_file.write_text("count = count * 2\n")
    configure(settings, ["--count=4", str(config_file)])
    assert settings["count"] == 8


@pytest.mark.parametrize("body,expected", [
    ("temprature = 0.5\n", "unknown setting 'temprature': did you mean --temperature?"),
    ("count = 'many'\n", "count expects an int, got 'many'"),
    ("count = (1, 2)\n", "count expects an int, got (1, 2)"),
    ("count = (\n", "SyntaxError"),
    ("x = 1\ncount = undefined_name\n", "line 2: NameError"),
])
def test_bad_config_file(settings, capsys, tmp_path, body, expected):
    config_file = tmp_path / "conf.py"
    config_file.write_text(body)
    assert expected in fails(settings, [str(config_file)], capsys)


def test_missing_config_file(settings, capsys, tmp_path):
    err = fails(settings, [str(tmp_path / "nope.py")], capsys)
    assert "cannot read config file" in err and "No such file" in err


def test_help_lists_every_setting_with_default_and_comment(settings, capsys):
    with pytest.raises(SystemExit) as exit_info:
        configure(settings, ["--count=3", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("A script with one setting of each kind.")
    for line in ["--name='gpt2'", "which model", "--temperature=0.8", "randomness", "--top_k=200",
                 "keep the k likeliest", "--top_p=None", "nucleus", "--flag=False", "a switch"]:
        assert line in out
    assert "helper" not in out


def test_sample_py_help_and_errors_end_to_end(root_dir):
    """Through the real script: --help lists sample.py's settings; a mistake exits 2 before torch is imported."""
    run = subprocess.run([sys.executable, "sample.py", "--help"], cwd=root_dir, capture_output=True, text=True)
    assert run.returncode == 0
    for key in ["init_from", "start", "num_samples", "max_new_tokens", "temperature", "top_k", "top_p",
                "stop_at_eot", "seed", "device", "dtype", "compile", "stream", "tiktoken_file"]:
        assert f"--{key}=" in run.stdout
    run = subprocess.run([sys.executable, "sample.py", "--top_k=ten"], cwd=root_dir, capture_output=True, text=True)
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr == textwrap.dedent("""\
        sample.py: error: top_k expects an int or None, got 'ten'
        """)
