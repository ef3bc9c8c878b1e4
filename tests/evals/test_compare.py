"""python -m bupo.evals.compare on synthetic run folders: t quantiles, hand-computed intervals, label grouping, partial
runs, a partially written last line, and the one-line errors."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from bupo.evals import compare as cli

T975 = {1: 12.706204736, 2: 4.302652730, 3: 3.182446305, 4: 2.776445105, 9: 2.262157163, 30: 2.042272456,
        1000: 1.962339081}  # published two-sided 95% critical values


def write_run(d, seed, s_inter, rewards, *, lr=1e-6, extra_lines=""):
    """A run folder as python -m bupo.train leaves it: nested config.json and one metrics record per step."""
    d.mkdir(parents=True)
    cfg = {"bupo": {"iterative_steps": s_inter, "internal_layer": 5}, "optim": {"lr": lr},
           "trainer": {"seed": seed, "out_dir": str(d), "total_steps": len(rewards), "threads": seed + 1}}
    (d / "config.json").write_text(json.dumps(cfg, indent=1))
    recs = [{"step": i + 1, "phase": "internal" if i < s_inter else "full", "reward_mean": r, "accuracy": r / 2,
             "entropy": float("nan") if i == 0 else 1.0 + r, "response_len_mean": 100.0 + 10 * r}
            for i, r in enumerate(rewards)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in recs) + extra_lines)
    return d


@pytest.fixture
def two_groups(tmp_path):
    """BuPO (s_inter=2) seeds 0-2 and GRPO seeds 0-1, 6 steps each; reward of run = base + step / 10."""
    bupo = [write_run(tmp_path / f"bupo{s}", s, 2, [b + i / 10 for i in range(1, 7)]) for s, b in
            enumerate((0.1, 0.2, 0.3))]
    grpo = [write_run(tmp_path / f"grpo{s}", s, 0, [b + i / 10 for i in range(1, 7)]) for s, b in
            enumerate((0.0, 0.4))]
    return bupo, grpo


@pytest.mark.parametrize("df", sorted(T975))
def test_t_quantile_matches_tables(df):
    assert cli.t_quantile(0.975, df) == pytest.approx(T975[df], abs=2e-9)


@pytest.mark.parametrize("p", [0.6, 0.9, 0.975, 0.999])
def test_t_quantile_closed_forms_and_noninteger_df(p):
    assert cli.t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-9)
    assert cli.t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-9)
    df = 3.7  # Welch df are not integers: integrate the t density up to the quantile
    q = cli.t_quantile(p, df)
    x = np.linspace(0, q, 200001)
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    pdf = c * (1 + x * x / df) ** (-(df + 1) / 2)
    assert 0.5 + np.trapezoid(pdf, x) == pytest.approx(p, abs=1e-8)


def test_intervals_match_hand_computation(two_groups, tmp_path):
    bupo, grpo = two_groups
    res = cli.main([*map(str, bupo + grpo), "--out", str(tmp_path / "cmp"), "--window", "3"])
    assert res["label_keys"] == ["bupo.iterative_steps"]  # seed, out_dir, total_steps, threads are ignored
    a, b = res["groups"]["bupo.iterative_steps=2"], res["groups"]["bupo.iterative_steps=0"]
    assert a["phase_one_steps"] == [1, 2] and b["phase_one_steps"] == []
    # step 1, BuPO: rewards 0.2, 0.3, 0.4 -> mean 0.3, sd 0.1, half-width t_{.975,2} * 0.1 / sqrt(3)
    s1 = a["per_step"]["reward_mean"][0]
    half = T975[2] * 0.1 / math.sqrt(3)
    assert (s1["n"], s1["mean"], s1["lo"], s1["hi"]) == pytest.approx((3, 0.3, 0.3 - half, 0.3 + half))
    # GRPO: step 1 rewards 0.1, 0.5 -> sd 0.2 sqrt(2)... via its definition
    g1 = b["per_step"]["reward_mean"][0]
    sd = math.sqrt(((0.1 - 0.3) ** 2 + (0.5 - 0.3) ** 2) / 1)
    assert g1["lo"] == pytest.approx(0.3 - T975[1] * sd / math.sqrt(2))
    # entropy is NaN at step 1 in every run: no mean there, finite steps are unaffected
    assert a["per_step"]["entropy"][0]["n"] == 0 and a["per_step"]["entropy"][1]["mean"] == pytest.approx(1.4)
    # windows 1-3, 4-6, all 1-6; BuPO window 1-3 run means 0.3, 0.4, 0.5
    w = a["windows"]["reward_mean"][0]
    assert [x["steps"] for x in a["windows"]["reward_mean"]] == ["1-3", "4-6", "all 1-6"]
    assert w["run_means"] == pytest.approx([0.3, 0.4, 0.5]) and w["mean"] == pytest.approx(0.4)
    # difference GRPO - BuPO over 1-3: run means a = .3 .4 .5, b = .2 .6 (Welch)
    d = next(x for x in res["differences"] if x["metric"] == "reward_mean" and x["steps"] == "1-3")
    va, vb = 0.01 / 3, 0.08 / 2
    df = (va + vb) ** 2 / (va ** 2 / 2 + vb ** 2 / 1)
    half = cli.t_quantile(0.975, df) * math.sqrt(va + vb)
    assert d["group"] == "bupo.iterative_steps=0" and d["baseline"] == "bupo.iterative_steps=2"
    assert (d["diff"], d["df"], d["lo"], d["hi"]) == pytest.approx((0.0, df, -half, half))
    out = tmp_path / "cmp"
    assert json.loads((out / "compare.json").read_text())["window"] == 3
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"
    md = (out / "compare.md").read_text()
    assert "| 1-3 | 0.400 [" in md and "Welch" in md


def test_single_seed_reports_no_interval(tmp_path):
    runs = [write_run(tmp_path / "a", 0, 2, [0.1, 0.2]), write_run(tmp_path / "b", 0, 0, [0.3, 0.5]),
            write_run(tmp_path / "c", 1, 0, [0.5, 0.7])]
    res = cli.main([*map(str, runs), "--out", str(tmp_path / "cmp")])
    a = res["groups"]["bupo.iterative_steps=2"]
    assert a["per_step"]["reward_mean"][0] == {"step": 1, "n": 1, "mean": 0.1, "sd": None, "lo": None, "hi": None}
    d = res["differences"][0]
    assert d["diff"] == pytest.approx(0.5 - 0.15) and d["lo"] is None and d["df"] is None
    assert "no interval: n=1" in (tmp_path / "cmp" / "compare.md").read_text()


def test_label_override_and_baseline(two_groups, tmp_path):
    bupo, grpo = two_groups
    extra = write_run(tmp_path / "grpo_lr", 5, 0, [0.5] * 6, lr=1e-5)
    res = cli.main([*map(str, bupo + grpo + [extra]), "--out", str(tmp_path / "c1")])
    assert res["label_keys"] == ["bupo.iterative_steps", "optim.lr"] and len(res["groups"]) == 3
    res = cli.main([*map(str, bupo + grpo + [extra]), "--out", str(tmp_path / "c2"), "--label",
                    "bupo.iterative_steps", "--baseline", "bupo.iterative_steps=0"])
    assert list(res["groups"]) == ["bupo.iterative_steps=2", "bupo.iterative_steps=0"]
    assert len(res["groups"]["bupo.iterative_steps=0"]["runs"]) == 3
    assert {d["group"] for d in res["differences"]} == {"bupo.iterative_steps=2"}
    res = cli.main([*map(str, bupo), "--out", str(tmp_path / "c3")])  # replicates only: one group, no differences
    assert list(res["groups"]) == ["all runs"] and res["differences"] == []


def test_partial_runs_and_incomplete_last_line(tmp_path, capsys):
    full = [write_run(tmp_path / f"f{s}", s, 0, [0.1 * s + 0.1 * i for i in range(6)]) for s in range(2)]
    short = write_run(tmp_path / "short", 2, 0, [0.5, 0.5, 0.5, 0.5],
                      extra_lines='{"step": 5, "phase": "full", "reward_me')  # killed while writing step 5
    with pytest.warns(UserWarning) as caught:
        res = cli.main([*map(str, full + [short]), "--out", str(tmp_path / "cmp"), "--window", "2"])
    assert "truncated last line" in " ".join(str(w.message) for w in caught)
    assert "warning: runs end at different steps: all runs: f0 6, f1 6, short 4" in capsys.readouterr().err
    st = res["groups"]["all runs"]
    assert [r["n"] for r in st["per_step"]["reward_mean"]] == [3, 3, 3, 3, 2, 2]
    assert [w["n"] for w in st["windows"]["reward_mean"]] == [3, 3, 2, 3]  # 1-2, 3-4, 5-6, all 1-4
    assert st["windows"]["reward_mean"][2]["run_means"][2] is None
    assert res["runs"][2]["last_step"] == 4 and res["notes"]


@pytest.mark.parametrize("setup,match", [
    (lambda d: d.mkdir(), "has no metrics.jsonl"),
    (lambda d: None, "does not exist"),
    (lambda d: d.write_text("a log, not a run\n"), "is a file, not a run folder"),  # a glob that caught run.log
    (lambda d: (write_run(d, 0, 0, [0.1]), (d / "config.json").unlink()), "has no config.json"),
    (lambda d: (write_run(d, 0, 0, [0.1]), (d / "metrics.jsonl").write_text("")), "holds no step records"),
    (lambda d: (write_run(d, 0, 0, [0.1]), (d / "metrics.jsonl").write_text('{"step": 1}\n{oops\n{"step": 3}\n')),
     "line 2: not valid JSON"),
    (lambda d: (write_run(d, 0, 0, [0.1]), (d / "metrics.jsonl").write_text('{"step": 1}\n{"step": "2"}\n')),
     "line 2: a record without an integer 'step'"),
])
def test_bad_folder_is_a_value_error(tmp_path, setup, match):
    setup(tmp_path / "run")
    with pytest.raises(ValueError, match=match):
        cli.main([str(tmp_path / "run"), "--out", str(tmp_path / "cmp")])


def test_bad_flags_are_value_errors(two_groups, tmp_path):
    runs = [str(d) for d in two_groups[0]]
    for flags, match in ((["--label", "bupo.nope"], "--label bupo.nope"), (["--baseline", "x"], "not a group"),
                         (["--metrics", "rewrd"], "--metrics rewrd"), (["--window", "0"], "--window=0")):
        with pytest.raises(ValueError, match=match):
            cli.main([*runs, "--out", str(tmp_path / "c"), *flags])


def test_cli_error_line_and_help(tmp_path):
    (tmp_path / "empty").mkdir()
    r = subprocess.run([sys.executable, "-m", "bupo.evals.compare", str(tmp_path / "empty"), "--out",
                        str(tmp_path / "o")], capture_output=True, text=True)
    assert r.returncode != 0 and r.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'empty'} has no metrics.jsonl (give trainer.out_dir folders of bupo train)"]
    r = subprocess.run([sys.executable, "-m", "bupo.evals.compare", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--window" in r.stdout and "--label" in r.stdout


def _records(d, recs):
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))


def test_a_nonfinite_value_takes_the_run_out_of_that_window_and_is_said(tmp_path, capsys):
    runs = [write_run(tmp_path / f"r{s}", s, 0, [0.1 * s + 0.1 * i for i in range(6)]) for s in range(3)]
    recs = [json.loads(x) for x in (runs[0] / "metrics.jsonl").read_text().splitlines()]
    recs[3]["reward_mean"] = float("nan")  # step 4
    recs[4]["reward_mean"] = "0.5"  # step 5: a string is not a number either
    _records(runs[0], recs)
    res = cli.main([*map(str, runs), "--out", str(tmp_path / "c"), "--window", "3"])
    w = res["groups"]["all runs"]["windows"]["reward_mean"]
    assert [x["steps"] for x in w] == ["1-3", "4-6", "all 1-6"] and [x["n"] for x in w] == [3, 2, 2]
    assert w[1]["run_means"][0] is None
    assert f"warning: {runs[0]}: reward_mean is not a finite number at steps [4, 5]" in capsys.readouterr().err


def test_steps_all_runs_skip_are_left_out_of_the_windows_and_gaps_are_named(tmp_path, capsys):
    runs = [write_run(tmp_path / f"r{s}", s, 0, [0.1 * s + 0.1 * i for i in range(6)]) for s in range(2)]
    for d in runs:  # both runs log every second step only
        _records(d, [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()][::2])
    res = cli.main([*map(str, runs), "--out", str(tmp_path / "c"), "--window", "2"])
    w = res["groups"]["all runs"]["windows"]["reward_mean"]
    assert [x["n"] for x in w] == [2, 2, 2, 2]  # 1-2, 3-4, 5-5 (last step 5), all 1-5: the logged steps count
    assert w[0]["run_means"] == pytest.approx([0.0, 0.1])
    assert f"warning: {runs[0]}: steps [2, 4] are missing" in capsys.readouterr().err


def test_repeated_steps_and_steps_below_one_are_said(tmp_path, capsys):
    runs = [write_run(tmp_path / f"r{s}", s, 0, [0.1, 0.2, 0.3]) for s in range(2)]
    recs = [json.loads(x) for x in (runs[0] / "metrics.jsonl").read_text().splitlines()]
    _records(runs[0], [dict(recs[0], step=0), *recs[:2], dict(recs[1], reward_mean=0.9), recs[2]])
    res = cli.main([*map(str, runs), "--out", str(tmp_path / "c"), "--window", "3"])
    assert res["groups"]["all runs"]["windows"]["reward_mean"][0]["run_means"][0] == pytest.approx(
        (0.1 + 0.9 + 0.3) / 3)  # the last record of step 2 is used; step 0 is in no window
    err = capsys.readouterr().err
    assert f"{runs[0]}: steps [2] are logged more than once; the last record of each is used" in err
    assert f"{runs[0]}: records with step < 1 ([0]) are in no window" in err


def test_a_label_that_merges_different_settings_is_said(two_groups, tmp_path, capsys):
    bupo, grpo = two_groups
    res = cli.main([*map(str, bupo + grpo), "--out", str(tmp_path / "c"), "--label", "optim.lr"])
    assert list(res["groups"]) == ["optim.lr=1e-06"]
    assert ("group 'optim.lr=1e-06' mixes runs whose settings differ in bupo.iterative_steps"
            in capsys.readouterr().err)


def test_name_lists_are_trimmed_and_deduplicated(two_groups, tmp_path):
    bupo, grpo = two_groups
    res = cli.main([*map(str, bupo + grpo), "--out", str(tmp_path / "c"), "--label",
                    " bupo.iterative_steps , bupo.iterative_steps", "--metrics", "reward_mean, entropy,reward_mean"])
    assert res["label_keys"] == ["bupo.iterative_steps"] and res["metrics"] == ["reward_mean", "entropy"]
    for flags, match in ((["--label", ","], "--label=',' names nothing"),
                         (["--metrics", " , "], "--metrics=' , ' names nothing"),
                         (["--metrics", "phase"], "--metrics phase: no run has a finite number"),
                         (["--level", "1e-17"], r"--level=1e-17: must be in \[0.5, 0.9999\]"),
                         (["--level", "0.9999999999999999"], "must be in"), (["--level", "0.3"], "must be in")):
        with pytest.raises(ValueError, match=match):
            cli.main([*map(str, bupo + grpo), "--out", str(tmp_path / "c2"), *flags])
    with pytest.raises(ValueError, match=rf"run folder {bupo[0]}/ is given twice \(also as {bupo[0]}\)"):
        cli.main([str(bupo[0]), str(bupo[1]), f"{bupo[0]}/", "--out", str(tmp_path / "c3")])


def test_level_is_written_as_given_and_one_run_is_singular(two_groups, tmp_path):
    bupo, _ = two_groups
    cli.main([*map(str, bupo), "--out", str(tmp_path / "c"), "--level", "0.995"])
    assert "[99.5% Student t-interval]" in (tmp_path / "c" / "compare.md").read_text()
    cli.main([str(bupo[0]), "--out", str(tmp_path / "c1")])
    assert (tmp_path / "c1" / "compare.md").read_text().startswith("# Run comparison: 1 run in 1 group\n")


def test_usage_errors_are_one_line(tmp_path):
    for args in ([], ["x"], ["x", "--out", str(tmp_path), "--window", "2.5"]):
        r = subprocess.run([sys.executable, "-m", "bupo.evals.compare", *args], capture_output=True, text=True)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr
        assert lines[0].endswith("(see python -m bupo.evals.compare --help)")


def test_a_stray_far_step_adds_one_window_and_step_zero_alone_is_an_error(tmp_path):
    runs = [write_run(tmp_path / f"r{s}", s, 0, [0.1 * s + 0.1 * i for i in range(6)]) for s in range(2)]
    with open(runs[0] / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 10**8, "reward_mean": 0.5}) + "\n")
    res = cli.main([*map(str, runs), "--out", str(tmp_path / "c"), "--window", "5"])
    assert [w["steps"] for w in res["groups"]["all runs"]["windows"]["reward_mean"]] == ["1-5", "6-10",
                                                                                          "99999996-100000000",
                                                                                          "all 1-6"]
    lone = tmp_path / "zero"
    write_run(lone, 0, 0, [0.1])
    _records(lone, [{"step": 0, "reward_mean": 0.1}])
    with pytest.raises(ValueError, match="no run has a record with step >= 1"):
        cli.main([str(lone), "--out", str(tmp_path / "c2"), "--metrics", "reward_mean"])


def test_missing_steps_of_a_stray_far_step_are_found_without_listing_them(tmp_path, capsys):
    """A stray step of 10^12 once made compare build the set of every step up to it (9 GB at 10^8)."""
    run = write_run(tmp_path / "r", 0, 0, [0.1, 0.2, 0.3])
    _records(run, [{"step": s, "reward_mean": 0.1} for s in (1, 2, 4, 10**12)])
    cli.main([str(run), "--out", str(tmp_path / "c"), "--window", "5", "--metrics", "reward_mean"])
    assert f"{run}: steps [3, 5, 6, 7, 8, 9, 10, 11]... are missing ({10**12 - 4} in all)" in capsys.readouterr().err


def test_labels_with_table_and_math_characters_are_drawn_and_tabulated(tmp_path):
    runs = []
    for s, tpl in enumerate(["{{ m|first }}`x`", "cost $\\frac$ | $y$"]):
        d = write_run(tmp_path / f"r{s}", s, 0, [0.1, 0.2, 1e308])
        cfg = json.loads((d / "config.json").read_text())
        cfg["data"] = {"chat_template": tpl}
        (d / "config.json").write_text(json.dumps(cfg))
        runs.append(d)
    res = cli.main([*map(str, runs), "--out", str(tmp_path / "c"), "--window", "3"])
    md = (tmp_path / "c" / "compare.md").read_text()
    for line in md.splitlines():
        if line.startswith("| steps"):  # steps, two groups, one difference: 4 cells once '\|' is set aside
            assert len(line.replace("\\|", "").split("|")) == 6, line
    assert (tmp_path / "c" / "compare.png").read_bytes()[:4] == b"\x89PNG"
    json.loads((tmp_path / "c" / "compare.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert res["groups"]
