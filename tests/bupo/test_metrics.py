"""bupo.metrics: metrics.jsonl survives a crash mid-write (a cut last line is dropped with a warning), a damaged line
elsewhere is an error naming the file and the line, and a resume keeps the records up to the restored step."""

import json
import warnings

import pytest

from bupo.metrics import MetricsLogger, jsonl_rows, read_jsonl


def _write(path, records, tail=""):
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)


@pytest.mark.parametrize("tail", ['{"step": 4, "loss": 0.', "{", '{"step": 4, "loss": 0.5}x', "[1]"])
def test_a_cut_last_line_is_dropped_with_a_warning(tmp_path, tail):
    p = tmp_path / "metrics.jsonl"
    _write(p, [{"step": 1}, {"step": 2}, {"step": 3}], tail)
    with pytest.warns(UserWarning, match=f"metrics.jsonl: dropping a truncated last line \\({len(tail)} bytes\\)"):
        assert read_jsonl(p) == [{"step": 1}, {"step": 2}, {"step": 3}]
    assert p.read_text().endswith(tail)  # a plain read leaves the file alone (a live run may be writing it)
    with pytest.warns(UserWarning, match="truncated last line"):
        assert [i for i, _ in jsonl_rows(p, cut_partial=True)] == [1, 2, 3]
    assert p.read_text() == "".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3))


def test_a_whole_last_record_without_its_newline_is_kept(tmp_path):
    p = tmp_path / "metrics.jsonl"
    _write(p, [{"step": 1}, {"step": 2}], '{"step": 3, "loss": 0.5}')
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning: nothing is dropped
        assert read_jsonl(p) == [{"step": 1}, {"step": 2}, {"step": 3, "loss": 0.5}]
        assert p.read_text().endswith("0.5}")  # a plain read leaves the file alone
        assert [i for i, _ in jsonl_rows(p, cut_partial=True)] == [1, 2, 3]
    assert p.read_text().endswith('0.5}\n')  # before appending, the newline is added
    assert read_jsonl(p)[-1] == {"step": 3, "loss": 0.5}


@pytest.mark.parametrize("bad, line, what", [
    ("not json", 2, "not valid JSON"),
    ('{"step": 2, "loss": 0.', 2, "not valid JSON"),  # cut, yet followed by more lines: not a crash's tail
    ("[1, 2]", 2, "not an object"),
    ("7", 2, "not an object"),
    ("\xff\xfe", 2, "not valid JSON"),
])
def test_a_damaged_line_names_the_file_and_the_line(tmp_path, bad, line, what):
    p = tmp_path / "metrics.jsonl"
    p.write_bytes(b'{"step": 1}\n' + bad.encode("latin-1") + b'\n\n{"step": 3}\n')
    with pytest.raises(ValueError, match=f"metrics.jsonl line {line}: {what}"):
        read_jsonl(p)


def test_damaged_last_complete_line_is_an_error_too(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text('{"step": 1}\n{"step": 2\n')  # has its newline: not a write cut short
    with pytest.raises(ValueError, match="line 2"):
        read_jsonl(p)


def test_blank_lines_keep_their_numbers(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text('{"a": 1}\n\n   \n{"a": 2}\n')
    assert jsonl_rows(p) == [(1, {"a": 1}), (4, {"a": 2})]
    assert read_jsonl(tmp_path / "missing.jsonl") == []


@pytest.mark.parametrize("resume_step, kept", [(2, [1, 2]), (4, [1, 2, 3, 4]), (0, [])])
def test_logger_on_resume_keeps_records_up_to_the_step(tmp_path, resume_step, kept):
    p = tmp_path / "metrics.jsonl"
    _write(p, [{"step": s, "loss": s / 10} for s in (1, 2, 3, 4)], tail='{"step": 5, "lo')
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        logger = MetricsLogger(tmp_path, enabled=True, resume_step=resume_step)
    msgs = [str(x.message) for x in w]
    assert any("truncated last line" in m for m in msgs)
    assert any(f"steps {[s for s in (1, 2, 3, 4) if s > resume_step]}" in m for m in msgs) == (resume_step < 4)
    assert [r["step"] for r in read_jsonl(p)] == kept
    logger.log({"step": resume_step + 1, "loss": 0.5})
    logger.close()
    assert [r["step"] for r in read_jsonl(p)] == kept + [resume_step + 1]
    assert not (tmp_path / "metrics.jsonl.tmp").exists()


def test_logger_with_a_damaged_middle_line_stops_and_keeps_the_file(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text('{"step": 1}\n{"st\n{"step": 3}\n')
    before = p.read_bytes()
    with pytest.raises(ValueError, match=r"metrics.jsonl line 2"):
        MetricsLogger(tmp_path, enabled=True, resume_step=3)
    assert p.read_bytes() == before
