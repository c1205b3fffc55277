"""The `newsgroups-lstm` command: help, exit codes, config mapping, inspect output."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest

from flows.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE, main
from storage.files import read_config_file
from tasks.config import build_config
from tests.flows.conftest import REPO_ROOT, tiny_config_dict


@pytest.mark.parametrize("command", [[], ["run"], ["data"], ["inspect"], ["predict"]])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == EXIT_OK
    assert "usage: newsgroups-lstm" in capsys.readouterr().out


def test_console_script_runs_help():
    script = REPO_ROOT / ".venv" / "bin" / "newsgroups-lstm"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "flows.cli"]
    done = subprocess.run([*cmd, "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "inspect" in done.stdout


@pytest.mark.parametrize("argv", [["frobnicate"], ["run", "--until", "nowhere"], ["run", "train.epochs=many"],
                                  ["run", "no_such_section.x=1"], ["run", "train.epochs"], ["run", "-c", "missing.toml"],
                                  ["sweep", "--grid", "train.lstm_units"], ["sweep", "--grid", "missing.toml"],
                                  ["sweep", "--grid", "train.no_such_field=1,2"], ["sweep", "--seeds", "0"],
                                  ["sweep", "--grid", "train.seed=1,2"]])
def test_usage_and_config_errors_exit_2_with_one_line(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own usage errors
        code = exc.code
    assert code == EXIT_USAGE
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip()


def test_config_precedence_preset_then_file_then_overrides(tmp_path):
    file = tmp_path / "cfg.toml"
    file.write_text('[train]\nepochs = 4\nbatch_size = 16\n[tokenize]\nmax_length = 100\n')
    cfg = build_config([read_config_file(str(file))], ["train.epochs=2", "corpus.strip=headers,quotes", "sources.corpus=news20"],
                       preset="seed", data_home=str(tmp_path / "h"))
    assert cfg.train.preset == "seed" and cfg.train.architecture == "lstm_last"  # from the preset
    assert cfg.tokenize.num_words == 20_000  # the seed preset's tokenizer setting
    assert cfg.train.batch_size == 16 and cfg.tokenize.max_length == 100  # the file beats the preset
    assert cfg.train.epochs == 2  # KEY=VALUE beats the file
    assert cfg.corpus.strip == ("headers", "quotes") and cfg.sources.corpus == "news20"
    assert cfg.data_home == str(tmp_path / "h")


@pytest.mark.usefixtures("prefect_api")
def test_data_then_inspect_then_a_failing_run(tiny_sources, home, tmp_path, capsys):
    config = tmp_path / "cfg.json"
    config.write_text(json.dumps(tiny_config_dict(tiny_sources, home)))

    assert main(["data", "-c", str(config)]) == EXIT_OK
    out = capsys.readouterr().out
    assert "cache hits: 0/4" in out and "corpus" in out and home in out

    assert main(["inspect", "--data-home", home]) == EXIT_OK
    listing = capsys.readouterr().out
    for step in ("download", "corpus", "glove"):
        assert step in listing
    corpus_key = next(line.split()[1] for line in listing.splitlines() if line.startswith("corpus "))

    assert main(["inspect", f"corpus/{corpus_key[:8]}", "--data-home", home, "--rows", "2"]) == EXIT_OK
    shown = capsys.readouterr().out
    assert '"step": "corpus"' in shown and "documents.parquet: 180 rows" in shown and "doc_id: string" in shown

    assert main(["inspect", "--lineage", f"corpus/{corpus_key}", "--data-home", home]) == EXIT_OK
    assert "└── download/" in capsys.readouterr().out

    assert main(["inspect", "train/nothing", "--data-home", home]) == EXIT_USAGE

    # A pipeline failure: exit 1, one line naming the problem, no traceback.
    bad = tiny_config_dict(tiny_sources, home)
    bad["sources"]["corpus_source"]["sha256"] = "0" * 64
    bad["sources"]["corpus_source"]["url"] += "?changed"  # not the cached download
    config.write_text(json.dumps(bad))
    assert main(["data", "-c", str(config)]) == EXIT_FAILED
    err = capsys.readouterr().err
    assert "checksum mismatch" in err and "Traceback" not in err


@pytest.mark.usefixtures("prefect_api")
def test_run_prints_metrics_then_predict_classifies_text(tiny_sources, home, tmp_path, capsys, monkeypatch):
    config = tmp_path / "cfg.json"
    config.write_text(json.dumps(tiny_config_dict(tiny_sources, home)))
    assert main(["run", "-c", str(config)]) == EXIT_OK
    out = capsys.readouterr().out
    assert "accuracy:" in out and "macro-F1:" in out and "cache hits: 0/8" in out

    assert main(["predict", "rocket launch orbit", "senate vote", "--data-home", home, "--json", "--top", "2"]) \
        == EXIT_OK
    result = json.loads(capsys.readouterr().out)
    assert result["run"].startswith("train/") and len(result["predictions"]) == 2
    for prediction in result["predictions"]:
        assert prediction["label"] in {"rec.autos", "sci.space", "talk.politics"}
        assert len(prediction["top"]) == 2 and prediction["top"][0]["label"] == prediction["label"]

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"car engine\nmoon comet\n")))
    assert main(["predict", "-", "--lines", "--data-home", home]) == EXIT_OK
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and all(line.split("\t")[0] in {"rec.autos", "sci.space", "talk.politics"} for line in lines)

    # a file longer than one prediction chunk: every non-blank line classified, in order, as one JSON document
    many = ["car engine", "", "moon comet"] * 2100
    (tmp_path / "many.txt").write_text("\n".join(many) + "\n")
    assert main(["predict", "--file", str(tmp_path / "many.txt"), "--lines", "--json", "--data-home", home]) == EXIT_OK
    streamed = json.loads(capsys.readouterr().out)["predictions"]
    assert [p["text"] for p in streamed] == [t for t in many if t]
    assert {p["label"] for p in streamed[0::2]} == {lines[0].split("\t")[0]}  # same text, same label

    assert main(["predict", "--run", "corpus/", "text", "--data-home", home]) == EXIT_USAGE
    _binary_input_is_read_the_same_way_on_every_path_and_never_echoed_raw(home, tmp_path)


def _binary_input_is_read_the_same_way_on_every_path_and_never_echoed_raw(home: str, tmp_path) -> None:
    """The same bytes as an argument, a file and stdin (in a real process: argv holds raw bytes)."""
    data = b"rocket \xff\xfe orbit \x1b]0;owned\x07 launch \x1b[2J\r\nmoon \xc3"
    (tmp_path / "binary.txt").write_bytes(data)
    done = subprocess.run([sys.executable, "-m", "flows.cli", "predict", data, "-", "--file", str(tmp_path / "binary.txt"),
                           "--data-home", home], input=data, capture_output=True, timeout=120, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    lines = done.stdout.decode().strip().splitlines()
    assert len(lines) == 3 and len(set(lines)) == 1  # label, probabilities and snippet: identical
    assert b"\x1b" not in done.stdout and b"\x07" not in done.stdout and "\\x1b]0;owned\\x07" in lines[0]
    assert "\ufffd" in lines[0]  # undecodable bytes shown as U+FFFD


@pytest.mark.parametrize("argv", [["--debug", "inspect"], ["inspect", "--debug"]])
def test_debug_flag_is_accepted_before_or_after_the_command(argv):
    from flows.cli import build_parser

    assert build_parser().parse_args(argv).debug is True


@pytest.mark.parametrize("override, field, why", [
    ("train.epochs=true", "train.epochs", "valid integer (got True)"),
    ("corpus.max_extracted_bytes=-1", "corpus.max_extracted_bytes", "greater than or equal to 1 (got -1)"),
    ("train.batch_size=0", "train.batch_size", "greater than or equal to 1 (got 0)"),
    ('train.epochs="3"', "train.epochs", "valid integer (got '3')"),
    ("tokenize.lower=1", "tokenize.lower", "valid boolean (got 1)"),
    ("train.learning_rate=Infinity", "train.learning_rate", "finite number"),
    ("corpus.max_document_bytes=1.5", "corpus.max_document_bytes", "valid integer (got 1.5)"),
])
def test_config_values_are_strict_and_bounded_exit_2_naming_the_field(override, field, why, capsys):
    code = main(["run", override, "--until", "data"])
    err = capsys.readouterr().err.strip()
    assert code == EXIT_USAGE and err.count("\n") == 0, err
    assert err.startswith("newsgroups-lstm: error: invalid configuration: ") and f"{field}: " in err and why in err


@pytest.mark.parametrize("args, stdin", [
    ([""], None), (["   \n\t"], None), (["-"], b""), (["-"], b" \n "), (["--file", "EMPTY"], None),
    (["--file", "EMPTY", "--lines"], None), (["-", "--lines"], b"\n\n"), (["real text", ""], None),
])
def test_predict_with_nothing_to_classify_exits_2(args, stdin, tmp_path, monkeypatch, capsys):
    (tmp_path / "empty.txt").write_bytes(b"")
    args = [str(tmp_path / "empty.txt") if a == "EMPTY" else a for a in args]
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
    assert main(["predict", *args, "--data-home", str(tmp_path / "no-home")]) == EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert err.startswith("newsgroups-lstm: error: nothing to classify") and "\n" not in err


def test_predict_reads_stdin_lines_as_they_are_classified_not_whole(monkeypatch):
    """The input side of `predict -` is a stream: the first text comes after one line is read."""
    from flows.cli import _texts, build_parser

    pulled = []

    class Stdin:
        def isatty(self):
            return False

        @property
        def buffer(self):
            return self

        def __iter__(self):
            for i in range(1_000_000):
                pulled.append(i)
                yield f"text {i}\n".encode()

    monkeypatch.setattr(sys, "stdin", Stdin())
    texts = _texts(build_parser().parse_args(["predict", "-", "--lines"]))
    assert [next(texts), next(texts)] == ["text 0", "text 1"] and len(pulled) == 2
